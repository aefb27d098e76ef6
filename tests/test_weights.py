"""Weights: checkpoint formats, and weights under bad or unusual input. Every refusal is one
line and exit 2. Sections name the issue and item a test comes from (issue 12: NaN and
wrongly typed weights; issue 24: DINOv2's position table, save_pretrained folders whose
config.json describes another model, float8 checkpoints, a poisoned hub cache, weights
files that are not files, and files that are not checkpoints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY, export_args, one_line_error, run_cli, run_main, tiny_model

from mame_export.checkpoints import RANDOM_INIT_SEED, seeded
from mame_export.families import build_model, get_family, registry, resolve
from mame_export.families.base import with_kwargs
from mame_export.families.transformers.configs import DINOV2_S, MODELS, TINY_IMG
from mame_export.job import run_export
from mame_export.request import ExportRequest

try:
    import transformers
except ImportError:  # the transformers family's tests are skipped, the others run
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")

# Below this many values the ONNX exporter folds a computation on weights into a constant
# (onnxscript's constant-folding input limit), which would hide a Resize of the table.
_FOLD_LIMIT = 8192


def _ckpt_args(path: Path | str) -> list[str]:
    return ["plan", *[a if a != "random" else str(path) for a in TINY]]


def _dinov2(image_size: int | None = None):  # noqa: ANN202
    family, spec = tiny_model("dinov2_s")
    if image_size is not None:
        spec = with_kwargs(spec, spec.alias, config={**spec.kwargs["config"],
                                                     "image_size": image_size})
    return family, spec


def _plain_dinov2(spec, seed: int = RANDOM_INIT_SEED, **changes: object):  # noqa: ANN202
    """transformers' own Dinov2Model of ``spec``'s config with ``changes``, seeded weights."""
    cfg = transformers.Dinov2Config(**{**DINOV2_S.config, **spec.kwargs["config"], **changes})
    return seeded(lambda: transformers.Dinov2Model(cfg), seed=seed).eval()


def _same_as_plain(model, plain, batch: int, side: int = TINY_IMG, seed: int = 1) -> bool:
    """``model`` gives ``plain``'s pooled output on a seeded (batch, 3, side, side) input."""
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return torch.allclose(model(x), plain(pixel_values=x).pooler_output, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).state_dict()


@pytest.fixture(scope="module")
def vit_t_state() -> dict[str, torch.Tensor]:
    return build_model(registry()["vit_t"], "random")[0].state_dict()


class NotATensor:  # a pickled object weights_only loading must refuse
    pass


# ---------------------------------------------------------------- checkpoint formats


def test_checkpoint_formats_load(tmp_path: Path, vit_t_state) -> None:
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in vit_t_state.items()}, str(st))
    wrapped = tmp_path / "w.pth"
    torch.save({"model": vit_t_state, "epoch": 3}, wrapped)
    sd_wrapped = tmp_path / "w2.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit_t_state.items()}}, sd_wrapped)
    for path in (st, wrapped, sd_wrapped):
        code, out, err = run_main("plan", "vit_t", "--weights", str(path), "--json")
        assert code == 0, err
        assert json.loads(out)["plan"]["final_patches"] == 98


def test_14_checkpoint_extension_case_does_not_matter(tmp_path, tiny_state) -> None:
    from safetensors.torch import save_file

    ckpt = tmp_path / "GOOD.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(ckpt))
    code, _, err = run_main(*_ckpt_args(ckpt))
    assert code == 0, err


def test_img_size_builds_the_model_before_the_checkpoint_loads(tmp_path) -> None:
    # A DINOv2-style model defaults to 518 px; a checkpoint saved at 224 must load at 224.
    import timm
    from safetensors.torch import save_file

    kw = dict(img_size=224, depth=1, embed_dim=48, num_heads=2, num_classes=0)
    small = timm.create_model("vit_small_patch14_dinov2", **kw)
    ckpt = tmp_path / "dinov2_224.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(ckpt))
    spec = resolve("vit_small_patch14_dinov2")
    assert spec.img_size == 518  # the untagged name builds at its default tag's size
    spec = type(spec)(**{**spec.__dict__, "kwargs": dict(depth=1, embed_dim=48, num_heads=2)})
    model, source = build_model(spec, str(ckpt), img_size=224)
    assert model.patch_embed.img_size == (224, 224) and source.startswith("file:")


# ---------------------------------------------------------------- checkpoints that are refused


