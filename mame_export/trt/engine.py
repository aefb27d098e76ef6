"""TensorRT engines from ONNX graphs: strongly typed builds, optimization profiles, timing cache,
engine reuse, and a JSON sidecar per plan.

Every decision that needs no TensorRT (options, profiles, precision, paths, cache keys, metadata,
reuse) is plain Python here and tested on CPU; ``_build_plan`` is the only code that talks to
TensorRT. Precision lives in the graph: TensorRT 11 dropped weak typing (no FP16/BF16 builder
flags), and 10.12+ builds the same graphs with the STRONGLY_TYPED network flag, so a fp16 engine
comes from a fp16 graph, never from a builder flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mame_export.artifacts import atomic_write_bytes, atomic_write_text, ensure_writable_dir
from mame_export.errors import UserError
from mame_export.graph import (
    TensorSpec,
    graph_inputs,
    graph_precision,
    graph_sha256,
    load_graph,
)
from mame_export.trt.detect import tensorrt_status

if TYPE_CHECKING:
    import tensorrt

# fp32/fp16/bf16 graphs, and QDQ graphs (int8, fp8: explicit quantization, mame_export.quant)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
SIDECAR_FORMAT = 1
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


class TensorRTUnavailable(UserError):
    """TensorRT (or a CUDA GPU for it) is not available here; the message says what to install."""


class OptionsError(UserError, ValueError):
    """Engine options that contradict each other or the graph."""


class EngineBuildError(UserError):
    """TensorRT could not parse the graph or build the engine."""


def parse_size(text: str | int) -> int:
    """Bytes from '4GiB', '512MiB', '2G', '1.5GB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise OptionsError(f"cannot read size {text!r}; use e.g. 4GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class EngineOptions:
    """How to build an engine. ``precision`` names the graph's precision (the engine is
    strongly typed); batch bounds matter only for graphs with a dynamic batch dim."""

    precision: str = "fp32"
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None
    builder_opt_level: int = 3  # TensorRT's default; 0 builds fastest, 5 searches most

    def validate(self) -> None:
        """Raise ``OptionsError`` (a ``ValueError``) with one line on a bad value or combination."""
        if self.precision not in PRECISIONS:
            raise OptionsError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                               f"{self.precision!r}")
        batches = {"--min-batch": self.min_batch, "--opt-batch": self.opt_batch,
                   "--max-batch": self.max_batch}
        for flag, value in batches.items():
            if value is not None and (not _is_int(value) or value < 1):
                raise OptionsError(f"{flag} must be a positive integer, got {value!r}")
        given = [(flag, v) for flag, v in batches.items() if v is not None]
        for (flag_a, a), (flag_b, b) in zip(given, given[1:], strict=False):
            if a > b:
                raise OptionsError(f"{flag_a} {a} is larger than {flag_b} {b}; "
                                   "need min <= opt <= max")
        if not _is_int(self.builder_opt_level) or not 0 <= self.builder_opt_level <= 5:
            raise OptionsError(f"--builder-opt-level must be 0..5, got {self.builder_opt_level!r}")
        if self.workspace_bytes is not None and (
                not _is_int(self.workspace_bytes) or self.workspace_bytes <= 0):
            raise OptionsError(f"--workspace must be a positive size, got {self.workspace_bytes!r}")
        if self.timing_cache is not None and Path(self.timing_cache).is_dir():
            raise OptionsError(f"--timing-cache {self.timing_cache} is a folder; give a file path")

    def engine_fields(self) -> dict[str, Any]:
        """The options that change what TensorRT builds (the timing cache only changes how fast)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "timing_cache"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ProfileShape:
    """One input's range in the optimization profile."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def resolve_profile(inputs: list[TensorSpec], options: EngineOptions) -> list[ProfileShape]:
    """The optimization profile for a dynamic-batch graph ([] for a static one).

    Only the batch dim (0) may be dynamic. Unset bounds default to: opt = the first of
    opt/max/min given (else 1), min = 1, max = opt. A static graph takes no batch bounds other
    than its own batch.
    """
    for i in inputs:
        if any(not (isinstance(d, int) and d > 0) for d in i.shape[1:]):
            raise OptionsError(f"input '{i.name}' has shape {list(i.shape)}: only the batch dim "
                               "may be dynamic; export with a fixed image size")
    dynamic = [i for i in inputs if i.dynamic_batch]
    bounds = {"--min-batch": options.min_batch, "--opt-batch": options.opt_batch,
              "--max-batch": options.max_batch}
    if not dynamic:
        batch = next((i.shape[0] for i in inputs if i.shape), None)
        for flag, value in bounds.items():
            if value is not None and value != batch:
                raise OptionsError(f"the graph has a static batch of {batch}, so {flag} {value} "
                                   "cannot apply; re-export with a dynamic batch or omit it")
        return []
    opt = options.opt_batch or options.max_batch or options.min_batch or 1
    low = options.min_batch or 1
    high = options.max_batch or opt
    if not low <= opt <= high:
        raise OptionsError(f"batch profile min {low}, opt {opt}, max {high}: "
                           "need min <= opt <= max")
    profile = []
    for i in dynamic:
        rest = tuple(int(d) for d in i.shape[1:] if isinstance(d, int))
        profile.append(ProfileShape(i.name, (low, *rest), (opt, *rest), (high, *rest)))
    return profile


