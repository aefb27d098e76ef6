"""The ToMe baseline (mame_export.baselines.tome): matching, merge, patch, plan."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_vit
from timm.models.vision_transformer import VisionTransformer

import mame_export
from mame_export.baselines import (
    apply_tome,
    bipartite_soft_matching,
    is_tome_patched,
    merge_wavg,
    tome_plan,
)

N_PATCHES = 64  # 32 px / 4 px patches


@pytest.fixture(scope="module")
def base() -> VisionTransformer:
    return tiny_vit()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trace_blocks(model: torch.nn.Module, x: torch.Tensor):
    """Tokens entering each block, and the sizes each block outputs."""
    seen_in, sizes_out = [], []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].shape[1]))
             for blk in model.blocks]
    hooks += [blk.register_forward_hook(lambda m, a, out: sizes_out.append(out[1]))
              for blk in model.blocks]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, seen_in, sizes_out


def test_r0_is_identity(base, pixels):
    with torch.no_grad():
        ref = base(pixels)
        for patched in (apply_tome(copy.deepcopy(base), 0.0),
                        apply_tome(copy.deepcopy(base), r_tokens=0)):
            assert (patched(pixels) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_token_counts_match_mame_plan(base, pixels, r):
    tome = apply_tome(copy.deepcopy(base), r)
    mame = mame_export.apply(copy.deepcopy(base), r)
    plan, mplan = tome_plan(tome), mame_export.merge_plan(mame)
    assert plan.family == "tome"
    assert plan.tokens_per_block == mplan.tokens_per_block
    assert plan.final_patches == mplan.final_patches == round(N_PATCHES * (1 - r))
    assert plan.macs_unpatched == mplan.macs_unpatched
    assert plan.flops_ratio < 1.0
    # What runs is what the plan says: tokens entering each block, at run time.
    y, seen, sizes = _trace_blocks(tome, pixels)
    assert seen == plan.tokens_per_block
    assert torch.isfinite(y).all() and y.shape == (3, 10)
    for s, bp in zip(sizes, plan.blocks, strict=True):
        if s is None:  # no merge yet: every token still stands for one patch
            assert not any(b.merges for b in plan.blocks[: bp.index + 1])
            continue
        assert s.shape[1] == bp.tokens_out
        torch.testing.assert_close(s[:, 1:].sum(dim=1), torch.full((3, 1), float(N_PATCHES)))
        assert torch.all(s[:, :1] == 1.0)  # the class token is never merged


def test_same_layers_as_mame(base):
    layers = [1, 3]
    tome = apply_tome(copy.deepcopy(base), 0.5, layers=layers)
    mame = mame_export.apply(copy.deepcopy(base), 0.5, layers=layers)
    assert tome_plan(tome).tokens_per_block == mame_export.merge_plan(mame).tokens_per_block
    assert tome_plan(tome).merge_layers == layers


def test_r_tokens_is_tomes_own_schedule(base, pixels):
    model = apply_tome(copy.deepcopy(base), r_tokens=20)
    # 64 -> 44 -> 24 -> 12 (clamped to half) -> 6, class token on top
    assert tome_plan(model).tokens_per_block == [65, 45, 25, 13]
    assert tome_plan(model).final_patches == 6
    assert tome_plan(model).r == pytest.approx(1 - 6 / 64)
    _, seen, _ = _trace_blocks(model, pixels)
    assert seen == [65, 45, 25, 13]
    per_block = apply_tome(copy.deepcopy(base), r_tokens=[0, 8, 0, 4])
    assert tome_plan(per_block).tokens_per_block == [65, 65, 57, 57]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 4])
def test_finite_outputs(base, dtype, batch):
    model = apply_tome(copy.deepcopy(base), 0.75).to(dtype)
    x = torch.randn(batch, 3, 32, 32).to(dtype)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (batch, 10) and y.dtype == dtype
    assert torch.isfinite(y).all()


def test_identical_and_zero_tokens_stay_finite(base):
    model = apply_tome(copy.deepcopy(base), 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 3, 32, 32))).all()
        assert torch.isfinite(model(torch.ones(2, 3, 32, 32))).all()


def test_matching_picks_the_most_similar_pair():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 10, 16, generator=gen)
    metric[0, 4] = metric[0, 7] * 3.0  # A token 2 (position 4) == B token 3 (position 7)
    m = bipartite_soft_matching(metric, 1)
    assert m.r == 1
    assert m.sources.flatten().tolist() == [2]
    assert m.destinations.flatten().tolist() == [3]
    # Every A token is either merged or kept, exactly once.
    m3 = bipartite_soft_matching(metric, 3)
    a_tokens = sorted(m3.sources.flatten().tolist() + m3.unmerged.flatten().tolist())
    assert a_tokens == list(range(5))
    assert all(0 <= d < 5 for d in m3.destinations.flatten().tolist())


def test_merge_wavg_preserves_mass_and_size():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 8, generator=gen)
    sizes = torch.randint(1, 5, (2, 12, 1), generator=gen).float()
    m = bipartite_soft_matching(torch.randn(2, 12, 6, generator=gen), 4)
    merged, new_sizes = merge_wavg(m, x, sizes)
    assert merged.shape == (2, 8, 8) and new_sizes.shape == (2, 8, 1)
    torch.testing.assert_close(new_sizes.sum(dim=1), sizes.sum(dim=1))
    torch.testing.assert_close((merged * new_sizes).sum(dim=1), (x * sizes).sum(dim=1))


def test_merge_of_identical_tokens_keeps_the_value():
    x = torch.ones(1, 6, 4) * 2.5
    m = bipartite_soft_matching(torch.randn(1, 6, 3), 3)
    merged, sizes = merge_wavg(m, x, torch.ones(1, 6, 1))
    torch.testing.assert_close(merged, torch.full((1, 3, 4), 2.5))
    assert sizes.shape == (1, 3, 1) and sizes.sum().item() == 6.0  # B tokens absorbed all of A


def test_errors(base):
    with pytest.raises(ValueError, match="r must be in"):
        apply_tome(copy.deepcopy(base), 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        apply_tome(copy.deepcopy(base))
    with pytest.raises(ValueError, match="at most half"):
        apply_tome(copy.deepcopy(base), 0.75, layers=[0])  # 48 of 64 in one block
    with pytest.raises(ValueError, match="MaMe-patched"):
        apply_tome(mame_export.apply(copy.deepcopy(base), 0.5), 0.5)
    with pytest.raises(TypeError, match="VisionTransformer"):
        apply_tome(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="0..5"):
        bipartite_soft_matching(torch.randn(1, 10, 4), 6)
    with pytest.raises(ValueError, match="not ToMe-patched"):
        tome_plan(base)


def test_patch_keeps_weights_and_reapplies(base, pixels):
    model = apply_tome(copy.deepcopy(base), 0.5)
    assert is_tome_patched(model) and not is_tome_patched(base)
    assert isinstance(model, VisionTransformer)
    assert model.state_dict().keys() == base.state_dict().keys()
    again = apply_tome(model, 0.25)  # re-applying replaces the plan
    assert tome_plan(again).r == 0.25
    assert type(again).__mro__.count(VisionTransformer) == 1
    _, seen, _ = _trace_blocks(again, pixels)
    assert seen == tome_plan(again).tokens_per_block


def test_average_pool_uses_sizes():
    model = tiny_vit(global_pool="avg", class_token=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert (apply_tome(copy.deepcopy(model), 0.0)(x) - ref).abs().max() <= 1e-5
        y = apply_tome(copy.deepcopy(model), 0.5)(x)
    assert torch.isfinite(y).all() and y.shape == (2, 10)
