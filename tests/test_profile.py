"""The latency profiler (mame_export.profile, `mame-export profile`): statistics, input
rotation, skipped backends, the JSON contract. No test asserts a timing."""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mame_export.errors import UserError
from mame_export.profile import (
    QUICK,
    Row,
    TimingSettings,
    add_speedups,
    format_markdown,
    format_table,
    measure_interleaved,
    profile,
    random_input_sets,
    summarize,
    throughput,
)
from mame_export.runners import TimedStep
from mame_export.runners.factory import make_runner, runner_availability

REQUIRED = {"variant": str, "backend": str, "batch": int, "r": float}
TIMINGS = ("median_ms", "p90_ms", "p99_ms", "throughput")
FAST = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=3, max_iters=3, budget_s=0.0,
                      input_sets=2)


def tiny_vit(depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                             num_classes=10).eval()


# ---------------------------------------------------------------- statistics


def test_summarize_known_arrays():
    s = summarize(np.arange(1, 101, dtype=float))  # 1..100
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.iterations == 100
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median_ms, s.p90_ms, s.p99_ms) == pytest.approx((2.0, 2.8, 2.98))
    one = summarize([7.0])
    assert one.median_ms == one.p90_ms == one.p99_ms == 7.0
    # A few slow outliers move p99, not the median.
    tail = summarize([1.0] * 98 + [50.0, 100.0])
    assert tail.median_ms == 1.0 and tail.p99_ms > 50.0
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_throughput():
    assert throughput(8, 4.0) == pytest.approx(2000.0)
    assert throughput(1, 1000.0) == pytest.approx(1.0)


def test_speedups_and_efficiency():
    rows = [
        Row("m", "baseline", "torch", 1, 0.0, "fp32", median_ms=10.0, flops_ratio=1.0),
        Row("m", "mame", "torch", 1, 0.5, "fp32", median_ms=5.0, flops_ratio=0.4),
        Row("m", "tome", "torch", 1, 0.5, "fp32", median_ms=8.0, flops_ratio=0.45),
        Row("m", "mame", "onnxrt", 1, 0.5, "fp32", median_ms=2.0, flops_ratio=0.4),  # no baseline
        Row("m", "mame", "tensorrt", 1, 0.5, "fp32", flops_ratio=0.4, skipped="no TensorRT"),
    ]
    add_speedups(rows)
    base, mame, tome, orphan, skipped = rows
    assert base.speedup == 1.0 and base.efficiency == 1.0
    assert mame.speedup == pytest.approx(2.0)
    assert mame.ideal_speedup == pytest.approx(2.5)
    assert mame.efficiency == pytest.approx(0.8)
    assert tome.speedup == pytest.approx(1.25)
    assert orphan.speedup is None and orphan.ideal_speedup == pytest.approx(2.5)
    assert skipped.speedup is None and skipped.efficiency is None


# ---------------------------------------------------------------- inputs and the timing loop


def measure(step, inputs, settings, sync=None):
    """One step timed alone: its samples, or the error it raised."""
    got = measure_interleaved({0: TimedStep(step, list(inputs), sync=sync)}, settings)[0]
    if isinstance(got, Exception):
        raise got
    return got


def test_input_sets_differ_and_are_never_zero():
    sets = random_input_sets(2, (3, 8, 8), 4, seed=0)
    assert len(sets) == 4
    for a in sets:
        assert a.shape == (2, 3, 8, 8) and a.dtype == np.float32
        assert np.any(a != 0) and np.isfinite(a).all()
        assert 0.5 < a.std() < 1.5  # standard normal, not a constant
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(sets[i], sets[j])
    again = random_input_sets(2, (3, 8, 8), 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(sets, again, strict=True))
    assert not np.array_equal(random_input_sets(2, (3, 8, 8), 1, seed=1)[0], sets[0])


def test_measure_rotates_inputs_and_counts_iterations():
    seen: list[int] = []
    inputs = [0, 1, 2]
    settings = TimingSettings(warmup_iters=2, warmup_s=0.0, min_iters=7, max_iters=7,
                              budget_s=0.0, input_sets=3)
    samples = measure(seen.append, inputs, settings)
    assert len(samples) == 7 and np.all(samples >= 0)
    assert seen[:2] == [0, 1]  # warm-up
    assert seen[2:] == [0, 1, 2, 0, 1, 2, 0]  # timed: every set in turn


