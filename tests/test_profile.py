"""The latency profiler (mame_export.profile, `mame-export profile`): statistics, input
rotation, skipped backends, the JSON contract, every registry alias at tiny size, given
graphs (--graph), the published page (--markdown, --append) and the refusals of bad
settings. No test asserts a timing."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mame_export.errors import UserError
from mame_export.families import IOSpec, build_model, get_family, registry
from mame_export.families.base import ModelSpec, with_kwargs
from mame_export.profile import (
    QUICK,
    Row,
    TimingSettings,
    add_speedups,
    family_variants,
    format_markdown,
    format_table,
    input_feeds,
    markdown_page,
    measure_interleaved,
    merge_results,
    profile,
    profile_model,
    summarize,
    throughput,
)
from mame_export.runners import TimedStep
from mame_export.runners.factory import make_runner, runner_availability

REQUIRED = {"variant": str, "backend": str, "batch": int, "r": float}  # r: None for a --graph
TIMINGS = ("median_ms", "p90_ms", "p99_ms", "throughput")
FAST = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=3, max_iters=3, budget_s=0.0,
                      input_sets=2)


def _vit_io(model: VisionTransformer) -> IOSpec:
    """The timm family's inputs and outputs of a timm ViT built here."""
    return get_family("timm-vit").io_spec(registry()["vit_t"], model, None)


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
    io = _vit_io(tiny_vit(depth=1))
    sets = input_feeds(io, 2, 4, seed=0)
    assert len(sets) == 4
    for feeds in sets:
        (a,) = feeds.values()
        assert list(feeds) == ["pixels"]
        assert a.shape == (2, 3, 32, 32) and a.dtype == np.float32
        assert np.any(a != 0) and np.isfinite(a).all()
        assert 0.5 < a.std() < 1.5  # standard normal, not a constant
    arrays = [f["pixels"] for f in sets]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(arrays[i], arrays[j])
    again = input_feeds(io, 2, 4, seed=0)
    assert all(np.array_equal(a, b["pixels"]) for a, b in zip(arrays, again, strict=True))
    assert not np.array_equal(input_feeds(io, 2, 1, seed=1)[0]["pixels"], arrays[0])


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
    rep = profile(model, model_name="tiny", rs=[0.5], io=_vit_io(model),
                  backends=["torch", "onnxrt-cuda", "tensorrt"], batches=[2], threads=1,
                  settings=FAST, log=lambda _msg: None)
    assert type(model) is VisionTransformer  # the caller's model is left unpatched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.get_num_threads() == threads_before  # pinned for the run, then restored
    return rep


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


def _check_row(r: Row, batch: int, iterations: int = FAST.min_iters) -> None:
    # A row either ran (all timings) or says why not (no timings): never both.
    if r.skipped is None:
        assert all(getattr(r, k) is not None and getattr(r, k) > 0 for k in TIMINGS)
        assert r.p90_ms >= r.median_ms and r.p99_ms >= r.p90_ms
        assert r.iterations == iterations
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
    assert base.final_tokens == 64 and base.gmacs > mame.gmacs
    assert mame.final_tokens == tome.final_tokens == 32  # the same token count
    assert 0 < mame.flops_ratio < 1 and 0 < tome.flops_ratio < 1
    assert mame.ideal_speedup == pytest.approx(1 / mame.flops_ratio)
    assert mame.efficiency == pytest.approx(mame.speedup / mame.ideal_speedup)
    # Skipped rows still carry the analytic numbers.
    assert by["mame", "tensorrt"].flops_ratio == mame.flops_ratio


def test_report_json_contract(report):
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert isinstance(d["device"], str) and d["device"]
    assert isinstance(d["versions"], dict) and "torch" in d["versions"]
    assert "onnxruntime" in d["versions"]
    assert d["threads"] == 1
    assert d["settings"]["inputs"] == {"pixels": [3, 32, 32]}
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


