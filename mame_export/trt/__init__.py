"""TensorRT: detection, the parser pre-flight, engine builds and the engine runner.

Nothing here imports ``tensorrt`` at module level: the package imports, and its CPU-side logic
runs, on machines without TensorRT. This ``__init__`` re-exports only the light modules
(detection, pre-flight: onnx and numpy; its findings are
:class:`mame_export.graph.Finding`); import builds from ``mame_export.trt.engine`` (it pulls
in torch). The engine runners are ``mame_export.runners.tensorrt``, beside the other runners.
"""

from mame_export.trt.detect import INSTALL_HINT, tensorrt_status, tensorrt_version
from mame_export.trt.support import support_table_info, trt_preflight

__all__ = [
    "INSTALL_HINT",
    "support_table_info",
    "tensorrt_status",
    "tensorrt_version",
    "trt_preflight",
]
