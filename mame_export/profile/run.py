"""One profile run: check the request, build the variants, then per batch and backend
make each variant's (and each given graph's) runner, time them all in turns and record
the rows."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mame_export.artifacts import clean_stale_dirs, tmp_prefix
from mame_export.errors import UserError, stderr_log
from mame_export.export import PRECISIONS
from mame_export.families import IOSpec
from mame_export.profile.checks import check_graphs, check_request
from mame_export.profile.graphs import GraphVariant, model_input_shapes
from mame_export.profile.quantized import export_quantized, row_precisions, skip_reason
from mame_export.profile.report import (
    ProfileReport,
    Row,
    add_speedups,
    cell,
    cpu_name,
    device_name,
    one_line,
    versions,
)
from mame_export.profile.timing import TimingSettings, input_feeds, measure_interleaved
from mame_export.profile.variants import (
    ExportInfo,
    MergeSettings,
    Variant,
    build_variant,
    export_variant,
)
from mame_export.quant.graphs import Quantization
from mame_export.runners import ReloadingStep, Runner, TimedStep, compile_room, deactivating
from mame_export.runners.factory import (
    EAGER_RUNNERS,
    GRAPH_RUNNERS,
    make_runner,
    runner_availability,
)
from mame_export.settings import QUANTIZED_PRECISIONS, check_threads

# Temporary folders carry the pid (artifacts.tmp_prefix), so a later run removes the ones
# a killed run left (artifacts.clean_stale_dirs).
PROFILE_TMP_PREFIX = "mame-profile-"
Log = Callable[[str], None]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int | None) -> int:
    """Pin PyTorch's intra-op threads (ONNX Runtime gets the same number); return it."""
    n = check_threads(threads) or default_threads()
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


