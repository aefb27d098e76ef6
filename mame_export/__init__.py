"""mame-export: MaMe token merging, static ONNX export, TensorRT engines, parity, latency.

The public names load lazily, so ``import mame_export`` (and the command line's start)
does not import torch: a Ctrl-C in the first second still ends in one clean line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

__all__ = ["MergePlan", "__version__", "apply", "merge_plan", "supported_families"]

if TYPE_CHECKING:
    from mame_export.patch import apply, merge_plan, supported_families
    from mame_export.plan import MergePlan

_LAZY = {"apply": "mame_export.patch", "merge_plan": "mame_export.patch",
         "supported_families": "mame_export.patch", "MergePlan": "mame_export.plan"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mame_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
