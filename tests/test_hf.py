"""MaMe on transformers vision encoders, built from small config objects (no hub): r=0 is
the unpatched model, the plan's token counts, size-aware heads, refusals, the LLaVA tower,
export, audit and ONNX Runtime parity; and timm's forward_intermediates when patched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import tiny_model

transformers = pytest.importorskip("transformers")

import mame_export  # noqa: E402
from mame_export.errors import CheckpointError  # noqa: E402
from mame_export.families import get_family  # noqa: E402
from mame_export.families.base import UnsupportedModelError  # noqa: E402
from mame_export.families.transformers import patch as hf_patch  # noqa: E402
from mame_export.families.transformers.configs import VIDEOMAE_L  # noqa: E402
from mame_export.families.transformers.encoders import (  # noqa: E402
    attention_pool,
    size_weighted_mean,
)
from mame_export.families.transformers.wrappers import HFExport, LlavaVisionTower  # noqa: E402
from mame_export.patch import merge_plan  # noqa: E402

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             image_size=8, patch_size=2)
IMAGE = (2, 3, 8, 8)
VIDEO = (2, 4, 3, 8, 8)  # transformers' (B, T, C, H, W)


def _make(name: str, attn: str = "sdpa", depth: int = 3) -> nn.Module:
    t = transformers
    small = {**SMALL, "num_hidden_layers": depth}
    if name.startswith("ViT"):
        cfg = t.ViTConfig(**small, num_labels=5)
    elif name.startswith("CLIP"):
        cfg = t.CLIPVisionConfig(**small, projection_dim=8, hidden_act="quick_gelu")
    elif name.startswith("Siglip"):
        cfg = t.SiglipVisionConfig(**small)
    elif name.startswith("Dinov2"):  # a 6 x 6 position table run at 4 x 4: interpolates
        cfg = t.Dinov2Config(**{**small, "image_size": 12}, layerscale_value=0.5)
    else:
        cfg = t.VideoMAEConfig(**small, num_frames=4, tubelet_size=2, num_labels=5)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return getattr(t, name)(cfg).eval()


CLASSES = ["ViTModel", "ViTForImageClassification", "CLIPVisionModel",
           "CLIPVisionModelWithProjection", "SiglipVisionModel", "Dinov2Model", "VideoMAEModel",
           "VideoMAEForVideoClassification"]
PROTECTED = {"ViT": 1, "CLIP": 1, "Siglip": 0, "Dinov2": 1, "VideoMAE": 0}


def _input(name: str, seed: int = 0) -> torch.Tensor:
    return torch.randn(VIDEO if name.startswith("VideoMAE") else IMAGE,
                       generator=torch.Generator().manual_seed(seed))


def _tensors(out) -> list[torch.Tensor]:  # noqa: ANN001
    flat = []
    for v in out.values():
        flat.extend(v if isinstance(v, tuple) else [v])
    return flat


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", CLASSES)
def test_r0_is_exactly_the_unpatched_model(name, attn):
    model, x = _make(name, attn), _input(name)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        mame_export.apply(model, 0.0)
        out = model(x, output_hidden_states=True)
    assert list(model.state_dict()) == keys
    assert list(out.keys()) == list(ref.keys())
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CLASSES)
def test_token_counts_follow_the_plan(name):
    model, x = _make(name), _input(name)
    mame_export.apply(model, 0.5, layers=[0, 1], img_size=8)  # DINOv2's config says 12
    plan = merge_plan(model)
    assert plan.family == "transformers"
    assert plan.num_protected == PROTECTED[next(k for k in PROTECTED if name.startswith(k))]
    n0 = 32 if name.startswith("VideoMAE") else 16
    assert plan.num_patches == n0 and plan.final_patches == n0 // 2
    assert plan.macs < plan.macs_unpatched
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    hidden = out.hidden_states
    assert [h.shape[1] for h in hidden] == [plan.blocks[0].tokens_in] + [
        b.tokens_out for b in plan.blocks]
    if "last_hidden_state" in out:
        assert out.last_hidden_state.shape == (2, plan.blocks[-1].tokens_out, 16)
    if "logits" in out:
        assert out.logits.shape == (2, 5)
    if out.get("pooler_output") is not None:
        assert out.pooler_output.shape == (2, 16)
    if "image_embeds" in out:
        assert out.image_embeds.shape == (2, 8)
    assert not out.to_tuple()[0].isnan().any()


def test_class_token_is_never_merged_and_sizes_add_up():
    model = _make("CLIPVisionModel")
    mame_export.apply(model, 0.6)
    with torch.no_grad():
        tokens, sizes = model.mame_hidden(_input("CLIPVisionModel"))
    assert tokens.shape[1] == sizes.shape[1] == 1 + merge_plan(model).final_patches
    assert torch.equal(sizes[:, 0], torch.ones(2, 1))  # the class token stands for itself
    assert torch.allclose(sizes[:, 1:].sum(dim=1), torch.full((2, 1), 16.0))


def test_reapplying_replaces_the_plan():
    x = _input("ViTModel")
    model = mame_export.apply(_make("ViTModel"), 0.5)
    mame_export.apply(model, 0.25)
    fresh = mame_export.apply(_make("ViTModel"), 0.25)
    assert merge_plan(model) == merge_plan(fresh)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, fresh(x).last_hidden_state)


def test_unpatched_macs_match_a_flop_count():
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("ViTForImageClassification", "SiglipVisionModel",
                 "VideoMAEForVideoClassification"):
        model = _make(name, "eager")  # the counter does not see CPU SDPA kernels
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(_input(name)[:1])
        plan = hf_patch.build_plan(model, 0.0, 1.0, None, True, "static")
        assert abs(plan.macs_unpatched - counter.get_total_flops() / 2) <= 0.02 * plan.macs


# ---- size-aware heads ----------------------------------------------------------------------


def test_size_weighted_mean_counts_a_token_as_its_size():
    x = torch.randn(1, 3, 4)
    sizes = torch.tensor([[[2.0], [1.0], [1.0]]])
    dup = torch.cat([x[:, :1], x], dim=1)
    assert torch.allclose(size_weighted_mean(x, sizes), dup.mean(1), atol=1e-6)


def test_attention_pool_with_sizes_equals_duplicated_tokens():
    head = _make("SiglipVisionModel").head
    x = torch.randn(2, 3, 16)
    sizes = torch.tensor([[3.0], [1.0], [1.0]]).expand(2, 3, 1)
    dup = torch.cat([x[:, :1], x[:, :1], x], dim=1)
    with torch.no_grad():
        assert torch.allclose(attention_pool(head, x, sizes), head(dup), atol=1e-5)


def test_videomae_classifier_pools_by_size():
    model, x = _make("VideoMAEForVideoClassification"), _input("VideoMAEModel")
    mame_export.apply(model, 0.5)
    with torch.no_grad():
        logits = model(x).logits
        seq, sizes = model.videomae.mame_hidden(x)
        want = model.classifier(model.fc_norm(size_weighted_mean(seq, sizes)))
        plain = model.classifier(model.fc_norm(seq.mean(1)))
    assert torch.allclose(logits, want, atol=1e-6)
    assert not torch.allclose(logits, plain, atol=1e-4)


# ---- refusals ------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_other_attention_implementations_are_refused():
    model = _make("CLIPVisionModel")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2") as err:
        mame_export.apply(model, 0.5)
    assert "eager, sdpa" in _one_line(err)
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        get_family("transformers").check(model, "clip", None, True)


def test_other_transformers_classes_are_refused():
    cfg = transformers.BeitConfig(**SMALL)
    model = transformers.BeitModel(cfg).eval()
    assert not hf_patch.matches(model)
    with pytest.raises(TypeError, match="BeitModel") as err:
        mame_export.apply(model, 0.5)
    assert "ViTModel" in _one_line(err)
    assert not hf_patch.matches(nn.Linear(2, 2))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"output_attentions": True}, "output_attentions"),
    ({"interpolate_pos_encoding": True}, "interpolate_pos_encoding"),
    ({"bool_masked_pos": torch.zeros(2, 16, dtype=torch.bool)}, "bool_masked_pos"),
    ({"colour": 1}, "colour"),
])
def test_what_merged_tokens_cannot_do_is_refused(kwargs, needle):
    model = mame_export.apply(_make("ViTModel"), 0.5)
    x = torch.randn(2, 3, 12, 12) if "interpolate_pos_encoding" in kwargs else _input("ViTModel")
    with pytest.raises((ValueError, TypeError), match=needle) as err:
        model(x, **kwargs)
    _one_line(err)


def test_layers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        mame_export.apply(_make("Dinov2Model"), 0.5, layers=[3])


# ---- the family: aliases, wrappers, the LLaVA tower, checkpoints -----------------------------


def test_aliases_and_capabilities():
    family = get_family("transformers")
    specs = {s.alias: s for s in family.entries()}
    assert set(specs) == {"clip_l336", "videomae_l", "siglip2_b_512_hf", "dinov2_s"}
    assert "llava" in family.capabilities
    clip = family.skeleton(specs["clip_l336"])
    assert hf_patch.num_patches(clip) == 576 and len(clip.model.encoder.layers) == 24
    # VideoMAE-L's geometry at a small width (its skeleton builds a 1568 x 1024 table slowly)
    geometry = {k: v for k, v in VIDEOMAE_L.config.items() if "size" not in k or k in (
        "image_size", "patch_size", "tubelet_size")}
    video = transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
        **{**geometry, "hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2}))
    plan = hf_patch.build_plan(video, 0.5, 1.0, None, True, "static")
    assert plan.tokens_per_block[0] == 1568 and plan.final_patches == 784
    dino = family.skeleton(specs["dinov2_s"])
    assert hf_patch.num_patches(dino, 224) == 256


def test_video_wrapper_takes_channels_first_clips():
    family, spec = tiny_model("videomae_l")
    model, _ = family.build(spec, "random", None)
    io = family.io_spec(spec, model, None)
    (clip,) = io.make_inputs(2, torch.Generator().manual_seed(0))
    assert io.input_names == ("video",) and clip.shape == (2, 3, 4, 16, 16)
    assert io.output_names == ("logits",) and io.class_scores
    with torch.no_grad():
        want = model.model(pixel_values=clip.permute(0, 2, 1, 3, 4)).logits
        assert torch.equal(model(clip), want)
    mame_export.apply(model, 0.5, **family.patch_options(spec, None))
    assert isinstance(model, HFExport) and merge_plan(model).num_patches == 32


def test_llava_tower_returns_second_to_last_patch_tokens_and_sizes():
    family, spec = tiny_model("clip_l336", llava=True)
    tower, _ = family.build(spec, "random", None)
    assert isinstance(tower, LlavaVisionTower)
    io = family.io_spec(spec, tower, None)
    assert io.output_names == ("image_features", "token_sizes") and not io.class_scores
    (x,) = io.make_inputs(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tower.model(x, output_hidden_states=True).hidden_states[-2]
        mame_export.apply(tower, 0.0, **family.patch_options(spec, None))
        feats, sizes = tower(x)
        assert torch.equal(feats, hidden[:, 1:]) and torch.equal(sizes, torch.ones(2, 16, 1))
        mame_export.apply(tower, 0.5, **family.patch_options(spec, None))
        feats, sizes = tower(x)
    plan = merge_plan(tower)
    assert len(plan.blocks) == 2 and "LLaVA" in plan.notes[-1]  # 3 layers, the last not run
    assert feats.shape == (2, 8, 32) and sizes.shape == (2, 8, 1)
    assert sizes.dtype == torch.float32 and float(sizes.sum()) == 2 * 16
    with pytest.raises(UnsupportedModelError, match="CLIP"):
        family.build(tiny_model("dinov2_s", llava=True)[1], "random", None)


def test_checkpoints_load_strictly(tmp_path):
    from safetensors.torch import save_file

    family, spec = tiny_model("clip_l336")
    model, _ = family.build(spec, "random", None)
    file = tmp_path / "tower.safetensors"
    save_file(model.model.state_dict(), str(file))
    again, source = family.build(spec, str(file), None)
    assert source.startswith("file:")
    for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A full CLIP save_pretrained folder: the vision tower loads, the text tower is left out.
    cfg = transformers.CLIPConfig(vision_config=model.model.config.to_dict(),
                                  text_config=dict(hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2))
    full = transformers.CLIPModel(cfg)
    full.save_pretrained(tmp_path / "clip")
    tower, _ = family.build(spec, str(tmp_path / "clip"), None)
    assert torch.equal(tower.model.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="missing") as err:
        family.build(spec, str(tmp_path / "bad.safetensors"), None)
    _one_line(err)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        family.build(spec, str(tmp_path), None)


def test_fixed_size_models_refuse_other_image_sizes():
    family, spec = tiny_model("siglip2_b_512_hf")
    with pytest.raises(UnsupportedModelError, match="img-size"):
        family.build(spec, "random", 32)
    family, spec = tiny_model("dinov2_s")
    model, _ = family.build(spec, "random", 24)
    assert family.io_spec(spec, model, 24).make_inputs(1, torch.Generator())[0].shape[-1] == 24


# ---- timm: forward_intermediates on a patched ViT ------------------------------------------


def test_timm_forward_intermediates_on_merged_tokens():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    # The layout of vit_large_patch14_clip_336.openai (pre-norm, class token), tiny.
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                            num_classes=3, pre_norm=True, act_layer="quick_gelu").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit.forward_intermediates(x, indices=[-2], output_fmt="NLC",
                                        return_prefix_tokens=True)
        mame_export.apply(vit, 0.0)
        out = vit.forward_intermediates(x, indices=[-2], output_fmt="NLC",
                                        return_prefix_tokens=True)
        assert torch.equal(out[0], ref[0])
        assert all(torch.equal(a, b) for a, b in zip(out[1][0], ref[1][0], strict=True))
        mame_export.apply(vit, 0.5)
        feats, sizes = vit.forward_intermediates(x, indices=[-2], output_fmt="NLC",
                                                 intermediates_only=True, stop_early=True,
                                                 return_token_sizes=True)
        d = vit.forward_intermediates(x, indices=2, output_fmt="NLC", output_dict=True,
                                      return_token_sizes=True, norm=True)
    n = merge_plan(vit).blocks[2].tokens_out - 1  # indices=[-2]: block 2 of 4
    assert n < 16 and feats[0].shape == (2, n, 32) and sizes[0].shape == (2, n, 1)
    assert torch.allclose(sizes[0].sum(dim=1), torch.full((2, 1), 16.0))
    assert {"image_intermediates", "image_intermediates_sizes", "image_features"} <= set(d)
    assert [t.shape[1] for t in d["image_intermediates"]] == [n, 8]  # the last 2 blocks
    with pytest.raises(ValueError, match="NLC") as err:
        vit.forward_intermediates(x)
    _one_line(err)


# ---- export, audit, ONNX Runtime parity ----------------------------------------------------

EXPORTS = [("ViTForImageClassification", "logits"), ("CLIPVisionModelWithProjection",
           "image_embeds"), ("SiglipVisionModel", "pooler_output"),
           ("Dinov2Model", "pooler_output"), ("VideoMAEForVideoClassification", "logits")]


class _Bundle(nn.Module):
    """Every class (and the LLaVA tower) in one graph: one export's fixed cost, not six."""

    def __init__(self) -> None:
        super().__init__()
        self.models = nn.ModuleList(
            HFExport(_make(name, depth=2), field, video=name.startswith("VideoMAE"))
            for name, field in EXPORTS)
        self.models.append(LlavaVisionTower(_make("CLIPVisionModel", depth=2)))
        for m in self.models:  # one merge each, in the first layer
            mame_export.apply(m, 0.5, layers=[0], img_size=8)

    def forward(self, pixels: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for m in self.models:
            out = m(video if getattr(m, "video", False) else pixels)
            outs.extend(out if isinstance(out, tuple) else (out,))
        return tuple(outs)


@pytest.mark.slow
def test_every_class_exports_to_a_clean_static_graph_that_matches_onnxruntime(tmp_path):
    from mame_export.audit import audit
    from mame_export.export import export_onnx
    from mame_export.runners import OrtRunner
    bundle = _Bundle().eval()
    names = (*[f"{n}.{f}" for n, f in EXPORTS], "image_features", "token_sizes")
    inputs = (_input("ViTModel"), _input("VideoMAEModel").permute(0, 2, 1, 3, 4).contiguous())
    path = tmp_path / "bundle.onnx"
    export_onnx(bundle, inputs, path, input_names=("pixels", "video"), output_names=names)
    report = audit(path)
    assert report.passed and not report.forbidden_ops, report.summary()
    fresh = (_input("ViTModel", 1), _input("VideoMAEModel", 1).permute(0, 2, 1, 3, 4))
    got = OrtRunner(path).infer({"pixels": fresh[0].numpy(),
                                 "video": fresh[1].contiguous().numpy()})
    with torch.no_grad():
        want = bundle(*fresh)
    assert want[-2].shape == (2, 8, 16) and want[-1].shape == (2, 8, 1)
    for name, w in zip(names, want, strict=True):
        np.testing.assert_allclose(got[name], w.numpy(), atol=1e-3, rtol=1e-3, err_msg=name)
