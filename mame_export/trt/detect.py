"""Is a usable TensorRT installed? Detection that type stubs cannot fool.

``pip install tensorrt-stubs`` leaves an empty ``tensorrt`` namespace package behind:
``import tensorrt`` succeeds, yet there is no library. TensorRT counts as present only if the
module has a ``__version__`` and a ``Builder``, and the version accepts strongly typed networks.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

INSTALL_HINT = "pip install 'mame-export[trt]' (TensorRT >= 10.12 and polygraphy)"
MIN_VERSION = (10, 12)  # first release whose strongly typed networks match TensorRT 11's


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '10.13.0.35', or None."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def tensorrt_status() -> tuple[ModuleType | None, str]:
    """(the tensorrt module, "") when usable, else (None, one line saying what to install)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        return None, f"TensorRT is not installed; {INSTALL_HINT}"
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) fails here
        return None, f"TensorRT failed to load ({type(e).__name__}: {e}); {INSTALL_HINT}"
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt, "Builder"):
        return None, (f"'tensorrt' at {_where(trt)} is not the TensorRT library (type stubs or "
                      f"an empty namespace package?); {INSTALL_HINT}")
    parsed = parse_version(version)
    if parsed is None or parsed < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return None, (f"TensorRT {version} is too old: strongly typed engines need >= {need}; "
                      f"{INSTALL_HINT}")
    return trt, ""


def tensorrt_reason() -> str:
    """Why TensorRT cannot run here (no usable library, no CUDA device), or "" if it can.

    The one place that decides TensorRT's availability; the engine runners and the
    runner factory ask it.
    """
    trt, reason = tensorrt_status()
    if trt is None:
        return reason
    import torch  # here, not at module level: detection stays light

    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    return ""


def tensorrt_version() -> str | None:
    """The usable TensorRT's version string, or None."""
    trt, _ = tensorrt_status()
    return None if trt is None else str(trt.__version__)


def _where(module: ModuleType) -> str:
    paths = list(getattr(module, "__path__", []) or [])
    return paths[0] if paths else str(getattr(module, "__file__", None) or "<unknown>")
