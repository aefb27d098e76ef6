"""MaMe (matrix-based token merging) and MaRe (restoration) as pure tensor ops.

Everything here takes and returns tensors; nothing knows about models. The
static step uses matrix products, element-wise ops, reductions, static slices
and gathers with *constant* index lists only, so it traces to a static ONNX
graph: the token counts come from the caller's plan, the choice of which
tokens merge comes from the data.

One step over N mergeable tokens (``x`` (B, N, C), ``metric`` (B, N, Ck),
``sizes`` (B, N, 1)), removing ``n_merge = N - n_keep`` of them:

1. Alternate split: A = even positions (source candidates), B = odd (targets).
2. Size-aware similarity (B, Nb, Na): ``A_ji = 1 - hm(s_j, s_i) (1 - cos(k_j, k_i))``
   with ``hm`` the harmonic mean of the two sizes. Maximising it minimises Ward's
   linkage cost (the growth of the within-cluster sum of squares of unit keys); for
   unit sizes it is the cosine. Redundancy of A token i: ``max_j A_ji``.
3. Ranks by a comparison matrix (no sort): ``rank_i = #{j: r_j > r_i} +
   #{j < i: r_j == r_i}``, a permutation of 0..Na-1 with ties broken by position.
4. A one-hot permutation ``Q[q, i] = [rank_i == q]`` (a matmul, an exact copy) puts
   the candidates in rank order. The first ``n_merge`` (the most redundant) merge
   into B, each to its most similar target (weights W (B, Nb, n_merge)); the rest
   are kept.
5. Output: ``[kept candidates, size-weighted merge of W into x_B]``.

A step removes at most ``ceil(N / 2)`` tokens; larger requests run as several
steps (:func:`mame_step` returns them all, :func:`mare_restore` undoes them).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from mame_export.settings import SIMILARITIES

__all__ = [
    "MergeStep",
    "redundancy_ranks",
    "selection_matrix",
    "stable_order",
    "merge_weights",
    "mame_weights",
    "size_aware_similarity",
    "mame_step",
    "SIMILARITIES",
    "check_similarity",
    "step_macs",
    "mare_restore",
    "mame_step_adaptive",
]

# Names the merge computation a graph was exported with (recorded in its sidecar): a graph
# made with another one cannot be compared with this code's eager model.
MERGE_OP = "data-selected, size-aware (Ward), best target, order-stable; v3"

# Weights and sizes are computed in float32 whatever the token dtype: the
# normalisations divide by sums that can be tiny, which fp16 cannot hold.
_EPS = 1e-6
_TINY = 1e-12
_BAND_MIN = 1e-6


def real_tensors() -> contextlib.AbstractContextManager:
    """A context in which new tensors are real even inside an exporter's fake mode."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return unset_fake_temporarily()


def _constant(make: object, *key: object) -> torch.Tensor:
    """A constant tensor ``make(*key)``: cached and real in eager mode (the cache outlives
    any trace, so it never keeps fake or inference tensors); made afresh under
    ``torch.compile``, where it becomes a graph constant."""
    if torch.compiler.is_compiling():
        return make(*key)  # type: ignore[operator]
    return _cached_constant(make, *key)


