"""`mame-export eval`: data discovery, metric arithmetic, a tiny trained model, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mame_export import evaluate as ev
from mame_export.cli import main


def _png(path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _stripes(vertical: bool, phase: int, size: int = 32) -> np.ndarray:
    """Class 0: horizontal stripes; class 1: vertical stripes (period 8, any phase)."""
    line = ((np.arange(size) + phase) // 4 % 2) * 255
    img = np.tile(line[None, :] if vertical else line[:, None], (size, size)[::-1] if False
                  else (size, 1) if vertical else (1, size))
    return np.repeat(img[..., None], 3, axis=2)


def _stripe_folder(root, per_class: int = 6, names=("horizontal", "vertical")):
    for c, name in enumerate(names):
        for i in range(per_class):
            _png(root / name / f"{i}.png", _stripes(bool(c), phase=i))
    return root


# ---- data discovery -----------------------------------------------------------------


def test_named_class_folders_map_to_sorted_indices_and_limit_spreads_over_classes(tmp_path):
    root = _stripe_folder(tmp_path / "d", per_class=3, names=("zebra", "apple"))
    images = ev.find_images(root)
    assert images.class_names == ("apple", "zebra")
    assert "sorted order" in images.mapping
    assert [p.parent.name for p in images.paths[:2]] == ["apple", "zebra"]
    assert images.labels[:2] == (0, 1) and len(images.paths) == 6
    limited = ev.find_images(root, limit=3)
    assert limited.labels == (0, 1, 0)


def test_integer_class_folders_are_their_own_indices(tmp_path):
    _png(tmp_path / "d" / "243" / "a.png", np.zeros((8, 8, 3)))
    _png(tmp_path / "d" / "7" / "b.png", np.zeros((8, 8, 3)))
    images = ev.find_images(tmp_path / "d")
    assert sorted(images.labels) == [7, 243] and images.num_classes == 244
    assert "integer name" in images.mapping


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.jpg", np.full((8, 8, 3), 40 * i))
    (tmp_path / "notes.txt").write_text("not an image")
    images = ev.find_images(tmp_path)
    assert images.labels is None and len(images.paths) == 3


@pytest.mark.parametrize("setup, message", [
    (lambda p: p, "no images"),
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "f.png").write_bytes(b"x") and p / "f.png", "must be a folder"),
])
def test_bad_data_folders_are_one_clear_error(tmp_path, setup, message):
    with pytest.raises(ev.DataError, match=message):
        ev.find_images(setup(tmp_path))


def test_unreadable_image_names_the_file(tmp_path):
    _png(tmp_path / "good.png", np.zeros((8, 8, 3)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    images = ev.find_images(tmp_path)
    with pytest.raises(ev.DataError, match="bad.png"):
        list(ev.load_batches(images, lambda im: torch.zeros(3, 4, 4), 4))


# ---- metric arithmetic ----------------------------------------------------------------


def test_compare_computes_top1_top5_agreement_and_cosines():
    ref = ev.Outputs(torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0]]),
                     torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = ev.Outputs(torch.tensor([[1.0, 5, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0]]),
                     torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    labels = [0, 1]
    m = ev.compare(ref, out, labels, has_head=True)
    assert m["top1"] == 0.5  # sample 0 now predicts 1
    assert m["top5"] == 1.0  # label 0 is still in sample 0's top 5
    assert m["top1_agreement"] == 0.5
    assert m["cosine_features"] == pytest.approx((2 ** -0.5 + 1.0) / 2)
    assert m["cosine_outputs"] < 1.0
    headless = ev.compare(ref, out, labels, has_head=False)
    assert headless["top1"] is None and headless["top1_agreement"] is None


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
    log: list[str] = []
    report = ev.evaluate(variants, images, ev.transform_for(model), 5, log.append)
    rows = {r["name"]: r for r in report["variants"]}
    base = rows["unmerged"]
    assert base["top1"] == 1.0 and base["top5"] == 1.0  # trained to separate the stripes
    assert base["top1_agreement"] == 1.0 and base["cosine_features"] == pytest.approx(1.0)
    for name in ("MaMe r=0.5", "ToMe r=0.5"):
        r = rows[name]
        assert 0.0 < r["macs_ratio"] < 1.0 and r["final_patches"] == 32
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert -1.0 <= r["cosine_features"] <= 1.0
    # The agreement is the share of the unmerged model's predictions it reproduces.
    assert report["images"] == 12 and report["labelled"] and report["classes"] == 2
    assert any("12/12 images" in line for line in log)  # progress per variant


def test_class_count_that_does_not_fit_the_head_is_refused(tmp_path):
    root = tmp_path / "d"
    for c in range(3):
        _png(root / str(c) / "a.png", np.zeros((8, 8, 3)))
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                              embed_dim=16, num_heads=1, num_classes=2)
    with pytest.raises(ev.DataError, match="head has 2 classes"):
        ev.check_labels(ev.find_images(root), model)


# ---- the command line ---------------------------------------------------------------------


@pytest.mark.slow
def test_eval_cli_json_and_plot_on_a_flat_folder(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", _stripes(bool(i % 2), i, size=64))
    plot = tmp_path / "acc.png"
    rc = main(["eval", "vit_tiny_patch16_224", "--data", str(tmp_path / "imgs"),
               "--weights", "random", "--img-size", "64", "--r", "0.25,0.5", "--batch", "2",
               "--json", "--plot", str(plot)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in report["variants"]]
    assert names == ["unmerged", "MaMe r=0.25", "ToMe r=0.25", "MaMe r=0.5", "ToMe r=0.5"]
    assert report["labelled"] is False and report["variants"][0]["top1"] is None
    assert report["variants"][0]["top1_agreement"] == 1.0
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/none"], "not found"),
    (["--data", "{tmp}", "--r", "1.5"], "r must be in"),
    (["--data", "{tmp}", "--batch", "0"], "--batch must be"),
    (["--data", "{tmp}"], "no images"),
])
def test_eval_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["eval", "vit_tiny_patch16_224", "--weights", "random", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