def _check_results(results, graphs: bool = False):
    assert results
    for row in results:
        for key, typ in REQUIRED.items():
            if key == "r" and graphs and row["graph"]:
                assert row["r"] is None or isinstance(row["r"], float)
                continue
            assert isinstance(row[key], typ), key
        for key in (*TIMINGS, "flops_ratio"):
            assert key in row
            assert row[key] is None or (isinstance(row[key], float) and math.isfinite(row[key]))
        assert "skipped" in row and "graph" in row
        assert (row["skipped"] is None) == (row["median_ms"] is not None)


# ---------------------------------------------------------------- every registry alias, tiny

_NEEDS = {"sd-unet": "diffusers", "transformers": "transformers"}


def _alias_params() -> list:
    out = []
    for alias, spec in [*registry().items(), ("clip_l336 --llava", registry()["clip_l336"])]:
        dep = _NEEDS.get(spec.family)
        missing = dep is not None and importlib.util.find_spec(dep) is None
        out.append(pytest.param(alias, id=alias.replace(" --", "+"), marks=pytest.mark.skipif(
            missing, reason=f"{spec.family} needs {dep}")))
    return out


def _job(spec: ModelSpec, **kwargs):
    """A resolved profile job for ``spec`` (random weights, one thread, r = 0.5)."""
    from mame_export.request import ExportRequest, resolve_job

    req = ExportRequest(model=spec.alias, weights="random", threads=1, **kwargs)
    return resolve_job(req, export=False, spec=spec, rs=[0.5])


def _tiny_spec(alias: str) -> ModelSpec:
    name, _, flag = alias.partition(" --")
    spec = registry()[name]
    tiny = get_family(spec.family).tiny(spec)
    return with_kwargs(tiny, tiny.alias, llava=True) if flag == "llava" else tiny


TINY = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=2, max_iters=2, budget_s=0.0,
                      input_sets=2)


@functools.cache
def _tiny_io(alias: str) -> IOSpec:
    """The family's IOSpec of the alias's tiny model (from its weightless skeleton where
    the family has one)."""
    spec = _tiny_spec(alias)
    family = get_family(spec.family)
    model = family.skeleton(spec) or build_model(spec, "random")[0]
    return family.io_spec(spec, model, None)


def _io_kind(alias: str) -> tuple:
    """What the profiler's code does differently per model: the family, its inputs (pixels,
    video, the UNet's three) and the variants that apply. Outputs are read from the graph
    or the module, whatever they are."""
    spec = _tiny_spec(alias)
    return spec.family, _tiny_io(alias).input_names, family_variants(get_family(spec.family))


