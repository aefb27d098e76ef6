"""MaMe + MaRe on diffusion transformers (the ``dit`` family: PixArt, SD3) at tiny size,
and the SD 1.5 / SDXL UNet aliases' plans and inputs. The shared family contract (build,
r=0 identity, plan, export, audit, parity) runs on every alias in test_families.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_error, tiny_model

pytest.importorskip("diffusers")

import mame_export  # noqa: E402
from mame_export.families import get_family, resolve  # noqa: E402
from mame_export.families.dit import forward as dit_forward  # noqa: E402
from mame_export.families.dit.model import pixart_forward  # noqa: E402
from mame_export.ops import mame_merge, mame_weights, mare_restore_partition  # noqa: E402
from mame_export.ops.grid import grid_partition  # noqa: E402
from mame_export.patch import merge_plan  # noqa: E402


def _built(alias: str):  # noqa: ANN202 - (family, spec, wrapper, inputs)
    family, spec = tiny_model(alias)
    model, _ = family.build(spec, "random", None)
    inputs = family.io_spec(spec, model, None).make_inputs(2, torch.Generator().manual_seed(0))
    return family, spec, model, inputs


def _cell_constant(b: int, h: int, w: int, c: int) -> torch.Tensor:
    """Tokens of an h x w grid (raster order), equal within each 2 x 2 cell."""
    cells = torch.randn(b, c, h // 2, w // 2, generator=torch.Generator().manual_seed(1))
    return cells.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2)


def test_mame_then_mare_gives_back_duplicated_tokens():
    x = _cell_constant(2, 8, 8, 16)
    part = grid_partition(8, 8, 16)  # one target per 2 x 2 cell
    w = mame_weights(x.index_select(1, part.targets), x.index_select(1, part.sources), 1.0)
    merged, sizes = mame_merge(x, x.new_ones(2, 64, 1), w, part)
    assert merged.shape == (2, 16, 16) and torch.equal(sizes, torch.full((2, 16, 1), 4.0))
    assert torch.allclose(mare_restore_partition(merged, w, part), x, atol=1e-6)


@pytest.mark.parametrize("alias", ["pixart_sigma_1024", "sd3_medium"])
def test_a_merging_block_on_duplicated_tokens_is_the_unmerged_block(alias):
    """Each 2 x 2 cell of image tokens equal: merging to one token per cell with
    proportional attention computes what the unmerged block does, text stream included."""
    _, spec, model, inputs = _built(alias)
    m = model.denoiser
    grid = (4, 4)  # the tiny models' patch grid (8 x 8 latent, patch 2)
    c = m.config.num_attention_heads * m.config.attention_head_dim
    x = _cell_constant(2, *grid, c)
    blk = m.transformer_blocks[0]
    if alias == "sd3_medium":
        text = torch.randn(2, 5, c)
        temb = m.time_text_embed(inputs[1], inputs[3])
        ref = blk(x, text, temb)
        mame_export.apply(model, 0.75, img_size=spec.img_size)
        out = blk(x, text, temb, {dit_forward._GRID_KEY: grid})
        for a, b in zip(out, ref, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
        return
    t, _ = m.adaln_single(inputs[1], {"resolution": None, "aspect_ratio": None}, batch_size=2,
                          hidden_dtype=x.dtype)
    text = torch.randn(2, 5, c)
    ref = blk(x, encoder_hidden_states=text, timestep=t)
    mame_export.apply(model, 0.75, img_size=spec.img_size)
    out = blk(x, encoder_hidden_states=text, timestep=t,
              cross_attention_kwargs={dit_forward._GRID_KEY: grid})
    assert torch.allclose(out, ref, atol=1e-4)


def test_sd3_text_tokens_never_merge(monkeypatch):
    _, spec, model, inputs = _built("sd3_medium")
    seen = []
    joint = dit_forward._joint_attention

    def spy(attn, x, c, bias):  # noqa: ANN001, ANN202
        seen.append((x.shape[1], c.shape[1], tuple(bias.shape)))
        return joint(attn, x, c, bias)

    monkeypatch.setattr(dit_forward, "_joint_attention", spy)
    mame_export.apply(model, 0.5, img_size=spec.img_size, text_tokens=5)
    with torch.no_grad():
        out = model(*inputs)
    # 16 image tokens -> 8; all 5 text tokens in every joint attention, bias over 8 + 5 keys
    assert seen == [(8, 5, (2, 1, 1, 13))] * 2
    assert out.shape == inputs[0].shape and torch.isfinite(out).all()
    plan = merge_plan(model)
    assert plan.num_protected == 0 and plan.tokens_per_block == [16, 16]
    assert any("5 text tokens join every joint attention unmerged" in n for n in plan.notes)


def test_the_pixart_wrapper_is_diffusers_own_forward():
    _, _, model, inputs = _built("pixart_sigma_1024")
    with torch.no_grad():
        ref = model.denoiser(inputs[0], encoder_hidden_states=inputs[2], timestep=inputs[1],
                             return_dict=False)[0]
        assert torch.allclose(pixart_forward(model.denoiser, *inputs[:2], inputs[2]), ref,
                              atol=1e-6)
        assert torch.allclose(model(*inputs), ref, atol=1e-6)


@pytest.mark.parametrize("alias", ["pixart_sigma_1024", "sd3_medium"])
@pytest.mark.parametrize("merge_mlp", [True, False])
def test_dit_macs_from_shapes_equal_what_torch_counts(alias, merge_mlp):
    # On the meta device, where SDPA decomposes into matmuls torch's FlopCounterMode counts.
    from torch.utils.flop_counter import FlopCounterMode

    from mame_export.families.dit.model import DenoiserExportWrapper

    family, spec, _, inputs = _built(alias)
    model = DenoiserExportWrapper(family.skeleton(spec))

    def counted() -> int:
        one = tuple(torch.zeros_like(t[:1], device="meta") for t in inputs)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*one)
        return counter.get_total_flops() // 2

    unpatched = counted()
    mame_export.apply(model, 0.5, img_size=spec.img_size, text_tokens=5, merge_mlp=merge_mlp)
    plan = merge_plan(model)
    assert plan.merge_layers == [0, 1]
    # the merge's own products (similarity, merge, restore) are counted by both
    assert (plan.macs, plan.macs_unpatched) == (counted(), unpatched)


@pytest.mark.parametrize("alias, tokens, notes", [
    ("pixart_sigma_1024", 4096, "64x64 patch grid"),
    ("sd3_medium", 4096, "333 text tokens join every joint attention unmerged"),
    ("sdxl-unet", 4096, "64x64: 0,1,2,3,64,65,66,67,68,69; 32x32: 4,5,6,7,"),
    ("sd15-unet", 4096, "64x64: 0,1,13,14,15"),
])
def test_native_plans_from_the_skeleton(alias, tokens, notes):
    spec = resolve(alias)
    family = get_family(spec.family)
    skel = family.skeleton(spec)
    mame_export.apply(skel, 0.5, **family.patch_options(spec, None))
    plan = merge_plan(skel)
    assert max(plan.tokens_per_block) == tokens and plan.macs < plan.macs_unpatched
    assert any(notes in n for n in plan.notes), plan.notes


def test_sdxl_has_70_blocks_and_text_time_inputs():
    spec = resolve("sdxl-unet")
    family = get_family(spec.family)
    skel = family.skeleton(spec)
    assert family.patcher.depth(skel) == 70
    io = family.io_spec(spec, skel, None)
    assert io.input_names == ("sample", "timestep", "encoder_hidden_states", "text_embeds",
                              "time_ids")
    x = io.make_inputs(2, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in x[3:]] == [(2, 1280), (2, 6)]
    assert x[4][0].tolist() == [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]


@pytest.mark.parametrize("args, needle", [
    (["plan", "pixart_sigma_1024", "--img-size", "1004"], "not a multiple of the VAE factor 8"),
    (["plan", "sd3_medium", "--img-size", "1000"], "off the patch grid of sd3_medium (patch 2)"),
    (["plan", "sd3_medium", "--img-size", "3088"], "past sd3_medium's position table"),
    (["plan", "pixart_sigma_1024", "--llava"], "--llava needs a LLaVA vision encoder"),
])
def test_bad_denoiser_settings_are_one_line(args, needle):
    assert needle in cli_error(*args, "--r", "0.5")


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path):
    from safetensors.torch import save_file

    flux = tmp_path / "flux" / "transformer"
    flux.mkdir(parents=True)
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    line = cli_error("pixart_sigma_1024", "--weights", str(tmp_path / "flux"),
                     "--out", str(tmp_path / "out"))
    assert "FluxTransformer2DModel" in line and "rotary-position" in line
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    line = cli_error("sdxl-unet", "--weights", str(tmp_path / "other.safetensors"),
                     "--out", str(tmp_path / "out"))
    assert "does not fit UNet2DConditionModel" in line


def test_dit_eval_reports_noise_prediction_fidelity():
    from test_eval import _run_eval

    _, spec = tiny_model("sd3_medium")
    report = _run_eval(spec, dict(weights="random", batch=2, limit=1), lambda _: None)
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["unmerged"]["rel_l2"] == 0.0 and 0.0 < rows["MaMe r=0.5"]["rel_l2"]
    assert len(rows["MaMe r=0.5"]["per_timestep"]) == 10
    assert any("no ToMe baseline" in n for n in report["notes"])
