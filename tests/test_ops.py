"""Property tests for the MaMe / MaRe ops (mame_export.ops): the invariants of the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mame_export.ops import (
    Partition,
    mame_merge,
    mame_step,
    mame_step_adaptive,
    mame_weights,
    mare_restore,
    mare_restore_partition,
    merge_weights,
    partition,
    redundancy_ranks,
    selection_matrix,
    size_aware_similarity,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


# Bounded and deadline-free: the CPU is small and shared.
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("random", "zero_metric", "identical", "clustered", "large")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_tokens(
    seed: int, b: int, n: int, kind: str = "random", dtype: torch.dtype = torch.float32,
    c: int = 8, ck: int = 6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x (b, n, c) and a merge metric (b, n, ck) of a given kind."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    k = torch.randn(b, n, ck, generator=g)
    if kind == "zero_metric":
        k = torch.zeros_like(k)
    elif kind == "identical":
        x, k = x[:, :1].expand_as(x).clone(), k[:, :1].expand_as(k).clone()
    elif kind == "clustered":
        proto = torch.randint(0, 3, (b, n), generator=g)
        k = torch.randn(b, 3, ck, generator=g).gather(1, proto[..., None].expand(-1, -1, ck))
        k = k + 1e-3 * torch.randn(b, n, ck, generator=g)
    elif kind == "large":
        x, k = x * 1e3, k * 1e3
    return x.to(dtype), k.to(dtype)


@st.composite
def sizes_and_keep(draw, n_max: int = 40) -> tuple[int, int]:
    n = draw(st.integers(2, n_max))
    return n, draw(st.integers(1, n))


seeds = st.integers(0, 2**31 - 1)
taus = st.floats(-1.0, 1.0, allow_nan=False)
batches = st.sampled_from([1, 2, 8])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).transpose(-1, -2)


# ---- the weights ------------------------------------------------------------------------


@PROPS
@given(nt=st.integers(1, 20), ns=st.integers(1, 20), b=batches, seed=seeds, tau=taus,
       kind=st.sampled_from(KINDS))
def test_every_column_of_w_sums_to_one(nt, ns, b, seed, tau, kind):
    _, k = make_tokens(seed, b, nt + ns, kind)
    w = mame_weights(k[:, :nt], k[:, nt:], tau)
    assert w.shape == (b, nt, ns) and w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(b, ns), atol=1e-5, rtol=0)


def reference_weights(sim: np.ndarray, tau: float) -> np.ndarray:
    """merge_weights read literally, one column at a time, in float64."""
    out = np.zeros_like(sim)
    for b in range(sim.shape[0]):
        for j in range(sim.shape[2]):
            s = sim[b, :, j]
            if (1 - tau) / 2 < 1e-6:
                w = (s == s.max()).astype(np.float64)
            else:
                w = np.maximum(s - (s.max() - (1 - tau) / 2), 0.0)
            out[b, :, j] = w / w.sum()
    return out


@PROPS
@given(nt=st.integers(1, 12), ns=st.integers(1, 12), seed=seeds,
       tau=st.one_of(st.just(1.0), taus))
def test_weights_match_a_literal_reading(nt, ns, seed, tau):
    sim = torch.rand(2, nt, ns, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    np.testing.assert_allclose(merge_weights(sim, tau).numpy(),
                               reference_weights(sim.double().numpy(), tau), atol=1e-5)


def test_tau_one_sends_each_source_to_its_best_target_and_splits_ties():
    sim = torch.tensor([[[0.1, 0.9], [0.8, 0.9], [0.2, 0.0]]])  # (1, 3 targets, 2 sources)
    w = merge_weights(sim, 1.0)[0]
    torch.testing.assert_close(w[:, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(w[:, 1], torch.tensor([0.5, 0.5, 0.0]))


def test_lower_tau_shares_a_source_with_near_best_targets():
    sim = torch.tensor([[[0.9], [0.8], [0.2]]])
    w = merge_weights(sim, 0.6)[0, :, 0]  # bar = 0.9 - 0.2 = 0.7: targets 0 and 1
    torch.testing.assert_close(w, torch.tensor([0.2 / 0.3, 0.1 / 0.3, 0.0]))


def test_size_aware_similarity_is_wards_linkage_and_cosine_at_unit_sizes():
    cos = torch.tensor([[[0.8, 0.5]]])  # (1, 1 target, 2 sources)
    ones = torch.ones(1, 1, 1)
    torch.testing.assert_close(size_aware_similarity(cos, ones, torch.ones(1, 2, 1)), cos)
    s_t, s_s = torch.tensor([[[3.0]]]), torch.tensor([[[1.0], [6.0]]])
    sim = size_aware_similarity(cos, s_t, s_s)
    hm = torch.tensor([2 * 3 * 1 / 4, 2 * 3 * 6 / 9])
    torch.testing.assert_close(sim[0, 0], 1 - hm * (1 - cos[0, 0]))
    # The larger a merged token, the less similar it looks (it merges later).
    assert sim[0, 0, 0] < 0.8 and sim[0, 0, 1] < sim[0, 0, 0]


# ---- ranks and the selection matrix --------------------------------------------------


@PROPS
@given(b=batches, na=st.integers(1, 40), seed=seeds, levels=st.sampled_from([2, 5, 1000]))
def test_ranks_are_a_permutation_ordered_by_score_with_ties_by_position(b, na, seed, levels):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, levels, (b, na), generator=g).float() / levels  # many ties
    rank = redundancy_ranks(score)
    assert rank.dtype == torch.float32
    for i in range(b):
        assert sorted(rank[i].long().tolist()) == list(range(na))
        # A stable sort by descending score gives the same order.
        order = sorted(range(na), key=lambda j: (-score[i, j].item(), j))
        assert [order.index(j) for j in range(na)] == rank[i].long().tolist()


def test_ranks_break_ties_by_position():
    rank = redundancy_ranks(torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]]))
    assert rank.tolist() == [[2.0, 0.0, 3.0, 4.0, 1.0]]


@PROPS
@given(b=batches, na=st.integers(1, 30), seed=seeds, data=st.data())
def test_selection_matrix_is_one_hot_and_picks_ranks_in_order(b, na, seed, data):
    first = data.draw(st.integers(0, na))
    score = torch.rand(b, na, generator=torch.Generator().manual_seed(seed))
    rank = redundancy_ranks(score)
    p = selection_matrix(rank, first, na - first)
    assert p.shape == (b, na - first, na)
    assert torch.equal(p.sum(dim=-1), torch.ones(b, na - first))
    x = torch.randn(b, na, 3)
    order = score.argsort(dim=1, descending=True, stable=True)[:, first:]
    assert torch.equal(p @ x, x.gather(1, order[..., None].expand(-1, -1, 3)))


# ---- the step: sizes, mass, shapes ----------------------------------------------------


@PROPS
@given(
    n=st.integers(2, 64), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS),
    keeps=st.lists(st.floats(0.2, 1.0), min_size=1, max_size=6),
)
def test_total_size_stays_the_input_patch_count_through_repeated_steps(n, b, seed, tau, kind,
                                                                       keeps):
    x, k = make_tokens(seed, b, n, kind)
    proj = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    sizes = torch.ones(b, n, 1)
    for step, keep in enumerate(keeps):
        n_keep = max(1, round(x.shape[1] * keep))  # keep < 1/2 runs several sub-steps
        metric = k if step == 0 else x @ proj  # later steps: a metric from the merged tokens
        x, sizes, _ = mame_step(x, metric, sizes, n_keep, tau)
        assert x.shape == (b, n_keep, 8)
        torch.testing.assert_close(sizes.sum(dim=1), torch.full((b, 1), float(n)),
                                   rtol=1e-5, atol=0)
        assert (sizes >= 1 - 1e-5).all()


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS))
def test_a_step_preserves_mass(nk, b, seed, tau, kind):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n, kind)
    sizes = 1 + 4 * torch.rand(b, n, 1, generator=torch.Generator().manual_seed(seed + 1))
    merged, new_sizes, _ = mame_step(x, k, sizes, n_keep, tau)
    before, after = (sizes * x).sum(dim=1), (new_sizes * merged).sum(dim=1)
    scale = (sizes * x.abs()).sum(dim=1)
    assert ((after - before).abs() <= 4e-6 * scale + 1e-6).all()
    torch.testing.assert_close(new_sizes.sum(dim=1), sizes.sum(dim=1), rtol=1e-5, atol=0)


@PROPS
@given(nk=sizes_and_keep(), b=batches, seeds2=st.tuples(seeds, seeds),
       taus2=st.tuples(taus, taus),
       kinds=st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)))
def test_output_shapes_depend_only_on_n_and_n_keep(nk, b, seeds2, taus2, kinds):
    n, n_keep = nk
    shapes = set()
    for seed, tau, kind in zip(seeds2, taus2, kinds, strict=True):
        x, k = make_tokens(seed, b, n, kind)
        merged, sizes, steps = mame_step(x, k, torch.ones(b, n, 1), n_keep, tau)
        shapes.add((merged.shape, sizes.shape,
                    tuple((s.weights.shape, s.order.shape) for s in steps)))
    assert len(shapes) == 1
    merged_shape, sizes_shape, _ = shapes.pop()
    assert merged_shape == (b, n_keep, 8) and sizes_shape == (b, n_keep, 1)


def test_r_zero_is_the_identity():
    x, k = make_tokens(0, 2, 9)
    merged, sizes, steps = mame_step(x, k, torch.ones(2, 9, 1), 9)
    assert torch.equal(merged, x) and steps == ()
    assert torch.equal(sizes, torch.ones(2, 9, 1))
    assert torch.equal(mare_restore(merged, steps), x)


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from(sorted(DTYPES)))
def test_no_nan_or_inf_for_any_input_kind_dtype_or_batch(nk, b, seed, tau, kind, dtype):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n, kind, DTYPES[dtype])
    sizes = torch.ones(b, n, 1, dtype=DTYPES[dtype])
    merged, new_sizes, steps = mame_step(x, k, sizes, n_keep, tau)
    assert merged.dtype == DTYPES[dtype] and new_sizes.dtype == torch.float32
    for t in (merged, new_sizes, *[s.weights for s in steps], mare_restore(merged, steps)):
        assert torch.isfinite(t).all()
    # A convex mix stays within the range of its inputs (up to the dtype's rounding).
    lo, hi = x.float().amin(dim=1, keepdim=True), x.float().amax(dim=1, keepdim=True)
    rel = 1e-5 if dtype == "fp32" else 2e-2
    tol = rel * x.float().abs().amax(dim=1, keepdim=True) + 1e-6
    assert (merged.float() >= lo - tol).all() and (merged.float() <= hi + tol).all()


def test_identical_tokens_merge_to_themselves():
    x, k = make_tokens(0, 2, 16, "identical")
    merged, sizes, _ = mame_step(x, k, torch.ones(2, 16, 1), 5)
    torch.testing.assert_close(merged, x[:, :5])
    torch.testing.assert_close(sizes.sum(dim=1), torch.full((2, 1), 16.0))


@PROPS
@given(nk=sizes_and_keep(), seed=seeds, tau=taus, kind=st.sampled_from(KINDS))
def test_samples_are_independent(nk, seed, tau, kind):
    n, n_keep = nk
    x, k = make_tokens(seed, 4, n, kind)
    sizes = torch.ones(4, n, 1)
    out = mame_step(x, k, sizes, n_keep, tau)
    x2, k2 = make_tokens(seed + 7, 4, n, "random")
    x2[0], k2[0] = x[0], k[0]
    out2 = mame_step(x2, k2, sizes, n_keep, tau)
    for a, b_ in zip(out[:2], out2[:2], strict=True):
        assert torch.equal(a[0], b_[0])
    alone = mame_step(x[:1], k[:1], sizes[:1], n_keep, tau)
    for a, b_ in zip(out[:2], alone[:2], strict=True):
        torch.testing.assert_close(a[:1], b_, atol=1e-6, rtol=1e-6)


def _duplicates_metric(dup: list[bool], nb: int) -> torch.Tensor:
    """A metric over 2 * nb tokens: B tokens (odd) are orthogonal axes; candidate i (even)
    copies B token i if dup[i], else points along an axis of its own."""
    k = torch.zeros(1, 2 * nb, 2 * nb)
    for j in range(nb):
        k[0, 2 * j + 1, j] = 1.0
        k[0, 2 * j, j if dup[j] else nb + j] = 1.0
    return k


def test_the_most_redundant_candidates_merge_and_distinctive_ones_stay():
    dup = [False, True, False, True, True, False]
    k = _duplicates_metric(dup, 6)
    x = torch.randn(1, 12, 4)
    merged, sizes, (step,) = mame_step(x, k, torch.ones(1, 12, 1), 9)
    w = step.weights_by_candidate
    assert w.sum(dim=1)[0].tolist() == [float(d) for d in dup]  # the three duplicates merged
    # Each went to the B token it copies; the distinctive candidates are kept exactly.
    for i in (1, 3, 4):
        assert w[0, i, i] == 1.0
    kept = merged[0, :3]
    assert torch.equal(kept, x[0, [0, 4, 10]])
    assert sizes[0, :, 0].tolist() == [1, 1, 1, 1, 2, 1, 2, 2, 1]


def test_wards_similarity_sends_a_token_to_the_smaller_of_two_equal_targets():
    # Candidate 0 is equally close (cosine) to B tokens 0 and 1; B token 0 is large.
    k = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    sizes = torch.tensor([[[1.0], [5.0], [1.0], [1.0]]])
    _, _, (step,) = mame_step(torch.randn(1, 4, 2), k, sizes, 3)
    assert step.weights_by_candidate[0, :, 0].tolist() == [0.0, 1.0]


# ---- MaRe -----------------------------------------------------------------------------


@PROPS
@given(nb=st.integers(1, 12), b=batches, seed=seeds, data=st.data())
def test_mare_after_mame_restores_inputs_when_merged_tokens_duplicate_targets(nb, b, seed,
                                                                              data):
    dup = data.draw(st.lists(st.booleans(), min_size=nb, max_size=nb))
    n_merge = data.draw(st.integers(0, sum(dup)))
    k = _duplicates_metric(dup, nb).expand(b, -1, -1)
    x = torch.randn(b, 2 * nb, 5, generator=torch.Generator().manual_seed(seed))
    for j in range(nb):  # a duplicate candidate also copies its target's token
        if dup[j]:
            x[:, 2 * j] = x[:, 2 * j + 1]
    merged, _, steps = mame_step(x, k, torch.ones(b, 2 * nb, 1), 2 * nb - n_merge)
    torch.testing.assert_close(mare_restore(merged, steps), x, atol=1e-6, rtol=1e-6)


@PROPS
@given(nk=sizes_and_keep(30), b=st.sampled_from([1, 3]), seed=seeds)
def test_mare_puts_every_position_back(nk, b, seed):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n)
    merged, _, steps = mame_step(x, k, torch.ones(b, n, 1), n_keep)
    restored = mare_restore(merged, steps)
    assert restored.shape == x.shape
    if len(steps) == 1:
        (step,) = steps
        n_kept = step.order.shape[1] - step.n_merge
        torch.testing.assert_close(restored[:, 1::2], merged[:, n_kept:])  # targets
        a = restored[:, 0::2]
        kept = step.order[:, step.n_merge:]
        torch.testing.assert_close(kept @ a, merged[:, :n_kept])  # kept, in place
        w = step.weights_by_candidate
        merged_a = w.transpose(1, 2) @ merged[:, n_kept:]
        gone = w.sum(dim=1) > 0  # merged candidates: their target's value
        torch.testing.assert_close(a[gone], merged_a[gone])


# ---- no data-dependent indexing --------------------------------------------------------


FORBIDDEN_OPS = (
    "sort", "topk", "argmax", "argmin", "nonzero", "scatter", "gather", "masked_select",
    "unique", "index.Tensor", "index_put", "kthvalue", "median", "msort",
)


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.index_args: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__) + "." + func._overloadname)
        if func.overloadpacket.__name__ == "index_select":
            self.index_args.append(args[2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["random", "zero_metric", "identical"])
@pytest.mark.parametrize("n_keep", [17, 9])  # one step, and two sub-steps
def test_step_and_restore_have_no_data_dependent_indexing(kind, n_keep):
    x, k = make_tokens(1, 2, 30, kind)
    with _OpLog() as log:
        merged, _, steps = mame_step(x, k, torch.ones(2, 30, 1), n_keep)
        mare_restore(merged, steps)
    bad = [op for op in log.ops if any(f in op for f in FORBIDDEN_OPS)]
    assert not bad, bad
    # The only index lists are MaRe's constant interleaving permutations (cached objects).
    assert log.index_args
    with _OpLog() as again:
        mare_restore(merged, steps)
    assert {id(t) for t in again.index_args} <= {id(t) for t in log.index_args}
    assert all(not t.requires_grad for t in log.index_args)


def test_constants_made_under_inference_mode_still_serve_autograd():
    with torch.inference_mode():
        mame_step(*make_tokens(0, 1, 97), torch.ones(1, 97, 1), 41)
    x, k = make_tokens(1, 2, 97)
    x.requires_grad_(True)
    merged, _, steps = mame_step(x, k, torch.ones(2, 97, 1), 41)
    mare_restore(merged, steps).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- gradients --------------------------------------------------------------------------


@PROPS
@given(nk=sizes_and_keep(), b=st.sampled_from([1, 3]), seed=seeds, tau=taus,
       kind=st.sampled_from(KINDS))
def test_gradients_flow_and_are_finite(nk, b, seed, tau, kind):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n, kind)
    x.requires_grad_(True)
    k.requires_grad_(True)
    merged, sizes, steps = mame_step(x, k, torch.ones(b, n, 1), n_keep, tau)
    (merged.square().sum() + sizes.sum() + mare_restore(merged, steps).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if k.grad is not None:
        assert torch.isfinite(k.grad).all()


def test_metric_gets_a_gradient_when_weights_are_soft():
    x, k = make_tokens(5, 2, 20)
    k.requires_grad_(True)
    merged, _, _ = mame_step(x, k, torch.ones(2, 20, 1), 10, tau=-0.5)
    merged.square().sum().backward()
    assert k.grad.abs().sum() > 0


# ---- adaptive mode ----------------------------------------------------------------------


def test_adaptive_merges_only_candidates_over_tau():
    dup = [False, True, False, True, True, False]
    k = _duplicates_metric(dup, 6)
    x, sizes = torch.randn(1, 12, 4), torch.ones(1, 12, 1)
    # The static plan would merge 5; only the 3 duplicates clear tau.
    out, s = mame_step_adaptive(x, k, sizes, 7, tau=0.8)
    assert out.shape[1] == 9
    assert out.shape[1] == mame_step(x, k, sizes, 9)[0].shape[1]
    torch.testing.assert_close(out, mame_step(x, k, sizes, 9)[0])
    # Never more than the static count.
    assert mame_step_adaptive(x, k, sizes, 10, tau=0.8)[0].shape[1] == 10


def test_adaptive_count_is_the_minimum_over_the_batch():
    a = _duplicates_metric([True] * 4 + [False] * 2, 6)  # 4 over tau
    c = _duplicates_metric([True] * 2 + [False] * 4, 6)  # 2 over tau
    x, sizes = torch.randn(2, 12, 4), torch.ones(2, 12, 1)
    out, s = mame_step_adaptive(x, torch.cat([a, c]), sizes, 6, tau=0.5)
    assert out.shape[1] == 10
    torch.testing.assert_close(s.sum(dim=1), torch.full((2, 1), 12.0))
    torch.testing.assert_close((s * out).sum(dim=1), x.sum(dim=1), atol=1e-5, rtol=1e-5)


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds, taus2=st.tuples(taus, taus),
       kind=st.sampled_from(("random", "clustered")))
def test_adaptive_count_grows_with_tau_and_preserves_size_and_mass(nk, b, seed, taus2, kind):
    n, n_keep = nk
    lo, hi = sorted(taus2)
    x, k = make_tokens(seed, b, n, kind)
    sizes = torch.ones(b, n, 1)
    out_lo, s_lo = mame_step_adaptive(x, k, sizes, n_keep, lo)
    out_hi, s_hi = mame_step_adaptive(x, k, sizes, n_keep, hi)
    assert n_keep <= out_lo.shape[1] <= out_hi.shape[1] <= n
    for out, s in ((out_lo, s_lo), (out_hi, s_hi)):
        torch.testing.assert_close(s.sum(dim=1), torch.full((b, 1), float(n)), rtol=1e-5, atol=0)
        scale = x.abs().sum(dim=1)
        assert (((s * out).sum(dim=1) - x.sum(dim=1)).abs() <= 4e-6 * scale + 1e-6).all()


def test_adaptive_with_every_candidate_over_tau_equals_the_static_step():
    x, k = make_tokens(2, 3, 30)
    sizes = torch.ones(3, 30, 1)
    static, s_static, _ = mame_step(x, k, sizes, 12, tau=-1.0)
    adaptive, s_adaptive = mame_step_adaptive(x, k, sizes, 12, tau=-1.0)
    torch.testing.assert_close(adaptive, static)
    torch.testing.assert_close(s_adaptive, s_static)


# ---- constant partitions (the UNet's grid path) --------------------------------------------


@PROPS
@given(nk=sizes_and_keep(300))
def test_partition_is_cached_and_a_constant_split(nk):
    n, n_keep = nk
    part = partition(n, n_keep)
    assert isinstance(part, Partition) and partition(n, n_keep) is part
    t, s = part.targets.tolist(), part.sources.tolist()
    assert len(t) == n_keep and len(s) == n - n_keep == part.n_sources
    assert sorted(t + s) == list(range(n)) and t == sorted(t) and s == sorted(s)
    assert torch.equal(torch.cat([part.targets, part.sources])[part.inverse], torch.arange(n))


def test_partition_and_step_reject_impossible_counts():
    for n, n_keep in [(10, 0), (10, 11), (5, -1)]:
        with pytest.raises(ValueError, match="n_keep"):
            partition(n, n_keep)
        with pytest.raises(ValueError, match="n_keep"):
            mame_step(*make_tokens(0, 1, n), torch.ones(1, n, 1), n_keep)


def test_mame_merge_is_the_size_weighted_average_and_mare_puts_positions_back():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])  # targets 0, 2 (n=3, keep 2 -> source 1)
    part = partition(3, 2)
    assert part.sources.tolist() == [1]
    sizes = torch.tensor([[[2.0], [4.0], [1.0]]])
    w = torch.tensor([[[0.25], [0.75]]])
    merged, new_sizes = mame_merge(x, sizes, w, part)
    torch.testing.assert_close(new_sizes, torch.tensor([[[3.0], [4.0]]]))
    torch.testing.assert_close(merged, torch.tensor([[[(2 * 1 + 1 * 3) / 3], [(10 + 3 * 3) / 4]]]))
    restored = mare_restore_partition(merged, w, part)
    torch.testing.assert_close(restored[:, [0, 2]], merged)
    torch.testing.assert_close(restored[:, 1], 0.25 * merged[:, 0] + 0.75 * merged[:, 1])


@pytest.mark.parametrize("na,n_merge,seed", [(1, 1, 0), (7, 3, 1), (16, 0, 2), (16, 16, 3),
                                             (33, 10, 4)])
def test_stable_order_puts_merged_then_kept_each_in_original_order(na, n_merge, seed):
    from mame_export.ops import stable_order

    g = torch.Generator().manual_seed(seed)
    score = torch.randn(3, na, generator=g)
    rank = redundancy_ranks(score)
    p = stable_order(rank, n_merge)
    assert p.shape == (3, na, na)
    assert torch.equal(p.sum(1), torch.ones(3, na)) and torch.equal(p.sum(2), torch.ones(3, na))
    picked = p.argmax(-1)  # row q -> the candidate it selects
    for b in range(3):
        merged = [i for i in range(na) if rank[b, i] < n_merge]
        kept = [i for i in range(na) if rank[b, i] >= n_merge]
        assert picked[b].tolist() == merged + kept


def test_a_near_tie_between_kept_tokens_does_not_change_the_step():
    # Two kept candidates whose scores swap order (as rounding on another backend can
    # make them) leave the output exactly as it was: only the merge boundary matters.
    g = torch.Generator().manual_seed(0)
    x, k = torch.randn(1, 12, 8, generator=g), torch.randn(1, 12, 8, generator=g)
    sizes = torch.ones(1, 12, 1)
    out, s_out, _ = mame_step(x, k, sizes, 9)
    from mame_export.ops.mame import _merge_selected, _redundancy

    sim, score = _redundancy(k, sizes)
    rank = redundancy_ranks(score)
    kept = [i for i in range(score.shape[-1]) if rank[0, i] >= 3]
    a, b = kept[0], kept[1]
    swapped = rank.clone()
    swapped[0, a], swapped[0, b] = rank[0, b], rank[0, a]
    out2, s_out2, _ = _merge_selected(x, sizes, sim, swapped, 3, 1.0)
    assert torch.equal(out, out2) and torch.equal(s_out, s_out2)