@functools.lru_cache(maxsize=1024)
def _cached_constant(make: object, *key: object) -> torch.Tensor:
    with real_tensors(), torch.inference_mode(False):
        return make(*key)  # type: ignore[operator]


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float32; zero rows stay zero with a finite gradient
    (``F.normalize``'s norm has a NaN gradient at zero)."""
    v = v.float()
    return v * torch.rsqrt(v.square().sum(dim=-1, keepdim=True) + _EPS * _EPS)


def _normalize_columns(w: torch.Tensor) -> torch.Tensor:
    # Every column is either all zero or sums to more than _TINY, so the clamp only
    # keeps 0 / 0 away and is exact for any positive sum.
    return w / w.sum(dim=-2, keepdim=True).clamp_min(_TINY)


# ---- the weights --------------------------------------------------------------------


def merge_weights(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """Merge weights (B, Nt, Ns) from similarities ``sim`` (targets x sources).

    Each source goes to its most similar target (``S == max over targets``: an
    Equal and a ReduceMax, no ArgMax). ``tau`` widens that: targets whose
    similarity is within ``(1 - tau) / 2`` of the column's best share the source,
    weighted by how far they clear that bar. ``tau = 1`` is the single best
    target, which measured best (docs/method.md); ``tau = -1`` admits every
    target. Every column sums to 1; ties at the maximum share equally.
    """
    best = sim.amax(dim=-2, keepdim=True)
    width = (1.0 - tau) * 0.5
    if width < _BAND_MIN:  # narrower than float32 resolves near 1: the best target alone
        return _normalize_columns((sim == best).float())
    # A column's maximum clears its bar by `width` > _TINY, so no column is empty.
    return _normalize_columns((sim - (best - width)).clamp_min(0.0))


def mame_weights(
    metric_targets: torch.Tensor, metric_sources: torch.Tensor, tau: float
) -> torch.Tensor:
    """The merge weight matrix W, shape (B, Nt, Ns), in float32: cosine similarity of the
    metrics, then :func:`merge_weights`. Every column sums to 1."""
    sim = _unit(metric_targets) @ _unit(metric_sources).transpose(-1, -2)
    return merge_weights(sim, tau)


# ---- data-selected sources ----------------------------------------------------------


def _tie_break(n: int, device: str) -> torch.Tensor:
    # [j < i] at (i, j): earlier positions win ties.
    idx = torch.arange(n, device=device)
    return idx[None, :] < idx[:, None]


def _slots(first: int, count: int, device: str) -> torch.Tensor:
    # Rank values n_merge, n_merge + 1, ... as a float32 column (TensorRT: no INT64 Equal
    # needed, and ranks are small integers, exact in float32).
    return torch.arange(first, first + count, device=device, dtype=torch.float32)[:, None]


def redundancy_ranks(score: torch.Tensor) -> torch.Tensor:
    """Ranks (B, Na) in float32 of scores (B, Na), highest score first.

    ``rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}``: a permutation of
    0..Na-1 per sample, ties broken by position, from one (Na, Na) comparison
    matrix and a sum (no Sort, TopK or ArgMax).
    """
    n = score.shape[-1]
    s_i, s_j = score[..., :, None], score[..., None, :]
    tie = _constant(_tie_break, n, str(score.device))
    ahead = (s_j > s_i) | ((s_j == s_i) & tie)
    return ahead.sum(dim=-1, dtype=torch.float32)


def selection_matrix(rank: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """One-hot (B, count, Na) float32: row k selects the token of rank ``first + k``."""
    slots = _constant(_slots, int(first), int(count), str(rank.device))
    return (rank[..., None, :] == slots).float()


def _before(n: int, device: str) -> torch.Tensor:
    # [j < i] at (j, i) as float32: x @ before counts, for each i, the marked j ahead of it.
    idx = torch.arange(n, device=device)
    return (idx[:, None] < idx[None, :]).float()


def _positions(n: int, device: str) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.float32)


def stable_order(rank: torch.Tensor, n_merge: int) -> torch.Tensor:
    """One-hot permutation (B, Na, Na): rows ``0..n_merge-1`` select the merged candidates
    (rank < n_merge), the other rows the kept ones, each group in its original order.

    Only which side of the boundary a candidate falls on depends on the scores, not how
    the scores are ordered within a side: two kept tokens whose scores nearly tie keep
    their order on every backend, so the next block's even/odd split, and every merge
    after it, does not depend on rounding. (Kept tokens in rank order made one such
    near-tie reorder the sequence and change all later merges.) A token's place in its
    group is a prefix count: one matmul with a constant triangular matrix.
    """
    na = rank.shape[-1]
    merged = (rank < n_merge).float()  # (B, Na)
    merged_before = merged @ _constant(_before, na, str(rank.device))
    kept_before = _constant(_positions, na, str(rank.device)) - merged_before
    place = merged * merged_before + (1.0 - merged) * (n_merge + kept_before)
    return selection_matrix(place, 0, na)


@dataclass(frozen=True)
class MergeStep:
    """One data-selected step, as :func:`mare_restore` needs it.

    ``order`` (B, Na, Na): the one-hot permutation of the candidates that puts the
    merged ones first, then the kept ones, each in its original order
    (:func:`stable_order`). ``weights`` (B, Nb, n_merge): where each merged candidate
    (in that order) went; every column sums to 1.
    """

    n: int
    n_merge: int
    weights: torch.Tensor
    order: torch.Tensor

    @property
    def weights_by_candidate(self) -> torch.Tensor:
        """W in the candidates' own order (B, Nb, Na); zero columns for kept ones."""
        return self.weights @ self.order[:, : self.n_merge]


def _interleave_inverse(n: int, device: str) -> torch.Tensor:
    # cat([even positions, odd positions]) -> original order.
    order = list(range(0, n, 2)) + list(range(1, n, 2))
    inverse = [0] * n
    for pos, idx in enumerate(order):
        inverse[idx] = pos
    return torch.tensor(inverse, dtype=torch.long, device=device)


def size_aware_similarity(
    cos: torch.Tensor, size_targets: torch.Tensor, size_sources: torch.Tensor
) -> torch.Tensor:
    """``1 - hm(s_t, s_s) (1 - cos)``, (B, Nt, Ns): Ward's linkage as a similarity.

    Merging tokens of sizes a and b whose unit keys have cosine c grows the
    within-cluster sum of squares by ``a b / (a + b) * 2 (1 - c) = hm(a, b) (1 - c)``
    (hm: the harmonic mean), so the most similar pair here is the cheapest merge.
    Large merged tokens look less similar; small redundant ones merge first. Equal
    to ``cos`` for unit sizes.
    """
    s_t, s_s = size_targets.float(), size_sources.float().transpose(-1, -2)
    hm = 2.0 * s_t * s_s / (s_t + s_s)
    return 1.0 - hm * (1.0 - cos)


def _redundancy(metric: torch.Tensor, sizes: torch.Tensor,
                similarity: str = "size") -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities (B, Nb, Na) of targets B to candidates A (size-aware, or the cosine
    alone), and each candidate's redundancy (its best similarity to B)."""
    k = _unit(metric)
    cos = k[:, 1::2] @ k[:, 0::2].transpose(-1, -2)
    sim = cos if similarity == "cosine" else \
        size_aware_similarity(cos, sizes[:, 1::2], sizes[:, 0::2])
    return sim, sim.amax(dim=-2)


def check_similarity(similarity: str) -> None:
    """ValueError for a similarity other than :data:`SIMILARITIES`."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}; "
                         f"got {similarity!r}")


def _merge_selected(
    x: torch.Tensor, sizes: torch.Tensor, sim: torch.Tensor, rank: torch.Tensor,
    n_merge: int, tau: float,
) -> tuple[torch.Tensor, torch.Tensor, MergeStep]:
    """Merge the ``n_merge`` most redundant A tokens (rank < n_merge) into B, keep the
    rest of A.

    A one-hot permutation matrix (a matmul, an exact copy) puts the merged candidates
    first and the kept ones after them, each group in its original order; the first
    ``n_merge`` then merge, the rest are kept.
    """
    n = x.shape[1]
    order = stable_order(rank, n_merge)  # (B, Na, Na)
    w = merge_weights(sim @ order[:, :n_merge].transpose(-1, -2), tau)  # (B, Nb, n_merge)
    s = sizes.float()
    x_a = order.to(x.dtype) @ x[:, 0::2]
    s_a = order @ s[:, 0::2]
    x_b, s_b, s_m = x[:, 1::2], s[:, 1::2], s_a[:, :n_merge]
    new_b = s_b + w @ s_m  # (B, Nb, 1)
    # Mix with normalised coefficients so no large intermediate s * x exists.
    coef_b = (s_b / new_b).to(x.dtype)
    coef_m = (w * s_m.transpose(-1, -2) / new_b).to(x.dtype)
    merged_b = torch.baddbmm(coef_b * x_b, coef_m, x_a[:, :n_merge])
    out = torch.cat([x_a[:, n_merge:], merged_b], dim=1)
    out_sizes = torch.cat([s_a[:, n_merge:], new_b], dim=1)
    return out, out_sizes, MergeStep(n, n_merge, w, order)


def _split_counts(n: int, n_keep: int) -> list[int]:
    """Tokens removed per sub-step: at most ceil(N / 2) each (all of A)."""
    counts, left = [], n - n_keep
    while left > 0:
        step = min(left, (n + 1) // 2)
        counts.append(step)
        n, left = n - step, left - step
    return counts


def step_macs(n: int, n_keep: int, channels: int, metric_channels: int) -> int:
    """Multiply-accumulates of :func:`mame_step` per sample (matrix products only): the
    similarities, the prefix count and the permutation of the candidates and their sizes, the
    merged columns of the similarities, ``W s`` and ``W x``, and between sub-steps
    the metric carried along."""
    macs, counts = 0, _split_counts(n, n_keep)
    for i, m in enumerate(counts):
        na, nb = (n + 1) // 2, n // 2
        macs += nb * na * metric_channels + na * na * (channels + 2)  # + the prefix count
        macs += nb * na * m + nb * m * (channels + 1)
        if i + 1 < len(counts):
            macs += na * na * metric_channels + nb * m * metric_channels
        n -= m
    return macs


def _check_counts(n: int, n_keep: int) -> None:
    if not 0 < n_keep <= n:
        raise ValueError(f"n_keep must be in [1, n]; got n={n}, n_keep={n_keep}")


def mame_step(
    x: torch.Tensor,
    metric: torch.Tensor,
    sizes: torch.Tensor,
    n_keep: int,
    tau: float = 1.0,
    similarity: str = "size",
) -> tuple[torch.Tensor, torch.Tensor, tuple[MergeStep, ...]]:
    """Static, data-selected MaMe: ``x`` (B, N, C) -> (B, n_keep, C).

    Returns ``(merged x, merged float32 sizes, steps)``; ``steps`` is what
    :func:`mare_restore` needs to put every position back. The output shape
    depends on ``(N, n_keep)`` only; which tokens merge depends on the data.
    ``similarity``: how tokens are compared (:data:`SIMILARITIES`).
    """
    n = x.shape[1]
    _check_counts(n, n_keep)
    check_similarity(similarity)
    steps: list[MergeStep] = []
    sizes = sizes.float()
    counts = _split_counts(n, n_keep)
    for i, n_merge in enumerate(counts):
        sim, score = _redundancy(metric, sizes, similarity)
        x, sizes, step = _merge_selected(x, sizes, sim, redundancy_ranks(score), n_merge, tau)
        steps.append(step)
        if i + 1 < len(counts):  # the metric follows its tokens into the next sub-step
            metric = _carry_metric(metric, step)
    return x, sizes, tuple(steps)


def _carry_metric(metric: torch.Tensor, step: MergeStep) -> torch.Tensor:
    k = metric.float()
    k_a = step.order @ k[:, 0::2]
    return torch.cat([k_a[:, step.n_merge:], k[:, 1::2] + step.weights @ k_a[:, :step.n_merge]],
                     dim=1)


def mare_restore(y: torch.Tensor, steps: tuple[MergeStep, ...]) -> torch.Tensor:
    """MaRe: undo :func:`mame_step`, restoring all N positions from its output.

    Per step, last first: B tokens take their merged values, a merged A token
    becomes ``sum_j W[j, i] y_j`` (its target's value), kept A tokens are already
    there, the transposed permutation puts A back in its own order, and a constant
    permutation interleaves A and B again.
    """
    for step in reversed(steps):
        n_kept = step.order.shape[1] - step.n_merge
        y_kept, y_b = y[:, :n_kept], y[:, n_kept:]
        y_merged = step.weights.transpose(-1, -2).to(y.dtype) @ y_b
        y_a = step.order.transpose(-1, -2).to(y.dtype) @ torch.cat([y_merged, y_kept], dim=1)
        inverse = _constant(_interleave_inverse, step.n, str(y.device))
        y = torch.cat([y_a, y_b], dim=1).index_select(1, inverse)
    return y


def mame_step_adaptive(
    x: torch.Tensor,
    metric: torch.Tensor,
    sizes: torch.Tensor,
    n_keep: int,
    tau: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive MaMe (eager only): a candidate merges only if its redundancy (best
    size-aware similarity to a target; the cosine for unit sizes) exceeds ``tau`` in
    every sample of the batch, and at most ``N - n_keep`` merge (the static count is
    the floor of what stays). The output count follows the data."""
    n = x.shape[1]
    _check_counts(n, n_keep)
    sizes = sizes.float()
    left = n - n_keep
    while left > 0:
        sim, score = _redundancy(metric, sizes)
        above = int((score > tau).sum(dim=-1).min())
        n_merge = min(left, score.shape[-1], above)
        if n_merge == 0:
            break
        x, sizes, step = _merge_selected(x, sizes, sim, redundancy_ranks(score), n_merge, tau)
        left -= n_merge
        if n_merge < score.shape[-1]:  # every candidate over tau merged, or the count is met
            break
        metric = _carry_metric(metric, step)
    return x, sizes