def test_bad_checkpoints(tmp_path: Path, vit_t_state) -> None:
    good = tmp_path / "good.pth"
    torch.save(vit_t_state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    vit_s = build_model(registry()["vit_s"], "random")[0].state_dict()
    other = tmp_path / "vit_s.pth"
    torch.save(vit_s, other)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in vit_t_state.items() if not k.startswith("head")}, partial)
    cases = [
        (truncated, "cannot read checkpoint"),
        (garbage, "cannot read checkpoint"),
        (other, "with other shapes"),
        (partial, "missing (e.g. head."),
    ]
    for path, needle in cases:
        code, _, err = run_main("plan", "vit_t", "--weights", str(path))
        assert code == 2
        one_line_error(err, needle)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.complex64])
def test_10_checkpoints_of_the_wrong_dtype_are_named(tmp_path, tiny_state, dtype) -> None:
    ckpt = tmp_path / "w.pth"
    torch.save({k: v.to(dtype) for k, v in tiny_state.items()}, ckpt)
    code, _, err = run_main(*_ckpt_args(ckpt))
    assert code == 2
    line = one_line_error(err, "of the wrong dtype")
    assert str(dtype).replace("torch.", "") in line and "floating-point" in line


def test_13_meta_tensor_checkpoint(tmp_path, tiny_state) -> None:
    ckpt = tmp_path / "meta.pth"
    torch.save({k: torch.empty_like(v, device="meta") for k, v in tiny_state.items()}, ckpt)
    code, _, err = run_main(*_ckpt_args(ckpt))
    assert code == 2
    one_line_error(err, "meta tensor(s) without values")


def test_14_pickle_refusal_is_one_whole_sentence(tmp_path) -> None:
    ckpt = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, ckpt)
    res = run_cli("plan", "vit_t", "--weights", str(ckpt), timeout=300)
    assert res.returncode == 2
    line = one_line_error(res.stderr, "refused to load checkpoint")
    assert line.endswith("as safetensors")
    assert "Warning" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- issue 12 item 9: NaN weights


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_9_nan_weights_give_null_and_fail_parity(tmp_path, tiny_state) -> None:
    from safetensors.torch import save_file

    sd = {k: v.clone().contiguous() for k, v in tiny_state.items()}
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(sd, str(ckpt))
    args = [a if a != "random" else str(ckpt) for a in export_args(tmp_path / "g", "--json")]
    code, stdout, err = run_main(*args)
    assert code == 1, err
    meta = _strict_json(stdout)  # no NaN in the JSON
    assert _strict_json(Path(meta["metadata_path"]).read_text())["parity"]["passed"] is False
    parity = meta["parity"]
    assert parity["passed"] is False and parity["max_abs_diff"] is None
    onnxrt = next(r for r in parity["runners"] if r["runner"] == "onnxrt")
    assert onnxrt["status"] == "failed" and "NaN" in onnxrt["reason"]
    assert onnxrt["outputs"][0]["cosine"] is None
    assert "NaN or infinite values" in err  # the checkpoint warning


# ---------------------------------------------------------------- issue 24 item 6: DINOv2's table


@needs_transformers
def test_tiny_dinov2_keeps_the_real_models_table_mismatch():
    """The tiny form must not hide what the real one does: a table built for another size
    than it runs at, too large for the exporter to fold its resampling away."""
    for alias, entry in MODELS.items():
        if not entry.interpolates_position_table:
            continue
        assert entry.config["image_size"] != entry.img_size, alias
        tiny = entry.tiny
        side = tiny["image_size"] // tiny["patch_size"]
        assert tiny["image_size"] != TINY_IMG, alias
        assert side * side * tiny["hidden_size"] > _FOLD_LIMIT, alias


@needs_transformers
@pytest.mark.slow
def test_dinov2_default_export_has_no_resize_and_keeps_its_outputs(tmp_path):
    family, spec = _dinov2(image_size=72)  # 18 x 18 table, run at 4 x 4 patches
    req = ExportRequest(model=spec.alias, weights="random", out_dir=tmp_path)
    meta = run_export(req, log=lambda _: None, spec=spec)
    assert "Resize" not in meta["audit"]["op_census"], meta["audit"]["op_census"]
    assert meta["audit"]["passed"], meta["audit"]["findings"]
    assert meta["parity"]["passed"] and meta["ok"]
    # The table resampled at build gives what transformers' own forward gives.
    model, _ = family.build(spec, "random", None)
    assert model.model.embeddings.position_embeddings.shape[1] == 1 + 16
    assert _same_as_plain(model, _plain_dinov2(spec), batch=2, seed=0)


