"""Property tests for the MaMe / MaRe ops (mame_export.ops): invariants of mame.md."""

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
    partition,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from threads, and on a busy small CPU the thread
    # pool's hand-offs cost more than the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Bounded and deadline-free: the CPU is small and shared.
PROPS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
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
taus = st.floats(-0.9, 0.95, allow_nan=False)
batches = st.sampled_from([1, 2, 8])


def reference_weights(sim: np.ndarray, tau: float) -> np.ndarray:
    """mame.md steps 3-6, one column at a time, in float64 (a slow, literal reading)."""
    w_out = np.zeros_like(sim)
    for b in range(sim.shape[0]):
        for j in range(sim.shape[2]):
            s = sim[b, :, j]
            w = np.maximum(s - tau, 0.0)
            if w.sum() > 0:
                w = w / w.sum()
                zeta = w[w > 0].mean()
                w = np.where(w >= zeta * (1 - 1e-6), w, 0.0)
                w = w / w.sum()
            else:
                w = (s == s.max()).astype(np.float64)
                w = w / w.sum()
            w_out[b, :, j] = w
    return w_out


# ---- the weight matrix ---------------------------------------------------------------


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS))
def test_every_column_of_w_sums_to_one(nk, b, seed, tau, kind):
    n, n_keep = nk
    if n_keep == n:
        n_keep -= 1
    if n_keep == 0:
        return
    _, k = make_tokens(seed, b, n, kind)
    w = mame_weights(k[:, :n_keep], k[:, n_keep:], tau)
    assert w.shape == (b, n_keep, n - n_keep)
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(b, n - n_keep), atol=1e-5, rtol=0)


@PROPS
@given(nk=sizes_and_keep(24), b=st.sampled_from([1, 3]), seed=seeds, tau=taus)
def test_weights_match_a_literal_reading_of_the_method(nk, b, seed, tau):
    n, n_keep = nk
    if n_keep == n:
        return
    _, k = make_tokens(seed, b, n, "random")
    kt, ks = k[:, :n_keep], k[:, n_keep:]
    w = mame_weights(kt, ks, tau)
    sim = F.normalize(kt.double(), dim=-1) @ F.normalize(ks.double(), dim=-1).transpose(1, 2)
    ref = reference_weights(sim.numpy(), tau)
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-4)


