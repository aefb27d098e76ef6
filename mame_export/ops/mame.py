"""MaMe (matrix-based token merging) and MaRe (restoration) as pure tensor ops.

Everything here takes and returns tensors; nothing knows about models. The
static step uses matrix products, element-wise ops, reductions and gathers
with *constant* index lists only, so it traces to a static ONNX graph.

Shapes: ``x`` (B, N, C) mergeable tokens, ``metric`` (B, N, Ck), ``sizes``
(B, N, 1). The partition is fixed by ``(N, n_keep)``: ``n_keep`` targets stay,
``N - n_keep`` sources are spread evenly over the sequence and merged away.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

__all__ = [
    "Partition",
    "partition",
    "mame_weights",
    "mame_merge",
    "mame_step",
    "mare_restore",
    "mame_step_adaptive",
]

# Weights and sizes are computed in float32 whatever the token dtype: the
# normalisations divide by sums that can be tiny, which fp16 cannot hold.
_EPS = 1e-6
_TINY = 1e-12
_REFINE_SLACK = 1e-6


@dataclass(frozen=True)
class Partition:
    """Constant split of N tokens into targets (kept) and sources (merged away).

    ``targets``/``sources`` are index lists into the N tokens, both ascending;
    ``inverse`` puts ``cat([targets, sources])`` back into the original order.
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
    # Under torch.compile the lists are evaluated once, outside the trace.
    return _partition_lists(n, n_keep)


def _as_partition(n: int, n_keep: int, device: str) -> Partition:
    tgt, src, inverse = _partition_lists_constant(n, n_keep)
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return Partition(n, n_keep, as_t(tgt), as_t(src), as_t(inverse))


@functools.lru_cache(maxsize=512)
def _partition_cached(n: int, n_keep: int, device: str) -> Partition:
    # The cache outlives any trace or mode: make real, normal tensors even if the
    # first call happens under an exporter's fake-tensor mode or inference_mode
    # (inference tensors would break a later backward or torch.export).
    with real_tensors(), torch.inference_mode(False):
        return _as_partition(n, n_keep, device)


def real_tensors() -> contextlib.AbstractContextManager:
    """A context in which new tensors are real even inside an exporter's fake mode."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return unset_fake_temporarily()


def partition(n: int, n_keep: int, device: torch.device | str = "cpu") -> Partition:
    """The constant partition for ``n`` tokens keeping ``n_keep``; cached.

    Depends on ``(n, n_keep)`` only, never on data, and is computed once per
    (n, n_keep, device) and reused by every forward. Under ``torch.compile`` the
    index lists become graph constants and nothing is cached.
    """
    if not 0 < n_keep <= n:
        raise ValueError(f"n_keep must be in [1, n]; got n={n}, n_keep={n_keep}")
    device = str(torch.device(device))
    if torch.compiler.is_compiling():
        return _as_partition(int(n), int(n_keep), device)
    return _partition_cached(int(n), int(n_keep), device)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float32; zero rows stay zero with a finite gradient
    (``F.normalize``'s norm has a NaN gradient at zero)."""
    v = v.float()
    return v * torch.rsqrt(v.square().sum(dim=-1, keepdim=True) + _EPS * _EPS)


def _normalize_columns(w: torch.Tensor) -> torch.Tensor:
    # Every column here is either all zero or sums to more than _TINY (its non-zero
    # entries are > _TINY), so the clamp only keeps 0 / 0 away: exact for any
    # positive sum (an additive eps would leave a column that is barely over the
    # threshold summing to well under 1), and zero columns stay zero.
    return w / w.sum(dim=-2, keepdim=True).clamp_min(_TINY)


def mame_weights(
    metric_targets: torch.Tensor, metric_sources: torch.Tensor, tau: float
) -> torch.Tensor:
    """The merge weight matrix W, shape (B, Nt, Ns), computed in float32.

    Cosine similarity, shifted threshold ``relu(S - tau)``, column
    normalisation, refinement (keep weights >= the mean of a column's non-zero
    weights), and a fallback for distinctive sources (all-zero columns) onto
    their most similar target(s). Every column sums to 1.
    """
    kt = _unit(metric_targets)
    ks = _unit(metric_sources)
    sim = kt @ ks.transpose(-1, -2)  # (B, Nt, Ns)

    # relu(S - tau); links weaker than float32 can normalise with a finite
    # gradient count as none.
    shifted = sim - tau
    linked = shifted > _TINY
    w = _normalize_columns(torch.where(linked, shifted, 0.0))
    # Non-zero weights per column, counted in float32 (TensorRT has no INT64 Clip).
    count = linked.sum(dim=-2, keepdim=True, dtype=torch.float32)
    zeta = w.sum(dim=-2, keepdim=True) / count.clamp_min(1.0)
    # The column maximum is always >= the mean; the slack keeps it when all
    # non-zero weights are equal and the mean rounds just above them. In a column
    # with no link w is all zero and stays so.
    w = _normalize_columns(torch.where(w >= zeta * (1.0 - _REFINE_SLACK), w, 0.0))

    # Distinctive sources: no target passed the threshold. Fall back to the
    # best target(s) by an equality with a reduce-max (no ArgMax).
    fallback = _normalize_columns((sim == sim.amax(dim=-2, keepdim=True)).float())
    return torch.where(count > 0, w, fallback)