def profile(
    model: nn.Module | None,
    *,
    model_name: str,
    rs: Sequence[float],
    io: IOSpec,
    merge: MergeSettings | None = None,
    graphs: Sequence[GraphVariant] = (),
    backends: Sequence[str] = ("torch", "onnxrt"),
    batches: Sequence[int] = (1,),
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    settings: TimingSettings | None = None,
    variants: Sequence[str] = ("baseline", "mame", "tome"),
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    command: str = "",
    log: Log = stderr_log,
    quantization: Quantization | None = None,
    one_session: bool = False,
) -> ProfileReport:
    """Profile ``model`` (unpatched, left unchanged), its variants and given graphs.

    ``io`` is the model's family's IOSpec (input and output names, random inputs);
    ``merge`` how MaMe (and ToMe) apply. For each batch and backend, every variant (the
    baseline, and MaMe, ToMe and ToMe-SD at each r) and, on the graph backends, every
    graph of ``graphs`` gets its runner and a timed step, then all are timed in turns,
    one call each per round (:func:`measure_interleaved`), so their ratios come from the
    same conditions. ONNX graphs are exported once per (variant, r, batch) into
    ``workdir`` (a temporary folder by default) and deleted when the batch is done.
    A quantized ``precision`` (int8, fp8) times each variant's fp32 graph and its QDQ
    graph, calibrated as ``quantization`` says (:mod:`mame_export.profile.quantized`).

    Empty ``variants`` times the ``graphs`` only (``model`` may then be None), with
    speed-ups over the first graph. ``one_session`` (graph backends only) holds one
    session at a time: every timed call loads its graph, runs ``settings.warmup_iters``
    untimed calls, times one and frees the session (:class:`ReloadingStep`), for graphs
    that do not fit in memory together.
    """
    graphs_only = not variants
    if graphs_only and not graphs:
        raise UserError("nothing to time: no variant and no --graph")
    rs, backends = check_request(rs, backends, batches, precision, variants,
                                 graphs_only=graphs_only, one_session=one_session)
    if (quantization is None) != (precision not in QUANTIZED_PRECISIONS):
        raise ValueError(f"precision {precision} and quantization {quantization} disagree")
    check_graphs(graphs, io, batches, backends, model_name)
    settings = settings or TimingSettings()
    merge = merge or MergeSettings()
    threads_before = torch.get_num_threads()
    try:
        n_threads = pin_threads(threads)
        shapes = model_input_shapes(io, 1)
        report = ProfileReport(
            device=device_name(device), cpu=cpu_name(), threads=n_threads, versions=versions(),
            settings={"model": model_name, "device": device, "precision": precision,
                      "img_size": list(next(iter(shapes.values()))[-2:]),
                      "inputs": {n: list(s[1:]) for n, s in shapes.items()},
                      "rs": rs, "batches": list(batches), "backends": backends,
                      "variants": list(variants),
                      "graphs": {g.name: str(g.path) for g in graphs},
                      "merge": {"tau": merge.tau, "layers": merge.layers,
                                "prop_attn": merge.prop_attn, **merge.options},
                      "plan_file": merge.plan,
                      "calibration": quantization.calibration if quantization else None,
                      "quant_keep": list(quantization.keep) if quantization else [],
                      "timing": asdict(settings), "seed": seed,
                      "one_session": one_session},
            command=command,
        )
        reasons = {b: runner_availability(b, device)[1] for b in backends}
        with _work_dir(workdir) as wd:
            ahead = None
            if not any(b in EAGER_RUNNERS for b in backends):
                # Graph backends only: each variant is exported at every batch (if any
                # backend can run it) and let go before the next is built, so one model
                # copy lives at a time (a UNet's is gigabytes).
                runnable = any(not reasons[b] for b in backends)
                ahead = _Ahead(io, batches if runnable else [], precision, Path(wd), log,
                               quantization)
            built = _build_variants(model, rs, variants, merge, device, precision, ahead)
            with compile_room(len(built)):
                for batch in batches:
                    ctx = _Batch(model_name, int(batch), precision, device, n_threads,
                                 settings, io, Path(wd), log,
                                 input_feeds(io, batch, settings.input_sets, seed + batch),
                                 ahead.exports.get(batch, {}) if ahead else {}, quantization,
                                 one_session)
                    for backend in backends:
                        report.rows += _time_group(ctx, built, graphs, backend,
                                                   reasons[backend])
                    for info in ctx.exports.values():
                        if info.path is not None:
                            with contextlib.suppress(OSError):
                                info.path.unlink()
        add_speedups(report.rows, reference="baseline" if not graphs_only else graphs[0].name)
        return report
    finally:
        torch.set_num_threads(threads_before)


def _work_dir(workdir: str | os.PathLike | None) -> contextlib.AbstractContextManager[str]:
    """``workdir``, or a temporary folder named with this process's pid (stale ones of
    killed runs removed first)."""
    if workdir is not None:
        return contextlib.nullcontext(str(workdir))
    clean_stale_dirs(Path(tempfile.gettempdir()), (PROFILE_TMP_PREFIX,))
    return tempfile.TemporaryDirectory(prefix=tmp_prefix(PROFILE_TMP_PREFIX))


@dataclass
class _Ahead:
    """Exports made while the variants are built (runs on graph backends only): batch ->
    (variant, r) -> graph."""

    io: IOSpec
    batches: Sequence[int]
    precision: str
    out_dir: Path
    log: Log
    quantization: Quantization | None = None
    exports: dict[int, dict[ExportKey, ExportInfo]] = field(default_factory=dict)

    def take(self, var: Variant) -> None:
        """Export ``var`` at every batch (and each row precision), then let its model go."""
        for batch in self.batches if var.model is not None else ():
            for prec in row_precisions(self.precision):
                if skip_reason(prec, "onnxrt", var.name):
                    continue
                self.log(f"  exporting {var.name} r={var.r:g} batch {batch} to ONNX ({prec}) ...")
                self.exports.setdefault(int(batch), {})[(var.name, var.r, prec)] = _export(
                    var, int(batch), self.io, prec, self.out_dir, self.quantization)
        var.model = None


