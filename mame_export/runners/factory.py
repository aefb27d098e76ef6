"""One way to name, check and make a runner: parity and latency both come through here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mame_export.errors import UserError
from mame_export.runners.base import Runner
from mame_export.runners.ort import OrtRunner, ort_availability
from mame_export.runners.torch import TorchRunner, torch_availability

EAGER_RUNNERS = ("torch", "torch-compile")  # run the PyTorch module
GRAPH_RUNNERS = ("onnxrt", "onnxrt-cuda", "tensorrt")  # run an exported ONNX graph
RUNNER_NAMES = EAGER_RUNNERS + GRAPH_RUNNERS


def check_runner_names(names: Sequence[str], allowed: Sequence[str] = GRAPH_RUNNERS,
                       what: str = "runner", flag: str = "--runners") -> list[str]:
    """``names`` without repeats; a UserError of one line if one is unknown or none is given."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"unknown {what}(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(allowed)}")
    if not names:
        raise UserError(f"{flag} is empty; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def runner_availability(name: str, device: str = "cpu") -> tuple[bool, str]:
    """Whether runner ``name`` can run here (``device`` for the PyTorch runners), without
    a model or a graph: (True, "") or (False, one-line reason)."""
    check_runner_names([name], RUNNER_NAMES)
    if name in EAGER_RUNNERS:
        return torch_availability(device)
    if name == "tensorrt":
        from mame_export.trt.detect import tensorrt_reason

        reason = tensorrt_reason()
        return not reason, reason
    return ort_availability("cuda" if name == "onnxrt-cuda" else "cpu")


def make_runner(
    name: str,
    *,
    model: torch.nn.Module | None = None,
    onnx_path: str | os.PathLike | None = None,
    input_names: Sequence[str] = ("pixels",),
    output_names: Sequence[str] = ("logits",),
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    spinning: bool = True,
    compile_backend: str = "inductor",
    trt_options: Any = None,
    engines_dir: str | os.PathLike = "engines",
    label: str | None = None,
) -> Runner:
    """The runner ``name`` (one of ``RUNNER_NAMES``), not yet activated.

    ``torch`` and ``torch-compile`` run ``model`` on ``device`` (``dtype`` casts it);
    ``onnxrt``, ``onnxrt-cuda`` and ``tensorrt`` run the graph at ``onnx_path``
    (``threads``/``spinning`` for ONNX Runtime; ``trt_options`` and ``engines_dir`` for
    the engine TensorRT builds or reuses). ``label`` renames the runner in reports.
    """
    check_runner_names([name], RUNNER_NAMES)
    if name in EAGER_RUNNERS:
        if model is None:
            raise ValueError(f"runner {name} needs a model")
        return TorchRunner(model, input_names, output_names, device=device, dtype=dtype,
                           name=label or name, compile=name == "torch-compile",
                           compile_backend=compile_backend)
    if onnx_path is None:
        raise ValueError(f"runner {name} needs an ONNX graph")
    if name == "tensorrt":
        from mame_export.runners.tensorrt import TrtGraphRunner

        runner: Runner = TrtGraphRunner(onnx_path, trt_options, Path(engines_dir))
        runner.name = label or name
        return runner
    return OrtRunner(onnx_path, "cuda" if name == "onnxrt-cuda" else "cpu", threads=threads,
                     spinning=spinning, name=label)
