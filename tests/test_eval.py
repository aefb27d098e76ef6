"""`mame-export eval`: metric arithmetic, every registry alias at tiny size, a tiny trained
model, `--graph`, and the CLI's refusals (data layouts: tests/test_eval_data.py)."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import timm
import torch
from helpers import cli_error, registry_params, tiny_model, write_png

from mame_export import evaluate as ev
from mame_export.cli import main
from mame_export.evaluate.deployed import GraphMismatchError
from mame_export.evaluate.variants import NonFiniteOutputError, Variant, run_once
from mame_export.families import IOSpec, get_family, registry
from mame_export.families.base import with_kwargs


def _stripes(vertical: bool, phase: int, size: int = 32) -> np.ndarray:
    """Class 0: horizontal stripes; class 1: vertical stripes (period 8, any phase)."""
    line = ((np.arange(size) + phase) // 4 % 2) * 255
    img = np.tile(line[None, :], (size, 1)) if vertical else np.tile(line[:, None], (1, size))
    return np.repeat(img[..., None], 3, axis=2)


def _stripe_folder(root, per_class: int = 6, names=("horizontal", "vertical"), size=32):
    for c, name in enumerate(names):
        for i in range(per_class):
            write_png(root / name / f"{i}.png", _stripes(bool(c), phase=i, size=size))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Labelled images (2 classes x 4), clips (2 classes x 2 clips x 4 frames), latents."""
    root = tmp_path_factory.mktemp("eval-data")
    _stripe_folder(root / "images", per_class=4, size=24)
    for c, name in enumerate(("horizontal", "vertical")):
        for k in range(2):
            for f in range(4):
                write_png(root / "clips" / name / f"clip{k}" / f"{f:03d}.png",
                          _stripes(bool(c), phase=k + f, size=24))
    (root / "latents").mkdir()
    for k in range(3):
        np.save(root / "latents" / f"{k}.npy",
                np.random.default_rng(k).standard_normal((4, 16, 16)).astype(np.float32))
    return root


# ---- metric arithmetic ----------------------------------------------------------------


def test_tally_computes_top1_top5_agreement_and_cosines():
    ref = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0]])
    out = torch.tensor([[1.0, 5, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0]])
    ref_feat, feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1], [0, 2.0]])
    tally = ev.Tally()
    tally.add(ref, out, ref_feat, feat, torch.tensor([0, 1]), True, False)
    m = tally.metrics(class_scores=True, labelled=True)
    assert m["top1"] == 0.5  # sample 0 now predicts 1
    assert m["top5"] == 1.0  # label 0 is still in sample 0's top 5
    assert m["top1_agreement"] == 0.5
    assert m["cosine_features"] == pytest.approx((2 ** -0.5 + 1.0) / 2)
    assert m["cosine_outputs"] < 1.0
    headless = tally.metrics(class_scores=False, labelled=True)
    assert headless["top1"] is None and headless["top1_agreement"] is None


def test_token_outputs_pool_to_the_size_weighted_mean():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sizes = torch.tensor([[[3.0], [1.0]]])
    pooled = ev.metrics.pooled_tokens(tokens, sizes)
    assert torch.allclose(pooled, torch.tensor([[0.75, 0.25]]))


def test_probe_split_is_a_stratified_half_and_needs_two_per_class():
    train, why = ev.probe_split([0, 1, 0, 1, 0, 1, 1])
    assert why is None and train.tolist() == [True, True, False, False, True, True, False]
    assert "1 image(s)" in ev.probe_split([0, 0, 1])[1]
    assert "one class" in ev.probe_split([3, 3, 3, 3])[1]


def test_knn_and_probe_fit_on_the_reference_and_score_the_other_half():
    gen = torch.Generator().manual_seed(0)
    labels = [0, 1, 2] * 6
    centers = torch.eye(3, 8) * 4
    ref = centers[labels] + 0.3 * torch.randn(18, 8, generator=gen)
    train, _ = ev.probe_split(labels)
    scorer = ev.FeatureScorer(ref.double(), labels, train)
    same = scorer.score(ref.double())
    assert same == {"knn_accuracy": 1.0, "knn_agreement": 1.0, "probe_accuracy": 1.0,
                    "probe_agreement": 1.0}
    noise = scorer.score(torch.randn(18, 8, generator=gen).double())
    assert noise["knn_accuracy"] < 1.0 or noise["probe_accuracy"] < 1.0
    again = ev.FeatureScorer(ref.double(), labels, train)  # deterministic fit
    assert torch.equal(again.probe.weight, scorer.probe.weight)