def test_distinctive_source_falls_back_to_its_most_similar_target():
    # Targets along e0, e1, e2; the source is closest to e1 but under tau everywhere.
    kt = torch.eye(3)[None]
    ks = torch.tensor([[[0.1, 0.4, 0.2]]])
    w = mame_weights(kt, ks, tau=0.9)
    torch.testing.assert_close(w[0, :, 0], torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("gap", [1e-2, 1e-5, 1e-8, 1e-11, 1e-14])
def test_a_source_barely_over_the_threshold_keeps_all_its_mass(gap):
    # Similarity `gap` with target 0 and -1 with target 1, tau = 0: one tiny link.
    kt = torch.eye(2)[None]
    ks = torch.tensor([[[gap, -1.0]]])
    w = mame_weights(kt, ks, tau=0.0)
    torch.testing.assert_close(w[0, :, 0], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    x = torch.tensor([[[1.0], [5.0], [3.0]]])  # partition(3, 2): targets 0, 2; source 1
    merged, sizes = mame_merge(x, torch.ones(1, 3, 1), w, partition(3, 2))
    torch.testing.assert_close((merged * sizes).sum(), torch.tensor(9.0))


def test_refinement_keeps_only_weights_at_or_above_the_column_mean():
    # Cosine sims with targets e0, e1, e2 are the unit source's components.
    kt = torch.eye(3)[None]
    ks = F.normalize(torch.tensor([[[0.9, 0.8, 0.55]]]), dim=-1)
    sims = ks[0, 0]  # ~0.655, 0.582, 0.400
    raw = (sims - 0.35).clamp_min(0)  # all three pass the threshold...
    assert (raw > 0).all()
    w = mame_weights(kt, ks, 0.35)[0, :, 0]
    # ...but only those at or above the mean (1/3 of the column) survive refinement.
    assert w[2] == 0 and w[0] > w[1] > 0
    torch.testing.assert_close(w[:2], raw[:2] / raw[:2].sum())


# ---- the step: sizes, mass, shapes ----------------------------------------------------


@PROPS
@given(
    n=st.integers(4, 64), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS),
    keeps=st.lists(st.floats(0.3, 1.0), min_size=1, max_size=6),
)
def test_total_size_stays_the_input_patch_count_through_repeated_steps(n, b, seed, tau, kind,
                                                                       keeps):
    x, k = make_tokens(seed, b, n, kind)
    proj = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    sizes = torch.ones(b, n, 1)
    for step, keep in enumerate(keeps):
        n_keep = max(1, round(x.shape[1] * keep))
        metric = k if step == 0 else x @ proj  # later steps: a metric from the merged tokens
        x, sizes, _, _ = mame_step(x, metric, sizes, n_keep, tau)
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
    merged, new_sizes, _, _ = mame_step(x, k, sizes, n_keep, tau)
    before = (sizes * x).sum(dim=1)
    after = (new_sizes * merged).sum(dim=1)
    scale = (sizes * x.abs()).sum(dim=1)
    assert ((after - before).abs() <= 2e-6 * scale + 1e-6).all()
    torch.testing.assert_close(new_sizes.sum(dim=1), sizes.sum(dim=1), rtol=1e-5, atol=0)


@PROPS
@given(nk=sizes_and_keep(), b=batches, seeds2=st.tuples(seeds, seeds),
       taus2=st.tuples(taus, taus), kinds=st.tuples(st.sampled_from(KINDS),
                                                    st.sampled_from(KINDS)))
def test_output_shapes_depend_only_on_n_and_n_keep(nk, b, seeds2, taus2, kinds):
    n, n_keep = nk
    shapes = set()
    for seed, tau, kind in zip(seeds2, taus2, kinds, strict=True):
        x, k = make_tokens(seed, b, n, kind)
        merged, sizes, w, part = mame_step(x, k, torch.ones(b, n, 1), n_keep, tau)
        shapes.add((merged.shape, sizes.shape, w.shape, part.targets.shape))
    assert shapes == {(
        torch.Size([b, n_keep, 8]), torch.Size([b, n_keep, 1]),
        torch.Size([b, n_keep, n - n_keep]), torch.Size([n_keep]),
    )}


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds, tau=taus, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from(sorted(DTYPES)))
def test_no_nan_or_inf_for_any_input_kind_dtype_or_batch(nk, b, seed, tau, kind, dtype):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n, kind, DTYPES[dtype])
    sizes = torch.ones(b, n, 1, dtype=DTYPES[dtype])
    merged, new_sizes, w, _ = mame_step(x, k, sizes, n_keep, tau)
    assert merged.dtype == DTYPES[dtype]
    assert new_sizes.dtype == w.dtype == torch.float32
    for t in (merged, new_sizes, w):
        assert torch.isfinite(t).all()
    # A convex mix stays within the range of its inputs (up to the dtype's rounding).
    lo, hi = x.float().amin(dim=1, keepdim=True), x.float().amax(dim=1, keepdim=True)
    rel = 1e-5 if dtype == "fp32" else 2e-2
    tol = rel * x.float().abs().amax(dim=1, keepdim=True) + 1e-6
    assert (merged.float() >= lo - tol).all()
    assert (merged.float() <= hi + tol).all()


def test_identical_tokens_merge_to_themselves():
    x, k = make_tokens(0, 2, 16, "identical")
    merged, sizes, _, _ = mame_step(x, k, torch.ones(2, 16, 1), 5, tau=0.5)
    torch.testing.assert_close(merged, x[:, :5])
    torch.testing.assert_close(sizes.sum(dim=1), torch.full((2, 1), 16.0))


