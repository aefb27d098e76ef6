"""Latency of the unpatched model, MaMe and ToMe, per backend, in one run.

Variants: ``baseline`` (unpatched), ``mame`` (each r) and ``tome`` (ToMe with the
same tokens per block as MaMe at that r). Backends: ``torch`` (eager),
``torch-compile``, ``onnxrt`` (CPU), ``onnxrt-cuda`` and ``tensorrt``. A backend
or variant that cannot run is a row with a ``skipped`` reason and no timings.

Method (see docs/profiling.md): the variants of one (backend, batch) are timed
in turns, one call each per round, so drift of a shared machine hits them alike;
warm-up, then rounds until every variant has a minimum count and a time budget
is spent; several fresh random input sets
(never zeros) rotated; CUDA events on GPU, a synchronised wall clock elsewhere;
CPU threads pinned for PyTorch and ONNX Runtime alike; median, p90 and p99.
Speed-ups are ratios against the baseline on the same backend and batch,
measured in the same run; the FLOPs-ideal speed-up is 1 / MACs ratio.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.export import PRECISIONS, export_onnx, set_default_mode
from mame_export.plan import check_ratio
from mame_export.runners import OrtRunner, TorchRunner

BACKENDS = ("torch", "torch-compile", "onnxrt", "onnxrt-cuda", "tensorrt")
ONNX_BACKENDS = ("onnxrt", "onnxrt-cuda", "tensorrt")
VARIANTS = ("baseline", "mame", "tome")
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"

Log = Callable[[str], None]
Key = TypeVar("Key", bound=Hashable)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings, statistics


@dataclass(frozen=True)
class TimingSettings:
    """How long to measure one row.

    Timed iterations run until at least ``min_iters`` are done *and* ``budget_s``
    seconds have passed, or ``max_iters`` are done, whichever comes first.
    """

    warmup_iters: int = 5
    warmup_s: float = 1.0
    min_iters: int = 30
    max_iters: int = 5000
    budget_s: float = 10.0
    input_sets: int = 4

    def __post_init__(self) -> None:
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise UserError(f"need 1 <= min_iters <= max_iters; got {self.min_iters}, "
                            f"{self.max_iters}")
        if self.input_sets < 2:
            raise UserError("input_sets must be >= 2 (inputs are rotated)")
        if self.warmup_iters < 0 or self.budget_s < 0 or self.warmup_s < 0:
            raise UserError("warm-up and budget must be >= 0")


QUICK = TimingSettings(warmup_iters=2, warmup_s=0.0, min_iters=5, max_iters=20, budget_s=0.5,
                       input_sets=2)


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int


def summarize(samples_ms: Sequence[float] | np.ndarray) -> Stats:
    """Median, p90, p99 (linear interpolation between order statistics) and mean."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("need at least one finite sample")
    med, p90, p99 = np.percentile(a, [50, 90, 99])
    return Stats(float(med), float(p90), float(p99), float(a.mean()), int(a.size))


def throughput(batch: int, median_ms: float) -> float:
    """Images per second at the median latency."""
    return batch * 1000.0 / median_ms