def test_a_variant_with_nan_outputs_fails_naming_it():
    io = IOSpec(("pixels",), ("logits",), lambda b, g: (torch.zeros(b, 3),))
    broken = Variant("MaMe r=0.5", "mame", 0.5, lambda x: x * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="MaMe r=0.5 gives NaN") as e:
        run_once(broken, io, (torch.ones(2, 3),), "images 1-2")
    assert e.value.exit_code == 1


# ---- every registry alias at tiny size ----------------------------------------------------


def _run_eval(spec, kwargs: dict, log):
    """``run_eval`` on a resolved job for ``spec`` (eval-only settings split off)."""
    from mame_export.request import ExportRequest, resolve_job

    only = {k: kwargs.pop(k) for k in ("data", "tome", "limit", "graph") if k in kwargs}
    kwargs.setdefault("batch", 16)
    job = resolve_job(ExportRequest(model=spec.alias, **kwargs), export=False, spec=spec)
    return ev.run_eval(job, ev.EvalSettings(**only), log)


@pytest.mark.parametrize("alias, llava", registry_params(llava=True))
def test_every_alias_evaluates_at_tiny_size(alias, llava, data):
    family, spec = tiny_model(alias, llava=True) if llava else tiny_model(alias)
    model, _ = family.build(spec, "random", None)
    kind = ev.run.inputs_of(family, spec, model, None).kind
    folder = {"images": data / "images", "clips": data / "clips", "latents": None}[kind]
    log: list[str] = []
    report = _run_eval(spec, dict(data=folder, weights="random", batch=4,
                                               limit=1 if folder is None else None),
                         log.append)
    rows = {r["name"]: r for r in report["variants"]}
    base = rows["unmerged"]
    assert base["cosine_outputs"] == pytest.approx(1.0) and base["macs_ratio"] == 1.0
    mame = rows["MaMe r=0.5"]
    assert 0.0 < mame["macs_ratio"] < 1.0 and -1.0 <= mame["cosine_outputs"] <= 1.0
    if "tome" in family.capabilities:
        assert "ToMe r=0.5" in rows
    assert ev.table(report).splitlines()[0].startswith("variant")
    if kind == "latents":
        assert report["kind"] == "denoiser" and report["images"] == 1
        assert base["rel_l2"] == 0.0 and mame["rel_l2"] > 0.0
        assert len(report["timesteps"]) == 10 and report["timesteps"][-1] == 999
        assert any("seeded random" in n for n in report["notes"])
        assert ("ToMe-SD r=0.5" in rows) == ("tomesd" in family.capabilities and  # UNets
                                             importlib.util.find_spec("tomesd") is not None)
        return
    assert report["labelled"] and report["inputs"] == kind
    assert report["images"] == {"images": 8, "clips": 4}[kind]
    if report["kind"] == "classifier":
        assert base["top1_agreement"] == 1.0 and base["top1"] is not None
    else:
        assert report["kind"] == "encoder" and base["cosine_features"] == pytest.approx(1.0)
        assert base["knn_agreement"] == 1.0 and base["probe_agreement"] == 1.0
        for r in rows.values():
            assert 0.0 <= r["knn_accuracy"] <= 1.0 and 0.0 <= r["probe_accuracy"] <= 1.0
    if llava:
        assert any("size-weighted mean token" in n for n in report["notes"])


def test_unet_latents_from_data_are_used(data):
    spec = tiny_model("sd21-unet")[1]
    report = _run_eval(spec, dict(data=data / "latents", weights="random",
                                               batch=2, layers=[0]), lambda _: None)
    assert report["images"] == 3 and [r["name"] for r in report["variants"]] == \
        ["unmerged", "MaMe r=0.5"]
    assert not any("seeded random N(0, 1) latents" in n for n in report["notes"])
    if importlib.util.find_spec("tomesd") is not None:  # ToMe-SD merges by level only
        assert any("ToMe-SD is left out: it merges by UNet level" in n
                   for n in report["notes"])


def test_a_unet_refuses_a_folder_of_images(data):
    with pytest.raises(ev.DataError):
        _run_eval(tiny_model("sd21-unet")[1], dict(data=data / "images",
                                                             weights="random"), print)


def test_an_image_model_needs_data():
    with pytest.raises(ev.run.UserError, match="--data DIR is needed"):
        _run_eval(tiny_model("vit_t")[1], dict(weights="random"), print)


