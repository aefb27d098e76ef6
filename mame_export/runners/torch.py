"""PyTorch runners: eager, or ``torch.compile(dynamic=False)`` with ``compile=True``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mame_export.runners.base import Feeds, Runner, TimedStep, cast_input, free_cuda_cache
from mame_export.runners.decisions import DecisionRecorder


def torch_availability(device: str | torch.device) -> tuple[bool, str]:
    """Whether PyTorch can run on ``device`` here."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device visible to PyTorch"
    return True, ""


class TorchRunner(Runner):
    """PyTorch on a module whose forward takes the inputs positionally, in order.

    ``dtype`` casts the module and its floating inputs (``model.to(dtype)``). With
    ``compile=True`` the module runs through ``torch.compile(dynamic=False)`` (static
    shapes, as exported), compiled on its first call; ``compile_backend`` picks the
    compiler (inductor by default). Activation moves the module to ``device`` in
    place; deactivation moves it back to the CPU and drops the compiled graph.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        name: str | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.compile, self.compile_backend = compile, compile_backend
        self.name = name or ("torch-compile" if compile else f"torch-{self.device.type}")
        self._fn: Callable[..., Any] | None = None

    def availability(self) -> tuple[bool, str]:
        return torch_availability(self.device)

    def _activate(self) -> None:
        self.model.eval().to(self.device)
        if self.dtype is not None:
            self.model.to(self.dtype)
        self._fn = self.model
        if self.compile:
            self._fn = torch.compile(self.model, dynamic=False, backend=self.compile_backend)

    def _deactivate(self) -> None:
        self._fn = None
        if self.device.type == "cuda":
            self.model.to("cpu")
            free_cuda_cache()

    def _tensors(self, feeds: Feeds) -> list[torch.Tensor]:
        def dtype_for(a: np.ndarray) -> torch.dtype | None:
            return self.dtype if np.issubdtype(a.dtype, np.floating) else None

        return [cast_input(feeds[n], dtype_for(feeds[n]), self.device) for n in self.input_names]

    def _call(self, args: Sequence[torch.Tensor]) -> Any:
        assert self._fn is not None
        with torch.inference_mode():
            return self._fn(*args)

    def infer_tensors(self, feeds: Feeds) -> tuple[torch.Tensor, ...]:
        self.activate()
        out = self._call(self._tensors(feeds))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        return self._named(self.infer_tensors(feeds))

    def infer_with_decisions(self, feeds: Feeds
                             ) -> tuple[dict[str, np.ndarray], list[np.ndarray]] | None:
        if self.compile:  # a compiled graph runs no Python comparisons to record
            return None
        with DecisionRecorder() as recorder:
            outs = self.infer_tensors(feeds)
        return self._named(outs), [d.cpu().numpy() for d in recorder.decisions]

    def _named(self, outs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        """The outputs by their declared names; a count that differs is an error, never a
        silently dropped output."""
        if len(outs) != len(self.output_names):
            raise ValueError(f"the model returned {len(outs)} output(s) for the "
                             f"{len(self.output_names)} declared: {', '.join(self.output_names)}")
        pairs = zip(self.output_names, outs, strict=True)
        return {n: o.detach().float().cpu().numpy() for n, o in pairs}

    def _timed_step(self, feeds: Sequence[Feeds]) -> TimedStep:
        staged = [self._tensors(f) for f in feeds]  # on the device before timing starts
        return TimedStep(self._call, staged, sync=self.sync,
                         cuda_events=self.device.type == "cuda", hold=self)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def compile_room(n_models: int) -> Iterator[None]:
    """Let torch.compile hold one compiled graph per model at once: patched copies share
    their class's forward, so the default recompile limit would fall back to eager."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    before = getattr(dcfg, name)
    setattr(dcfg, name, max(before, 2 * n_models + 8))
    try:
        yield
    finally:
        setattr(dcfg, name, before)