def random_input_sets(
    batch: int, shape: Sequence[int], n_sets: int, seed: int = 0
) -> list[np.ndarray]:
    """``n_sets`` different standard-normal float32 arrays of shape (batch, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen).numpy() for _ in range(n_sets)]


@dataclass
class Prepared:
    """A ready-to-time backend: ``step(input)`` runs one inference."""

    step: Callable[[Any], object]
    inputs: list[Any]
    sync: Callable[[], None] | None = None
    cuda_events: bool = False
    hold: Any = None  # objects the step needs alive (engine, output buffers)


def _warm_up(p: Prepared, settings: TimingSettings) -> None:
    """``warmup_iters`` calls, continued up to ``warmup_s`` (at most 10x the count)."""
    i, t_end = 0, time.perf_counter() + settings.warmup_s
    while i < settings.warmup_iters or (
        time.perf_counter() < t_end and i < 10 * max(settings.warmup_iters, 1)
    ):
        p.step(p.inputs[i % len(p.inputs)])
        i += 1
    if p.sync:
        p.sync()


def _time_once(p: Prepared, x: Any) -> float:
    """One timed call in ms: CUDA events on GPU, else a synchronised wall clock."""
    if p.cuda_events:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        p.step(x)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    p.step(x)
    if p.sync:
        p.sync()
    return (time.perf_counter() - t0) * 1e3


def measure_interleaved(
    prepared: Mapping[Key, Prepared], settings: TimingSettings
) -> dict[Key, np.ndarray | Exception]:
    """Time several steps in turns; return per-step latencies in ms (or the error it raised).

    Each step is warmed up, then the steps run round-robin, one call each per
    round, with the starting step rotating from round to round. A slow drift of
    a shared machine (another process, clock or thermal state) therefore lands
    on every step alike and their ratios stay fair, which timing them one after
    another does not give. Each step's inputs rotate through its own sets.
    Rounds go on until every step has ``min_iters`` samples and
    ``budget_s`` x (number of steps) seconds have passed, or ``max_iters``.
    A step that raises (e.g. out of memory) leaves the rotation with its error;
    the others go on.
    """
    out: dict[Key, np.ndarray | Exception] = {}
    active: dict[Key, Prepared] = {}
    for key, p in prepared.items():
        try:
            _warm_up(p, settings)
            active[key] = p
        except Exception as e:  # noqa: BLE001 - reported per step
            out[key] = e
    samples: dict[Key, list[float]] = {k: [] for k in active}
    budget = settings.budget_s * max(len(active), 1)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start_all, rnd = time.perf_counter(), 0
        while active:
            keys = list(active)
            shift = rnd % len(keys)
            for key in keys[shift:] + keys[:shift]:
                p, got = active[key], samples[key]
                try:
                    got.append(_time_once(p, p.inputs[len(got) % len(p.inputs)]))
                except Exception as e:  # noqa: BLE001 - reported per step
                    out[key] = e
                    del active[key]
            rnd += 1
            n = min((len(samples[k]) for k in active), default=0)
            if n >= settings.max_iters or (
                n >= settings.min_iters and time.perf_counter() - start_all >= budget
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for key in active:
        out[key] = np.asarray(samples[key])
    return {k: out[k] for k in prepared}


# ---------------------------------------------------------------- rows and report


@dataclass
class Row:
    """One (variant, backend, batch, r) measurement, or the reason it was skipped."""

    model: str
    variant: str
    backend: str
    batch: int
    r: float
    precision: str
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    iterations: int | None = None
    throughput: float | None = None
    flops_ratio: float | None = None
    gmacs: float | None = None
    final_tokens: int | None = None
    speedup: float | None = None
    ideal_speedup: float | None = None
    efficiency: float | None = None
    skipped: str | None = None
    exports: bool | None = None
    forbidden_ops: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileReport:
    """Everything one run measured, with the device, threads and versions."""

    device: str
    cpu: str
    threads: int
    versions: dict[str, str]
    settings: dict[str, Any]
    command: str
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "cpu": self.cpu,
            "threads": self.threads,
            "versions": self.versions,
            "settings": self.settings,
            "command": self.command,
            "results": [r.to_dict() for r in self.rows],
        }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


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


def versions() -> dict[str, str]:
    from mame_export.job import versions as package_versions

    out = package_versions()
    out["torch_cuda"] = str(torch.version.cuda)
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        out["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    return out


def add_speedups(rows: list[Row]) -> None:
    """Speed-up over the baseline on the same model/backend/batch/precision, and efficiency."""
    base = {
        (r.model, r.backend, r.batch, r.precision): r.median_ms
        for r in rows
        if r.variant == "baseline" and r.median_ms
    }
    for row in rows:
        if row.flops_ratio:
            row.ideal_speedup = 1.0 / row.flops_ratio
        ref = base.get((row.model, row.backend, row.batch, row.precision))
        if row.median_ms and ref:
            row.speedup = ref / row.median_ms
            if row.ideal_speedup:
                row.efficiency = row.speedup / row.ideal_speedup


# ---------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    r: float
    model: nn.Module | None
    flops_ratio: float | None
    gmacs: float | None
    final_tokens: int | None
    error: str | None = None


def build_variant(base: nn.Module, name: str, r: float, macs_unpatched: int | None) -> Variant:
    """A patched deep copy of ``base`` (unchanged), or a Variant with the reason it failed."""
    from mame_export.baselines import apply_tome, tome_plan
    from mame_export.patch import apply, merge_plan

    model = copy.deepcopy(base).eval()
    if name == "baseline":
        gmacs = macs_unpatched / 1e9 if macs_unpatched else None
        n = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return Variant(name, 0.0, model, 1.0, gmacs, n)
    try:
        if name == "mame":
            plan = merge_plan(apply(model, r))
        elif name == "tome":
            plan = tome_plan(apply_tome(model, r))
        else:
            raise ValueError(f"unknown variant {name!r}")
    except (TypeError, ValueError) as e:
        return Variant(name, r, None, None, None, None, error=f"{name} does not apply: {e}")
    return Variant(name, r, model, plan.flops_ratio, plan.macs / 1e9, plan.final_patches)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the pixels a patch-embedding image model takes."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "img_size") or not hasattr(pe, "proj"):
        raise UserError(f"profile supports image models with a patch embedding (timm ViTs); "
                        f"got {type(model).__name__}")
    h, w = pe.img_size
    return int(pe.proj.in_channels), int(h), int(w)


def unpatched_macs(base: nn.Module) -> int | None:
    """MACs of the unpatched model, from the MaMe plan at r=0 (None if MaMe does not apply)."""
    from mame_export.patch import apply, merge_plan

    try:
        return merge_plan(apply(copy.deepcopy(base), 0.0)).macs_unpatched
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- ONNX export and census


@dataclass
class ExportInfo:
    path: Path | None
    error: str | None
    forbidden: dict[str, int]


def forbidden_census(path: Path) -> dict[str, int]:
    """Forbidden (data-dependent) ops in the graph at ``path``: op -> count.

    A Gather whose indices are computed at run time is counted as
    ``Gather(computed indices)``.
    """
    from mame_export.audit import forbidden_ops, load_graph

    counts: dict[str, int] = {}
    for f in forbidden_ops(load_graph(path)):
        key = f.op_type if f.op_type != "Gather" else "Gather(computed indices)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def export_variant(
    variant: Variant, batch: int, img_shape: Sequence[int], dtype: torch.dtype, out_dir: Path
) -> ExportInfo:
    """Export a variant at a static batch; failures become ``ExportInfo.error``."""
    assert variant.model is not None
    path = out_dir / f"{variant.name}_r{variant.r:g}_b{batch}.onnx"
    model = copy.deepcopy(variant.model).to("cpu", dtype)
    example = (torch.randn(batch, *img_shape, generator=torch.Generator().manual_seed(1))
               .to(dtype),)
    try:
        export_onnx(model, example, path, input_names=(INPUT_NAME,),
                    output_names=(OUTPUT_NAME,), dynamic_batch=False)
    except UserError as e:
        return ExportInfo(None, f"does not export: {e}", {})
    return ExportInfo(path, None, forbidden_census(path))


# ---------------------------------------------------------------- backends


def tensorrt_reason() -> str:
    """Why TensorRT cannot run here, or "" if it can."""
    try:
        from mame_export.trt.detect import tensorrt_status
    except ImportError:
        return "TensorRT support (mame_export.trt) is not in this build"
    trt, reason = tensorrt_status()
    if trt is None:
        return reason or "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    return ""


def backend_reason(backend: str, device: str) -> str:
    """Why ``backend`` cannot run on ``device`` here, or "" if it can."""
    if backend in ("torch", "torch-compile"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA device visible to PyTorch"
        return ""
    if backend == "onnxrt":
        return OrtRunner("unused.onnx", "cpu").availability()[1]
    if backend == "onnxrt-cuda":
        return OrtRunner("unused.onnx", "cuda").availability()[1]
    if backend == "tensorrt":
        return tensorrt_reason()
    return f"unknown backend {backend!r}"


def prepare_torch(
    model: nn.Module, arrays: list[np.ndarray], device: str, dtype: torch.dtype, compile_: bool
) -> Prepared:
    runner = TorchRunner(model, [INPUT_NAME], [OUTPUT_NAME], device=device, dtype=dtype)
    runner.activate()
    fn: Callable[[torch.Tensor], Any] = runner.model
    if compile_:  # compiled on the first (warm-up) call
        fn = torch.compile(runner.model, dynamic=False)  # static shapes, as exported
    tensors = [torch.from_numpy(a).to(device=device, dtype=dtype) for a in arrays]
    on_gpu = torch.device(device).type == "cuda"

    def step(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return fn(x)

    return Prepared(step, tensors, sync=runner.sync, cuda_events=on_gpu)


def _ort_input_dtype(type_str: str) -> Any:
    if type_str == "tensor(float16)":
        return np.float16
    if type_str == "tensor(bfloat16)":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


def prepare_ort(path: Path, arrays: list[np.ndarray], provider: str, threads: int) -> Prepared:
    # The variants' sessions take turns: idle sessions must not spin on the cores.
    runner = OrtRunner(path, provider, threads=threads, spinning=False)
    runner.activate()
    session = runner.session
    inp = session.get_inputs()[0]
    want = _ort_input_dtype(inp.type)
    feeds = [np.ascontiguousarray(a.astype(want)) for a in arrays]
    out_names = [o.name for o in session.get_outputs()]
    if provider == "cpu":
        return Prepared(lambda x: session.run(out_names, {inp.name: x}), feeds, hold=runner)
    # CUDA: inputs staged on the device once; outputs stay there (no host copies timed).
    import onnxruntime as ort

    bindings = []
    for a in feeds:
        b = session.io_binding()
        b.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0))
        for n in out_names:
            b.bind_output(n, "cuda")
        bindings.append(b)
    last: list[Any] = [bindings[0]]

    def step(b: Any) -> None:
        session.run_with_iobinding(b)
        last[0] = b

    return Prepared(step, bindings, sync=lambda: last[0].synchronize_outputs(), hold=runner)


def prepare_trt(
    path: Path, arrays: list[np.ndarray], precision: str, engines_dir: Path
) -> Prepared:  # pragma: no cover - needs TensorRT and a GPU
    """Build the engine for ``path``, stage inputs and outputs on the GPU once; a step
    only sets the input address and enqueues the engine."""
    from mame_export.trt.engine import EngineOptions, build_engine
    from mame_export.trt.runner import TrtRunner

    built = build_engine(path, EngineOptions(precision=precision), engines_dir=engines_dir)
    runner = TrtRunner(built.plan)
    runner.activate()
    # TrtRunner.infer copies host arrays per call; timing needs device-resident buffers.
    ctx, stream, dtypes = runner._context, runner._stream, runner._dtypes
    assert ctx is not None and stream is not None
    name = runner.input_names[0]
    inputs = [torch.from_numpy(a).to("cuda", dtypes[name]) for a in arrays]
    if not ctx.set_input_shape(name, tuple(inputs[0].shape)):
        raise RuntimeError(f"input shape {tuple(inputs[0].shape)} is outside the engine's profile")
    outputs = []
    for n in runner.output_names:
        dims = ctx.get_tensor_shape(n)
        out = torch.empty(tuple(int(dims[i]) for i in range(len(dims))), dtype=dtypes[n],
                          device="cuda")
        ctx.set_tensor_address(n, out.data_ptr())
        outputs.append(out)

    def step(t: torch.Tensor) -> None:
        ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")

    return Prepared(step, inputs, sync=stream.synchronize, hold=(runner, outputs))


# ---------------------------------------------------------------- the run


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


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
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise UserError(f"unknown backend(s) {', '.join(bad) or '(none given)'}; choose from "
                        f"{', '.join(BACKENDS)}")
    if not batches or any(int(b) < 1 for b in batches):
        raise UserError(f"batch sizes must be >= 1; got {list(batches)}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    return [float(r) for r in rs], list(dict.fromkeys(backends))


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
    settings: TimingSettings = TimingSettings(),
    variants: Sequence[str] = VARIANTS,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    command: str = "",
    log: Log = stderr_log,
) -> ProfileReport:
    """Profile ``model`` (unpatched, left unchanged) and its MaMe / ToMe variants.

    For each batch and backend, every variant (the baseline, MaMe and ToMe at
    each r) is prepared, then all are timed in turns, one call each per round
    (:func:`measure_interleaved`), so their ratios come from the same conditions.
    ONNX graphs are exported once per (variant, r, batch) into ``workdir`` (a
    temporary folder by default) and deleted when the batch is done.
    """
    rs, backends = check_request(rs, backends, batches, precision, variants)
    threads_before = torch.get_num_threads()
    try:
        return _profile(model, model_name, rs, backends, batches, device, precision, threads,
                        settings, variants, workdir, seed, command, log)
    finally:
        torch.set_num_threads(threads_before)


def _profile(
    model: nn.Module,
    model_name: str,
    rs: list[float],
    backends: list[str],
    batches: Sequence[int],
    device: str,
    precision: str,
    threads: int | None,
    settings: TimingSettings,
    variants: Sequence[str],
    workdir: str | os.PathLike | None,
    seed: int,
    command: str,
    log: Log,
) -> ProfileReport:
    dtype = PRECISIONS[precision]
    n_threads = pin_threads(threads)
    img_shape = image_shape(model)
    macs0 = unpatched_macs(model)

    specs = [("baseline", 0.0)] if "baseline" in variants else []
    specs += [(v, r) for r in rs for v in ("mame", "tome") if v in variants]
    built = {(v, r): build_variant(model, v, r, macs0) for v, r in specs}
    reasons = {b: backend_reason(b, device) for b in backends}

    report = ProfileReport(
        device=device_name(device),
        cpu=cpu_name(),
        threads=n_threads,
        versions=versions(),
        settings={"model": model_name, "device": device, "precision": precision,
                  "img_size": list(img_shape[1:]), "rs": rs, "batches": list(batches),
                  "backends": backends, "timing": asdict(settings), "seed": seed},
        command=command,
    )
    tmp_ctx = (tempfile.TemporaryDirectory(prefix="mame-profile-") if workdir is None
               else contextlib.nullcontext(str(workdir)))
    with tmp_ctx as wd, _compile_room(len(built)):
        out_dir = Path(wd)
        for batch in batches:
            ctx = _Batch(model_name, int(batch), precision, dtype, device, n_threads, settings,
                         img_shape, out_dir, log,
                         random_input_sets(batch, img_shape, settings.input_sets, seed + batch))
            for backend in backends:
                report.rows += _time_group(ctx, built, backend, reasons[backend])
            for info in ctx.exports.values():
                if info.path is not None:
                    with contextlib.suppress(OSError):
                        info.path.unlink()
    add_speedups(report.rows)
    return report


@contextlib.contextmanager
def _compile_room(n_variants: int) -> Iterator[None]:
    """Let torch.compile hold one compiled graph per variant at once (they share the
    model class's forward, so the default recompile limit would fall back to eager)."""
    import torch._dynamo.config as dcfg

    before = dcfg.recompile_limit
    dcfg.recompile_limit = max(before, 2 * n_variants + 8)
    try:
        yield
    finally:
        dcfg.recompile_limit = before


@dataclass
class _Batch:
    """What every row of one batch size shares: the run's settings, the input
    arrays, and the ONNX graphs exported so far (one per variant)."""

    model_name: str
    batch: int
    precision: str
    dtype: torch.dtype
    device: str
    threads: int
    settings: TimingSettings
    img_shape: Sequence[int]
    out_dir: Path
    log: Log
    arrays: list[np.ndarray]
    exports: dict[tuple[str, float], ExportInfo] = field(default_factory=dict)


def _time_group(
    ctx: _Batch, built: dict[tuple[str, float], Variant], backend: str, reason: str
) -> list[Row]:
    """All variants on one backend and batch: prepared, then timed in turns
    (:func:`measure_interleaved`) so their ratios come from the same conditions."""
    rows: list[Row] = []
    ready: dict[int, Prepared] = {}
    if backend == "torch-compile":
        torch._dynamo.reset()  # compiled graphs of an earlier batch are not reused
    for var in built.values():
        row = Row(ctx.model_name, var.name, backend, ctx.batch, var.r, ctx.precision,
                  flops_ratio=var.flops_ratio, gmacs=var.gmacs, final_tokens=var.final_tokens)
        rows.append(row)
        if var.error or reason:
            row.skipped = var.error or reason
            continue
        prepared = _prepare_row(ctx, row, var, backend)
        if prepared is not None:
            ready[len(rows) - 1] = prepared
    if ready:
        ctx.log(f"  timing {len(ready)} variant(s) in turns on {backend}, batch {ctx.batch} ...")
        try:
            timed = measure_interleaved(ready, ctx.settings)
        finally:
            del ready
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # e.g. after an out-of-memory step, for the next group
        for i, got in timed.items():
            if isinstance(got, Exception):
                rows[i].skipped = f"failed: {_one_line(got)}"
                continue
            stats = summarize(got)
            row = rows[i]
            row.median_ms, row.p90_ms, row.p99_ms = stats.median_ms, stats.p90_ms, stats.p99_ms
            row.mean_ms, row.iterations = stats.mean_ms, stats.iterations
            row.throughput = throughput(row.batch, stats.median_ms)
    for row in rows:
        _log_row(row, ctx.log)
    return rows


def _prepare_row(ctx: _Batch, row: Row, var: Variant, backend: str) -> Prepared | None:
    """Export (once per variant and batch) and load one row's backend; a failure
    becomes the row's ``skipped`` reason and None."""
    try:
        if backend in ONNX_BACKENDS:
            key = (var.name, var.r)
            if key not in ctx.exports:
                ctx.log(f"  exporting {var.name} r={var.r:g} batch {row.batch} to ONNX ...")
                ctx.exports[key] = export_variant(var, row.batch, ctx.img_shape, ctx.dtype,
                                                  ctx.out_dir)
            info = ctx.exports[key]
            row.exports = info.error is None
            row.forbidden_ops = info.forbidden if info.error is None else None
            if info.error is not None:
                row.skipped = info.error
                return None
            assert info.path is not None
            if backend == "tensorrt":  # pragma: no cover - needs TensorRT and a GPU
                return prepare_trt(info.path, ctx.arrays, row.precision, ctx.out_dir / "engines")
            provider = "cuda" if backend == "onnxrt-cuda" else "cpu"
            return prepare_ort(info.path, ctx.arrays, provider, ctx.threads)
        assert var.model is not None  # moved/cast in place; exports work from a copy
        return prepare_torch(var.model, ctx.arrays, ctx.device, ctx.dtype,
                             backend == "torch-compile")
    except Exception as e:  # noqa: BLE001 - a backend that fails is a row that says why
        row.skipped = f"failed: {_one_line(e)}"
        return None


def _log_row(row: Row, log: Log) -> None:
    what = f"[profile] {row.model} {row.variant:<8} r={row.r:<5g} {row.backend:<13} b{row.batch}"
    if row.skipped:
        log(f"{what}: skipped ({row.skipped})")
    else:
        log(f"{what}: median {row.median_ms:.3f} ms, p90 {row.p90_ms:.3f}, "
            f"n={row.iterations}")


# ---------------------------------------------------------------- tables and plots


_COLUMNS = (
    ("model", "model", "{}"),
    ("variant", "variant", "{}"),
    ("backend", "backend", "{}"),
    ("batch", "batch", "{}"),
    ("r", "r", "{:g}"),
    ("median_ms", "median ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("throughput", "img/s", "{:.1f}"),
    ("flops_ratio", "MACs ratio", "{:.3f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("ideal_speedup", "ideal", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.0%}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    out = []
    for key, _, fmt in _COLUMNS:
        v = row.get(key)
        out.append("-" if v is None else fmt.format(v))
    return out


def _note(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    ops = row.get("forbidden_ops")
    if ops:
        return "graph has " + ", ".join(f"{k} x{v}" for k, v in ops.items())
    return ""


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width terminal table of result rows (dicts as in the JSON)."""
    head = [h for _, h, _ in _COLUMNS] + ["note"]
    body = [_cells(r) + [_note(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = 0
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths[:-1]] + [""])]
                     + [line(b) for b in body])


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The same table in GitHub markdown."""
    head = [h for _, h, _ in _COLUMNS] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = _cells(r) + [_note(r).replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """PNG: median latency against r, one panel per (model, batch); per backend the
    MaMe line, the FLOPs-ideal curve (baseline x MACs ratio) and the ToMe points.
    Written atomically (temporary file in the same folder, then a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    timed = [r for r in rows if r.get("median_ms") is not None]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    if not panels:
        raise UserError("nothing to plot: no result rows")
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        for b in backends:
            sel = [r for r in timed if r["model"] == model and r["batch"] == batch
                   and r["backend"] == b]
            base = [r for r in sel if r["variant"] == "baseline"]
            mame = sorted((r for r in sel if r["variant"] == "mame"), key=lambda r: r["r"])
            tome = sorted((r for r in sel if r["variant"] == "tome"), key=lambda r: r["r"])
            c = colors[b]
            line = base + mame
            if line:
                ax.plot([r["r"] for r in line], [r["median_ms"] for r in line], "o-", color=c,
                        label=f"{b}: MaMe")
            if base:
                ideal = [(0.0, base[0]["median_ms"])] + [
                    (r["r"], base[0]["median_ms"] * r["flops_ratio"])
                    for r in rows if r["model"] == model and r["batch"] == batch
                    and r["backend"] == b and r["variant"] == "mame" and r.get("flops_ratio")
                ]
                ideal.sort()
                ax.plot([x for x, _ in ideal], [y for _, y in ideal], ":", color=c,
                        label=f"{b}: FLOPs-ideal")
            if tome:
                ax.plot([r["r"] for r in tome], [r["median_ms"] for r in tome], "x", color=c,
                        markersize=9, mew=2, linestyle="none", label=f"{b}: ToMe")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("r (fraction of patch tokens merged)")
        ax.set_ylabel("median latency (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        set_default_mode(tmp)  # mkstemp makes 0600; a plot is as readable as any file
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path
