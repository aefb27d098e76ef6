"""mame-export: MaMe token merging, static ONNX export, TensorRT engines, parity, latency."""

from mame_export.patch import apply, merge_plan, supported_families
from mame_export.plan import MergePlan

__version__ = "0.2.0"

__all__ = ["MergePlan", "__version__", "apply", "merge_plan", "supported_families"]
