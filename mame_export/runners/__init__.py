"""Backends behind one interface: PyTorch (eager, compiled), ONNX Runtime (CPU/CUDA), TensorRT.

Every runner follows one life cycle (``mame_export.runners.base.Runner``):
``availability()`` says whether it can run here and, if not, why (callers report
such a runner as skipped, never as passed); ``activate()`` acquires the session or
engine; ``infer(feeds)`` maps named numpy inputs to named float32 numpy outputs;
``infer_with_decisions(feeds)`` adds the merge decisions behind the outputs, where the
runner can read them (``mame_export.runners.decisions``);
``prepare_timing(feeds)`` gives a ``TimedStep`` that times one inference with the
runner's own synchronisation; ``deactivate()`` frees it all. ``make_runner`` builds
any runner by name (``mame_export.runners.factory``: above this package, beside the
TensorRT runners it can make); parity and latency are computed over runners.

The TensorRT runners live in ``mame_export.runners.tensorrt`` (they need the trt extra,
and sit a layer up, beside the engine builds of ``mame_export.trt.engine``).
"""

from mame_export.runners.base import (
    Feeds,
    ReloadingStep,
    Runner,
    TimedStep,
    cast_input,
    deactivating,
    free_cuda_cache,
)
from mame_export.runners.ort import OrtRunner, ort_availability
from mame_export.runners.torch import TorchRunner, compile_room, torch_availability

__all__ = [
    "Feeds",
    "OrtRunner",
    "ReloadingStep",
    "Runner",
    "TimedStep",
    "TorchRunner",
    "cast_input",
    "compile_room",
    "deactivating",
    "free_cuda_cache",
    "ort_availability",
    "torch_availability",
]