@needs_transformers
def test_dinov2_weights_load_at_the_table_size_and_run_at_any_size(tmp_path):
    from safetensors.torch import save_file

    family, spec = _dinov2()
    plain = _plain_dinov2(spec, seed=3)
    file = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(file))
    for side in (TINY_IMG, 24):
        model, _ = family.build(spec, str(file), side)
        assert _same_as_plain(model, plain, batch=1, side=side)


# ---------------------------------------------------------------- issue 24 item 10: config.json


def _hub_config(**changes: object) -> dict:
    """facebook/dinov2-small's config.json as save_pretrained writes it, changed."""
    cfg = transformers.Dinov2Config(**DINOV2_S.config).to_dict()
    cfg.update(architectures=["Dinov2Model"], transformers_version="4.31.0.dev0",
               torch_dtype="float32", _name_or_path="facebook/dinov2-small")
    cfg.update(changes)
    return cfg


@needs_transformers
@pytest.mark.parametrize(("field", "value", "ours"), [
    ("hidden_act", "relu", "'gelu'"),
    ("layer_norm_eps", 1e-5, "1e-06"),
    ("model_type", "swin", "'dinov2'"),
    ("num_hidden_layers", 6, "12"),
    ("architectures", ["SwinModel"], "['Dinov2Model']"),
    ("architectures", ["__class__"], "['Dinov2Model']"),
])
def test_a_folder_whose_config_describes_another_model_is_refused(tmp_path, field, value,
                                                                   ours):
    (tmp_path / "config.json").write_text(json.dumps(_hub_config(**{field: value})))
    code, _, err = run_main("plan", "dinov2_s", "--weights", str(tmp_path))
    assert code == 2
    line = one_line_error(err, f"has {field} {value!r}")
    assert f"dinov2_s has {ours}" in line and str(tmp_path) in line


@needs_transformers
def test_a_folder_of_the_same_model_loads_and_metadata_or_auto_map_do_not_matter(tmp_path):
    family, spec = _dinov2()
    plain = _plain_dinov2(spec, seed=5)
    plain.save_pretrained(tmp_path / "dino")
    saved = json.loads((tmp_path / "dino" / "config.json").read_text())
    saved.update(transformers_version="0.0.1", id2label={"0": "x"}, hidden_dropout_prob=0.1,
                 auto_map={"AutoModel": "no_such_module.Evil"})  # never imported
    (tmp_path / "dino" / "config.json").write_text(json.dumps(saved))
    model, source = family.build(spec, str(tmp_path / "dino"), None)
    assert source.startswith("file:")
    assert _same_as_plain(model, plain, batch=1)


@needs_transformers
def test_a_tiny_folder_with_another_activation_is_refused_not_loaded(tmp_path):
    family, spec = _dinov2()
    _plain_dinov2(spec, hidden_act="relu").save_pretrained(tmp_path)
    with pytest.raises(Exception, match="hidden_act 'relu'") as err:
        family.build(spec, str(tmp_path), None)
    assert getattr(err.value, "exit_code", None) == 2 and "\n" not in str(err.value)


@needs_transformers
def test_a_full_clip_folder_is_compared_by_its_vision_config(tmp_path):
    family = get_family("transformers")
    spec = family.tiny(registry()["clip_l336"])
    model, _ = family.build(spec, "random", None)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2)
    vision = model.model.config.to_dict()
    transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)
                           ).save_pretrained(tmp_path / "ok")
    family.build(spec, str(tmp_path / "ok"), None)
    other = transformers.CLIPConfig(vision_config={**vision, "hidden_act": "gelu"},
                                    text_config=text)
    transformers.CLIPModel(other).save_pretrained(tmp_path / "bad")
    with pytest.raises(Exception, match="hidden_act 'gelu'.*has 'quick_gelu'"):
        family.build(spec, str(tmp_path / "bad"), None)


# ---------------------------------------------------------------- issue 24 item 17: float8


@pytest.mark.parametrize(("dtype", "suffix"), [(torch.float8_e4m3fn, ".safetensors"),
                                               (torch.float8_e5m2, ".pt"),
                                               (torch.float8_e4m3fn, ".pt")])
