"""A Triton ``config.pbtxt`` derived from the graph itself: names, dtypes and dims of every
input and output, ``max_batch_size`` from the batch axis, batching, instances, platform.

Built and checked with Triton's own protobuf schema (``model_config_pb2``, shipped by
``tritonclient``): the text written is the schema's text format, and every written config
is parsed back and checked against the graph the way the server checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import onnx

from mame_export.errors import UserError
from mame_export.graph import TensorSpec, graph_inputs, graph_outputs
from mame_export.settings import MAX_BATCH, check_int

INSTALL_HINT = "pip install 'mame-export[serve]' (tritonclient[grpc,http])"
BACKENDS = ("auto", "python")  # auto: onnxruntime_onnx for a graph, tensorrt_plan for an engine
DEVICES = ("gpu", "cpu")
DEFAULT_MAX_BATCH = 8  # max_batch_size of a dynamic-batch graph when --max-batch is not given
DEFAULT_QUEUE_DELAY_US = 500  # how long the dynamic batcher waits to fill a batch
# Triton takes a model name as a folder name: no separators, no hidden folders, no spaces.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# ONNX element type -> Triton data type (model_config.proto DataType)
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
ORT_TRT_PRECISIONS = {"fp32": "FP32", "fp16": "FP16"}  # ORT's TensorRT provider's modes


class ServeError(UserError):
    """The repository cannot be written for this source, name or setting."""


class GraphShapeError(ServeError):
    """A graph whose inputs or outputs Triton cannot describe with a batch axis."""


@dataclass(frozen=True)
class ServeOptions:
    """How to serve one model (the ``triton`` command's options)."""

    name: str | None = None  # default: from the source's file name
    version: int | None = None  # default: one past the highest version in the repository
    backend: str = "auto"
    device: str = "gpu"
    instances: int = 1
    max_batch: int | None = None  # dynamic-batch graphs only
    preferred_batch: tuple[int, ...] = ()
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    ort_trt: bool = False
    ort_trt_precision: str | None = None  # default: the graph's (fp32 or fp16)
    ort_trt_workspace: int | None = None
    gpu: str | None = None  # the GPU a tensorrt_plan repository is for (default: this one)

    def validate(self) -> None:
        """One-line ServeError for a bad value or combination; nothing is written yet."""
        if self.name is not None:
            check_model_name(self.name)
        if self.version is not None:
            check_int("--model-version", self.version, 1, 2**63 - 1)
        if self.backend not in BACKENDS:
            raise ServeError(f"--backend must be one of {', '.join(BACKENDS)}, "
                             f"got {self.backend!r}")
        if self.device not in DEVICES:
            raise ServeError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_int("--instances", self.instances, 1, 1024)
        if self.max_batch is not None:
            check_int("--max-batch", self.max_batch, 1, MAX_BATCH)
        for b in self.preferred_batch:
            check_int("--preferred-batch", b, 1, MAX_BATCH)
        check_int("--max-queue-delay-us", self.queue_delay_us, 0, 60_000_000)
        if self.ort_trt_workspace is not None:
            check_int("--triton-ort-trt-workspace", self.ort_trt_workspace, 1, 2**50)
        if not self.ort_trt and (self.ort_trt_precision or self.ort_trt_workspace):
            raise ServeError("--triton-ort-trt-precision and --triton-ort-trt-workspace need "
                             "--triton-ort-trt")
        if self.ort_trt and (self.backend == "python" or self.device == "cpu"):
            raise ServeError("--triton-ort-trt is TensorRT inside ONNX Runtime on a GPU: "
                             "it needs the onnxruntime_onnx backend and --device gpu")
        if self.ort_trt_precision and self.ort_trt_precision not in ORT_TRT_PRECISIONS:
            raise ServeError(f"--triton-ort-trt-precision must be one of "
                             f"{', '.join(ORT_TRT_PRECISIONS)}, got {self.ort_trt_precision!r}")


def check_model_name(name: str) -> str:
    """``name`` if Triton takes it as a model (folder) name; else a one-line ServeError."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ServeError(f"model name {name!r} has characters Triton refuses: use 1 to 128 "
                         "letters, digits, '_', '-' or '.', not starting with '.' or '-'")
    return name


def model_name_for(stem: str) -> str:
    """A valid model name from a file name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).lstrip(".-")[:128]
    return name or "model"