def mame_merge(
    x: torch.Tensor, sizes: torch.Tensor, weights: torch.Tensor, part: Partition
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted, mass-preserving merge of sources into targets.

    ``x_t' = (s_t x_t + W (s_s x_s)) / (s_t + W s_s)``, ``s_t' = s_t + W s_s``.
    Returns the ``n_keep`` merged targets (in order) and their float32 sizes.
    """
    x_t, x_s = x.index_select(1, part.targets), x.index_select(1, part.sources)
    s = sizes.float()
    s_t, s_s = s.index_select(1, part.targets), s.index_select(1, part.sources)
    new_sizes = s_t + weights @ s_s  # (B, Nt, 1)
    # Mix with normalised coefficients so no large intermediate s * x exists.
    coef_t = (s_t / new_sizes).to(x.dtype)
    coef_s = (weights * s_s.transpose(-1, -2) / new_sizes).to(x.dtype)
    return torch.baddbmm(coef_t * x_t, coef_s, x_s), new_sizes  # one pass fewer than + @


def mame_step(
    x: torch.Tensor,
    metric: torch.Tensor,
    sizes: torch.Tensor,
    n_keep: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Partition]:
    """One static MaMe step over all of ``x``'s tokens.

    Returns ``(merged x, merged sizes, W, partition)``; W and the partition are
    what :func:`mare_restore` needs to put every position back.
    """
    n = x.shape[1]
    part = partition(n, n_keep, x.device)
    if part.n_sources == 0:
        return x, sizes.float(), x.new_zeros(x.shape[0], n, 0, dtype=torch.float32), part
    w = mame_weights(
        metric.index_select(1, part.targets), metric.index_select(1, part.sources), tau
    )
    merged, new_sizes = mame_merge(x, sizes, w, part)
    return merged, new_sizes, w, part


def mare_restore(y: torch.Tensor, weights: torch.Tensor, part: Partition) -> torch.Tensor:
    """MaRe: invert a MaMe step, restoring all N positions from ``n_keep`` targets.

    Targets take their merged values, source j becomes ``sum_i W_ij y_i`` (a
    convex combination, since W's columns sum to 1), and the constant inverse
    permutation puts tokens back in place.
    """
    if part.n_sources == 0:
        return y
    sources = weights.transpose(-1, -2).to(y.dtype) @ y
    return torch.cat([y, sources], dim=1).index_select(1, part.inverse)


def mame_step_adaptive(
    x: torch.Tensor,
    metric: torch.Tensor,
    sizes: torch.Tensor,
    n_keep: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaMe as in the paper: distinctive sources are retained (eager only).

    A source whose thresholded column is all zero in *any* sample of the batch
    (union over the batch) is kept as a token of its own, so the output count
    is ``n_keep + #retained`` and depends on the data. Not exportable to a
    static graph; use :func:`mame_step` for export.
    """
    n = x.shape[1]
    part = partition(n, n_keep, x.device)
    if part.n_sources == 0:
        return x, sizes.float()
    kt = _unit(metric.index_select(1, part.targets))
    ks = _unit(metric.index_select(1, part.sources))
    linked_any = ((kt @ ks.transpose(-1, -2) - tau) > _TINY).any(dim=-2)  # (B, Ns)
    retained = ~linked_any.all(dim=0)  # (Ns,) distinctive in some sample
    if not bool(retained.any()):
        merged, new_sizes, _, _ = mame_step(x, metric, sizes, n_keep, tau)
        return merged, new_sizes
    keep_idx = torch.cat([part.targets, part.sources[retained]]).sort().values
    merge_idx = part.sources[~retained]
    s = sizes.float()
    if merge_idx.numel() == 0:
        return x.index_select(1, keep_idx), s.index_select(1, keep_idx)
    w = mame_weights(metric.index_select(1, keep_idx), metric.index_select(1, merge_idx), tau)
    # Reuse the static merge with an ad-hoc partition over the kept/merged lists.
    adhoc = Partition(n, int(keep_idx.numel()), keep_idx, merge_idx, keep_idx)
    return mame_merge(x, s, w, adhoc)
