"""MaMe on timm's VisionTransformer family: parity, token counts, MACs, pooling, errors.

Every model here is tiny (width 32, depth 4, 2 heads), so the file runs in seconds on a
small CPU; the variants cover the options users meet in real timm checkpoints.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import SwiGLUPacked
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import mame_export
from mame_export import merge_plan

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
            num_classes=7)

# name -> (constructor, kwargs over TINY)
VARIANTS: dict[str, tuple[type, dict]] = {
    "vit_class_token": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "registers": (VisionTransformer, dict(reg_tokens=4)),
    "no_class_token_avg": (VisionTransformer, dict(class_token=False, global_pool="avg")),
    "avgmax": (VisionTransformer, dict(global_pool="avgmax")),
    "max": (VisionTransformer, dict(class_token=False, global_pool="max")),
    "map_siglip": (VisionTransformer, dict(class_token=False, global_pool="map")),
    "layer_scale_no_embed_class": (VisionTransformer, dict(init_values=1e-5, no_embed_class=True)),
    "qk_norm": (VisionTransformer, dict(qk_norm=True)),
    "clip_pre_norm": (VisionTransformer, dict(pre_norm=True, qkv_bias=True)),
    "swiglu": (VisionTransformer, dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.5)),
    "img_size_48x40": (VisionTransformer, dict(img_size=(48, 40), patch_size=8)),
    # SigLIP2-B@512's token count (patch 16 at 512: 1024 patches) at a toy width and depth.
    "siglip2_like_1024": (VisionTransformer, dict(img_size=512, patch_size=16, depth=3,
                                                  class_token=False, global_pool="map")),
}


def build(variant: str, fused: bool = True, seed: int = 0) -> nn.Module:
    cls, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    model = cls(**{**TINY, **kw}).eval()
    set_fused(model, fused)
    return model


def set_fused(model: nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    if model.attn_pool is not None:
        model.attn_pool.fused_attn = fused


def image(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def tokens_entering_blocks(model: nn.Module, x: torch.Tensor) -> list[int]:
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
             for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def counted_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per sample of matrix products, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:  # (no_grad trips its module tracker)
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


# ---- parity and token counts -----------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_matches_the_unpatched_model(variant, fused):
    model = build(variant, fused)
    x = image(model)
    with torch.no_grad():
        ref, ref_feats = model(x), model.forward_features(x)
        mame_export.apply(model, 0.0)
        out, feats = model(x), model.forward_features(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5
    assert (feats - ref_feats).abs().max() <= 1e-5
    assert merge_plan(model).final_patches == model.patch_embed.num_patches


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r05_leaves_half_the_patches_as_planned(variant, fused):
    model = build(variant, fused)
    x = image(model)
    with torch.no_grad():
        ref = model(x)
    n, p = model.patch_embed.num_patches, model.num_prefix_tokens
    mame_export.apply(model, 0.5)
    plan = merge_plan(model)
    assert abs(plan.final_patches - round(n * 0.5)) <= 1
    assert plan.num_patches == n and plan.num_protected == p
    assert tokens_entering_blocks(model, x) == plan.tokens_per_block
    with torch.no_grad():
        feats, sizes = model._mame_features(x)
        out, again = model(x), model(x)
    assert feats.shape[1] - p == plan.final_patches
    # Protected tokens stand for nothing but themselves; patches for all N of them.
    torch.testing.assert_close(sizes[:, :p], torch.ones(x.shape[0], p, 1))
    torch.testing.assert_close(sizes[:, p:].sum(dim=1), torch.full((x.shape[0], 1), float(n)))
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)


@pytest.mark.parametrize("variant", ["vit_class_token", "map_siglip", "no_class_token_avg"])
def test_sdpa_and_explicit_attention_agree_after_merging(variant):
    outs = []
    for fused in (True, False):
        model = mame_export.apply(build(variant, fused), 0.5)
        with torch.no_grad():
            outs.append(model(image(model)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["vit_class_token", "map_siglip", "registers"])
def test_proportional_attention_on_and_off(variant):
    outs = {}
    for prop_attn in (True, False):
        model = mame_export.apply(build(variant), 0.5, prop_attn=prop_attn)
        assert merge_plan(model).prop_attn is prop_attn
        with torch.no_grad():
            outs[prop_attn] = model(image(model))
        assert torch.isfinite(outs[prop_attn]).all()
    # Once tokens carry sizes > 1 the log-size bias changes the result.
    assert not torch.allclose(outs[True], outs[False])


def test_proportional_attention_adds_log_size_to_the_logits():
    model = mame_export.apply(build("vit_class_token", fused=False), 0.5)
    blk = model.blocks[1]
    x = torch.randn(2, 20, 32)
    size = torch.rand(2, 20, 1) * 3 + 1
    bias = size.log().transpose(1, 2).unsqueeze(1)
    with torch.no_grad():
        out, _ = blk.attn(x, bias)
        # Reference: unpatched timm attention with the bias as an additive mask.
        base = type(blk.attn).__bases__[1]
        ref = base.forward(blk.attn, x, attn_mask=bias)
    torch.testing.assert_close(out, ref)


def test_vit_b16_schedule_leaves_98_of_196_after_block_8():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                              num_classes=0)
    plan = merge_plan(mame_export.apply(model, 0.5))
    assert plan.merge_layers == list(range(8))
    assert plan.tokens_per_block[8:] == [99] * 4  # 98 patches + the class token
    assert plan.final_patches == 98
    table = str(plan)
    assert "196 patches + 1 protected" in table and "MACs" in table
    assert table.count("(no merge)") == 4
    keeps = [b.keep_ratio for b in plan.blocks[:8]]
    assert all(0.9 < k < 0.93 for k in keeps)  # each about 0.5 ** (1 / 8) = 0.917


def test_runtime_schedule_follows_the_plan_when_some_layers_round_to_no_merge():
    # 16 patches, r = 0.34 over 8 layers: a few layers do not drop a token after rounding.
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=12, num_heads=2,
                              num_classes=3).eval()
    mame_export.apply(model, 0.34)
    plan = merge_plan(model)
    assert len(plan.merge_layers) < 8
    assert tokens_entering_blocks(model, image(model)) == plan.tokens_per_block


def test_custom_layers_merge_only_there():
    model = build("vit_class_token")
    mame_export.apply(model, 0.5, layers=[1, 3])
    plan = merge_plan(model)
    assert plan.merge_layers == [1, 3]
    seen = tokens_entering_blocks(model, image(model))
    assert seen == plan.tokens_per_block
    assert seen[0] == seen[1] == 65 and seen[2] == seen[3] < 65
    assert plan.final_patches == 32


def test_reapplying_replaces_the_plan_and_r0_restores_parity():
    model = build("registers")
    x = image(model)
    with torch.no_grad():
        ref = model(x)
        mame_export.apply(model, 0.6)
        assert merge_plan(model).final_patches == round(64 * 0.4)
        mame_export.apply(model, 0.0)
        assert (model(x) - ref).abs().max() <= 1e-5
    assert type(model).__name__ == "MaMeVisionTransformer"
    assert isinstance(model, VisionTransformer)


def test_dynamic_image_size_schedules_from_the_actual_token_count():
    model = VisionTransformer(**{**TINY, "dynamic_img_size": True}).eval()
    mame_export.apply(model, 0.5)
    with torch.no_grad():
        feats, _ = model._mame_features(torch.randn(1, 3, 48, 48))  # 144 patches, not 64
    assert feats.shape[1] - 1 == 72


def test_a_real_timm_config_dinov2_registers():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                              depth=3, num_classes=5).eval()
    x = image(model)
    with torch.no_grad():
        ref = model(x)
        mame_export.apply(model, 0.0)
        assert (model(x) - ref).abs().max() <= 1e-5
        mame_export.apply(model, 0.5)
        feats, _ = model._mame_features(x)
    assert model.num_prefix_tokens == 5
    assert feats.shape[1] - 5 == merge_plan(model).final_patches == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    model = mame_export.apply(build("map_siglip").to(dtype), 0.5)
    with torch.no_grad():
        out = model(image(model).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


# ---- MACs --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plan_macs_match_torch_flop_counter(variant):
    # FlopCounterMode does not count the fused CPU SDPA kernel, so count explicit attention;
    # the matrix products are the same either way.
    model = build(variant, fused=False)
    x = image(model, batch=2)
    unpatched = counted_macs(model, x)
    mame_export.apply(model, 0.5)
    plan = merge_plan(model)
    patched = counted_macs(model, x)
    assert plan.macs_unpatched == pytest.approx(unpatched, rel=0.01)
    assert plan.macs == pytest.approx(patched, rel=0.01)
    assert plan.flops_ratio == pytest.approx(patched / unpatched, rel=0.01)


@pytest.mark.parametrize("name, img, max_share", [
    ("vit_base_patch16_224", 224, 0.005),
    ("vit_base_patch16_siglip_512", 512, 0.02),  # 1024 patches: the (Na, Na) products grow
])
def test_merge_products_are_a_small_share_at_real_sizes(name, img, max_share):
    # The tiny test configs above have channels so few that the merge's own (Na, Na, C)
    # products can outweigh what merging saves; at real widths they must not.
    import timm

    from mame_export.ops import step_macs

    with torch.device("meta"):
        model = timm.create_model(name, img_size=img)
    mame_export.apply(model, 0.5)
    plan = merge_plan(model)
    p = plan.num_protected
    merge = sum(step_macs(b.tokens_in - p, b.tokens_out - p, model.embed_dim,
                          model.blocks[0].attn.head_dim) for b in plan.blocks if b.merges)
    assert merge / plan.macs_unpatched < max_share
    assert plan.flops_ratio < 0.7


# ---- pooling -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["no_class_token_avg", "avgmax"])
def test_average_pooling_is_size_weighted(variant):
    model = mame_export.apply(build(variant), 0.5)
    x = image(model)
    p = 0 if model.pool_include_prefix else model.num_prefix_tokens
    with torch.no_grad():
        feats, sizes = model._mame_features(x)
        tokens, s = feats[:, p:], sizes[:, p:]
        weighted = (tokens * s).sum(dim=1) / s.sum(dim=1)
        plain = tokens.mean(dim=1)
        if variant == "avgmax":
            weighted = 0.5 * (tokens.amax(dim=1) + weighted)
            plain = 0.5 * (tokens.amax(dim=1) + plain)
        expect = model.head(model.fc_norm(weighted))
        out = model(x)
        unweighted = model.head(model.fc_norm(plain))
    torch.testing.assert_close(out, expect)
    assert not torch.allclose(out, unweighted)  # sizes differ, so the weighting matters


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_map_head_gets_the_log_size_bias(fused):
    model = mame_export.apply(build("map_siglip", fused), 0.5)
    x = image(model)
    with torch.no_grad():
        feats, sizes = model._mame_features(x)
        bias = sizes.log().transpose(1, 2).unsqueeze(1)
        expect = model.head(model.fc_norm(model.attn_pool(feats, attn_mask=bias)))
        unbiased = model.head(model.fc_norm(model.attn_pool(feats)))
        out = model(x)
    torch.testing.assert_close(out, expect)
    assert not torch.allclose(out, unbiased)


def test_class_token_pooling_reads_the_class_token():
    model = mame_export.apply(build("vit_class_token"), 0.5)
    x = image(model)
    with torch.no_grad():
        feats, _ = model._mame_features(x)
        torch.testing.assert_close(model(x), model.head(model.fc_norm(feats[:, 0])))


# ---- adaptive mode -------------------------------------------------------------------------


def test_adaptive_mode_token_count_follows_the_input():
    model = mame_export.apply(build("vit_class_token"), 0.5, mode="adaptive", tau=0.9)
    plan = merge_plan(model)
    assert plan.mode == "adaptive" and plan.notes
    flat = torch.zeros(1, 3, 32, 32)  # every patch alike: every source finds a target
    noisy = image(model, batch=1) * 3
    with torch.no_grad():
        n_flat = model._mame_features(flat)[0].shape[1] - 1
        n_noisy = model._mame_features(noisy)[0].shape[1] - 1
        out = model(noisy)
    assert n_flat == plan.final_patches
    assert n_noisy > n_flat
    assert torch.isfinite(out).all()


def test_adaptive_mode_retains_more_with_a_higher_tau():
    x = image(build("no_class_token_avg"), batch=2)
    counts = []
    for tau in (0.0, 0.5, 0.95):
        model = mame_export.apply(build("no_class_token_avg"), 0.5, mode="adaptive", tau=tau)
        with torch.no_grad():
            counts.append(model._mame_features(x)[0].shape[1])
            assert torch.isfinite(model(x)).all()
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_adaptive_mode_keeps_total_size():
    model = mame_export.apply(build("registers"), 0.5, mode="adaptive", tau=0.7)
    with torch.no_grad():
        _, sizes = model._mame_features(image(model, batch=3))
    torch.testing.assert_close(sizes[:, 5:].sum(dim=1), torch.full((3, 1), 64.0))


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [nn.Linear(4, 4), nn.Sequential(nn.Conv2d(3, 8, 3))],
                         ids=["linear", "conv"])
def test_unsupported_models_name_what_is_supported(model):
    with pytest.raises(TypeError, match="supported.*VisionTransformer"):
        mame_export.apply(model, 0.5)


@pytest.mark.parametrize("kw", [
    dict(block_fn=ResPostBlock),
    dict(global_pool="prr"),
], ids=["res_post_block", "prr_pool"])
def test_unsupported_vit_variants_raise_value_error(kw):
    model = VisionTransformer(**{**TINY, **kw})
    with pytest.raises(ValueError, match="supports"):
        mame_export.apply(model, 0.5)
    assert type(model) is VisionTransformer  # nothing half-patched


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.5", None, True])
def test_bad_r_raises_value_error(r):
    with pytest.raises(ValueError, match="r must be in"):
        mame_export.apply(build("vit_class_token"), r)


@pytest.mark.parametrize("tau", [-1.5, 2.0, math.nan, "high"])
def test_bad_tau_raises_value_error(tau):
    with pytest.raises(ValueError, match="tau must be in"):
        mame_export.apply(build("vit_class_token"), 0.5, tau=tau)


def test_bad_mode_and_layers_raise_value_error():
    with pytest.raises(ValueError, match="mode must be one of"):
        mame_export.apply(build("vit_class_token"), 0.5, mode="dynamic")
    with pytest.raises(ValueError, match="out of range"):
        mame_export.apply(build("vit_class_token"), 0.5, layers=[0, 4])


def test_merge_plan_of_an_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="not MaMe-patched"):
        merge_plan(build("vit_class_token"))



# ---- export --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdpa_with_the_size_mask_exports_to_a_static_onnx_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from mame_export.audit import forbidden_ops

    # An unusual grid (7 x 9 patches) so the partitions are first made right here, under
    # inference_mode: the cached index lists must still serve the exporter afterwards.
    model = VisionTransformer(**{**TINY, "img_size": (28, 36), "depth": 2, "class_token": False,
                                 "global_pool": "map"}).eval()
    set_fused(model, True)
    mame_export.apply(model, 0.5)
    x = image(model, batch=2)
    with torch.inference_mode():
        ref = model(x)
    path = tmp_path / "mame.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    graph = onnx.load(str(path))
    assert not forbidden_ops(graph)
    assert {"Log", "Softmax"} <= {n.op_type for n in graph.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - ref.numpy()).max() <= 1e-4


def test_torch_compile_fullgraph_matches_eager() -> None:
    """The patched ViT compiles without graph breaks (partition lists become constants)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                          num_classes=5).eval()
    mame_export.apply(m, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True)(x)
    assert torch.allclose(ref, out, atol=1e-5)


def test_two_compiled_models_with_different_r_stay_one_graph_each() -> None:
    """A second patched model with another r must not make dynamo trace r as a
    symbolic float (automatic dynamic), which turned every token count into a
    symbolic shape and broke the graph; alternating calls stay compiled and exact."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                             num_classes=5).eval()
    models = [mame_export.apply(copy.deepcopy(base), r) for r in (0.25, 0.5)]
    compiled = [torch.compile(m, backend="eager", fullgraph=True) for m in models]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(2):
            for m, c in zip(models, compiled, strict=True):
                assert torch.allclose(c(x), m(x), atol=1e-5)