def model_config_pb2() -> ModuleType:
    """Triton's ModelConfig schema, from tritonclient; a one-line ServeError without it."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError:
        raise ServeError(f"writing a Triton config needs Triton's schema; {INSTALL_HINT}") \
            from None
    return pb


# ------------------------------------------------------------------ the graph's IO


@dataclass(frozen=True)
class ModelIO:
    """What a config says about the graph: its tensors and its batch axis (``batch`` is
    None for a dynamic batch, else the graph's fixed batch)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        return self.batch is None

    def dims(self, t: TensorSpec) -> list[int]:
        """The config's dims: without the batch axis when the server batches."""
        dims = [int(d) for d in t.shape[1:]] if self.dynamic_batch else [int(d) for d in t.shape]
        return dims


def model_io(model: onnx.ModelProto, where: str) -> ModelIO:
    """The graph's inputs and outputs, checked: every dim known, only the first may be
    dynamic, and then on every input and output (one batch axis)."""
    inputs, outputs = graph_inputs(model), graph_outputs(model)
    tensors = [("input", t) for t in inputs] + [("output", t) for t in outputs]
    for kind, t in tensors:
        if not t.name:
            raise GraphShapeError(f"{where}: an {kind} has no name; Triton names every tensor")
        if t.elem_type not in TRITON_TYPES:
            raise GraphShapeError(f"{where}: {kind} '{t.name}' has element type {t.dtype}, "
                                  "which a Triton config cannot declare")
        if not t.ranked or not t.shape:
            raise GraphShapeError(f"{where}: {kind} '{t.name}' has no known shape (rank "
                                  "unknown or a scalar); Triton needs its batch axis and dims")
        for axis, d in enumerate(t.shape[1:], start=1):
            if not (isinstance(d, int) and d > 0):
                what = "an unnamed" if d is None else f"a dynamic ({d!r})"
                raise GraphShapeError(
                    f"{where}: {kind} '{t.name}' has {what} axis {axis} in shape "
                    f"{list(t.shape)}; only the batch axis (0) may be dynamic: export with a "
                    "fixed image size")
    dynamic = [f"{k} '{t.name}'" for k, t in tensors if t.dynamic_batch]
    fixed = [f"{k} '{t.name}'" for k, t in tensors if not t.dynamic_batch]
    if dynamic and fixed:
        raise GraphShapeError(f"{where}: the batch axis is dynamic on {dynamic[0]} but fixed on "
                              f"{fixed[0]}; Triton batches all inputs and outputs together")
    batch = None if dynamic else int(tensors[0][1].shape[0])
    return ModelIO(tuple(inputs), tuple(outputs), batch)


# ------------------------------------------------------------------ building the config


def preferred_sizes(max_batch: int, given: tuple[int, ...]) -> list[int]:
    """The dynamic batcher's preferred sizes: as given, else half the maximum and the
    maximum (the batcher waits for these)."""
    if given:
        too_big = [b for b in given if b > max_batch]
        if too_big:
            raise ServeError(f"--preferred-batch {too_big[0]} is larger than max_batch_size "
                             f"{max_batch}")
        return sorted(set(given))
    return sorted({max(1, max_batch // 2), max_batch})


def build_config(io: ModelIO, name: str, platform: str, opts: ServeOptions,
                 max_batch: int, default_file: str | None = None,
                 cc_files: dict[str, str] | None = None, precision: str = "fp32") -> Any:
    """The ModelConfig message. ``platform``: onnxruntime_onnx, tensorrt_plan or python
    (a backend, not a platform). ``max_batch``: the batch range's top (dynamic graphs)."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=name)
    if platform == "python":
        cfg.backend = "python"
    else:
        cfg.platform = platform
    cfg.max_batch_size = 0 if not io.dynamic_batch else max_batch
    for tensors, declared in ((io.inputs, cfg.input), (io.outputs, cfg.output)):
        for t in tensors:
            dims = io.dims(t)
            # A tensor that is only the batch axis (the UNet's timestep): Triton needs
            # dims, so [1], reshaped to [] for the model.
            entry = declared.add(name=t.name, dims=dims or [1],
                                 data_type=pb.DataType.Value(TRITON_TYPES[t.elem_type]))
            if not dims:
                entry.reshape.SetInParent()
    gpu = opts.device == "gpu" and platform != "python"
    cfg.instance_group.add(count=opts.instances,
                           kind=pb.ModelInstanceGroup.KIND_GPU if gpu
                           else pb.ModelInstanceGroup.KIND_CPU)
    if io.dynamic_batch:
        cfg.dynamic_batching.preferred_batch_size.extend(
            preferred_sizes(max_batch, opts.preferred_batch))
        cfg.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    if default_file:
        cfg.default_model_filename = default_file
    for cc, file in (cc_files or {}).items():
        cfg.cc_model_filenames[cc] = file
    if opts.ort_trt:
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt")
        mode = ORT_TRT_PRECISIONS.get(opts.ort_trt_precision or precision)
        if mode is None:
            raise ServeError(f"--triton-ort-trt: ONNX Runtime's TensorRT provider takes "
                             f"{', '.join(ORT_TRT_PRECISIONS)}, and the graph is {precision}; "
                             "pass --triton-ort-trt-precision")
        trt.parameters["precision_mode"] = mode
        if opts.ort_trt_workspace:
            trt.parameters["max_workspace_size_bytes"] = str(opts.ort_trt_workspace)
    return cfg


def config_text(cfg: Any) -> str:
    """The config as ``config.pbtxt`` text (the schema's text format)."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str, where: str) -> Any:
    """``config.pbtxt`` text parsed with Triton's schema; a one-line ServeError if it
    does not parse."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise ServeError(f"{where} is not a valid Triton config: {e}") from None


def check_config(text: str, io: ModelIO, where: str) -> Any:
    """Parse a written config with Triton's schema and check what the server checks against
    the graph: every input and output named once with its dtype and dims, the batch axis
    consistent with ``max_batch_size``, batching sizes within range, instances >= 1."""
    cfg = parse_config(text, where)
    pb = model_config_pb2()
    if not _MODEL_NAME.fullmatch(cfg.name):
        raise ServeError(f"{where}: model name {cfg.name!r} is not one Triton takes")
    if not (cfg.platform or cfg.backend):
        raise ServeError(f"{where}: neither platform nor backend is set")
    if io.dynamic_batch != (cfg.max_batch_size > 0):
        raise ServeError(f"{where}: max_batch_size {cfg.max_batch_size} does not match the "
                         f"graph's {'dynamic' if io.dynamic_batch else 'fixed'} batch axis")
    for kind, declared, tensors in (("input", cfg.input, io.inputs),
                                    ("output", cfg.output, io.outputs)):
        names = [t.name for t in declared]
        if sorted(names) != sorted(t.name for t in tensors) or len(set(names)) != len(names):
            raise ServeError(f"{where}: {kind}s {names} are not the graph's "
                             f"{[t.name for t in tensors]}")
        by_name = {t.name: t for t in declared}
        for t in tensors:
            entry = by_name[t.name]
            dtype = pb.DataType.Name(entry.data_type)
            if dtype != TRITON_TYPES[t.elem_type]:
                raise ServeError(f"{where}: {kind} '{t.name}' is {dtype}, the graph's is "
                                 f"{TRITON_TYPES[t.elem_type]}")
            dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
            if dims != io.dims(t) or not entry.dims:
                raise ServeError(f"{where}: {kind} '{t.name}' has dims {list(entry.dims)}"
                                 f"{f' reshaped to {dims}' if entry.HasField('reshape') else ''}"
                                 f", the graph's are {io.dims(t)}")
    for size in cfg.dynamic_batching.preferred_batch_size:
        if not 0 < size <= cfg.max_batch_size:
            raise ServeError(f"{where}: preferred batch size {size} is outside 1.."
                             f"{cfg.max_batch_size}")
    if not cfg.instance_group or any(g.count < 1 for g in cfg.instance_group):
        raise ServeError(f"{where}: instance_group needs a count of at least 1")
    return cfg
