"""2-D constant partitions for token grids (UNet latents), as used by MaRe.

Targets are the positions that come first in the ordered-dither (Bayer)
order of the grid: any prefix of that order is spread as evenly over the
image as a prefix can be. Keeping a quarter of an even-sized grid gives
exactly one target per 2x2 cell (its top-left position), keeping half gives
the checkerboard, and fewer than a quarter gives a sparser grid (one per 4x4
cell at 1/16). The partition depends on ``(h, w, n_keep)`` only, never on data.
"""

from __future__ import annotations

import functools

import torch

from mame_export.ops.mame import real_tensors
from mame_export.ops.partition import Partition

__all__ = ["grid_partition", "dither_order"]


def _bayer_index(y: int, x: int, bits: int) -> int:
    # The finest bit pair is the most significant: position within a 2x2 cell
    # ranks first ((0,0), (1,1), (0,1), (1,0)), coarser cells break the ties.
    v = 0
    for i in range(bits):
        yb, xb = (y >> i) & 1, (x >> i) & 1
        v = (v << 2) | ((xb ^ yb) << 1) | yb
    return v


@functools.lru_cache(maxsize=64)
def dither_order(h: int, w: int) -> tuple[int, ...]:
    """Raster indices of an ``h x w`` grid, ordered by the Bayer dither matrix."""
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1; got {h}x{w}")
    bits = max(h - 1, w - 1, 1).bit_length()
    keyed = sorted((_bayer_index(y, x, bits), y * w + x) for y in range(h) for x in range(w))
    return tuple(idx for _, idx in keyed)


@functools.lru_cache(maxsize=256)
def _grid_lists(h: int, w: int, n_keep: int) -> tuple[tuple[int, ...], ...]:
    """(targets, sources, inverse) as plain index tuples."""
    order = dither_order(h, w)
    tgt, src = sorted(order[:n_keep]), sorted(order[n_keep:])
    inverse = [0] * (h * w)
    for pos, idx in enumerate(tgt + src):
        inverse[idx] = pos
    return tuple(tgt), tuple(src), tuple(inverse)


@torch.compiler.assume_constant_result
def _grid_lists_constant(h: int, w: int, n_keep: int) -> tuple[tuple[int, ...], ...]:
    # Under torch.compile / export the lists are evaluated once, outside the trace.
    return _grid_lists(h, w, n_keep)


def _as_partition(h: int, w: int, n_keep: int, device: str) -> Partition:
    tgt, src, inverse = _grid_lists_constant(h, w, n_keep)
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return Partition(h * w, n_keep, as_t(tgt), as_t(src), as_t(inverse))


@functools.lru_cache(maxsize=256)
def _grid_partition_cached(h: int, w: int, n_keep: int, device: str) -> Partition:
    with real_tensors():  # the cache outlives any trace: never keep fake tensors
        return _as_partition(h, w, n_keep, device)


def grid_partition(
    h: int, w: int, n_keep: int, device: torch.device | str = "cpu"
) -> Partition:
    """The constant 2-D partition of an ``h x w`` token grid keeping ``n_keep`` targets.

    Tokens are in raster order (index ``y * w + x``), as a UNet's transformer
    flattens its (H, W) feature map. Targets and sources are ascending index
    lists; ``inverse`` puts ``cat([targets, sources])`` back in raster order.
    Computed once per ``(h, w, n_keep, device)`` and cached; under
    ``torch.compile`` or export tracing the index lists become graph constants.
    """
    h, w, n_keep = int(h), int(w), int(n_keep)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1; got {h}x{w}")
    if not 0 < n_keep <= h * w:
        raise ValueError(f"n_keep must be in [1, h*w={h * w}]; got {n_keep}")
    device = str(torch.device(device))
    if torch.compiler.is_compiling():  # traced: constants in the graph, nothing cached
        return _as_partition(h, w, n_keep, device)
    return _grid_partition_cached(h, w, n_keep, device)
