"""The one plan builder and the families' patchers: plan numbers kept from before (the
UNet's now counted from its modules' shapes), the forward reading the plan's keep
schedule, the input-size bound, the warning when merging costs more than it saves, and
solve_r over the whole range of r."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import one_line_error, tiny_vit
from timm.models.vision_transformer import VisionTransformer

import mame_export
from mame_export.cli import main
from mame_export.families import all_families, family_for_model, get_family, resolve
from mame_export.families.base import Patcher, UnsupportedModelError
from mame_export.patch import R_TOP, merge_plan, solve_r
from mame_export.plan import MAX_TOKENS


def skeleton(alias: str, img_size: int | None = None) -> torch.nn.Module:
    spec = resolve(alias)
    if spec.family == "sd-unet":
        diffusers = pytest.importorskip("diffusers")
        from mame_export.families.sd_unet.model import SD21_UNET_CONFIG

        with torch.device("meta"):
            return diffusers.UNet2DConditionModel.from_config(SD21_UNET_CONFIG).eval()
    if spec.family == "transformers":
        pytest.importorskip("transformers")
    model = get_family(spec.family).skeleton(spec, img_size)
    assert model is not None
    return model


# ---- the same numbers as before ---------------------------------------------------------

# (MACs at r=0.5, unpatched MACs) at the alias's default size, recorded from the code before
# the one plan builder (the UNet's from torch's FlopCounterMode over a meta-device forward).
KNOWN_MACS = {
    "vit_t": (801243503, 1253683200),
    "deit_b_distilled": (11357101871, 17656811520),
    "siglip2_b_512": (67435222710, 108119851008),
    "clip_l336": (106310870290, 190959108096),
    "dinov2_s": (3894358824, 6123561984),
    "sd21-unet": (929608468544, 1074552872960),
}


@pytest.mark.parametrize("alias", list(KNOWN_MACS))
def test_plans_keep_the_numbers_recorded_before(alias):
    spec = resolve(alias)
    model = skeleton(alias)
    mame_export.apply(model, 0.5, **get_family(spec.family).patch_options(spec, None))
    plan = merge_plan(model)
    assert (plan.macs, plan.macs_unpatched) == KNOWN_MACS[alias]


UNET_CASES = [
    (16, {}, None), ((24, 16), {"merge_crossattn": True}, None),
    ((20, 12), {"merge_crossattn": True, "merge_mlp": True}, None), (9, {}, [1]),
]


@pytest.mark.parametrize("latent, options, layers", UNET_CASES)
def test_unet_macs_from_shapes_equal_what_torch_counts(latent, options, layers):
    # The plan no longer runs the UNet; torch's FlopCounterMode over a meta-device forward
    # (its SDPA decomposes into counted matmuls there) must still agree exactly.
    diffusers = pytest.importorskip("diffusers")
    from torch.utils.flop_counter import FlopCounterMode

    from mame_export.families.sd_unet.model import TINY_UNET_CONFIG

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(TINY_UNET_CONFIG).eval()
    h, w = (latent, latent) if isinstance(latent, int) else latent

    def counted() -> int:
        sample = torch.zeros(1, 4, h, w, device="meta")
        context = torch.zeros(1, 77, TINY_UNET_CONFIG["cross_attention_dim"], device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(sample, torch.zeros((), device="meta"), context)
        return counter.get_total_flops() // 2

    unpatched = counted()
    mame_export.apply(unet, 0.5, layers=layers, latent_size=latent, **options)
    plan = merge_plan(unet)
    assert plan.merge_layers == (layers or [0, 1, 2, 3])
    assert (plan.macs, plan.macs_unpatched) == (counted(), unpatched)


def test_planning_runs_no_forward(monkeypatch):
    diffusers = pytest.importorskip("diffusers")

    def refuse(*args, **kwargs):
        raise AssertionError("the plan ran the model")

    unet = skeleton("sd21-unet")
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", refuse)
    monkeypatch.setattr(VisionTransformer, "forward", refuse)
    plan = mame_export.apply(unet, 0.5, latent_size=128)._mame_plan
    assert plan.num_patches == 128 * 128 and plan.blocks[0].tokens_out == 8192
    assert merge_plan(mame_export.apply(skeleton("vit_t", 2032), 0.5)).num_patches == 127 ** 2


# ---- one patcher per family, the forward reads the plan ---------------------------------


def test_every_family_holds_a_typed_patcher():
    for fam in all_families():
        assert isinstance(fam.patcher, Patcher)
        assert not hasattr(fam, "patch_module") and not hasattr(fam, "patch")
    model = tiny_vit()
    patcher = family_for_model(model).patcher
    plan = patcher.build_plan(model, 0.5)
    assert merge_plan(mame_export.apply(model, 0.5)) == plan
    assert plan.keep_counts == tuple(b.tokens_out - 1 if b.merges else None
                                     for b in plan.blocks)
    assert plan.schedule_layers == (0, 1, 2, 3)
    keys = set(plan.to_dict())
    assert {"blocks", "tokens_per_block", "flops_ratio", "merge_layers", "final_patches",
            "gmacs", "keep_counts", "schedule_layers"} <= keys


def tokens_entering(blocks: torch.nn.ModuleList, run) -> list[int]:
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_the_forward_runs_the_plans_keep_schedule():
    model = mame_export.apply(tiny_vit(), 0.5)
    x = torch.randn(1, 3, 32, 32)
    # A plan stored with another schedule: the forward follows it, recomputing nothing.
    model._mame_plan = dataclasses.replace(model._mame_plan, keep_counts=(None, 40, None, 20))
    assert tokens_entering(model.blocks, lambda: model(x)) == [65, 65, 41, 41]


def test_the_transformers_forward_runs_the_plans_keep_schedule():
    transformers = pytest.importorskip("transformers")
    from mame_export.families.transformers.patch import layer_list

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=4)
    cfg._attn_implementation = "sdpa"
    model = mame_export.apply(transformers.ViTModel(cfg).eval(), 0.5)
    model._mame_plan = dataclasses.replace(model._mame_plan, keep_counts=(12, None, 6))
    seen = tokens_entering(layer_list(model), lambda: model(torch.randn(1, 3, 16, 16)))
    assert seen == [17, 13, 13]


# ---- the input-size bound -----------------------------------------------------------------


def test_an_input_too_large_is_refused_in_one_line_before_any_build(monkeypatch, capsys):
    def no_build(*args, **kwargs):
        raise AssertionError("built a model")

    monkeypatch.setattr(type(get_family("timm-vit")), "build", no_build)
    assert main(["plan", "vit_t", "--img-size", "65536"]) == 2
    one_line_error(capsys.readouterr().err,
                          "--img-size 65536 is too large for vit_t: 16777217 tokens per block")
    assert main(["export", "vit_t", "--img-size", "2048"]) == 2
    err = capsys.readouterr().err
    one_line_error(err, f"at most {MAX_TOKENS} tokens per block")
    assert "use --img-size 2032 or less" in err


def test_the_largest_size_each_family_allows():
    timm_family = get_family("timm-vit")
    vit_t = skeleton("vit_t")
    assert timm_family.patcher.max_input_size(vit_t) == 2032  # 127 x 127 patches + 1
    timm_family.check(vit_t, "vit_t", 2032, True)
    with pytest.raises(UnsupportedModelError, match="too large"):
        timm_family.check(vit_t, "vit_t", 2048, True)
    pytest.importorskip("transformers")
    hf = get_family("transformers")
    video = hf.skeleton(hf.tiny(resolve("videomae_l")))  # 4 frames, tubelets of 2, patch 4
    assert hf.patcher.max_input_size(video) == 360  # 2 tubelets x 90 x 90 patches
    with pytest.raises(UnsupportedModelError, match="use --img-size 360 or less"):
        hf.patcher.check_input_size(video, "tiny-videomae_l", 364)
    unet_family = get_family("sd-unet")
    unet = skeleton("sd21-unet")
    assert unet_family.patcher.max_input_size(unet) == 128  # latent side: 128 x 128 tokens
    unet_family.check(unet, "sd21-unet", 128, True)
    with pytest.raises(UnsupportedModelError, match="16641 tokens per block"):
        unet_family.check(unet, "sd21-unet", 129, True)


def test_the_library_plan_refuses_too_many_tokens():
    with torch.device("meta"):
        model = VisionTransformer(img_size=16 * 129, patch_size=16, embed_dim=32, depth=1,
                                  num_heads=2)
    with pytest.raises(ValueError, match="16642 tokens in one block"):
        mame_export.apply(model, 0.5)
    assert type(model) is VisionTransformer


# ---- merging that costs more than it saves --------------------------------------------


def test_a_plan_costing_more_than_it_saves_warns_once(capsys):
    # Two blocks of 1024 tokens 32 channels wide: the merge's (N/2, N/2) products cost more
    # than the one block it shortens saves.
    model = tiny_vit(img_size=128, depth=2)
    for _ in range(2):
        mame_export.apply(model, 0.5)
    assert merge_plan(model).flops_ratio > 1
    err = capsys.readouterr().err
    assert err.count("warning: merging costs more than it saves") == 1, err
    assert f"MACs ratio of {merge_plan(model).flops_ratio:.3f} > 1" in err
    mame_export.apply(tiny_vit(), 0.5)  # a ratio below 1: no warning
    assert "warning" not in capsys.readouterr().err


# ---- solve_r over [0, 1) ------------------------------------------------------------------


def test_solve_r_reaches_a_target_only_r_near_1_reaches():
    model = skeleton("vit_t", 768)
    r = solve_r(model, 0.16)  # r = 0.999 gives 0.181; r = 0.999999999 gives 0.151
    plan = merge_plan(model)
    assert 0.999 < r < 1 and plan.r == r and plan.flops_ratio <= 0.16
    # Close to the smallest such r: twice as many tokens left over falls short.
    below = get_family("timm-vit").patcher.build_plan(model, 1 - 2 * (1 - r))
    assert below.flops_ratio > 0.16


def test_out_of_reach_names_the_true_best():
    model = skeleton("vit_t")
    with pytest.raises(ValueError, match="out of reach") as info:
        solve_r(model, 0.05)
    patcher = get_family("timm-vit").patcher
    best = patcher.build_plan(model, R_TOP).flops_ratio
    assert f"the best is {best:.3f}" in str(info.value)
    # No r in [0, 1) does better: r = 1 - 10**-k down to the last float below 1.
    rs = [1 - 10.0 ** -k for k in range(1, 16)] + [R_TOP]
    assert min(patcher.build_plan(model, r).flops_ratio for r in rs) == best
    r_best = float(str(info.value).split("at r=")[1].split(" ")[0])
    assert patcher.build_plan(model, r_best).flops_ratio == best


def test_target_macs_on_the_command_line_reaches_what_r_reaches(capsys):
    assert main(["plan", "vit_t", "--img-size", "768", "--target-macs", "0.16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["flops_ratio"] <= 0.16 and 0.999 < plan["r"] < 1


def test_solve_r_on_a_unet():
    unet = skeleton("sd21-unet")
    r = solve_r(unet, 0.8)
    assert merge_plan(unet).flops_ratio <= 0.8 and 0 < r < 1
    assert not math.isclose(r, 0.0)
    with pytest.raises(ValueError, match="out of reach"):
        solve_r(unet, 0.3)  # MaRe restores every position: most of a UNet never merges
