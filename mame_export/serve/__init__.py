"""Serving what was exported: a Triton Inference Server model repository for a graph or an
engine (``config.pbtxt`` derived from the graph and checked with Triton's schema), the
Python-backend variant that runs the graph with ONNX Runtime, and a local server for checks.

Imports onnx and the lower ``mame_export`` layers; Triton's schema comes from ``tritonclient``
(the ``serve`` extra), the server binary from ``nvidia-pytriton``, each only when used.
"""

from mame_export.serve.config import (
    BACKENDS,
    DEVICES,
    GraphShapeError,
    ModelIO,
    ServeError,
    ServeOptions,
    check_config,
    check_model_name,
    model_io,
    parse_config,
)
from mame_export.serve.repository import EngineGpuError, write_model

__all__ = ["BACKENDS", "DEVICES", "EngineGpuError", "GraphShapeError", "ModelIO", "ServeError",
           "ServeOptions", "check_config", "check_model_name", "model_io", "parse_config",
           "write_model"]