def test_measure_runs_until_min_iters_and_budget():
    calls = []
    settings = TimingSettings(warmup_iters=0, warmup_s=0.0, min_iters=4, max_iters=1000,
                              budget_s=0.05, input_sets=2)
    samples = measure(lambda x: calls.append(x), [0, 1], settings)
    assert 4 <= len(samples) <= 1000 and len(samples) == len(calls)
    capped = TimingSettings(warmup_iters=0, warmup_s=0.0, min_iters=2, max_iters=5,
                            budget_s=60.0, input_sets=2)
    assert len(measure(lambda x: None, [0, 1], capped)) == 5  # max_iters wins over the budget


def test_measure_calls_sync_every_iteration():
    syncs = []
    measure(lambda x: None, [0, 1], FAST, sync=lambda: syncs.append(1))
    assert len(syncs) == 1 + 3  # once after warm-up, then once per timed iteration


def test_interleaved_steps_take_turns_with_rotating_start():
    calls: list[tuple[str, int]] = []
    steps = {k: TimedStep(lambda x, k=k: calls.append((k, x)), [0, 1]) for k in "abc"}
    settings = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=4, max_iters=4,
                              budget_s=0.0, input_sets=2)
    got = measure_interleaved(steps, settings)
    assert list(got) == ["a", "b", "c"]
    assert all(isinstance(v, np.ndarray) and len(v) == 4 for v in got.values())
    assert calls[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up, each in turn
    timed = calls[3:]
    rounds = [[k for k, _ in timed[i:i + 3]] for i in range(0, 12, 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")]
    for k in "abc":  # each step rotates through its own input sets
        assert [x for kk, x in timed if kk == k] == [0, 1, 0, 1]


def test_interleaved_step_that_fails_leaves_the_others_running():
    count = {"n": 0}

    def flaky(x: int) -> None:
        count["n"] += 1
        if count["n"] > 3:  # warm-up and two timed calls work, then it fails
            raise MemoryError("out of memory")

    broken_at_warmup = TimedStep(lambda x: 1 / 0, [0, 1])
    settings = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=6, max_iters=6,
                              budget_s=0.0, input_sets=2)
    got = measure_interleaved({"ok": TimedStep(lambda x: None, [0, 1]),
                               "flaky": TimedStep(flaky, [0, 1]),
                               "broken": broken_at_warmup}, settings)
    assert isinstance(got["ok"], np.ndarray) and len(got["ok"]) == 6
    assert isinstance(got["flaky"], MemoryError)
    assert isinstance(got["broken"], ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        measure(lambda x: 1 / 0, [0, 1], FAST)


def test_interleaved_budget_scales_with_the_number_of_steps():
    settings = TimingSettings(warmup_iters=0, warmup_s=0.0, min_iters=1, max_iters=10_000,
                              budget_s=0.02, input_sets=2)
    t0 = time.perf_counter()
    got = measure_interleaved({k: TimedStep(lambda x: None, [0, 1]) for k in range(3)}, settings)
    assert time.perf_counter() - t0 >= 0.06  # 3 steps x 0.02 s
    lengths = {len(v) for v in got.values()}  # every step got the same rounds (+-1)
    assert max(lengths) - min(lengths) <= 1


def test_timing_settings_validation():
    with pytest.raises(UserError):
        TimingSettings(min_iters=0)
    with pytest.raises(UserError):
        TimingSettings(min_iters=10, max_iters=5)
    with pytest.raises(UserError):
        TimingSettings(input_sets=1)
    assert QUICK.min_iters <= QUICK.max_iters


# ---------------------------------------------------------------- one profile run, many checks


@pytest.fixture(scope="module")
def report():
    """Every variant on eager PyTorch and on the backends this machine may lack."""
    threads_before = torch.get_num_threads()
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = profile(model, model_name="tiny", rs=[0.5],
                  backends=["torch", "onnxrt-cuda", "tensorrt"], batches=[2], threads=1,
                  settings=FAST, log=lambda _msg: None)
    assert type(model) is VisionTransformer  # the caller's model is left unpatched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.get_num_threads() == threads_before  # pinned for the run, then restored
    return rep


@pytest.fixture(scope="module")
def onnx_report():
    """MaMe and ToMe through ONNX Runtime (two exports: the slow part of this file)."""
    model = tiny_vit(depth=2)  # export time grows with the graph
    return profile(model, model_name="tiny", rs=[0.5], backends=["onnxrt"], batches=[1],
                   threads=1, settings=FAST, variants=["mame", "tome"], log=lambda _msg: None)


def test_rows_cover_every_variant_and_backend(report):
    rows = report.rows
    assert [(r.variant, r.backend) for r in rows] == [
        (v, b) for b in ("torch", "onnxrt-cuda", "tensorrt") for v in ("baseline", "mame", "tome")
    ]
    for r in rows:
        assert r.batch == 2 and r.precision == "fp32"
        assert r.r == (0.0 if r.variant == "baseline" else 0.5)
        _check_row(r, batch=2)
        assert (r.speedup is None) == (r.skipped is not None)


def _check_row(r: Row, batch: int) -> None:
    # A row either ran (all timings) or says why not (no timings): never both.
    if r.skipped is None:
        assert all(getattr(r, k) is not None and getattr(r, k) > 0 for k in TIMINGS)
        assert r.p90_ms >= r.median_ms and r.p99_ms >= r.p90_ms
        assert r.iterations == FAST.min_iters
        assert r.throughput == pytest.approx(batch * 1000 / r.median_ms)
    else:
        assert all(getattr(r, k) is None for k in TIMINGS) and r.speedup is None


def test_unavailable_backends_are_skipped_with_the_reason(report):
    for backend in ("onnxrt-cuda", "tensorrt"):
        reason = runner_availability(backend, "cpu")[1]
        if not reason:
            pytest.skip(f"{backend} is available here")
        rows = [r for r in report.rows if r.backend == backend]
        assert len(rows) == 3 and all(r.skipped == reason for r in rows)
        assert all(r.exports is None for r in rows)  # nothing exported for a skipped backend


def test_eager_backend_ran(report):
    ran = {r.variant for r in report.rows if r.backend == "torch" and r.skipped is None}
    assert ran == {"baseline", "mame", "tome"}


def test_flops_and_tokens(report):
    by = {(r.variant, r.backend): r for r in report.rows}
    base, mame, tome = by["baseline", "torch"], by["mame", "torch"], by["tome", "torch"]
    assert base.flops_ratio == 1.0 and base.ideal_speedup == 1.0 and base.speedup == 1.0
    assert base.final_tokens == 64
    assert mame.final_tokens == tome.final_tokens == 32  # the same token count
    assert 0 < mame.flops_ratio < 1 and 0 < tome.flops_ratio < 1
    assert mame.ideal_speedup == pytest.approx(1 / mame.flops_ratio)
    assert mame.efficiency == pytest.approx(mame.speedup / mame.ideal_speedup)
    # Skipped rows still carry the analytic numbers.
    assert by["mame", "tensorrt"].flops_ratio == mame.flops_ratio


def test_onnx_rows_and_census(onnx_report):
    by = {r.variant: r for r in onnx_report.rows}
    assert set(by) == {"mame", "tome"}
    for r in by.values():
        assert r.backend == "onnxrt" and r.skipped is None
        _check_row(r, batch=1)
        assert r.exports is True
        assert r.speedup is None  # no baseline in this run: no ratio is made up
    assert by["mame"].forbidden_ops == {}  # MaMe's graph is static
    assert {"TopK", "ScatterElements", "GatherElements"} <= set(by["tome"].forbidden_ops)
    assert "TopK" in format_table(onnx_report.to_dict()["results"])


def test_report_json_contract(report):
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert isinstance(d["device"], str) and d["device"]
    assert isinstance(d["versions"], dict) and "torch" in d["versions"]
    assert "onnxruntime" in d["versions"]
    assert d["threads"] == 1
    _check_results(d["results"])


def test_tables_name_skips_and_forbidden_ops(report):
    rows = report.to_dict()["results"]
    text = format_table(rows)
    assert "median ms" in text and "efficiency" in text
    assert "skipped: " in text
    assert len(text.splitlines()) == len(rows) + 2
    md = format_markdown(rows)
    assert md.splitlines()[0].startswith("| model | variant |")
    assert len(md.splitlines()) == len(rows) + 2


def _check_results(results):
    assert results
    for row in results:
        for key, typ in REQUIRED.items():
            assert isinstance(row[key], typ), key
        for key in (*TIMINGS, "flops_ratio"):
            assert key in row
            assert row[key] is None or (isinstance(row[key], float) and math.isfinite(row[key]))
        assert "skipped" in row
        assert (row["skipped"] is None) == (row["median_ms"] is not None)


# ---------------------------------------------------------------- the command line


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from mame_export.cli import main

    code = main(["profile", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_is_one_object_and_plot_is_png(capsys, tmp_path):
    png = tmp_path / "sub" / "p.png"
    code, out, err = _cli(
        capsys, "vit_t", "--img-size", "32", "--r", "0.25,0.5",
        "--backends", "torch,onnxrt-cuda,tensorrt", "--threads", "1", "--json",
        "--warmup", "1", "--min-iters", "2", "--max-iters", "2", "--seconds", "0",
        "--input-sets", "2", "--plot", str(png),
    )
    assert code == 0, err
    d = json.loads(out)  # stdout holds exactly one JSON object, nothing else
    assert isinstance(d, dict)
    assert {"device", "versions", "results", "command", "threads"} <= set(d)
    assert d["command"].startswith("mame-export profile vit_t --r 0.25,0.5")
    _check_results(d["results"])
    assert [r["r"] for r in d["results"] if r["backend"] == "torch"] == [0.0, 0.25, 0.25,
                                                                         0.5, 0.5]
    assert all(r["skipped"] for r in d["results"] if r["backend"] == "tensorrt")
    assert "[profile]" in err  # progress went to stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name != "p.png"]  # no temp files left


def test_cli_table_by_default(capsys):
    code, out, _ = _cli(capsys, "vit_t", "--img-size", "32", "--r", "0.5",
                        "--backends", "torch", "--variants", "baseline,mame", "--threads", "1",
                        "--warmup", "0", "--min-iters", "2", "--max-iters", "2",
                        "--seconds", "0", "--input-sets", "2")
    assert code == 0
    assert out.startswith("device: ")
    assert "versions: " in out and "command: mame-export profile" in out
    assert "median ms" in out and "tome" not in out


@pytest.mark.parametrize("argv, message", [
    (["vit_t", "--r", "1.5"], "r must be in [0, 1)"),
    (["vit_t", "--r", "0.5", "--backends", "torch,warp"], "unknown backend"),
    (["vit_t", "--r", "0.5", "--batch", "0"], "batch sizes must be >= 1"),
    (["vit_t", "--r", "0.5", "--threads", "0"], "--threads must be >= 1"),
])
def test_cli_user_errors_are_one_line(capsys, argv, message):
    code, out, err = _cli(capsys, *argv)
    assert code != 0 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_ort_sessions_taking_turns_do_not_spin(tmp_path):
    """The profiler's ONNX Runtime sessions take turns on the same cores, so their
    idle threads must not busy-wait; a runner left alone keeps ORT's default."""
    import onnx
    from onnx import TensorProto, helper

    from mame_export.runners import OrtRunner

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["logits"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)

    runner = make_runner("onnxrt", onnx_path=path, threads=1, spinning=False)
    step = runner.prepare_timing([{"pixels": np.ones((1, 2), np.float32)},
                                  {"pixels": -np.ones((1, 2), np.float32)}])
    opts = step.hold.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert np.array_equal(step.run(step.inputs[1])[0], np.zeros((1, 2), np.float32))
    runner.deactivate()

    alone = OrtRunner(path, "cpu", threads=1)
    alone.activate()
    with pytest.raises(RuntimeError, match="allow_spinning"):  # not set: ORT's default
        alone.session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")


def _profile_tables():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "profile_tables.py"
    spec = importlib.util.spec_from_file_location("profile_tables", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_published_tables_can_be_measured_in_parts():
    tables = _profile_tables()

    def row(model, batch, ms):
        return {"model": model, "backend": "torch", "batch": batch, "precision": "fp16",
                "variant": "baseline", "r": 0.0, "median_ms": ms}

    old = {"preset": "gpu", "device": "H100", "command": "part 1", "runs": [{"model": "a"}],
           "results": [row("vit_b", 1, 1.0), row("vit_b", 256, 9.0)]}
    new = {"preset": "gpu", "device": "H100", "command": "part 2", "runs": [{"model": "b"}],
           "results": [row("vit_b", 256, 8.0), row("vit_l", 1, 3.0)]}
    merged = tables.merge_results(old, new)
    got = {(r["model"], r["batch"]): r["median_ms"] for r in merged["results"]}
    assert got == {("vit_b", 1): 1.0, ("vit_b", 256): 8.0, ("vit_l", 1): 3.0}  # re-measured wins
    assert merged["commands"] == ["part 1", "part 2"]
    assert "- command: `part 1`" in tables.markdown_page(
        {**merged, "cpu": "x", "threads": 1, "versions": {}, "timing": {}})
    with pytest.raises(ValueError, match="device"):
        tables.merge_results({**old, "device": "A100"}, new)
