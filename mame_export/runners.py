"""Backends behind one interface: eager PyTorch, ONNX Runtime (CPU/CUDA), TensorRT.

A runner is activated once (session creation, engine load), then ``infer``
maps named numpy inputs to named numpy outputs. ``availability()`` says
whether it can run here and, if not, why: callers report such a runner as
skipped, never as passed. Parity and latency are computed over runners.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Runner:
    """Base class: subclasses set ``name`` and implement ``_activate`` / ``infer``."""

    name: str = "runner"

    def availability(self) -> tuple[bool, str]:
        """(True, "") if this runner can run here, else (False, one-line reason)."""
        return True, ""

    def activate(self) -> None:
        """Prepare to run (build session, load engine). Idempotent."""
        if not getattr(self, "_active", False):
            self._activate()
            self._active = True

    def _activate(self) -> None:  # pragma: no cover - trivial default
        pass

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class TorchRunner(Runner):
    """Eager PyTorch on a module whose forward takes the inputs positionally, in order."""

    def __init__(
        self,
        model: torch.nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.name = name or f"torch-{self.device.type}"

    def availability(self) -> tuple[bool, str]:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device visible to PyTorch"
        return True, ""

    def _activate(self) -> None:
        self.model.eval().to(self.device)
        if self.dtype is not None:
            self.model.to(self.dtype)

    def _to_tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t

    def infer_tensors(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        args = [self._to_tensor(feeds[n]) for n in self.input_names]
        with torch.inference_mode():
            out = self.model(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.infer_tensors(feeds)
        pairs = zip(self.output_names, outs, strict=False)
        return {n: o.detach().float().cpu().numpy() for n, o in pairs}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _ort():
    import onnxruntime as ort

    return ort


class OrtRunner(Runner):
    """ONNX Runtime on CPU or CUDA (``provider`` = "cpu" or "cuda").

    ``spinning=False`` stops the intra-op threads from busy-waiting for work after
    a run. Leave it on for one session alone; turn it off when several sessions
    take turns on a few cores, where the idle sessions' spinning threads take the
    cores from the one that runs (measured: +60% latency on 2 cores).
    """

    _PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu",
                 threads: int | None = None, spinning: bool = True) -> None:
        if provider not in self._PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(self._PROVIDERS)}")
        self.path, self.provider, self.threads = Path(onnx_path), provider, threads
        self.spinning = spinning
        self.name = f"onnxrt-{provider}" if provider == "cuda" else "onnxrt"
        self.session: Any = None

    def availability(self) -> tuple[bool, str]:
        try:
            ort = _ort()
        except ImportError:
            return False, "onnxruntime is not installed"
        if self.provider == "cuda":
            if hasattr(ort, "preload_dlls"):
                try:
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001 - best effort, availability decides
                    pass
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return False, "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu)"
            if not torch.cuda.is_available():
                return False, "no CUDA device"
        return True, ""

    def _activate(self) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = [self._PROVIDERS[self.provider]]
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}
        if self.provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("ONNX Runtime fell back from CUDA to CPU for this graph")

    @property
    def input_names(self) -> list[str]:
        self.activate()
        return [i.name for i in self.session.get_inputs()]

    def _cast(self, name: str, value: np.ndarray) -> np.ndarray:
        """Feed each input in the element type the graph declares (fp16 graphs take fp16)."""
        want = self._input_types.get(name)
        if want == "tensor(float16)":
            return value.astype(np.float16)
        if want == "tensor(bfloat16)":
            import ml_dtypes

            return value.astype(ml_dtypes.bfloat16)
        return np.ascontiguousarray(value)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, {k: self._cast(k, v) for k, v in feeds.items()})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, outs, strict=False)}