ExportKey = tuple[str, float, str]  # (variant, r, precision)


def _export(var: Variant, batch: int, io: IOSpec, precision: str, out_dir: Path,
            quantization: Quantization | None) -> ExportInfo:
    if quantization is not None and precision == quantization.precision:
        return export_quantized(var, batch, io, quantization, out_dir)
    return export_variant(var, batch, io, PRECISIONS[precision], out_dir)


def _build_variants(model: nn.Module | None, rs: Sequence[float], variants: Sequence[str],
                    merge: MergeSettings, device: str, precision: str,
                    ahead: _Ahead | None) -> dict[tuple[str, float], Variant]:
    """Every (variant, r), the baseline first (none, and ``model`` unused, where
    ``variants`` is empty); the baseline's MACs and tokens come from the
    first plan built (every MaMe and ToMe plan holds the unpatched numbers). With
    ``ahead``, each is exported (and its model let go) before the next is built."""
    patched: dict[tuple[str, float], Variant] = {}
    if not variants:
        return patched
    assert model is not None
    keys = [(v, r) for r in rs for v in variants if v not in ("baseline", "mame-plan")]
    if "mame-plan" in variants:  # its own schedule: one row, at the r it amounts to
        keys.append(("mame-plan", merge.plan_r))
    for key in keys:
        patched[key] = build_variant(model, *key, merge=merge)
        if ahead is not None:
            ahead.take(patched[key])
    if "baseline" not in variants:
        return patched
    plan = next((var.plan for var in patched.values() if var.plan is not None), None)
    # An eager runner moves and casts its model in place: the caller's model is copied
    # unless the run leaves it as it is (fp32 on the CPU, or graph backends only).
    copy_base = ahead is None and (device != "cpu" or precision != "fp32")
    base = build_variant(model, "baseline", 0.0, plan.macs_unpatched if plan else None,
                         tokens=plan.num_patches if plan else None, copy_base=copy_base)
    if ahead is not None:
        ahead.take(base)
    return {("baseline", 0.0): base, **patched}


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
    io: IOSpec
    out_dir: Path
    log: Log
    feeds: list[dict[str, np.ndarray]]
    exports: dict[ExportKey, ExportInfo] = field(default_factory=dict)
    quantization: Quantization | None = None
    one_session: bool = False  # graph runners load for each timed call (ReloadingStep)


def _time_group(ctx: _Batch, built: dict[tuple[str, float], Variant],
                graphs: Sequence[GraphVariant], backend: str, reason: str) -> list[Row]:
    """All variants (and, on a graph backend, the given graphs) on one backend and batch:
    each runner activated and its step prepared, then all timed in turns, then every
    runner deactivated."""
    rows: list[Row] = []
    steps: dict[int, TimedStep] = {}
    if backend == "torch-compile":
        torch._dynamo.reset()  # compiled graphs of an earlier batch are not reused
    with deactivating([]) as runners:
        for var in built.values():
            for prec in row_precisions(ctx.precision):
                row = Row(ctx.model_name, var.name, backend, ctx.batch, var.r, prec,
                          flops_ratio=var.flops_ratio, gmacs=var.gmacs,
                          final_tokens=var.final_tokens)
                rows.append(row)
                why = var.error or reason or skip_reason(prec, backend, var.name)
                if why:
                    row.skipped = why
                    continue
                _prepare(row, functools.partial(_runner_for, ctx, row, var, backend), ctx,
                         runners, steps, len(rows) - 1)
        for g in graphs if backend in GRAPH_RUNNERS else ():
            # a quantized run has rows of two precisions: a given graph is of its own
            prec = g.precision if ctx.quantization is not None else ctx.precision
            row = Row(ctx.model_name, g.name, backend, ctx.batch, g.r, prec,
                      flops_ratio=g.flops_ratio, gmacs=g.gmacs, final_tokens=g.final_tokens,
                      exports=True, forbidden_ops=g.forbidden, graph=str(g.path),
                      graph_precision=g.precision)
            rows.append(row)
            if reason:
                row.skipped = reason
                continue
            _prepare(row, functools.partial(_graph_runner, ctx, backend, g.path, g.precision),
                     ctx, runners, steps, len(rows) - 1)
        if steps:
            how = (", one session at a time (a load per call)" if ctx.one_session
                   and backend in GRAPH_RUNNERS else "")
            ctx.log(f"  timing {len(steps)} variant(s) in turns on {backend}, batch "
                    f"{ctx.batch}{how}")
        time_rows(rows, steps, ctx.settings)
    for row in rows:
        _log_row(row, ctx.log)
    return rows


