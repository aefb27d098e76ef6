"""MaMe + MaRe on diffusers UNets: grid partition, patch, plan, export, tools' pieces.

Everything runs on a random miniature of the SD 2.x layout (two levels, four
transformer blocks: 16x16, 8x8 (mid), 16x16, 16x16 at a 16x16 latent).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import mame_export  # noqa: E402
from mame_export.errors import CheckpointError  # noqa: E402
from mame_export.families.sd_unet import patch as du  # noqa: E402
from mame_export.families.sd_unet.model import (  # noqa: E402
    INPUT_NAMES,
    OUTPUT_NAMES,
    SD21_UNET_CONFIG,
    TINY_UNET_CONFIG,
    UNetExportWrapper,
    build_tiny_unet,
    build_unet,
    sd_unet_io_spec,
    unet_example_inputs,
)
from mame_export.ops.grid import dither_order, grid_partition  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "benchmarks" / "scripts"  # the one-off studies


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _targets_mask(h: int, w: int, n_keep: int) -> np.ndarray:
    mask = np.zeros(h * w, dtype=bool)
    mask[grid_partition(h, w, n_keep).targets.numpy()] = True
    return mask.reshape(h, w)


@pytest.fixture(scope="module")
def unet():
    return build_tiny_unet()


@pytest.fixture()
def fresh_unet():
    return build_tiny_unet()


def _run(unet, h: int = 16, w: int | None = None, batch: int = 2) -> torch.Tensor:
    inputs = unet_example_inputs(TINY_UNET_CONFIG, batch, (h, w or h))
    with torch.no_grad():
        return UNetExportWrapper(unet)(*inputs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("h,w", [(16, 16), (24, 24), (8, 12), (2, 2)])
def test_grid_quarter_is_one_target_per_2x2_cell(h, w):
    mask = _targets_mask(h, w, h * w // 4)
    yy, xx = np.mgrid[0:h, 0:w]
    np.testing.assert_array_equal(mask, (yy % 2 == 0) & (xx % 2 == 0))


def test_grid_half_is_a_checkerboard():
    mask = _targets_mask(16, 16, 128)
    yy, xx = np.mgrid[0:16, 0:16]
    np.testing.assert_array_equal(mask, (yy + xx) % 2 == 0)


def test_grid_sparser_than_a_quarter_is_a_coarser_grid():
    mask = _targets_mask(16, 16, 16)  # r = 15/16: one target per 4x4 cell
    yy, xx = np.mgrid[0:16, 0:16]
    np.testing.assert_array_equal(mask, (yy % 4 == 0) & (xx % 4 == 0))


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20), (7, 9)])
def test_grid_partition_counts_order_and_inverse(h, w):
    n = h * w
    for n_keep in (1, n // 4, n // 2, (3 * n) // 4 + 1, n - 1, n):
        p = grid_partition(h, w, n_keep)
        t, s = p.targets.tolist(), p.sources.tolist()
        assert (len(t), len(s), p.n, p.n_keep) == (n_keep, n - n_keep, n, n_keep)
        assert t == sorted(t) and s == sorted(s)
        assert sorted(t + s) == list(range(n))  # disjoint, no duplicates, all positions
        x = torch.arange(n) * 10
        restored = torch.cat([x[p.targets], x[p.sources]]).index_select(0, p.inverse)
        assert torch.equal(restored, x)


def test_grid_keeps_a_target_in_every_2x2_cell_when_keeping_a_quarter_or_more():
    for n_keep in range(64, 257, 17):
        mask = _targets_mask(16, 16, n_keep)
        cells = mask.reshape(8, 2, 8, 2).any(axis=(1, 3))
        assert cells.all(), n_keep


def test_grid_prefixes_are_nested_and_order_is_a_permutation():
    order = dither_order(12, 10)
    assert sorted(order) == list(range(120))
    a = set(grid_partition(12, 10, 30).targets.tolist())
    b = set(grid_partition(12, 10, 70).targets.tolist())
    assert a < b


def test_grid_partition_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_keep"):
        grid_partition(4, 4, 0)
    with pytest.raises(ValueError, match="n_keep"):
        grid_partition(4, 4, 17)
    with pytest.raises(ValueError, match="1x1"):
        grid_partition(0, 4, 1)


# ----------------------------------------------------------------------------- patch


@pytest.mark.parametrize("h,w", [(16, 16), (24, 24), (32, 16)])
def test_r0_is_exactly_the_unpatched_unet(fresh_unet, h, w):
    ref = _run(fresh_unet, h, w)
    mame_export.apply(fresh_unet, 0.0)
    assert float((_run(fresh_unet, h, w) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("h,w", [(16, 16), (24, 24), (32, 16), (20, 12)])
def test_merging_keeps_every_position_and_stays_close(fresh_unet, h, w):
    ref = _run(fresh_unet, h, w)
    mame_export.apply(fresh_unet, 0.5)
    out = _run(fresh_unet, h, w)
    assert out.shape == ref.shape == (2, 4, h, w)
    assert torch.isfinite(out).all()
    assert 1e-4 < _rel(out, ref) < 0.25


def test_mare_restores_each_position_exactly_on_cell_constant_tokens(fresh_unet):
    # Tokens constant on each 2x2 cell: every source is identical to the target(s)
    # of its own cell and unlike other cells, so merge + restore must be exact; a
    # wrong inverse permutation would put other cells' values in place.
    t2d = fresh_unet.down_blocks[0].attentions[0]
    g = torch.Generator().manual_seed(1)
    cells = torch.randn(2, 32, 8, 8, generator=g)
    x = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 32, 16, 16)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
        mame_export.apply(fresh_unet, 0.5, tau=0.99)
        out = t2d(x, encoder_hidden_states=ctx, return_dict=False)[0]
        mame_export.apply(fresh_unet, 0.5, tau=0.99, prop_attn=False)
        rough = t2d(x + 0.3 * torch.randn(x.shape, generator=g), encoder_hidden_states=ctx,
                    return_dict=False)[0]
    assert type(t2d).__name__.startswith("MaMe")
    assert float((out - ref).abs().max()) < 1e-4
    assert not torch.allclose(rough, ref, atol=1e-2)  # the check can fail


def test_remove_restores_classes_and_output(fresh_unet):
    ref = _run(fresh_unet)
    mame_export.apply(fresh_unet, 0.5)
    assert mame_export.merge_plan(fresh_unet).r == 0.5
    du.remove(fresh_unet)
    assert not any(type(m).__name__.startswith("MaMe") for m in fresh_unet.modules())
    assert not mame_export.patch.is_patched(fresh_unet)
    assert torch.equal(_run(fresh_unet), ref)


def test_crossattn_and_mlp_merging_are_options(fresh_unet):
    ref = _run(fresh_unet)
    outs = {}
    for key, opts in {"default": {}, "crossattn": {"merge_crossattn": True},
                      "mlp": {"merge_mlp": True}}.items():
        du.apply(fresh_unet, 0.5, tau=0.5, layers=None, prop_attn=True, mode="static", **opts)
        outs[key] = _run(fresh_unet)
        assert torch.isfinite(outs[key]).all()
    assert _rel(outs["crossattn"], outs["default"]) > 1e-5
    assert _rel(outs["mlp"], outs["default"]) > 1e-5
    assert _rel(outs["mlp"], ref) > _rel(outs["default"], ref)


def test_only_selected_layers_merge(fresh_unet):
    ref = _run(fresh_unet)
    mame_export.apply(fresh_unet, 0.5, layers=[1])  # the 8x8 mid block only
    plan = mame_export.merge_plan(fresh_unet)
    assert plan.merge_layers == [1]
    assert _rel(_run(fresh_unet), ref) > 1e-5
    assert du.blocks_up_to_downsample(fresh_unet, 1) == [0, 2, 3]
    assert du.blocks_up_to_downsample(fresh_unet, 8) == [0, 1, 2, 3]


def test_apply_accepts_the_export_wrapper(fresh_unet):
    wrapper = UNetExportWrapper(fresh_unet)
    mame_export.apply(wrapper, 0.5)
    assert mame_export.merge_plan(wrapper) is mame_export.merge_plan(fresh_unet)
    du.remove(wrapper)
    assert not mame_export.patch.is_patched(wrapper)
    assert not mame_export.patch.is_patched(fresh_unet)


def test_unsupported_settings_fail_clearly(fresh_unet):
    with pytest.raises(ValueError, match="static"):
        mame_export.apply(fresh_unet, 0.5, mode="adaptive")
    with pytest.raises(ValueError, match="out of range"):
        mame_export.apply(fresh_unet, 0.5, layers=[4])
    with pytest.raises(ValueError, match="r must be"):
        mame_export.apply(fresh_unet, 1.0)
    assert not mame_export.patch.is_patched(fresh_unet)


def test_fp16_inputs_stay_finite():
    unet = build_tiny_unet(dtype=torch.float16)
    mame_export.apply(unet, 0.75)
    inputs = unet_example_inputs(TINY_UNET_CONFIG, 2, 16, dtype=torch.float16)
    with torch.no_grad():
        out = UNetExportWrapper(unet)(*inputs)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- plan


def test_plan_token_counts(unet):
    plan = du.build_plan(unet, 0.5, 0.5, None, True, "static")
    assert plan.num_patches == 256 and plan.num_protected == 0
    assert [b.tokens_in for b in plan.blocks] == [256, 64, 256, 256]
    assert [b.tokens_out for b in plan.blocks] == [128, 32, 128, 128]
    assert plan.merge_layers == [0, 1, 2, 3]
    assert plan.macs < plan.macs_unpatched
    plan75 = du.build_plan(unet, 0.75, 0.5, None, True, "static", latent_size=(24, 16))
    assert [b.tokens_in for b in plan75.blocks] == [384, 96, 384, 384]
    assert [b.tokens_out for b in plan75.blocks] == [96, 24, 96, 96]
    assert plan75.macs < plan.macs * 384 / 256  # more merging, relatively cheaper
    plan0 = du.build_plan(unet, 0.0, 0.5, None, True, "static")
    assert plan0.macs == plan0.macs_unpatched and plan0.merge_layers == []


def test_plan_counts_the_full_sd21_unet_without_memory():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd21 = UNet2DConditionModel.from_config(SD21_UNET_CONFIG)
    plan = du.build_plan(sd21, 0.5, 0.5, None, True, "static")
    assert len(plan.blocks) == 16 and plan.num_patches == 96 * 96
    assert [b.tokens_in for b in plan.blocks][:2] == [9216, 9216]
    assert plan.blocks[0].tokens_out == 4608
    assert 1000e9 < plan.macs_unpatched < 1150e9  # ~1.07 TMACs per sample at 96x96
    assert 0.8 < plan.flops_ratio < 0.95


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mame_export.export import export_onnx

    wrapper = UNetExportWrapper(build_tiny_unet())
    mame_export.apply(wrapper, 0.5)
    io = sd_unet_io_spec(wrapper, 16)
    example = io.make_inputs(2, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("unet") / "tiny_unet_r0.5.onnx"
    export_onnx(wrapper, example, path, input_names=io.input_names,
                output_names=io.output_names, opset=18)
    return wrapper, io, path


@pytest.mark.slow
def test_exported_graph_is_static_and_clean(exported):
    import onnx

    from mame_export.audit import forbidden_ops, op_census

    _, _, path = exported
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert forbidden_ops(model) == []  # also: every Gather has constant indices
    census = op_census(model)
    assert census.get("Gather", 0) > 0 and census.get("MatMul", 0) > 0
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 4, 16, 16]


@pytest.mark.slow
def test_onnxruntime_matches_eager(exported):
    from mame_export.runners import OrtRunner

    wrapper, io, path = exported
    runner = OrtRunner(path)
    for seed in (1, 2):
        inputs = io.make_inputs(2, torch.Generator().manual_seed(seed))
        got = runner.infer({n: t.numpy() for n, t in zip(io.input_names, inputs, strict=True)})
        with torch.no_grad():
            want = wrapper(*inputs).numpy()
        assert np.abs(got["out_sample"] - want).max() < 1e-4


# ------------------------------------------------------------------ families.sd_unet.model


def test_io_spec_shapes():
    io = sd_unet_io_spec(build_tiny_unet(), latent=(24, 16))
    s, t, c = io.make_inputs(3, torch.Generator().manual_seed(0))
    assert (io.input_names, io.output_names) == (INPUT_NAMES, OUTPUT_NAMES)
    assert s.shape == (3, 4, 24, 16) and t.shape == (3,) and c.shape == (3, 77, 32)
    assert 0 <= float(t.min()) and float(t.max()) < 1000 and float(s.abs().sum()) > 0


def test_sd21_config_is_the_published_one():
    cfg = SD21_UNET_CONFIG
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg["cross_attention_dim"] == 1024 and cfg["sample_size"] == 96
    assert cfg["layers_per_block"] == 2 and cfg["in_channels"] == cfg["out_channels"] == 4
    assert cfg["use_linear_projection"] and cfg["upcast_attention"]


def test_weights_from_a_diffusers_folder_and_errors(tmp_path, unet):
    from safetensors.torch import save_file

    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = build_unet(TINY_UNET_CONFIG, folder)
    assert torch.equal(_run(loaded), _run(unet))

    with pytest.raises(CheckpointError, match="not found"):
        build_unet(TINY_UNET_CONFIG, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no UNet weights"):
        build_unet(TINY_UNET_CONFIG, empty)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_unet(SD21_UNET_CONFIG, folder)


# ----------------------------------------------------------------------------- tools


def test_generate_compare_patches_one_method_at_a_time(fresh_unet):
    tool = _tool("sd_generate_compare")
    ref = _run(fresh_unet)
    for method in ("mame", "tomesd"):
        with tool.patched(fresh_unet, method, 0.5, max_downsample=8,
                          tome_kwargs={"use_rand": False}):
            inside = _run(fresh_unet)
            with pytest.raises(tool.ToolError, match="already patched"), \
                    tool.patched(fresh_unet, "baseline", 0.5):
                pass
        assert _rel(inside, ref) > 1e-5
        assert torch.equal(_run(fresh_unet), ref), method  # removed after the run
    with tool.patched(fresh_unet, "baseline", 0.5):
        assert torch.equal(_run(fresh_unet), ref)


def test_side_by_side_layout():
    tool = _tool("sd_generate_compare")
    red = np.zeros((10, 12, 3), dtype=np.uint8)
    red[..., 0] = 255
    gray = np.full((6, 5), 0.5)  # float in [0, 1], grayscale, shorter
    img = tool.side_by_side([red, gray], ["a", "b"], pad=4, label_height=8)
    a = np.asarray(img)
    assert a.shape == (10 + 8 + 2 * 4, 12 + 5 + 3 * 4, 3)
    np.testing.assert_array_equal(a[12:22, 4:16], red)
    np.testing.assert_array_equal(a[12:18, 20:25], np.full((6, 5, 3), 128, dtype=np.uint8))
    assert (a[12:22, 16:20] == 255).all()  # padding between panels stays white
    with pytest.raises(ValueError, match="one label per image"):
        tool.side_by_side([red], ["a", "b"])


def test_generate_compare_needs_a_model_folder(tmp_path, capsys):
    tool = _tool("sd_generate_compare")
    assert tool.main(["--model-dir", str(tmp_path / "nope")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    (tmp_path / "unet").mkdir()
    with pytest.raises(tool.ToolError, match="missing model_index.json"):
        tool.check_model_dir(tmp_path)


@pytest.mark.slow
def test_torch_compile_traces_the_patch_in_one_graph(fresh_unet):
    wrapper = UNetExportWrapper(fresh_unet)
    mame_export.apply(wrapper, 0.5)
    inputs = unet_example_inputs(TINY_UNET_CONFIG, 2, 16)
    with torch.no_grad():
        ref = wrapper(*inputs)
        out = torch.compile(wrapper, backend="eager", fullgraph=True)(*inputs)
    assert float((out - ref).abs().max()) < 1e-5
