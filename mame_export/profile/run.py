"""One profile run: check the request, build the variants, then per batch and backend
make each variant's runner, time them all in turns and record the rows."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.export import PRECISIONS
from mame_export.plan import check_ratio
from mame_export.profile.report import (
    ProfileReport,
    Row,
    add_speedups,
    cpu_name,
    device_name,
    one_line,
    versions,
)
from mame_export.profile.timing import TimingSettings, measure_interleaved, random_input_sets
from mame_export.profile.variants import (
    INPUT_NAME,
    OUTPUT_NAME,
    VARIANTS,
    ExportInfo,
    Variant,
    build_variant,
    export_variant,
    image_shape,
    unpatched_macs,
)
from mame_export.runners import Runner, TimedStep, compile_room, deactivating
from mame_export.runners.factory import (
    GRAPH_RUNNERS,
    RUNNER_NAMES,
    check_runner_names,
    make_runner,
    runner_availability,
)

BACKENDS = RUNNER_NAMES
Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int | None) -> int:
    """Pin PyTorch's intra-op threads (ONNX Runtime gets the same number); return it."""
    n = threads or default_threads()
    if n < 1:
        raise UserError(f"--threads must be >= 1; got {n}")
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before parallel work starts
        torch.set_num_interop_threads(1)
    return n


def time_rows(rows: Sequence[Row], steps: dict[int, TimedStep],
              settings: TimingSettings) -> None:
    """Time the steps of ``rows`` (by index) in turns, and record each row's timings or
    the error its step raised. The steps are dropped afterwards (their staged inputs)."""
    try:
        timed = measure_interleaved(steps, settings) if steps else {}
    finally:
        steps.clear()
    for i, got in timed.items():
        rows[i].record(got)