def test_fewer_than_two_images_per_class_says_why_no_probe(tmp_path):
    _stripe_folder(tmp_path, per_class=1, size=24)
    report = _run_eval(tiny_model("dinov2_s")[1], dict(
        data=tmp_path, weights="random", tome=False), lambda _: None)
    assert any("not computed: a class has 1 image(s)" in n for n in report["notes"])
    assert "knn_accuracy" not in report["variants"][0]


# ---- a tiny model trained on a synthetic task -------------------------------------------


def _trained_tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                              embed_dim=32, num_heads=2, num_classes=2)
    xs = torch.stack([torch.from_numpy(_stripes(bool(c), p)).permute(2, 0, 1).float() / 255
                      for c in (0, 1) for p in range(8)])
    xs = (xs - 0.5) / 0.5  # the transform's normalisation for this model (mean = std = 0.5)
    ys = torch.tensor([0] * 8 + [1] * 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    return model.eval()


def test_eval_on_a_tiny_labelled_set(tmp_path):
    root = _stripe_folder(tmp_path / "d")
    model = _trained_tiny_vit()
    images = ev.find_images(root)
    ev.check_labels(images, model)
    variants = ev.build_variants(model, [0.5], tau=1.0, layers=None, prop_attn=True)
    assert [v.name for v in variants] == ["unmerged", "MaMe r=0.5", "ToMe r=0.5"]
    family, spec = get_family("timm-vit"), registry()["vit_t"]
    io = family.io_spec(spec, model, None)
    transform = ev.data.transform_from(**family.eval_preprocessing(spec, model, None))
    log: list[str] = []
    rows, _ = ev.evaluate_images(variants, io, images, transform, 5, log.append)
    rows = {r["name"]: r for r in rows}
    base = rows["unmerged"]
    assert base["top1"] == 1.0 and base["top5"] == 1.0  # trained to separate the stripes
    assert base["top1_agreement"] == 1.0 and base["cosine_features"] == pytest.approx(1.0)
    for name in ("MaMe r=0.5", "ToMe r=0.5"):
        r = rows[name]
        assert 0.0 < r["macs_ratio"] < 1.0 and r["final_patches"] == 32
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert -1.0 <= r["cosine_features"] <= 1.0
    assert any("12/12 images" in line for line in log)  # progress per batch


def test_class_count_that_does_not_fit_the_head_is_refused(tmp_path):
    root = tmp_path / "d"
    for c in range(3):
        write_png(root / str(c) / "a.png", np.zeros((8, 8, 3)))
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                              embed_dim=16, num_heads=1, num_classes=2)
    with pytest.raises(ev.DataError, match="head has 2 classes"):
        ev.check_labels(ev.find_images(root), model)


# ---- eval --graph ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """An exported graph of the tiny vit_t (64 px, r = 0.5) and its sidecar."""
    from mame_export.job import run_export
    from mame_export.request import ExportRequest

    spec = tiny_model("vit_t")[1]
    out = tmp_path_factory.mktemp("graphs")
    req = ExportRequest(model=spec.alias, r=0.5, weights="random", out_dir=out,
                        parity_batches=1, seed=0, runners=("onnxrt",))
    meta = run_export(req, log=lambda _: None, spec=spec)
    return spec, meta["onnx"]


@pytest.mark.slow
def test_graph_is_a_variant_scored_through_onnx_runtime(tiny_graph, data, tmp_path):
    import pathlib
    import shutil

    spec, onnx = tiny_graph
    graph = pathlib.Path(onnx)
    report = _run_eval(spec, dict(data=data / "images", weights="random",
                                               batch=3, graph=graph), lambda _: None)
    rows = {r["name"]: r for r in report["variants"]}
    row, mame = rows[graph.name], rows["MaMe r=0.5"]
    assert row["method"] == "graph" and row["r"] == 0.5
    assert row["macs_ratio"] == pytest.approx(mame["macs_ratio"])
    # The graph is MaMe at r=0.5 exported: it agrees with the eager MaMe row.
    assert row["cosine_outputs"] == pytest.approx(mame["cosine_outputs"], abs=1e-4)
    assert row["top1_agreement"] == mame["top1_agreement"]
    assert row["cosine_features"] is None  # a graph returns logits only
    # Without its sidecar: the row is there, its r unknown, and a note says so.
    alone = tmp_path / "alone.onnx"
    shutil.copy(graph, alone)
    report = _run_eval(spec, dict(data=data / "images", weights="random",
                                               batch=4, graph=alone, tome=False), print)
    assert report["variants"][-1]["r"] is None
    assert any("no sidecar beside alone.onnx" in n for n in report["notes"])
    # A graph of another model (its sidecar says so) is refused in one line.
    other = with_kwargs(spec, "tiny-vit_s")
    with pytest.raises(GraphMismatchError, match="is of model tiny-vit_t; eval runs tiny-vit_s"):
        _run_eval(other, dict(data=data / "images", weights="random",
                                           graph=graph), print)