@PROPS
@given(nk=sizes_and_keep(), seed=seeds, tau=taus, kind=st.sampled_from(KINDS))
def test_static_step_treats_samples_independently(nk, seed, tau, kind):
    n, n_keep = nk
    x, k = make_tokens(seed, 4, n, kind)
    sizes = torch.ones(4, n, 1)
    out = mame_step(x, k, sizes, n_keep, tau)
    # Replace every other sample: sample 0's outputs must not move at all.
    x2, k2 = make_tokens(seed + 7, 4, n, "random")
    x2[0], k2[0] = x[0], k[0]
    out2 = mame_step(x2, k2, sizes, n_keep, tau)
    for a, b_ in zip(out[:3], out2[:3], strict=True):
        assert torch.equal(a[0], b_[0])
    # And alone it gives the same result as within the batch.
    alone = mame_step(x[:1], k[:1], sizes[:1], n_keep, tau)
    for a, b_ in zip(out[:3], alone[:3], strict=True):
        torch.testing.assert_close(a[:1], b_, atol=1e-6, rtol=1e-6)


# ---- MaRe -----------------------------------------------------------------------------


@PROPS
@given(nk=sizes_and_keep(24), b=batches, seed=seeds, data=st.data())
def test_mare_after_mame_restores_inputs_when_sources_duplicate_targets(nk, b, seed, data):
    n, n_keep = nk
    part = partition(n, n_keep)
    g = torch.Generator().manual_seed(seed)
    # Targets with orthogonal metrics; each source copies one target (token and metric).
    copy_of = data.draw(st.lists(st.integers(0, n_keep - 1), min_size=n - n_keep,
                                 max_size=n - n_keep))
    x_t = torch.randn(b, n_keep, 5, generator=g)
    k_t = torch.eye(n_keep).expand(b, -1, -1)
    x = torch.empty(b, n, 5)
    k = torch.empty(b, n, n_keep)
    x[:, part.targets], k[:, part.targets] = x_t, k_t
    idx = torch.tensor(copy_of, dtype=torch.long)
    x[:, part.sources], k[:, part.sources] = x_t[:, idx], k_t[:, idx]

    merged, sizes, w, part2 = mame_step(x, k, torch.ones(b, n, 1), n_keep, tau=0.5)
    assert part2 is part
    torch.testing.assert_close(merged, x_t, atol=1e-6, rtol=1e-6)
    restored = mare_restore(merged, w, part)
    torch.testing.assert_close(restored, x, atol=1e-6, rtol=1e-6)
    counts = torch.bincount(idx, minlength=n_keep).float() + 1
    torch.testing.assert_close(sizes[0, :, 0], counts)


def test_mare_puts_every_position_back_in_order():
    # Whatever the weights, targets return to their own positions.
    x, k = make_tokens(3, 2, 20, "random")
    merged, _, w, part = mame_step(x, k, torch.ones(2, 20, 1), 12, tau=0.2)
    restored = mare_restore(merged, w, part)
    assert restored.shape == x.shape
    torch.testing.assert_close(restored[:, part.targets], merged)
    torch.testing.assert_close(restored[:, part.sources], w.transpose(1, 2) @ merged)


def test_mare_with_nothing_merged_is_the_identity():
    x, k = make_tokens(0, 2, 9, "random")
    merged, sizes, w, part = mame_step(x, k, torch.ones(2, 9, 1), 9, tau=0.5)
    assert torch.equal(merged, x) and w.shape == (2, 9, 0)
    assert torch.equal(mare_restore(merged, w, part), x)


# ---- gradients --------------------------------------------------------------------------


@PROPS
@given(nk=sizes_and_keep(), b=st.sampled_from([1, 3]), seed=seeds, tau=taus,
       kind=st.sampled_from(KINDS))