def check_request(
    rs: Sequence[float],
    backends: Sequence[str],
    batches: Sequence[int],
    precision: str,
    variants: Sequence[str],
) -> tuple[list[float], list[str]]:
    """Validate a profile request (UserError with one line); return (rs, backends) cleaned."""
    if not rs:
        raise UserError("give at least one r")
    for r in rs:
        try:
            check_ratio(r)
        except ValueError as e:
            raise UserError(str(e)) from None
    backends = check_runner_names(backends, BACKENDS, what="backend", flag="--backends")
    if not batches or any(int(b) < 1 for b in batches):
        raise UserError(f"batch sizes must be >= 1; got {list(batches)}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return [float(r) for r in rs], backends


def profile(
    model: nn.Module,
    *,
    model_name: str,
    rs: Sequence[float],
    backends: Sequence[str] = ("torch", "onnxrt"),
    batches: Sequence[int] = (1,),
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    settings: TimingSettings | None = None,
    variants: Sequence[str] = VARIANTS,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    command: str = "",
    log: Log = stderr_log,
) -> ProfileReport:
    """Profile ``model`` (unpatched, left unchanged) and its MaMe / ToMe variants.

    For each batch and backend, every variant (the baseline, MaMe and ToMe at
    each r) gets its runner and a timed step, then all are timed in turns, one call
    each per round (:func:`measure_interleaved`), so their ratios come from the same
    conditions. ONNX graphs are exported once per (variant, r, batch) into
    ``workdir`` (a temporary folder by default) and deleted when the batch is done.
    """
    rs, backends = check_request(rs, backends, batches, precision, variants)
    settings = settings or TimingSettings()
    threads_before = torch.get_num_threads()
    try:
        n_threads = pin_threads(threads)
        img_shape = image_shape(model)
        macs0 = unpatched_macs(model)
        specs = [("baseline", 0.0)] if "baseline" in variants else []
        specs += [(v, r) for r in rs for v in ("mame", "tome") if v in variants]
        built = {(v, r): build_variant(model, v, r, macs0) for v, r in specs}
        report = ProfileReport(
            device=device_name(device), cpu=cpu_name(), threads=n_threads, versions=versions(),
            settings={"model": model_name, "device": device, "precision": precision,
                      "img_size": list(img_shape[1:]), "rs": rs, "batches": list(batches),
                      "backends": backends, "timing": asdict(settings), "seed": seed},
            command=command,
        )
        reasons = {b: runner_availability(b, device)[1] for b in backends}
        tmp_ctx = (tempfile.TemporaryDirectory(prefix="mame-profile-") if workdir is None
                   else contextlib.nullcontext(str(workdir)))
        with tmp_ctx as wd, compile_room(len(built)):
            for batch in batches:
                arrays = random_input_sets(batch, img_shape, settings.input_sets, seed + batch)
                ctx = _Batch(model_name, int(batch), precision, device, n_threads, settings,
                             img_shape, Path(wd), log, [{INPUT_NAME: a} for a in arrays])
                for backend in backends:
                    report.rows += _time_group(ctx, built, backend, reasons[backend])
                for info in ctx.exports.values():
                    if info.path is not None:
                        with contextlib.suppress(OSError):
                            info.path.unlink()
        add_speedups(report.rows)
        return report
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class _Batch:
    """What every row of one batch size shares: the run's settings, the inputs, and the
    ONNX graphs exported so far (one per variant)."""

    model_name: str
    batch: int
    precision: str
    device: str
    threads: int
    settings: TimingSettings
    img_shape: Sequence[int]
    out_dir: Path
    log: Log
    feeds: list[dict[str, np.ndarray]]
    exports: dict[tuple[str, float], ExportInfo] = field(default_factory=dict)


def _time_group(
    ctx: _Batch, built: dict[tuple[str, float], Variant], backend: str, reason: str
) -> list[Row]:
    """All variants on one backend and batch: each runner activated and its step
    prepared, then all timed in turns, then every runner deactivated."""
    rows: list[Row] = []
    steps: dict[int, TimedStep] = {}
    if backend == "torch-compile":
        torch._dynamo.reset()  # compiled graphs of an earlier batch are not reused
    with deactivating([]) as runners:
        for var in built.values():
            row = Row(ctx.model_name, var.name, backend, ctx.batch, var.r, ctx.precision,
                      flops_ratio=var.flops_ratio, gmacs=var.gmacs, final_tokens=var.final_tokens)
            rows.append(row)
            if var.error or reason:
                row.skipped = var.error or reason
                continue
            try:
                runner = _runner_for(ctx, row, var, backend)
                if runner is not None:
                    runners.append(runner)
                    steps[len(rows) - 1] = runner.prepare_timing(ctx.feeds)
            except Exception as e:  # noqa: BLE001 - a backend that fails is a row that says why
                row.skipped = f"failed: {one_line(e)}"
        if steps:
            ctx.log(f"  timing {len(steps)} variant(s) in turns on {backend}, batch {ctx.batch}")
        time_rows(rows, steps, ctx.settings)
    for row in rows:
        _log_row(row, ctx.log)
    return rows


def _runner_for(ctx: _Batch, row: Row, var: Variant, backend: str) -> Runner | None:
    """The row's runner; for a graph backend, the variant is exported first (once per
    batch), and an export that fails becomes the row's ``skipped`` reason and None."""
    dtype = PRECISIONS[ctx.precision]
    if backend not in GRAPH_RUNNERS:
        # moved and cast in place (exports work from a copy); back on the CPU when done
        return make_runner(backend, model=var.model, input_names=[INPUT_NAME],
                           output_names=[OUTPUT_NAME], device=ctx.device, dtype=dtype)
    key = (var.name, var.r)
    if key not in ctx.exports:
        ctx.log(f"  exporting {var.name} r={var.r:g} batch {row.batch} to ONNX ...")
        ctx.exports[key] = export_variant(var, row.batch, ctx.img_shape, dtype, ctx.out_dir)
    info = ctx.exports[key]
    row.exports = info.error is None
    row.forbidden_ops = info.forbidden if info.error is None else None
    if info.path is None:
        row.skipped = info.error
        return None
    trt_options = None
    if backend == "tensorrt":  # pragma: no cover - needs TensorRT and a GPU
        from mame_export.trt.engine import EngineOptions

        trt_options = EngineOptions(precision=row.precision)
    # The variants' ONNX Runtime sessions take turns: idle sessions must not spin.
    return make_runner(backend, onnx_path=info.path, threads=ctx.threads, spinning=False,
                       trt_options=trt_options, engines_dir=ctx.out_dir / "engines")


def _log_row(row: Row, log: Log) -> None:
    what = f"[profile] {row.model} {row.variant:<8} r={row.r:<5g} {row.backend:<13} b{row.batch}"
    if row.skipped:
        log(f"{what}: skipped ({row.skipped})")
    else:
        log(f"{what}: median {row.median_ms:.3f} ms, p90 {row.p90_ms:.3f}, "
            f"n={row.iterations}")