@pytest.mark.slow
def test_graph_with_other_inputs_is_one_line_exit_2(tiny_graph, data):
    _, onnx = tiny_graph  # takes pixels [B, 3, 64, 64]
    line = cli_error("eval", "vit_t", "--weights", "random", "--img-size", "32", "--data",
                     str(data / "images"), "--graph", onnx, alone=True)
    assert "takes pixels[B,3,64,64]; vit_t at size 32 takes pixels[B,3,32,32]" in line


# ---- the command line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    for i in range(3):
        write_png(root / f"{i}.png", _stripes(bool(i % 2), i, size=32))
    return root


@pytest.mark.slow
def test_eval_cli_json_and_plot_on_a_flat_folder(flat, tmp_path, capsys):
    plot = tmp_path / "acc.png"
    rc = main(["eval", "vit_tiny_patch16_224", "--data", str(flat), "--weights", "random",
               "--img-size", "32", "--r", "0.25,0.5", "--batch", "2", "--json", "--plot",
               str(plot)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in report["variants"]]
    assert names == ["unmerged", "MaMe r=0.25", "ToMe r=0.25", "MaMe r=0.5", "ToMe r=0.5"]
    assert report["labelled"] is False and report["variants"][0]["top1"] is None
    assert report["variants"][0]["top1_agreement"] == 1.0
    for key in ("model", "source", "weights", "data", "command", "versions", "images",
                "labelled", "class_mapping", "classes", "variants", "notes"):
        assert key in report
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/none"], "not found"),
    (["--data", "{flat}", "--r", "1.5"], "--r must be in"),
    (["--data", "{flat}", "--r", ","], "--r needs at least one value"),
    (["--data", "{flat}", "--target-macs", ","], "--target-macs needs at least one value"),
    (["--data", "{flat}", "--batch", "0"], "--batch must be"),
    (["--data", "{flat}", "--threads", "5000"], "--threads must be in [1, "),
    (["--data", "{flat}", "--limit", "0"], "--limit must be in [1, "),
    (["--data", "{flat}", "--img-size", "8"], "smaller than vit_t's patch size 16"),
    (["--data", "{flat}", "--img-size", "100"], "not a multiple of vit_t's patch size 16"),
    (["--data", "{flat}", "--graph", "{tmp}/none.onnx"], "graph not found"),
    (["--data", "{tmp}"], "no images"),
    ([], "--data DIR is needed"),
])
def test_eval_cli_errors_are_one_line(tmp_path, flat, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{flat}", str(flat)) for a in argv]
    assert message in cli_error("eval", "vit_t", "--weights", "random", *argv, alone=True)


def test_plot_through_a_file_is_refused_before_any_work(tmp_path, flat):
    (tmp_path / "afile").write_text("x")
    start = time.perf_counter()
    line = cli_error("eval", "vit_t", "--weights", "random", "--data", str(flat), "--plot",
                     str(tmp_path / "afile" / "x.png"), alone=True)
    assert "--plot" in line and "afile is not a folder" in line
    assert time.perf_counter() - start < 5.0  # no model was built


def test_results_are_printed_before_the_plot_is_written(flat, tmp_path, capsys, monkeypatch):
    def failing_plot(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ev, "plot", failing_plot)
    rc = main(["eval", "vit_t", "--weights", "random", "--img-size", "32", "--data", str(flat),
               "--no-tome", "--json", "--plot", str(tmp_path / "p.png")])
    captured = capsys.readouterr()
    assert rc == 2 and "results above are complete" in captured.err
    assert json.loads(captured.out)["variants"][0]["name"] == "unmerged"


def test_nan_weights_fail_the_run_naming_the_variant(flat, tmp_path, capsys):
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", img_size=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"][:] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    rc = main(["eval", "vit_t", "--weights", str(tmp_path / "nan.safetensors"), "--img-size",
               "32", "--data", str(flat), "--no-tome", "--json"])
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if "error" in ln]
    assert rc == 1 and captured.out == "" and len(errors) == 1
    assert "the unmerged model gives NaN or infinite outputs on images 1-3" in errors[0]
