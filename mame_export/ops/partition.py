"""MaMe and MaRe over a constant partition: which tokens are targets and which merge is
fixed by position (the UNet's 2-D grid, :mod:`mame_export.ops.grid`), not chosen from
the data. Only the weights of each merge come from the data."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mame_export.ops.mame import _check_counts, real_tensors

__all__ = ["Partition", "mame_merge", "mare_restore_partition", "partition"]


@dataclass(frozen=True)
class Partition:
    """Constant split of N tokens into targets (kept) and sources (merged away).

    ``targets``/``sources`` are index lists into the N tokens, both ascending;
    ``inverse`` puts ``cat([targets, sources])`` back into the original order.
    Used where the split is fixed by position (the UNet's 2-D grid).
    """

    n: int
    n_keep: int
    targets: torch.Tensor
    sources: torch.Tensor
    inverse: torch.Tensor

    @property
    def n_sources(self) -> int:
        return self.n - self.n_keep


def _source_positions(n: int, n_src: int) -> list[int]:
    # Evenly spread: the centre of each of n_src equal slices of [0, n).
    return [int((j + 0.5) * n / n_src) for j in range(n_src)]


@functools.lru_cache(maxsize=512)
def _partition_lists(n: int, n_keep: int) -> tuple[tuple[int, ...], ...]:
    """(targets, sources, inverse) as plain index tuples."""
    n_src = n - n_keep
    src = _source_positions(n, n_src) if n_src > 0 else []
    src_set = set(src)
    tgt = [i for i in range(n) if i not in src_set]
    inverse = [0] * n
    for pos, idx in enumerate(tgt + src):
        inverse[idx] = pos
    return tuple(tgt), tuple(src), tuple(inverse)


@torch.compiler.assume_constant_result
def _partition_lists_constant(n: int, n_keep: int) -> tuple[tuple[int, ...], ...]:
    return _partition_lists(n, n_keep)


def _as_partition(n: int, n_keep: int, device: str) -> Partition:
    tgt, src, inverse = _partition_lists_constant(n, n_keep)
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return Partition(n, n_keep, as_t(tgt), as_t(src), as_t(inverse))


@functools.lru_cache(maxsize=512)
def _partition_cached(n: int, n_keep: int, device: str) -> Partition:
    with real_tensors(), torch.inference_mode(False):
        return _as_partition(n, n_keep, device)


def partition(n: int, n_keep: int, device: torch.device | str = "cpu") -> Partition:
    """A constant 1-D partition of ``n`` tokens keeping ``n_keep`` evenly spread targets;
    cached. Depends on ``(n, n_keep)`` only, never on data."""
    _check_counts(n, n_keep)
    device = str(torch.device(device))
    if torch.compiler.is_compiling():
        return _as_partition(int(n), int(n_keep), device)
    return _partition_cached(int(n), int(n_keep), device)


def mame_merge(
    x: torch.Tensor, sizes: torch.Tensor, weights: torch.Tensor, part: Partition
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted, mass-preserving merge of a constant partition's sources into its
    targets: ``x_t' = (s_t x_t + W (s_s x_s)) / (s_t + W s_s)``, ``s_t' = s_t + W s_s``."""
    x_t, x_s = x.index_select(1, part.targets), x.index_select(1, part.sources)
    s = sizes.float()
    s_t, s_s = s.index_select(1, part.targets), s.index_select(1, part.sources)
    new_sizes = s_t + weights @ s_s  # (B, Nt, 1)
    coef_t = (s_t / new_sizes).to(x.dtype)
    coef_s = (weights * s_s.transpose(-1, -2) / new_sizes).to(x.dtype)
    return torch.baddbmm(coef_t * x_t, coef_s, x_s), new_sizes


def mare_restore_partition(
    y: torch.Tensor, weights: torch.Tensor, part: Partition
) -> torch.Tensor:
    """MaRe for a constant partition: targets take their merged values, source j
    becomes ``sum_i W_ij y_i``, and the constant inverse permutation puts tokens back."""
    if part.n_sources == 0:
        return y
    sources = weights.transpose(-1, -2).to(y.dtype) @ y
    return torch.cat([y, sources], dim=1).index_select(1, part.inverse)
