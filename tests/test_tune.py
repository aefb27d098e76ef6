"""`mame-export tune` and plan files (issue 19): the search, the file, `--plan` everywhere.

vit_t at 64 px (16 patches, 12 blocks, seeded random weights) is tuned on six generated
images in seconds; the plan files it writes are then read by every command."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, cli_env, cli_error, one_line_error, run_main, write_png

from mame_export import apply
from mame_export.patch import merge_plan
from mame_export.planfile import (
    PlanFileError,
    from_dict,
    read_plan_file,
    weights_sha256,
)
from mame_export.tune.search import Search, keep_of

# vit_t at 64 px: 16 patches in 12 blocks; random weights are seeded (the same each build)
TUNE_MODEL = ["vit_t", "--img-size", "64", "--weights", "random"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64 px images with structure (smooth gradients and a few blocks), seeded."""
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(6):
        img = np.stack([(xx * (i + 1)) % 256, (yy * (7 - i)) % 256,
                        ((xx + yy) * 3) % 256], -1).astype(np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 48, 2)
            img[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
        write_png(root / f"im{i}.png", img)
    return root


@pytest.fixture(scope="module")
def tuned(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tune run at two budgets (its --json report); the plan files in its folder."""
    out = tmp_path_factory.mktemp("plans")
    code, stdout, err = run_main("tune", *TUNE_MODEL, "--data", str(images),
                                 "--target-macs", "0.6,0.45", "--max-candidates", "10",
                                 "--out", str(out), "--json")
    assert code == 0, err
    return {"report": json.loads(stdout), "out": out, "log": err}


def test_tune_writes_one_plan_per_budget_within_it(tuned: dict) -> None:
    plans = tuned["report"]["plans"]
    assert [p["target_macs"] for p in plans] == [0.6, 0.45]
    for p in plans:
        plan = read_plan_file(p["plan_file"])
        assert Path(p["plan_file"]).name == f"vit_t_64_macs{p['target_macs']:g}.json"
        assert plan.macs_ratio <= plan.target_macs
        candidates = plan.search["candidates"]
        assert 2 <= len(candidates) <= 10
        assert all(c["macs_ratio"] <= plan.target_macs + 1e-9 for c in candidates)
        # the chosen schedule is MaMe's default, or one better than it beyond the noise
        assert plan.score in [c["score"] for c in candidates]
        assert plan.score >= plan.search["default"]["score"]
        # what the file says is what apply runs: the plan's MACs and counts
        assert plan.keep_counts == tuple(p["keep_counts"])
    assert "searching a plan at MACs ratio 0.6" in tuned["log"]  # progress on stderr
    assert "[1/10]" in tuned["log"]


def test_plan_file_round_trips(tuned: dict) -> None:
    path = Path(tuned["report"]["plans"][0]["plan_file"])
    plan = read_plan_file(path)
    assert from_dict(json.loads(path.read_text())) == plan
    assert from_dict(plan.to_dict()) == plan
    assert plan.version == 1 and plan.img_size == 64 and plan.num_patches == 16
    assert plan.depth == 12 and plan.model == "vit_t"
    assert plan.weights_sha256 == tuned_model_digest()


def tuned_model_digest() -> str:
    from mame_export.request import ExportRequest, build

    built = build(ExportRequest(model="vit_t", img_size=64, weights="random").resolve(
        export=False), log=lambda _m: None, patch=False)
    return weights_sha256(built.model)


def test_search_is_deterministic_for_a_seed(images: Path, tmp_path: Path) -> None:
    args = ["tune", *TUNE_MODEL, "--data", str(images), "--target-macs", "0.5",
            "--max-candidates", "8", "--seed", "3", "--json"]
    a = json.loads(run_main(*args, "--out", str(tmp_path / "a.json"))[1])
    b = json.loads(run_main(*args, "--out", str(tmp_path / "b.json"))[1])
    ca = read_plan_file(tmp_path / "a.json").search["candidates"]
    cb = read_plan_file(tmp_path / "b.json").search["candidates"]
    assert [(c["keep_counts"], c["similarity"]) for c in ca] == \
        [(c["keep_counts"], c["similarity"]) for c in cb]
    assert a["plans"][0]["keep_counts"] == b["plans"][0]["keep_counts"]


def test_search_respects_the_budget_and_its_bound() -> None:
    """The search alone, scored by a cheap stand-in: every candidate within budget, each
    scored once, no more than the bound, and the per-block moves used."""
    from helpers import tiny_vit

    from mame_export.families.timm_vit.patch import PATCHER

    model = tiny_vit()  # 64 patches, 4 blocks
    n = PATCHER.num_patches(model)
    scored = []

    def macs(keep, sim):
        return PATCHER.build_plan(model, 0.0, schedule=list(keep), similarity=sim).flops_ratio

    def score(keep, sim):  # prefers little merging in block 0, and the cosine
        scored.append((tuple(keep), sim))
        base = (n if keep[0] is None else keep[0]) + (0.5 if sim == "cosine" else 0.0)
        return [base + 0.01 * j for j in range(8)]  # 8 "images", the same gain on each

    search = Search(n, 4, 0.6, macs, score, max_candidates=25, seed=1,
                    similarities=("size", "cosine"), default_end=4, log=lambda _m: None)
    result = search.run()
    assert len(scored) == len(set(scored)) <= 25
    assert all(c.macs_ratio <= 0.6 + 1e-9 for c in result.candidates)
    assert result.best.similarity == "cosine"
    assert {c.stage for c in result.candidates} >= {"default", "shape", "similarity", "move"}
    assert keep_of(result.best.counts, n) != keep_of(result.default.counts, n)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(version=2), "format version 2"),
    (lambda d: d.update(merge_op="fixed source positions"), "another merge op"),
    (lambda d: d.update(format="something else"), "not a mame-export merge plan"),
    (lambda d: d.pop("keep_counts"), "no 'keep_counts' entry"),
    (lambda d: d.update(keep_counts=[0] * 12), "a keep count is 0"),
    (lambda d: d.update(similarity="l2"), "similarity must be one of size, cosine"),
    (lambda d: d.update(weights_sha256="0" * 64), "made for other weights"),
    (lambda d: d.update(keep_counts=[20] + [None] * 11), "block 0 of the schedule keeps 20"),
])
def test_a_bad_or_foreign_plan_file_is_one_line(tuned: dict, tmp_path: Path, edit,
                                                needle: str) -> None:
    d = json.loads(Path(tuned["report"]["plans"][0]["plan_file"]).read_text())
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    out = tmp_path / "g"
    line = cli_error("vit_t", "--weights", "random", "--plan", str(path), "--out", str(out))
    assert needle in line
    assert not out.exists()


def test_a_plan_for_another_model_or_size_is_refused_before_any_build(tuned: dict) -> None:
    path = tuned["report"]["plans"][0]["plan_file"]
    t0 = time.perf_counter()
    assert "made for vit_t" in cli_error("plan", "vit_s", "--plan", path)
    assert "made for input size 64, not 96" in cli_error("plan", "vit_t", "--img-size", "96",
                                                         "--plan", path)
    assert "--plan: not allowed with argument --r" in cli_error("vit_t", "--r", "0.3", "--plan",
                                                           path)
    assert "drop --layers" in cli_error("vit_t", "--layers", "0-3", "--plan", path)
    assert time.perf_counter() - t0 < 30
    assert "no plan file" in cli_error("vit_t", "--plan", "/nonexistent/p.json")


def test_export_with_a_plan_is_static_audited_and_at_parity(tuned: dict, tmp_path: Path) -> None:
    path = tuned["report"]["plans"][1]["plan_file"]
    plan = read_plan_file(path)
    code, stdout, err = run_main("vit_t", "--weights", "random", "--plan", path, "--out",
                                 str(tmp_path), "--parity-batches", "1", "--seed", "0",
                                 "--json")
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["audit"]["passed"] and meta["parity"]["passed"]
    assert meta["plan"]["keep_counts"] == list(plan.keep_counts)
    assert meta["plan"]["similarity"] == plan.similarity and meta["plan"]["explicit"]
    assert meta["plan_file"]["keep_counts"] == list(plan.keep_counts)
    assert meta["settings"]["img_size"] == 64  # the plan's size, not vit_t's 224
    # parity GRAPH rebuilds the tuned schedule from the sidecar (a uniform one would fail)
    code, _, err = run_main("parity", meta["onnx"], "--runners", "onnxrt", "--seed", "1",
                            "--parity-batches", "1")
    assert code == 0, err
    # a uniform export at the same r gets a file of its own (the plan is in the name's tag)
    from mame_export.request import ExportRequest, settings_tag

    uniform = ExportRequest(model="vit_t", img_size=64, weights="random", r=plan.r)
    assert settings_tag(uniform.resolve()) not in meta["onnx"]


def test_plan_eval_and_profile_take_the_plan(tuned: dict, images: Path) -> None:
    path = tuned["report"]["plans"][1]["plan_file"]
    plan = read_plan_file(path)
    code, stdout, err = run_main("plan", "vit_t", "--plan", path, "--json")
    assert code == 0, err
    assert json.loads(stdout)["plan"]["keep_counts"] == list(plan.keep_counts)
    code, stdout, err = run_main("eval", "vit_t", "--weights", "random", "--data", str(images),
                                 "--plan", path, "--no-tome", "--json")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(stdout)["variants"]}
    assert rows["mame-plan"]["macs_ratio"] == pytest.approx(plan.macs_ratio)
    assert rows["mame"]["macs_ratio"] <= plan.target_macs  # uniform, at the plan's budget
    # the plan's score on its own calibration images is what tune recorded
    assert rows["mame-plan"]["cosine_features"] == pytest.approx(plan.score, abs=1e-5)

    code, stdout, err = run_main("profile", "vit_t", "--plan", path, "--backends", "torch",
                                 "--variants", "baseline,mame", "--threads", "1", "--warmup",
                                 "0", "--min-iters", "2", "--max-iters", "2", "--seconds",
                                 "0.001", "--input-sets", "2", "--json")
    assert code == 0, err
    names = [r["variant"] for r in json.loads(stdout)["results"]]
    assert "mame-plan" in names and "mame" in names and "baseline" in names


def test_a_gain_inside_the_noise_is_not_taken() -> None:
    from mame_export.tune.search import Candidate

    def cand(per_image):
        return Candidate((1,), "size", 0.5, tuple(per_image), "shape", "")

    base = cand([0.90, 0.95, 0.80, 0.99])
    assert not cand([0.91, 0.94, 0.82, 0.98]).beats(base)  # +0.0025 mean, noisy
    assert cand([0.92, 0.97, 0.82, 1.01]).beats(base)  # +0.02 on every image


def test_apply_takes_a_plan_and_checks_the_weights(tuned: dict) -> None:
    from mame_export.request import ExportRequest, build

    path = tuned["report"]["plans"][1]["plan_file"]
    plan = read_plan_file(path)
    model = build(ExportRequest(model="vit_t", img_size=64, weights="random").resolve(
        export=False), log=lambda _m: None, patch=False).model
    patched = apply(copy.deepcopy(model), plan=path)
    assert merge_plan(patched).keep_counts == plan.keep_counts
    assert merge_plan(patched).similarity == plan.similarity
    assert patched(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(PlanFileError, match="made for other weights"):
        apply(other, plan=plan)


def test_tune_refuses_what_it_cannot_tune(images: Path, tmp_path: Path) -> None:
    assert "tune searches the token schedule of ViT-style" in cli_error(
        "tune", "sd21-unet", "--data", str(images), "--target-macs", "0.5")
    assert "--metric must be one of" in cli_error(
        "tune", *TUNE_MODEL, "--data", str(images), "--target-macs", "0.5", "--metric", "l2")
    assert "is one file, but --target-macs gives 2 budgets" in cli_error(
        "tune", *TUNE_MODEL, "--data", str(images), "--target-macs", "0.5,0.4",
        "--out", str(tmp_path / "p.json"))
    assert "out of reach" in cli_error(
        "tune", *TUNE_MODEL, "--data", str(images), "--target-macs", "0.01",
        "--max-candidates", "4", "--out", str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_ctrl_c_during_the_search_leaves_no_plan(images: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mame_export", "tune", *TUNE_MODEL, "--data", str(images),
         "--target-macs", "0.5", "--max-candidates", "200", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the search runs (no fixed delay)
        if line.startswith("  [2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    one_line_error(err, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_cosine_similarity_equals_size_aware_for_unit_sizes_only() -> None:
    from mame_export.ops import mame_step

    g = torch.Generator().manual_seed(0)
    x, k = torch.randn(2, 24, 8, generator=g), torch.randn(2, 24, 4, generator=g)
    ones = torch.ones(2, 24, 1)
    # one sub-step (8 of 12 candidates merge): every size is 1 when tokens are compared
    a = mame_step(x, k, ones, 16, similarity="size")[0]
    b = mame_step(x, k, ones, 16, similarity="cosine")[0]
    torch.testing.assert_close(a, b)
    sizes = torch.randint(1, 9, (2, 24, 1), generator=g).float()
    a = mame_step(x, k, sizes, 16, similarity="size")[0]
    b = mame_step(x, k, sizes, 16, similarity="cosine")[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="similarity must be one of"):
        mame_step(x, k, ones, 10, similarity="l2")
