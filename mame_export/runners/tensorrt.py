"""Run a TensorRT engine behind the common ``Runner`` interface (TensorRT 10/11 tensor API).

Buffers are torch CUDA tensors and work is queued on a torch CUDA stream, so no pycuda or
cuda-python is needed. Outputs come back as float32 numpy arrays, like every other runner.
An engine does not show its merge decisions (``infer_with_decisions`` gives None): no
TensorRT sample passes parity as a selection flip. Above the runner layer, beside the
engine builds (``mame_export.trt.engine``) that ``TrtGraphRunner`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mame_export.errors import UserError
from mame_export.runners.base import Feeds, Runner, TimedStep, cast_input, free_cuda_cache
from mame_export.trt.detect import tensorrt_reason, tensorrt_version
from mame_export.trt.engine import (
    EngineOptions,
    TensorRTUnavailable,
    build_engine,
    gpu_name,
    read_sidecar,
)

if TYPE_CHECKING:
    import tensorrt


class EngineLoadError(UserError):
    """The plan file could not be deserialized by this TensorRT on this GPU."""


class TrtRunner(Runner):
    """A serialized TensorRT engine (``.plan``) on the current CUDA device."""

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], name: str | None = None) -> None:
        self.plan = Path(plan_path)
        if name:
            self.name = name
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._stream: torch.cuda.Stream | None = None
        self._dtypes: dict[str, torch.dtype] = {}

    @property
    def input_names(self) -> list[str]:
        self.activate()
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        self.activate()
        return list(self._outputs)

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The engine's JSON sidecar (how and for what it was built), if present."""
        return read_sidecar(self.plan)

    def availability(self) -> tuple[bool, str]:
        reason = tensorrt_reason()
        if reason:
            return False, reason
        if not self.plan.is_file():
            return False, f"engine not found: {self.plan}"
        meta = self.metadata
        if meta is not None:
            built = (meta.get("tensorrt_version"), (meta.get("gpu") or {}).get("name"))
            here = (tensorrt_version(), gpu_name())
            if built != here:
                return False, (f"{self.plan.name} was built with TensorRT {built[0]} for "
                               f"{built[1]}; this machine has TensorRT {here[0]} on {here[1]}: "
                               "rebuild the engine here")
        return True, ""

    def _activate(self) -> None:
        ok, reason = self.availability()
        if not ok:
            raise TensorRTUnavailable(reason)
        import tensorrt as trt

        self._runtime = trt.Runtime(trt.Logger(trt.ILogger.Severity.WARNING))
        engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise EngineLoadError(f"TensorRT {trt.__version__} could not load {self.plan}; "
                                  "rebuild it on this machine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    def _deactivate(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._context = self._engine = self._runtime = self._stream = None
        free_cuda_cache()

    def _stage(self, feeds: Feeds) -> dict[str, torch.Tensor]:
        """The inputs on the GPU in the engine's types, their shapes set on the context."""
        context = self._context
        assert context is not None
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs for {self.plan.name}: {missing}")
        staged = {n: cast_input(feeds[n], self._dtypes[n], "cuda") for n in self._inputs}
        for n, t in staged.items():
            if not context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"input '{n}' of shape {tuple(t.shape)} is outside the "
                                 f"engine's optimization profile")
        return staged

    def _outputs_for_shapes(self) -> dict[str, torch.Tensor]:
        """Output buffers for the input shapes set on the context."""
        context = self._context
        assert context is not None
        out = {}
        for n in self._outputs:
            dims = context.get_tensor_shape(n)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output '{n}' has a data-dependent shape {shape}; "
                                   "static graphs only")
            out[n] = torch.empty(shape, dtype=self._dtypes[n], device="cuda")
        return out

    def _enqueue(self, buffers: dict[str, torch.Tensor]) -> None:
        context, stream = self._context, self._stream
        assert context is not None and stream is not None
        for n, t in buffers.items():
            context.set_tensor_address(n, t.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.plan.name}")

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        self.activate()
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            buffers = self._stage(feeds)  # held until the stream is done with them
            buffers.update(self._outputs_for_shapes())
            self._enqueue(buffers)
        self._stream.synchronize()
        return {n: buffers[n].float().cpu().numpy() for n in self._outputs}

    def _timed_step(self, feeds: Sequence[Feeds]) -> TimedStep:
        """Inputs and outputs staged on the GPU once; a step only sets addresses and
        enqueues the engine. Timed by the wall clock up to a sync of the engine's stream."""
        stream = self._stream
        assert stream is not None
        with torch.cuda.stream(stream):
            staged = [self._stage(f) for f in feeds]  # all sets share one shape
            outputs = self._outputs_for_shapes()
        torch.cuda.synchronize()
        return TimedStep(lambda bufs: self._enqueue({**bufs, **outputs}), staged,
                         sync=stream.synchronize, hold=outputs)

    def sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


def _torch_dtype(dtype: tensorrt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise EngineLoadError(f"engine I/O type {dtype} has no torch equivalent")
    return table[dtype]


class TrtGraphRunner(Runner):
    """TensorRT for an ONNX graph: builds (or reuses) its engine on activation, then runs it."""

    name = "tensorrt"

    def __init__(self, onnx_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 engines_dir: str | os.PathLike[str] = "engines") -> None:
        self.onnx_path = Path(onnx_path)
        self.options = options or EngineOptions()
        self.engines_dir = Path(engines_dir)
        self._inner: TrtRunner | None = None

    def availability(self) -> tuple[bool, str]:
        reason = tensorrt_reason()
        return not reason, reason

    def _activate(self) -> None:
        result = build_engine(self.onnx_path, self.options, self.engines_dir, self.onnx_path.stem)
        inner = TrtRunner(result.plan)
        ok, reason = inner.availability()
        if not ok:
            raise TensorRTUnavailable(reason)
        inner.activate()
        self._inner = inner

    def _deactivate(self) -> None:
        if self._inner is not None:
            self._inner.deactivate()
        self._inner = None

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        self.activate()
        assert self._inner is not None
        return self._inner.infer(feeds)

    def _timed_step(self, feeds: Sequence[Feeds]) -> TimedStep:
        assert self._inner is not None
        return self._inner.prepare_timing(feeds)

    def sync(self) -> None:
        if self._inner is not None:
            self._inner.sync()