@pytest.fixture(scope="module")
def onnxrt_reports():
    """IO kind -> a tiny model's profile on ONNX Runtime, the first alias of each kind
    (exports are the slow part of this file: one run per kind, not per alias; that every
    alias exports, audits and passes parity is tests/test_families.py's contract). Runs
    time MaMe's graph, and ToMe's where it applies (its forbidden ops are checked)."""
    runs: dict[tuple, object] = {}

    def get(alias: str):
        spec = _tiny_spec(alias)
        key = _io_kind(alias)
        if key not in runs:
            variants = [v for v in key[2] if v in ("mame", "tome")]
            runs[key] = profile_model(_job(spec), variants=variants, backends=["onnxrt"],
                                      settings=TINY, log=lambda _m: None)
        return runs[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("alias", _alias_params())
def test_every_alias_profiles_on_torch_and_onnxrt(alias, onnxrt_reports):
    """Inputs, outputs, batch and variants come from the family: pixels, video, a UNet's
    three inputs (batch 2), LLaVA's two outputs; ToMe for timm ViTs, ToMe-SD for the UNet."""
    spec = _tiny_spec(alias)
    family = get_family(spec.family)
    io = _tiny_io(alias)
    rep = profile_model(_job(spec), backends=["torch"], settings=TINY, log=lambda _m: None)
    want = list(family_variants(family))
    if "tomesd" in want and importlib.util.find_spec("tomesd") is None:
        want.remove("tomesd")  # its row is skipped with the reason (checked below)
    rows = {r.variant: r for r in rep.rows}
    assert list(rows) == list(family_variants(family))
    assert {r.batch for r in rep.rows} == {spec.default_batch}
    for name in want:
        r = rows[name]
        assert r.skipped is None, (name, r.skipped)
        _check_row(r, batch=spec.default_batch, iterations=TINY.min_iters)
        assert r.speedup is not None
    if "tomesd" in rows and "tomesd" not in want:
        assert "not installed" in rows["tomesd"].skipped
    assert list(rep.settings["inputs"]) == list(io.input_names)

    ort = onnxrt_reports(alias)
    mame = next(r for r in ort.rows if r.variant == "mame")
    assert mame.backend == "onnxrt" and mame.exports is True
    assert mame.skipped is None, mame.skipped
    _check_row(mame, batch=spec.default_batch, iterations=TINY.min_iters)
    assert mame.forbidden_ops == {}  # MaMe's graph is static in every family
    assert list(ort.settings["inputs"]) == list(io.input_names)


@pytest.mark.slow
def test_tome_graph_holds_the_forbidden_ops_mame_avoids(onnxrt_reports):
    by = {r.variant: r for r in onnxrt_reports("vit_t").rows}
    assert set(by) == {"mame", "tome"}
    for r in by.values():
        assert r.backend == "onnxrt" and r.skipped is None and r.exports is True
        assert r.speedup is None  # no baseline in this run: no ratio is made up
    assert by["mame"].forbidden_ops == {}
    assert {"TopK", "ScatterElements", "GatherElements"} <= set(by["tome"].forbidden_ops)
    assert "TopK" in format_table([r.to_dict() for r in by.values()])


def test_a_missing_tomesd_is_a_skipped_row_with_the_reason(monkeypatch):
    import sys

    from mame_export.profile import build_variant

    monkeypatch.setitem(sys.modules, "tomesd", None)  # as if it were not installed
    var = build_variant(torch.nn.Linear(2, 2), "tomesd", 0.5)
    assert var.model is None and var.error == (
        "tomesd is not installed: pip install 'mame-export[compare]'")


# ---------------------------------------------------------------- the command line

QUICK_ARGS = ("--threads", "1", "--warmup", "1", "--min-iters", "2", "--max-iters", "2",
              "--seconds", "0.001", "--input-sets", "2")
VIT32 = ("vit_t", "--img-size", "32")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from mame_export.cli import main

    code = main(["profile", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, out: str, err: str, message: str, exit_code: int = 2) -> None:
    assert code == exit_code and out == "", err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "[profile]" not in err and "exporting" not in err  # refused before any timing


def test_cli_json_is_one_object_and_plot_is_png(capsys, tmp_path):
    png = tmp_path / "sub" / "p.png"
    code, out, err = _cli(
        capsys, *VIT32, "--r", "0.25,0.5", "--backends", "torch,onnxrt-cuda,tensorrt",
        "--json", "--plot", str(png), *QUICK_ARGS)
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
    code, out, _ = _cli(capsys, *VIT32, "--r", "0.5", "--backends", "torch",
                        "--variants", "baseline,mame", *QUICK_ARGS)
    assert code == 0
    assert out.startswith("device: ")
    assert "versions: " in out and "command: mame-export profile" in out
    assert "median ms" in out and "tome" not in out


def test_cli_max_iters_below_the_default_min_iters_lowers_it(capsys):
    """24.28: --max-iters 5 alone used to fail against the default --min-iters 30."""
    code, out, err = _cli(capsys, *VIT32, "--r", "0.5", "--backends", "torch", "--variants",
                          "baseline", "--threads", "1", "--warmup", "0", "--max-iters", "5",
                          "--seconds", "0.001", "--input-sets", "2", "--json")
    assert code == 0, err
    assert [r["iterations"] for r in json.loads(out)["results"]] == [5]


@pytest.mark.parametrize("argv, message", [
    (["--r", "1.5"], "--r must be in [0, 1)"),
    (["--r", "0.5", "--backends", "torch,warp"], "unknown backend"),
    (["--r", "0.5", "--batch", "0"], "--batch must be in [1, 4096]"),
    (["--r", "0.5", "--batch", "5000"], "--batch must be in [1, 4096]"),  # 24.23
    (["--r", "0.5", "--input-sets", "65"], "--input-sets must be in [2, 64]"),  # 24.23
    (["--r", "0.5", "--threads", "0"], "--threads must be in [1, "),
    (["--r", "0.5", "--threads", str((os.cpu_count() or 1) + 1)], "--threads must be in"),
    (["--r", "0.5", "--seconds", "nan"], "--seconds must be in (0, "),  # 24.28
    (["--r", "0.5", "--seconds", "0"], "--seconds must be in (0, "),
    (["--r", "0.5", "--seconds", "inf"], "--seconds must be in (0, "),
    (["--r", "0.5", "--min-iters", "10", "--max-iters", "5"], "--min-iters 10 is above"),
    (["--r", "0.5", "--max-iters", "0"], "--max-iters must be in [1, "),
    (["--r", "0.5", "--variants", "tomesd"], "--variants tomesd does not apply to vit_t"),
    (["--r", "0.5", "--llava"], "--llava needs a LLaVA vision encoder"),
    (["--r", "0.5", "--markdown", "page.txt"], "--markdown takes a PAGE.md path"),
    (["--r", "0.5", "--append"], "--append needs --markdown"),
])
def test_cli_user_errors_are_one_line(capsys, argv, message):
    code, out, err = _cli(capsys, *VIT32, *argv, *_quick_unless(argv))
    _one_line_error(code, out, err, message)


def _quick_unless(argv: list[str]) -> list[str]:
    """The quick settings argv does not set itself (so a run that is not refused ends
    fast, as it did before these settings were checked)."""
    quick = {"--backends": "torch", "--variants": "baseline", "--threads": "1",
             "--warmup": "0", "--min-iters": "1", "--max-iters": "2", "--seconds": "0.001",
             "--input-sets": "2"}
    if "--min-iters" in argv or "--max-iters" in argv:
        del quick["--min-iters"], quick["--max-iters"]
    return [a for k, v in quick.items() if k not in argv for a in (k, v)]


@pytest.mark.parametrize("size, message", [
    ("8", "--img-size 8 is smaller than vit_t's patch size 16"),  # 24.16: ZeroDivisionError
    ("100", "--img-size 100 is not a multiple of vit_t's patch size 16"),
])
def test_cli_checks_the_input_size_as_export_does(capsys, size, message):
    code, out, err = _cli(capsys, "vit_t", "--img-size", size, "--r", "0.5", "--backends",
                          "torch", "--variants", "baseline", *QUICK_ARGS)
    _one_line_error(code, out, err, message)
    assert "profiling" not in err  # refused before the model was built


def test_cli_every_row_skipped_exits_1_and_says_so(capsys):
    """24.28: a run that timed nothing used to exit 0."""
    reason = runner_availability("tensorrt", "cpu")[1]
    if not reason:
        pytest.skip("TensorRT is available here")
    code, out, err = _cli(capsys, *VIT32, "--r", "0.5", "--backends", "tensorrt", "--json",
                          *QUICK_ARGS)
    assert code == 1
    assert all(r["skipped"] == reason for r in json.loads(out)["results"])  # still reported
    assert f"every row was skipped ({reason})" in err.strip().splitlines()[-1]


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


# ---------------------------------------------------------------- temporary folders


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_cli_removes_what_a_killed_profile_left(capsys, tmp_path, monkeypatch):
    """24.29a: the temporary folder of a SIGKILLed run carries its pid; a later run removes
    it (and never a live run's, or a fresh one)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = time.time() - 2 * 3600
    stale = tmp_path / f"mame-profile-{_dead_pid()}-abc123"
    live = tmp_path / f"mame-profile-{os.getppid()}-def456"
    for d in (stale, live):
        (d / "x.onnx").parent.mkdir()
        (d / "x.onnx").write_bytes(b"x")
        os.utime(d, (old, old))
    code, _, err = _cli(capsys, *VIT32, "--r", "0.5", "--backends", "torch", "--variants",
                        "baseline", *QUICK_ARGS)
    assert code == 0, err
    assert not stale.exists() and live.exists()


def test_profile_names_its_temporary_folder_with_its_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[str] = []
    model = tiny_vit(depth=1)
    profile(model, model_name="tiny", rs=[0.5], io=_vit_io(model),
            backends=["torch"], variants=["baseline"], threads=1, settings=TINY,
            log=lambda _m: seen.extend(os.listdir(tmp_path)))
    assert seen and all(n.startswith(f"mame-profile-{os.getpid()}-") for n in seen)
    assert os.listdir(tmp_path) == []  # removed when the run ends


# ---------------------------------------------------------------- --graph


def _write_graph(path: Path, inputs: list[tuple[str, int, list]], output: str = "logits") -> Path:
    """A one-node graph (Identity of the first input) with the declared inputs."""
    import onnx
    from onnx import helper

    ins = [helper.make_tensor_value_info(n, t, shape) for n, t, shape in inputs]
    first = inputs[0]
    out = helper.make_tensor_value_info(output, first[1], first[2])
    graph = helper.make_graph([helper.make_node("Identity", [first[0]], [output])], "g", ins,
                              [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from onnx import TensorProto

    d = tmp_path_factory.mktemp("graphs")
    f32, f16, i64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
    out = {
        "g32": _write_graph(d / "g32.onnx", [("pixels", f32, [1, 3, 32, 32])]),
        "g16": _write_graph(d / "g16.onnx", [("pixels", f16, [1, 3, 32, 32])]),
        "dyn": _write_graph(d / "dyn.onnx", [("pixels", f32, ["batch", 3, 32, 32])]),
        "name": _write_graph(d / "name.onnx", [("x", f32, [1, 3, 32, 32])]),
        "rank": _write_graph(d / "rank.onnx", [("pixels", f32, [1, 3, 32])]),
        "size": _write_graph(d / "size.onnx", [("pixels", f32, [1, 3, 64, 64])]),
        "b2": _write_graph(d / "b2.onnx", [("pixels", f32, [2, 3, 32, 32])]),
        "int": _write_graph(d / "int.onnx", [("pixels", i64, [1, 3, 32, 32])]),
    }
    from mame_export.artifacts import sha256_file

    (d / "dyn.json").write_text(json.dumps({  # a sidecar of this very graph: its plan counts
        "onnx_sha256": sha256_file(out["dyn"]), "plan": {"r": 0.5, "flops_ratio": 0.5}}))
    (d / "g32.json").write_text(json.dumps({  # another graph's sidecar: ignored
        "onnx_sha256": "0" * 64, "plan": {"r": 0.5, "flops_ratio": 0.5}}))
    return out


def test_cli_graph_rows_are_timed_in_the_same_rounds(capsys, graphs):
    """Given graphs (fp32, fp16, dynamic batch) join the variants on the graph backends
    only, and their speed-ups are against the baseline graph of the same run (timm's
    test_vit: the cheapest export)."""
    code, out, err = _cli(capsys, "test_vit", "--img-size", "32", "--r", "0.5", "--backends",
                          "torch,onnxrt", "--variants", "baseline", "--json", *QUICK_ARGS,
                          *(a for n in ("g32", "g16", "dyn") for a in
                            ("--graph", f"{n}={graphs[n]}")))
    assert code == 0, err
    d = json.loads(out)
    _check_results(d["results"], graphs=True)
    rows = {(r["variant"], r["backend"]): r for r in d["results"]}
    assert set(rows) == {("baseline", "torch"), ("baseline", "onnxrt"), ("g32", "onnxrt"),
                         ("g16", "onnxrt"), ("dyn", "onnxrt")}
    assert "timing 4 variant(s) in turns on onnxrt" in err
    for name in ("g32", "g16", "dyn"):
        r = rows[name, "onnxrt"]
        assert r["skipped"] is None and r["iterations"] == 2 and r["speedup"] > 0
        assert r["graph"] == str(graphs[name]) and r["precision"] == "fp32"
    assert rows["g16", "onnxrt"]["graph_precision"] == "fp16"  # fed float16 inputs
    assert rows["dyn", "onnxrt"]["r"] == 0.5 and rows["dyn", "onnxrt"]["ideal_speedup"] == 2.0
    assert rows["g32", "onnxrt"]["r"] is None and rows["g32", "onnxrt"]["flops_ratio"] is None
    assert d["settings"]["graphs"] == {n: str(graphs[n]) for n in ("g32", "g16", "dyn")}
    assert "--graph g16=" in d["command"]


@pytest.mark.parametrize("argv, message", [
    (["--graph", "{name}"], "its inputs are (x); vit_t takes (pixels)"),
    (["--graph", "{rank}"], "input pixels has rank 3 (1, 3, 32); vit_t takes rank 4"),
    (["--graph", "{size}"], "input pixels is (1, 3, 64, 64); vit_t at batch 1 takes "
                            "(1, 3, 32, 32) (axis 2 differs)"),
    (["--graph", "{b2}"], "input pixels has a static batch of 2, the run asks for batch 1"),
    (["--graph", "{g32}", "--batch", "1,2"], "has a static batch of 1, the run asks for "
                                             "batch 2"),
    (["--graph", "{int}"], "input pixels is INT64; vit_t takes float inputs"),
    (["--graph", "x=/nonexistent/g.onnx"], "/nonexistent/g.onnx"),
    (["--graph", "no-equals-sign"], "--graph takes NAME=PATH"),
    (["--graph", "mame={g32_path}"], "'mame' names one of the profiler's own variants"),
    (["--graph", "{g32}", "--graph", "{g32}"], "the NAME 'g32' is given twice"),
    (["--graph", "{g32}", "--backends", "torch"], "--graph needs a graph backend"),
])
def test_cli_graph_that_does_not_fit_is_refused_before_timing(capsys, graphs, argv, message):
    names = {k: f"{k}={p}" for k, p in graphs.items()}
    argv = [a.format(**names, g32_path=graphs["g32"]) for a in argv]
    backends = [] if "--backends" in argv else ["--backends", "onnxrt"]
    code, out, err = _cli(capsys, *VIT32, "--r", "0.5", *backends, *argv, *QUICK_ARGS)
    _one_line_error(code, out, err, message)


# ---------------------------------------------------------------- the published page


def test_cli_markdown_page_measured_in_parts(capsys, tmp_path):
    page = tmp_path / "results" / "profile_cpu.md"
    common = (*VIT32, "--r", "0.5", "--backends", "torch", "--markdown", str(page), *QUICK_ARGS)
    code, _, err = _cli(capsys, *common, "--batch", "1")
    assert code == 0, err
    first = json.loads(page.with_suffix(".json").read_text())
    code, _, err = _cli(capsys, *common, "--batch", "2", "--append")
    assert code == 0, err
    merged = json.loads(page.with_suffix(".json").read_text())
    assert {(r["batch"], r["variant"]) for r in merged["results"]} == {
        (b, v) for b in (1, 2) for v in ("baseline", "mame", "tome")}
    assert merged["commands"][0] == first["command"] and len(merged["commands"]) == 2
    text = page.read_text()
    assert text.startswith("# Latency: baseline vs MaMe vs ToMe")
    assert all(f"- command: `{c}`" in text for c in merged["commands"])
    assert "## Summary" in text and "| vit_t | torch | 2 | 0.5 |" in text
    # Another thread count (or device) is refused before anything is measured.
    code, out, err = _cli(capsys, *common[:-len(QUICK_ARGS)], "--append", "--threads", "2",
                          *QUICK_ARGS[2:])
    if (os.cpu_count() or 1) >= 2:
        _one_line_error(code, out, err, "the existing results are for threads 1")


def test_published_tables_can_be_measured_in_parts():
    def row(model, batch, ms):
        return {"model": model, "backend": "torch", "batch": batch, "precision": "fp16",
                "variant": "baseline", "r": 0.0, "median_ms": ms}

    old = {"device": "H100", "threads": 8, "command": "part 1", "runs": [{"model": "a"}],
           "results": [row("vit_b", 1, 1.0), row("vit_b", 256, 9.0)]}
    new = {"device": "H100", "threads": 8, "command": "part 2", "commands": ["part 2"],
           "runs": [{"model": "b"}], "results": [row("vit_b", 256, 8.0), row("vit_l", 1, 3.0)]}
    merged = merge_results(old, new)
    got = {(r["model"], r["batch"]): r["median_ms"] for r in merged["results"]}
    assert got == {("vit_b", 1): 1.0, ("vit_b", 256): 8.0, ("vit_l", 1): 3.0}  # re-measured wins
    assert merged["commands"] == ["part 1", "part 2"]
    assert "- command: `part 1`" in markdown_page(
        {**merged, "cpu": "x", "versions": {}, "timing": {}})
    with pytest.raises(ValueError, match="device"):
        merge_results({**old, "device": "A100"}, new)


def test_cli_graphs_only_one_session_at_a_time(capsys, graphs, tmp_path):
    """--variants none times the given graphs alone, without building the model, and
    --one-session loads each graph for every timed call: speed-ups over the first graph,
    the efficiency only against an unmerged one (g32 has no plan of its own)."""
    code, out, err = _cli(capsys, *VIT32, "--variants", "none", "--backends", "onnxrt",
                          "--one-session", "--graph", f"g32={graphs['g32']}",
                          "--graph", f"dyn={graphs['dyn']}", "--json", *QUICK_ARGS,
                          "--markdown", str(tmp_path / "page.md"))
    assert code == 0, err
    d = json.loads(out)
    rows = {r["variant"]: r for r in d["results"]}
    assert set(rows) == {"g32", "dyn"}
    assert "the model is not built" in err and "exporting" not in err
    assert "one session at a time (a load per call)" in err
    assert "  g32: call 2: loaded in " in err and "  dyn: call 2: loaded in " in err
    assert rows["g32"]["speedup"] == pytest.approx(1.0)
    assert rows["dyn"]["speedup"] > 0 and rows["dyn"]["ideal_speedup"] == 2.0
    assert rows["dyn"]["efficiency"] is None  # the reference is not known to be unmerged
    assert d["settings"]["one_session"] is True and d["settings"]["rs"] == []
    assert "--variants none" in d["command"] and "--one-session" in d["command"]
    page = (tmp_path / "page.md").read_text()
    assert page.startswith("# Latency: given graphs") and "## Summary" not in page
    assert "speed-ups are against the first graph (g32)" in page


@pytest.mark.parametrize("argv, message", [
    (["--variants", "none"], "--variants none times given graphs only: add --graph"),
    (["--variants", "none", "--r", "0.5", "--graph", "{g32}"], "drop --r and --plan"),
    (["--variants", "none,mame", "--graph", "{g32}"], "it takes no other variant"),
    (["--r", "0.5", "--one-session", "--backends", "torch,onnxrt"],
     "--one-session holds one graph session at a time; it applies to the graph backends"),
])
def test_cli_graphs_only_and_one_session_refusals(capsys, graphs, argv, message):
    names = {k: f"{k}={p}" for k, p in graphs.items()}
    argv = [a.format(**names) for a in argv]
    backends = [] if "--backends" in argv else ["--backends", "onnxrt"]
    code, out, err = _cli(capsys, *VIT32, *backends, *argv, *QUICK_ARGS)
    _one_line_error(code, out, err, message)