def test_float8_checkpoints_are_refused_in_one_line(tmp_path, tiny_state, dtype, suffix):
    from safetensors.torch import save_file

    ckpt = tmp_path / f"w{suffix}"
    sd = {k: v.to(dtype).contiguous() for k, v in tiny_state.items()}
    save_file(sd, str(ckpt)) if suffix == ".safetensors" else torch.save(sd, ckpt)
    code, _, err = run_main(*_ckpt_args(ckpt))
    assert code == 2
    line = one_line_error(err, f"holds {len(sd)} float8 tensor(s)")
    assert f"is {str(dtype).replace('torch.', '')})" in line


# ---------------------------------------------------------------- issue 24 item 19: hub cache


def _hub_cache(root: Path, payload: bytes) -> Path:
    """A hub cache laid out as huggingface_hub writes it, holding timm's vit_tiny file."""
    repo = root / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(payload)
    return snapshot / "model.safetensors"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):  # noqa: ANN201
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def _export_auto(out: Path) -> list[str]:
    """An export of the tiny timm ViT with --weights auto (plan would use random ones)."""
    return [*[a if a != "random" else "auto" for a in TINY], "--out", str(out)]


def _timm_224_state() -> dict[str, torch.Tensor]:
    import timm

    return seeded(lambda: timm.create_model("vit_tiny_patch16_224")).state_dict()


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "pickle"])
def test_a_poisoned_hub_cache_file_is_refused_in_one_line(hub_cache, tmp_path, kind):
    from safetensors.torch import save

    if kind == "random-bytes":
        payload, needle = os.urandom(4096), "not a safetensors or torch file"
    elif kind == "truncated":
        payload = save({k: v.contiguous() for k, v in _timm_224_state().items()})[:5000]
        needle = "truncated safetensors file"
    else:
        torch.save({"w": torch.zeros(2), "payload": NotATensor()}, tmp_path / "p.pt")
        payload, needle = (tmp_path / "p.pt").read_bytes(), "refused to load checkpoint"
    file = _hub_cache(hub_cache, payload)
    code, _, err = run_main(*_export_auto(tmp_path / "out"))
    assert code == 2, err
    assert str(file) in one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


def test_a_good_hub_cache_file_loads_through_timms_filter(hub_cache):
    from safetensors.torch import save

    state = _timm_224_state()
    file = _hub_cache(hub_cache, save({k: v.contiguous() for k, v in state.items()}))
    spec = resolve("vit_tiny_patch16_224")
    model, source = get_family(spec.family).build(spec, "auto", 32)
    assert source == f"hub cache:{file}"
    assert "state_dict" not in model.pretrained_cfg
    for k, v in model.state_dict().items():
        if k == "pos_embed":  # resampled by timm from 14 x 14 to 2 x 2 patches
            assert v.shape == (1, 1 + 4, 192)
        else:
            assert torch.equal(v, state[k]), k
    # A readable file with the keys of another model: refused, naming the file.
    file.write_bytes(save({"nope": torch.zeros(1)}))
    code, _, err = run_main(*_export_auto(hub_cache / "out"))
    assert code == 2
    one_line_error(err, f"hub cache file {file} does not fit")


# ---------------------------------------------------------------- issue 24 item 26: weights file


@needs_transformers
def test_a_folders_weights_file_that_is_not_a_file_is_named(tmp_path):
    cases = {"fifo": "is a FIFO", "folder": "is a folder", "loop": "is a symlink loop"}
    for kind, needle in cases.items():
        folder = tmp_path / kind
        folder.mkdir()
        weights = folder / "model.safetensors"
        if kind == "fifo":
            os.mkfifo(weights)
        elif kind == "folder":
            weights.mkdir()
        else:
            weights.symlink_to(weights)
        code, _, err = run_main("plan", "dinov2_s", "--weights", str(folder))
        assert code == 2
        assert str(weights) in one_line_error(err, needle)


# ---------------------------------------------------------------- issue 24 item 29b: no checkpoint


def test_a_file_that_is_no_checkpoint_says_what_it_starts_with(tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, _, err = run_main(*_ckpt_args(text))
    assert code == 2
    line = one_line_error(err, "not a safetensors or torch file (it starts with b'root:x:0")
    assert "list index" not in line
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = run_main(*_ckpt_args(empty))
    assert code == 2
    one_line_error(err, "is empty (0 bytes)")
