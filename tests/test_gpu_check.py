"""tools/gpu_check.py: the one-call GPU check, run here as its CPU dry run.

The dry run takes the real run's code paths (parts, groups, interleaved timing, the
JSON/markdown/plot writers, the ONNX Runtime part with the CPU provider standing in
for CUDA) on tiny models. No test asserts a timing, only how the numbers relate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
PARTS = ("env", "parity", "latency", "ort")


def _run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    # The timeout is a safety net only: the dry run takes ~35 s on 2 idle cores, several
    # times that on a loaded machine.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, check=False)


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stderr


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.slow
def test_dry_run_writes_few_flat_files(dry):
    out, doc, stderr = dry
    names = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log"} <= set(names)
    assert len(names) <= 8
    assert all(p.is_file() for p in out.iterdir())  # flat: no folders
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Parts", "## Environment", "## Parity", "## Latency", "## ONNX Runtime"):
        assert heading in md
    assert "[gpu_check +" in stderr and "done in" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_dry_run_every_part_ran(dry):
    _, doc, _ = dry
    assert doc["dry_run"] is True and doc["complete"] is True and doc["device"] == "cpu"
    assert set(doc["parts"]) == set(PARTS)
    for name in PARTS:
        part = doc["parts"][name]
        assert part["status"] == "ok", (name, part.get("error") or part.get("reason"))
        assert part["seconds"] >= 0
    assert doc["elapsed_s"] < doc["budget_s"] == 450
    assert "--dry-run" in doc["command"]


@pytest.mark.slow
def test_dry_run_environment(dry):
    env = dry[1]["parts"]["env"]["data"]
    for key in ("python", "torch", "torch_cuda", "cudnn", "driver_version", "command",
                "utc_date", "packages", "onnxruntime"):
        assert key in env
    assert "CPUExecutionProvider" in env["onnxruntime"]["providers"]
    assert env["packages"]["timm"] and env["packages"]["onnx"]


@pytest.mark.slow
def test_dry_run_parity_fields(dry):
    par = dry[1]["parts"]["parity"]
    got = {(i["variant"], i["precision"]) for i in par["results"]}
    assert got == {(v, p) for v in ("mame", "unmerged") for p in ("fp32", "fp16", "bf16")}
    assert par["r"] == 0.5 and 0 < par["flops_ratio"] < 1 and par["passed"] is True
    for i in par["results"]:
        assert i["status"] == "passed" and i["finite"] is True
        assert len(i["cosine_per_sample"]) == par["samples"]
        assert _close(i["cosine_min"], min(i["cosine_per_sample"]))
        assert -1 <= i["cosine_min"] <= i["cosine_mean"] <= 1 + 1e-12
        assert 0 <= i["top1_agreement"] <= 1
        assert len(i["top1_flips"]) == round((1 - i["top1_agreement"]) * par["samples"])
        if i["precision"] == "fp32":  # the project's fp32 tolerance; same device here
            assert i["max_abs_diff"] <= 1e-3 and i["cosine_ok"] is None
        else:
            assert i["cosine_ok"] is True and i["top1_ok"] is True


@pytest.mark.slow
def test_dry_run_latency_rows(dry):
    lat = dry[1]["parts"]["latency"]
    rows = lat["rows"]
    groups = {(g["model"], g["batch"], g["backend"]) for g in lat["groups"]}
    assert groups == {("vit_b", 4, "torch"), ("vit_b", 1, "torch"), ("vit_l", 2, "torch"),
                      ("vit_b", 4, "torch-compile")}
    half = lat["r_half_macs"]
    assert set(half) == {"vit_b", "vit_l"}
    assert all(0.4 < v["flops_ratio"] <= 0.5 and 0.5 < v["r"] < 1 for v in half.values())
    base = {(r["model"], r["backend"], r["batch"]): r["p50_ms"]
            for r in rows if r["variant"] == "baseline"}
    assert len(base) == 3
    for r in rows:
        assert r["skipped"] is None, r
        for k in ("p50_ms", "p90_ms", "p99_ms", "throughput"):
            assert math.isfinite(r[k]) and r[k] > 0
        assert r["p50_ms"] == r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert _close(r["throughput"], r["batch"] * 1000 / r["p50_ms"])
        if r["variant"] == "baseline":
            assert r["r"] == 0 and r["flops_ratio"] == 1 and r["speedup"] == 1
            continue
        assert 0 < r["flops_ratio"] < 1 and _close(r["ideal_speedup"], 1 / r["flops_ratio"])
        if r["r_target"] == "MACs/2":
            assert r["variant"] == "tome" or r["flops_ratio"] <= 0.5
            assert r["r"] == half[r["model"]]["r"]
        ref = base.get((r["model"], r["backend"], r["batch"]))
        if ref is None:  # the dry run compiles one variant alone: no baseline to divide by
            assert r["backend"] == "torch-compile" and r["speedup"] is None
            assert r["compile_s"] > 0 and r["compile_backend"] == "aot_eager"
        else:
            assert _close(r["speedup"], ref / r["p50_ms"])
            assert _close(r["efficiency"], r["speedup"] / r["ideal_speedup"])
    # ToMe runs MaMe's token schedule: same final tokens at the same r
    final = {(r["model"], r["batch"], r["variant"], r["r"]): r["final_tokens"] for r in rows}
    for (m, b, v, rr), n in final.items():
        if v == "tome":
            assert final[(m, b, "mame", rr)] == n


@pytest.mark.slow
def test_dry_run_ort_stand_in(dry):
    ort = dry[1]["parts"]["ort"]
    assert ort["provider"] == "cpu" and "stands in" in ort["stand_in"]
    assert [e["variant"] for e in ort["exports"]] == ["baseline", "mame"]
    assert all(e["error"] is None for e in ort["exports"])
    assert ort["exports"][1]["forbidden_ops"] == {}  # MaMe's graph is static
    assert ort["parity_passed"] is True and all(p["passed"] for p in ort["parity"])
    rows = {r["variant"]: r for r in ort["rows"]}
    assert set(rows) == {"baseline", "mame"}
    assert _close(rows["mame"]["speedup"], rows["baseline"]["p50_ms"] / rows["mame"]["p50_ms"])
    assert rows["mame"]["flops_ratio"] < 1


@pytest.mark.slow
def test_budget_skips_parts_with_a_reason(tmp_path):
    # 15 s: enough for the imports and the env part even on a loaded machine, less than
    # the 20 s and 30 s that parity and ort need.
    proc = _run("--dry-run", "--out", str(tmp_path), "--parts", "env,parity,ort",
                "--budget-s", "15")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = doc["parts"]
    assert parts["env"]["status"] == "ok" and parts["latency"]["status"] == "not_selected"
    for name in ("parity", "ort"):
        assert parts[name]["status"] == "skipped"
        assert parts[name]["reason"].startswith("time budget")
    assert doc["complete"] is True


@pytest.mark.slow
def test_watchdog_ends_a_stuck_run_and_keeps_the_record(tmp_path):
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        import torch  # before the tool's clock starts, so the budget is not spent importing
        spec = importlib.util.spec_from_file_location("gpu_check", {str(TOOL)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod
        spec.loader.exec_module(mod)
        mod.WATCHDOG_GRACE_S = 0.5
        mod.part_env = lambda chk, rec: time.sleep(60)
        sys.exit(mod.main(["--dry-run", "--out", {str(tmp_path)!r}, "--budget-s", "4",
                           "--parts", "env"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["complete"] is False and "watchdog" in doc["watchdog"]
    assert doc["parts"]["env"]["status"] == "error"
    assert "watchdog" in doc["parts"]["env"]["error"]


@pytest.mark.parametrize("args", [
    ["--parts", "env,bogus"],
    ["--budget-s", "-1"],
    ["--dry-run"],  # no --out
])
def test_bad_arguments_exit_2(tmp_path, args):
    if "--dry-run" not in args:
        args = [*args, "--out", str(tmp_path)]
    proc = _run(*args, timeout=30)
    assert proc.returncode == 2
    assert not (tmp_path / "gpu_check.json").exists()


def test_unwritable_out_exits_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run("--dry-run", "--out", str(blocker / "sub"), timeout=30)
    assert proc.returncode == 1
    assert "cannot write" in proc.stderr


def test_r_where_macs_halve_is_the_smallest_such_r():
    from timm.models.vision_transformer import VisionTransformer

    tool = _load_tool()
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                              num_classes=10).eval()
    r, ratio, solver = tool.solve_r_for_macs(model)
    assert ratio <= 0.5 and 0 < r < 1 and solver
    import copy

    patched = copy.deepcopy(model)
    assert tool.macs_ratio_at(patched, r) == ratio
    assert tool.macs_ratio_at(patched, r - 0.001) > 0.5
    assert type(model) is VisionTransformer  # the solver works on a copy


def test_ort_cuda_part_says_why_it_is_skipped():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime CUDA")
    from mame_export.sidecar import versions

    if "onnxruntime-gpu" in versions():
        pytest.skip("onnxruntime-gpu is installed here")
    reason = _load_tool().ort_reason("cuda")
    assert reason.startswith(
        "CUDAExecutionProvider not available: onnxruntime-gpu not installed (providers: ")
    assert "CPUExecutionProvider" in reason