def test_gradients_flow_and_are_finite(nk, b, seed, tau, kind):
    n, n_keep = nk
    x, k = make_tokens(seed, b, n, kind)
    x.requires_grad_(True)
    k.requires_grad_(True)
    merged, sizes, w, part = mame_step(x, k, torch.ones(b, n, 1), n_keep, tau)
    restored = mare_restore(merged, w, part)
    (merged.square().sum() + sizes.sum() + restored.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    if n_keep < n:  # with nothing to merge the metric is not used
        assert k.grad is not None and torch.isfinite(k.grad).all()


def test_metric_gets_a_gradient_when_links_are_soft():
    x, k = make_tokens(5, 2, 20, "random")
    k.requires_grad_(True)
    merged, _, _, _ = mame_step(x, k, torch.ones(2, 20, 1), 10, tau=-0.5)
    merged.square().sum().backward()
    assert k.grad.abs().sum() > 0


# ---- the partition: constant, cached, evenly spread ------------------------------------


@PROPS
@given(nk=sizes_and_keep(300))
def test_partition_is_cached_and_a_constant_split(nk):
    n, n_keep = nk
    part = partition(n, n_keep)
    assert isinstance(part, Partition)
    assert partition(n, n_keep) is part
    assert partition(n, n_keep, torch.device("cpu")) is part
    t, s = part.targets.tolist(), part.sources.tolist()
    assert len(t) == n_keep and len(s) == n - n_keep == part.n_sources
    assert sorted(t + s) == list(range(n)) and t == sorted(t) and s == sorted(s)
    assert torch.equal(torch.cat([part.targets, part.sources])[part.inverse], torch.arange(n))
    if len(s) > 1:  # evenly spread: gaps between sources differ by at most one
        gaps = np.diff(s)
        assert gaps.max() - gaps.min() <= 1


def test_partition_made_under_inference_mode_still_serves_autograd():
    # The cache outlives the mode of its first call (e.g. an inference_mode parity check).
    with torch.inference_mode():
        part = partition(97, 41)
        mame_step(*make_tokens(0, 1, 97), torch.ones(1, 97, 1), 41, 0.5)
    assert not part.targets.is_inference() and not part.inverse.is_inference()
    x, k = make_tokens(1, 2, 97)
    x.requires_grad_(True)
    merged, _, w, part2 = mame_step(x, k, torch.ones(2, 97, 1), 41, 0.5)
    assert part2 is part
    mare_restore(merged, w, part).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_partition_rejects_impossible_counts():
    for n, n_keep in [(10, 0), (10, 11), (5, -1)]:
        with pytest.raises(ValueError, match="n_keep"):
            partition(n, n_keep)


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
        name = str(func.overloadpacket.__name__) + "." + func._overloadname
        self.ops.append(name)
        if func.overloadpacket.__name__ == "index_select":
            self.index_args.append(args[2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["random", "zero_metric", "identical"])
def test_static_step_has_no_data_dependent_indexing(kind):
    x, k = make_tokens(1, 2, 30, kind)
    part = partition(30, 17)
    with _OpLog() as log:
        merged, sizes, w, _ = mame_step(x, k, torch.ones(2, 30, 1), 17, tau=0.5)
        mare_restore(merged, w, part)
    bad = [op for op in log.ops if any(f in op for f in FORBIDDEN_OPS)]
    assert not bad, bad
    # The only index lists are the partition's constants (the same tensor objects).
    constants = {id(part.targets), id(part.sources), id(part.inverse)}
    assert log.index_args and all(id(i) in constants for i in log.index_args)


def test_static_step_reuses_the_partition_whatever_the_data():
    parts = []
    for seed, kind in [(0, "random"), (1, "zero_metric"), (2, "clustered")]:
        x, k = make_tokens(seed, 2, 25, kind)
        parts.append(mame_step(x, k, torch.ones(2, 25, 1), 11, 0.5)[3])
    assert parts[0] is parts[1] is parts[2] is partition(25, 11)


# ---- adaptive mode ----------------------------------------------------------------------


def _orthogonal_sources(b: int, n: int, n_keep: int, duplicate: list[bool]) -> torch.Tensor:
    """A metric where source j copies a target if duplicate[j], else is orthogonal to all."""
    part = partition(n, n_keep)
    k = torch.zeros(b, n, n)
    k[:, part.targets, torch.arange(n_keep)] = 1.0
    for j, (src, dup) in enumerate(zip(part.sources.tolist(), duplicate, strict=True)):
        k[:, src, (j % n_keep) if dup else n_keep + j] = 1.0
    return k


def test_adaptive_retains_distinctive_sources_and_merges_duplicates():
    n, n_keep, b = 20, 8, 2
    x = torch.randn(b, n, 4)
    sizes = torch.ones(b, n, 1)
    all_dup = _orthogonal_sources(b, n, n_keep, [True] * 12)
    none_dup = _orthogonal_sources(b, n, n_keep, [False] * 12)
    half = _orthogonal_sources(b, n, n_keep, [j % 2 == 0 for j in range(12)])
    counts = [mame_step_adaptive(x, k, sizes, n_keep, 0.5)[0].shape[1]
              for k in (all_dup, half, none_dup)]
    assert counts == [n_keep, n_keep + 6, n]


def test_adaptive_retained_set_is_the_union_over_the_batch():
    n, n_keep = 20, 8
    a = _orthogonal_sources(1, n, n_keep, [j < 4 for j in range(12)])  # 8 distinctive
    c = _orthogonal_sources(1, n, n_keep, [j >= 8 or j < 2 for j in range(12)])  # 6 (2..7)
    x = torch.randn(2, n, 4)
    sizes = torch.ones(2, n, 1)
    alone = [mame_step_adaptive(x[i:i + 1], m, sizes[:1], n_keep, 0.5)[0].shape[1]
             for i, m in enumerate((a, c))]
    assert alone == [n_keep + 8, n_keep + 6]
    both, both_sizes = mame_step_adaptive(x, torch.cat([a, c]), sizes, n_keep, 0.5)
    assert both.shape[1] == n_keep + 10  # distinctive somewhere: sources 2..11
    torch.testing.assert_close(both_sizes.sum(dim=1), torch.full((2, 1), float(n)))
    torch.testing.assert_close((both_sizes * both).sum(dim=1), (sizes * x).sum(dim=1),
                               atol=1e-5, rtol=1e-5)


@PROPS
@given(nk=sizes_and_keep(), b=batches, seed=seeds,
       taus2=st.tuples(taus, taus), kind=st.sampled_from(("random", "clustered")))
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
        assert (((s * out).sum(dim=1) - x.sum(dim=1)).abs() <= 2e-6 * scale + 1e-6).all()


def test_adaptive_with_every_source_linked_equals_the_static_step():
    x, k = make_tokens(2, 3, 30, "random")
    sizes = torch.ones(3, 30, 1)
    static, s_static, _, _ = mame_step(x, k, sizes, 12, tau=-1.0)
    adaptive, s_adaptive = mame_step_adaptive(x, k, sizes, 12, tau=-1.0)
    torch.testing.assert_close(adaptive, static)
    torch.testing.assert_close(s_adaptive, s_static)


def test_mame_merge_is_the_size_weighted_average():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])  # targets 0, 2 (n=3, keep 2 -> source 1)
    part = partition(3, 2)
    assert part.sources.tolist() == [1]
    sizes = torch.tensor([[[2.0], [4.0], [1.0]]])
    w = torch.tensor([[[0.25], [0.75]]])
    merged, new_sizes = mame_merge(x, sizes, w, part)
    torch.testing.assert_close(new_sizes, torch.tensor([[[3.0], [4.0]]]))
    torch.testing.assert_close(merged, torch.tensor([[[(2 * 1 + 1 * 3) / 3], [(10 + 3 * 3) / 4]]]))
