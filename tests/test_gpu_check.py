"""tools/gpu_check.py: the one-call GPU check over the command line, run here as its dry run.

The dry run runs the real run's ``mame-export`` commands (parity, plan, profile, with
their flags, ``clip_l336 --llava`` included) through ``tools/gpu_check_standins.py``,
where the aliases are tiny models of the same classes, on the CPU. No test asserts a
timing, only how the numbers relate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
PARTS = ("env", "parity", "latency", "ort")
DRY_BUDGET_S = "1200"  # a shared 2-core machine runs the dry run's 10 commands slowly


def _run(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    # The timeout is a safety net only: the dry run takes ~2-3 min on 2 idle cores, several
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
    proc = _run("--dry-run", "--out", str(out), "--budget-s", DRY_BUDGET_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stderr


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.slow
def test_dry_run_writes_few_flat_files(dry):
    out, doc, stderr = dry
    names = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log"} <= set(names)
    assert len(names) <= 4
    assert all(p.is_file() for p in out.iterdir())  # flat: no folders
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Parts", "## Environment", "## Parity", "## Latency", "## ONNX Runtime",
                    "## Commands"):
        assert heading in md
    assert "[gpu_check +" in stderr and "done in" in (out / "gpu_check.log").read_text()
    assert "  | [profile]" in stderr  # the commands' own progress, passed through


@pytest.mark.slow
def test_dry_run_every_part_ran_through_the_command_line(dry):
    _, doc, _ = dry
    assert doc["dry_run"] is True and doc["complete"] is True and doc["device"] == "cpu"
    assert set(doc["parts"]) == set(PARTS)
    for name in PARTS:
        part = doc["parts"][name]
        assert part["status"] == "ok", (name, part.get("error") or part.get("reason"))
        assert part["seconds"] >= 0
    assert doc["elapsed_s"] < doc["budget_s"] == float(DRY_BUDGET_S)
    assert "--dry-run" in doc["command"]
    assert set(doc["stand_ins"]) == {"vit_b", "vit_l", "clip_l336"}
    parts = doc["parts"]
    calls = [*parts["parity"]["calls"], *parts["latency"]["plan_calls"],
             *parts["latency"]["groups"], parts["ort"]["call"]]
    assert len(calls) == 10  # 3 parity (fp32, fp16, int8), 2 plan, 4 latency, 1 ort
    for c in calls:
        assert c["command"].startswith("mame-export ") and c["exit_code"] == 0, c
        assert c["command"].endswith(" --json") and "error" not in c


@pytest.mark.slow
def test_dry_run_environment(dry):
    env = dry[1]["parts"]["env"]["data"]
    for key in ("python", "torch", "torch_cuda", "cudnn", "driver_version", "command",
                "utc_date", "packages", "onnxruntime"):
        assert key in env
    assert "CPUExecutionProvider" in env["onnxruntime"]["providers"]
    assert env["packages"]["timm"] and env["packages"]["onnx"]


@pytest.mark.slow
def test_dry_run_parity_is_the_parity_command(dry):
    par = dry[1]["parts"]["parity"]
    assert [c["command"].split(" --precision ")[1] for c in par["calls"]] == \
        ["fp32 --json", "fp16 --json", "int8 --json"]
    assert par["r"] == 0.5 and par["passed"] is True and par["samples"] == 4
    got = {(i["precision"], i["runner"]): i for i in par["results"]}
    assert set(got) == {(p, r) for p in ("fp32", "fp16", "int8")
                        for r in ("onnxrt", "onnxrt-cuda", "tensorrt")}
    for (precision, runner), i in got.items():
        if runner == "onnxrt":
            assert i["status"] == "passed" and i["finite"] is True and i["samples"] == 4
            bound, cosine = {"fp32": (1e-3, 0.999), "fp16": (0.05, 0.999),
                             "int8": (1.0, 0.95)}[precision]  # parity.TOLERANCES
            assert 0 <= i["max_abs_diff"] <= bound
            assert cosine <= i["cosine_min"] <= 1 + 1e-9 and 0 <= i["top1_agreement"] <= 1
        else:  # no onnxruntime-gpu, no TensorRT here: skipped, saying why
            assert i["status"] == "skipped" and i["reason"]


@pytest.mark.slow
def test_dry_run_latency_rows(dry):
    lat = dry[1]["parts"]["latency"]
    rows = lat["rows"]
    groups = [(g["model"], tuple(g["flags"]), tuple(g["batches"]), tuple(g["backends"]))
              for g in lat["groups"]]
    assert groups == [("vit_b", (), (4, 1), ("torch",)),
                      ("clip_l336", ("--llava",), (2,), ("torch",)),
                      ("clip_l336", ("--llava",), (2,), ("torch-compile",)),
                      ("vit_l", (), (2,), ("torch",))]
    assert lat["compile_backend"] == "aot_eager"
    half = lat["r_half_macs"]
    assert set(half) == {"vit_b", "vit_l"}
    assert all(0.4 < v["flops_ratio"] <= 0.5 and 0.5 < v["r"] < 1 for v in half.values())
    base = {(r["model"], r["backend"], r["batch"]): r["p50_ms"]
            for r in rows if r["variant"] == "baseline"}
    assert len(base) == 5
    for r in rows:
        assert r["skipped"] is None, r
        for k in ("p50_ms", "p90_ms", "p99_ms", "throughput"):
            assert math.isfinite(r[k]) and r[k] > 0
        assert r["p50_ms"] == r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert _close(r["throughput"], r["batch"] * 1000 / r["p50_ms"])
        if r["variant"] == "baseline":
            assert r["r"] == 0 and r["flops_ratio"] == 1 and r["r_target"] == "unmerged"
            continue
        assert 0 < r["flops_ratio"] < 1 and _close(r["ideal_speedup"], 1 / r["flops_ratio"])
        if r["r_target"] == "MACs/2":
            assert r["variant"] == "tome" or r["flops_ratio"] <= 0.5
            assert r["r"] == half[r["model"]]["r"]
        else:
            assert r["r_target"] == "r=0.5" and r["r"] == 0.5
        assert _close(r["speedup"], base[(r["model"], r["backend"], r["batch"])] / r["p50_ms"])
        assert _close(r["efficiency"], r["speedup"] / r["ideal_speedup"])
    llava = [r for r in rows if r["model"] == "clip_l336"]
    assert {(r["backend"], r["variant"]) for r in llava} == {
        (b, v) for b in ("torch", "torch-compile") for v in ("baseline", "mame")}
    # ToMe runs MaMe's token schedule: same final tokens at the same r
    final = {(r["model"], r["batch"], r["variant"], r["r"]): r["final_tokens"] for r in rows}
    for (m, b, v, rr), n in final.items():
        if v == "tome":
            assert final[(m, b, "mame", rr)] == n


@pytest.mark.slow
def test_dry_run_ort_stand_in(dry):
    ort = dry[1]["parts"]["ort"]
    assert ort["backend"] == "onnxrt" and "stands in" in ort["stand_in"]
    assert [e["variant"] for e in ort["exports"]] == ["baseline", "mame"]
    assert all(e["exports"] is True for e in ort["exports"])
    assert ort["exports"][1]["forbidden_ops"] == {}  # MaMe's graph is static
    assert ort["parity_passed"] is True
    assert {p["precision"] for p in ort["parity"]} == {"fp32", "fp16", "int8"}
    rows = {r["variant"]: r for r in ort["rows"]}
    assert set(rows) == {"baseline", "mame"}
    assert _close(rows["mame"]["speedup"], rows["baseline"]["p50_ms"] / rows["mame"]["p50_ms"])
    assert rows["mame"]["flops_ratio"] < 1
    # then the same two graphs and their INT8 QDQ twins, all four timed in turns
    int8 = ort["int8"]
    assert int8["call"]["exit_code"] == 0 and "--precision int8" in int8["call"]["command"]
    got = {(r["variant"], r["precision"]): r for r in int8["rows"]}
    assert set(got) == {(v, p) for v in ("baseline", "mame") for p in ("fp32", "int8")}
    assert not any(r["skipped"] for r in got.values())
    mame8 = got[("mame", "int8")]
    assert _close(mame8["speedup_vs_fp32"], got[("baseline", "fp32")]["p50_ms"] / mame8["p50_ms"])


@pytest.mark.slow
def test_budget_skips_parts_with_a_reason(tmp_path):
    # 15 s: enough for the imports and the env part even on a loaded machine, less than
    # the 20 s and 30 s that parity and ort need.
    proc = _run("--dry-run", "--out", str(tmp_path), "--parts", "env,parity,ort",
                "--budget-s", "15", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = doc["parts"]
    assert parts["env"]["status"] == "ok" and parts["latency"]["status"] == "not_selected"
    for name in ("parity", "ort"):
        assert parts[name]["status"] == "skipped"
        assert parts[name]["reason"].startswith("time budget")
    assert doc["complete"] is True


def _pid_gone(pid: int, wait_s: float = 10.0) -> bool:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
            if f.read().split(") ")[-1].startswith("Z"):
                return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("stuck", ["the tool", "a command"])
def test_watchdog_ends_a_stuck_run_and_keeps_the_record(tmp_path, stuck):
    # "a command": one that runs for minutes, let run past the budget (the tool's own
    # clock would stop it first), so that only the watchdog can stop it
    hang = ("time.sleep(60)" if stuck == "the tool" else
            "(setattr(chk, 'left', lambda: 1000.0), chk.cli(['profile', 'vit_b', '--r', "
            "'0.5', '--backends', 'torch', '--warmup', '100000', '--json'], min_s=0, "
            "cap_s=600, reserve_s=0))")
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        import torch  # before the tool's clock starts, so the budget is not spent importing
        spec = importlib.util.spec_from_file_location("gpu_check", {str(TOOL)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod
        spec.loader.exec_module(mod)
        mod.WATCHDOG_GRACE_S = 0.5
        mod.part_env = lambda chk, rec: {hang}
        sys.exit(mod.main(["--dry-run", "--out", {str(tmp_path)!r}, "--budget-s", "4",
                           "--parts", "env"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["complete"] is False and "watchdog" in doc["watchdog"]
    assert doc["parts"]["env"]["status"] == "error"
    assert "watchdog" in doc["parts"]["env"]["error"]
    if stuck == "a command":  # stopped with the tool, not left running
        pid = int(re.search(r"\(pid (\d+),", proc.stderr).group(1))
        assert _pid_gone(pid)


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


def _check(tmp_path: Path, budget_s: float):
    tool = _load_tool()
    chk = tool.Check(tmp_path, budget_s, tool.make_config(True), ["latency"], [])
    return tool, chk


def test_a_command_past_its_cap_is_stopped_and_recorded(tmp_path):
    _, chk = _check(tmp_path, 600)
    t0 = time.monotonic()
    call = chk.cli(["plan", "vit_b", "--r", "0.5", "--json"], min_s=0, cap_s=0.5, reserve_s=0)
    assert time.monotonic() - t0 < 30
    assert call.data is None and call.error == "timed out: stopped after 0.5 s"
    assert call.exit_code is not None and call.exit_code != 0
    assert call.record()["command"] == "mame-export plan vit_b --r 0.5 --json"


def test_a_command_that_does_not_fit_is_skipped_without_running(tmp_path):
    _, chk = _check(tmp_path, 30)
    call = chk.cli(["plan", "vit_b", "--json"], min_s=20, cap_s=100, reserve_s=15)
    assert call.exit_code is None and call.data is None
    assert call.skipped.startswith("time budget:") and "15 s kept for later parts" in call.skipped


@pytest.mark.slow  # a child process that imports torch: ~10 s on a loaded CPU
def test_a_command_that_fails_gives_its_last_line(tmp_path):
    _, chk = _check(tmp_path, 600)
    call = chk.cli(["plan", "vit_b", "--r", "2", "--json"], min_s=0, cap_s=120, reserve_s=0)
    assert call.exit_code == 2 and call.data is None
    assert call.error.startswith("exit 2: mame-export: error: ") and "r" in call.error


def test_rows_get_their_target_and_p50():
    sys.path.insert(0, str(TOOL.parent))
    from gpu_check_latency import rows_with_targets

    rows = [{"variant": "baseline", "r": 0.0, "median_ms": 2.0},
            {"variant": "mame", "r": 0.5, "median_ms": 1.0},
            {"variant": "tome", "r": 0.823204, "median_ms": 1.5},
            {"variant": "mame", "r": None, "median_ms": None}]
    got = rows_with_targets(rows, 0.823204)
    assert [r["r_target"] for r in got] == ["unmerged", "r=0.5", "MACs/2", "r=-"]
    assert [r["p50_ms"] for r in got] == [2.0, 1.0, 1.5, None]
    assert "r_target" not in rows[0]  # the command's rows are not changed