def _prepare(row: Row, make: Callable[[], Runner | None], ctx: _Batch, runners: list[Runner],
             steps: dict[int, TimedStep], index: int) -> None:
    """Make the row's runner and its timed step; a failure is the row's skip reason."""
    try:
        runner = make()
        if runner is not None:
            runners.append(runner)
            if ctx.one_session and row.backend in GRAPH_RUNNERS:
                steps[index] = ReloadingStep(runner, ctx.feeds, ctx.settings.warmup_iters,
                                             log=lambda m: ctx.log(f"  {row.variant}: {m}"))
            else:
                steps[index] = runner.prepare_timing(ctx.feeds)
    except Exception as e:  # noqa: BLE001 - a backend that fails is a row that says why
        row.skipped = f"failed: {one_line(e)}"


def _runner_for(ctx: _Batch, row: Row, var: Variant, backend: str) -> Runner | None:
    """The row's runner; for a graph backend, the variant is exported first (once per
    batch), and an export that fails becomes the row's ``skipped`` reason and None."""
    if backend not in GRAPH_RUNNERS:
        dtype = PRECISIONS[row.precision]
        # moved and cast in place (exports work from a copy); back on the CPU when done
        return make_runner(backend, model=var.model, input_names=ctx.io.input_names,
                           output_names=ctx.io.output_names, device=ctx.device, dtype=dtype)
    key = (var.name, var.r, row.precision)
    if key not in ctx.exports:
        ctx.log(f"  exporting {var.name} r={var.r:g} batch {row.batch} to ONNX "
                f"({row.precision}) ...")
        ctx.exports[key] = _export(var, row.batch, ctx.io, row.precision, ctx.out_dir,
                                   ctx.quantization)
    info = ctx.exports[key]
    row.exports = info.error is None
    row.forbidden_ops = info.forbidden if info.error is None else None
    if info.path is None:
        row.skipped = info.error
        return None
    return _graph_runner(ctx, backend, info.path, row.precision)


def _graph_runner(ctx: _Batch, backend: str, path: Path, precision: str) -> Runner:
    trt_options = None
    if backend == "tensorrt":  # pragma: no cover - needs TensorRT and a GPU
        from mame_export.trt.engine import EngineOptions

        trt_options = EngineOptions(precision=precision)  # strongly typed: the graph's own
    # The variants' ONNX Runtime sessions take turns: idle sessions must not spin.
    return make_runner(backend, onnx_path=path, threads=ctx.threads, spinning=False,
                       trt_options=trt_options, engines_dir=ctx.out_dir / "engines")


def _log_row(row: Row, log: Log) -> None:
    what = (f"[profile] {row.model} {row.variant:<8} r={cell(row.r, 'g'):<5} "
            f"{row.backend:<13} b{row.batch} {row.precision}")
    if row.skipped:
        log(f"{what}: skipped ({row.skipped})")
    else:
        log(f"{what}: median {row.median_ms:.3f} ms, p90 {row.p90_ms:.3f}, "
            f"n={row.iterations}")