def engine_cache_key(graph_sha256: str, options: EngineOptions, trt_version: str,
                     gpu_name: str) -> str:
    """Same graph, engine options, TensorRT version and GPU -> same key (and a reusable engine)."""
    payload = {"format": SIDECAR_FORMAT, "graph_sha256": graph_sha256,
               "tensorrt": trt_version, "gpu": gpu_name, **options.engine_fields()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def engine_path(engines_dir: str | os.PathLike[str], stem: str, gpu_name: str,
                precision: str) -> Path:
    """``<engines_dir>/<stem>.<gpu slug>.<precision>.plan``."""
    return Path(engines_dir) / f"{stem}.{slugify(gpu_name)}.{precision}.plan"


def sidecar_path(plan: Path) -> Path:
    """The JSON metadata next to a plan: ``<plan>.json``."""
    return plan.with_name(plan.name + ".json")


def read_sidecar(plan: Path) -> dict[str, Any] | None:
    """The plan's metadata, or None if missing or unreadable."""
    try:
        meta = json.loads(sidecar_path(plan).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def gpu_name() -> str:
    """The name of the GPU the engine is built on (and for)."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU visible to PyTorch; TensorRT builds an engine on "
                                  "the GPU it will run on")
    return torch.cuda.get_device_name(torch.cuda.current_device())


def compute_capability() -> str:
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return f"{major}.{minor}"


@dataclass(frozen=True)
class EngineResult:
    plan: Path
    sidecar: Path
    metadata: dict[str, Any] = field(repr=False)
    reused: bool

    @property
    def build_seconds(self) -> float:
        return float(self.metadata["build_seconds"])


def build_engine(onnx_path: str | os.PathLike[str], options: EngineOptions,
                 engines_dir: str | os.PathLike[str] = "engines",
                 stem: str | None = None) -> EngineResult:
    """Build (or reuse) the TensorRT engine for an ONNX graph on this machine's GPU.

    Writes ``engine_path(...)`` and its JSON sidecar, each atomically. An engine whose sidecar
    has the same cache key is reused (``reused=True``). Raises ``TensorRTUnavailable`` without
    TensorRT or a GPU, ``OptionsError`` for options that do not fit the graph, and
    ``EngineBuildError`` when TensorRT rejects the graph; none of them leaves a file behind.
    """
    options.validate()
    onnx_path = Path(onnx_path)
    trt, reason = tensorrt_status()
    if trt is None:
        raise TensorRTUnavailable(reason)
    model = load_graph(onnx_path)
    inputs = graph_inputs(model)
    profile = resolve_profile(inputs, options)
    precision = graph_precision(model)
    if precision != options.precision:
        raise OptionsError(f"{onnx_path.name} is a {precision} graph but the engine was asked "
                           f"for {options.precision}; engines are strongly typed, so export the "
                           f"graph with --precision {options.precision}")
    digest = graph_sha256(onnx_path, model)
    gpu, capability = gpu_name(), compute_capability()
    version = str(trt.__version__)
    key = engine_cache_key(digest, options, version, gpu)
    plan = engine_path(engines_dir, stem or onnx_path.stem, gpu, options.precision)
    sidecar = sidecar_path(plan)
    previous = read_sidecar(plan)
    if previous is not None and previous.get("cache_key") == key and plan.is_file() \
            and plan.stat().st_size == previous.get("plan_bytes"):
        return EngineResult(plan, sidecar, previous, reused=True)

    ensure_writable_dir(plan.parent)
    start = time.perf_counter()
    data = _build_plan(onnx_path, profile, options)
    seconds = time.perf_counter() - start
    metadata = {
        "format": SIDECAR_FORMAT,
        "cache_key": key,
        "plan": plan.name,
        "plan_bytes": len(data),
        "tensorrt_version": version,
        "gpu": {"name": gpu, "compute_capability": capability},
        "precision": options.precision,
        "strongly_typed": True,
        "inputs": {i.name: {"dtype": i.dtype, "shape": list(i.shape)} for i in inputs},
        "profiles": [{p.input: p.to_json() for p in profile}] if profile else [],
        "builder": {"workspace_bytes": options.workspace_bytes,
                    "builder_opt_level": options.builder_opt_level,
                    "timing_cache": str(options.timing_cache) if options.timing_cache else None},
        "source_graph": {"path": str(onnx_path), "sha256": digest},
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sidecar.unlink(missing_ok=True)  # an old sidecar must never vouch for the new plan
    atomic_write_bytes(plan, data)
    atomic_write_text(sidecar, json.dumps(metadata, indent=2) + "\n")
    return EngineResult(plan, sidecar, metadata, reused=False)


def _build_plan(onnx_path: Path, profile: list[ProfileShape], options: EngineOptions) -> bytes:
    """Parse the graph into a strongly typed network and build the serialized engine."""
    import tensorrt as trt

    logger = trt.Logger(trt.ILogger.Severity.WARNING)
    builder = trt.Builder(logger)
    # Required on 10.12+ to keep the graph's precision; TensorRT 11 accepts and ignores it.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads side files next to the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors else "no details"
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name} ({len(errors)} "
                               f"errors; first: {first}); `mame-export audit` lists what it lacks")
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.builder_opt_level
    if profile:
        shapes = builder.create_optimization_profile()
        for p in profile:
            shapes.set_shape(p.input, trt.Dims(list(p.min)), trt.Dims(list(p.opt)),
                             trt.Dims(list(p.max)))
        config.add_optimization_profile(shapes)
    if options.timing_cache is not None:
        _use_timing_cache(config, Path(options.timing_cache))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name}; "
                               "its log above says why")
    if options.timing_cache is not None:
        atomic_write_bytes(Path(options.timing_cache),
                           bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _use_timing_cache(config: tensorrt.IBuilderConfig, path: Path) -> None:
    """Start from the cache file if there is one; a cache from another TensorRT version or GPU
    is not an error, the build just starts from an empty cache (and overwrites the file)."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
    except Exception:  # noqa: BLE001 - an unreadable cache only costs build time
        pass
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
