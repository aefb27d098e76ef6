"""The runner life cycle every backend follows, its timed step, and the one input cast.

A runner says whether it can run here (``availability``), acquires what it needs
(``activate``: a session, an engine, device memory), runs (``infer``, or a
``TimedStep`` from ``prepare_timing`` for latency; ``infer_with_decisions`` where it can
show which tokens its merges chose) and lets go (``deactivate``).
Nothing outside a runner touches its session, engine or buffers: a profiler asks
the runner for a timed step, which owns its synchronisation.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

Feeds = Mapping[str, np.ndarray]


@dataclass
class TimedStep:
    """One inference on inputs staged once, timed the way its runner needs.

    ``run(x)`` launches one inference on ``x``, one of ``inputs``; ``sync`` waits for
    the device work it queued; with ``cuda_events`` a call is timed by CUDA events,
    else by a wall clock around the call and ``sync``. ``hold`` keeps alive what the
    step needs (a runner, output buffers).
    """

    run: Callable[[Any], object]
    inputs: list[Any]
    sync: Callable[[], None] | None = None
    cuda_events: bool = False
    hold: Any = None
    # True where every timed call warms itself up (ReloadingStep): timers skip their warm-up
    warms_itself: ClassVar[bool] = False

    def wait(self) -> None:
        """Wait for the work the step queued (no-op on the CPU)."""
        if self.sync is not None:
            self.sync()

    def time_ms(self, x: Any) -> float:
        """One timed call on ``x``, in milliseconds."""
        if self.cuda_events:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self.run(x)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        self.run(x)
        self.wait()
        return (time.perf_counter() - t0) * 1e3


class ReloadingStep(TimedStep):
    """A step that holds its runner only while it times one call: each ``time_ms`` loads the
    runner (``prepare_timing``: a session, an engine, the inputs staged), runs ``warmup``
    untimed calls, times one, and lets the runner go before it returns.

    For graphs whose sessions do not fit in memory together (a denoiser's fp32 weights are
    gigabytes): timed in turns with other steps, only one is loaded at a time. Loading is
    not timed; ``load_s`` records each load's seconds, and ``log`` (if given) gets a line
    per call (a call can take a minute). ``inputs`` are indices into the feeds, which are
    staged again at every load.
    """

    warms_itself: ClassVar[bool] = True

    def __init__(self, runner: Runner, feeds: Sequence[Feeds], warmup: int = 1,
                 log: Callable[[str], None] | None = None) -> None:
        if len(feeds) < 1 or warmup < 0:
            raise ValueError("ReloadingStep needs at least one set of inputs and warmup >= 0")
        super().__init__(run=self._cycle, inputs=list(range(len(feeds))))
        self.runner, self.feeds, self.warmup, self.log = runner, list(feeds), warmup, log
        self.load_s: list[float] = []

    def _cycle(self, i: int) -> None:
        """An untimed load, warm-up and call (what ``run`` means for this step)."""
        self.time_ms(i)

    def time_ms(self, x: Any) -> float:
        i = int(x)
        t0 = time.perf_counter()
        step: TimedStep | None = self.runner.prepare_timing(self.feeds)
        try:
            self.load_s.append(time.perf_counter() - t0)
            n = len(step.inputs)
            for k in range(self.warmup):
                step.run(step.inputs[(i + 1 + k) % n])
            step.wait()
            ms = step.time_ms(step.inputs[i % n])
            if self.log is not None:
                self.log(f"call {len(self.load_s)}: loaded in {self.load_s[-1]:.1f} s, "
                         f"{ms:.1f} ms")
            return ms
        finally:
            step = None  # the step holds the session: dropped before the runner lets go
            self.runner.deactivate()
            gc.collect()
            free_cuda_cache()


class Runner:
    """Base class: subclasses set ``name`` and implement ``_activate``, ``infer`` and
    ``_timed_step``; ``_deactivate`` frees what ``_activate`` took."""

    name: str = "runner"
    _active: bool = False

    def availability(self) -> tuple[bool, str]:
        """(True, "") if this runner can run here, else (False, one-line reason)."""
        return True, ""

    def activate(self) -> None:
        """Prepare to run (build a session, load an engine). Idempotent."""
        if not self._active:
            self._activate()
            self._active = True

    def deactivate(self) -> None:
        """Free sessions, engines and device memory. Idempotent; ``activate`` again to rerun."""
        if self._active:
            self._active = False
            self._deactivate()

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Named float32 numpy outputs for named numpy inputs."""
        raise NotImplementedError

    def infer_with_decisions(self, feeds: Feeds
                             ) -> tuple[dict[str, np.ndarray], list[np.ndarray]] | None:
        """Named outputs for ``feeds`` and the merge decisions that made them (boolean
        arrays, :mod:`mame_export.runners.decisions`); None where this runner cannot read
        its decisions (then none of its samples may pass as a selection flip)."""
        return None

    def prepare_timing(self, feeds: Sequence[Feeds]) -> TimedStep:
        """A step that times one inference, with ``feeds`` staged where the backend reads
        them (cast, on the device) before timing starts. Activates the runner."""
        if len(feeds) < 1:
            raise ValueError("prepare_timing needs at least one set of inputs")
        self.activate()
        return self._timed_step(feeds)

    def _timed_step(self, feeds: Sequence[Feeds]) -> TimedStep:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


@contextlib.contextmanager
def deactivating(runners: list[Runner]) -> Iterator[list[Runner]]:
    """A list to put activated runners in; each is deactivated when the block ends, even
    on an error (e.g. out of memory), and cached CUDA memory goes back."""
    try:
        yield runners
    finally:
        for runner in runners:
            runner.deactivate()
        free_cuda_cache()


def free_cuda_cache() -> None:
    """Give cached CUDA memory back (after a runner let go of its buffers)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_FLOATS = {"float": "float32", "double": "float64", "float16": "float16"}


def cast_input(value: np.ndarray, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> Any:
    """``value`` in the element type a backend declares: the one input cast of every runner.

    With a torch ``dtype`` or a ``device``: a torch tensor there (None keeps the type).
    Else ``dtype`` is a name, bare ("float16", "bfloat16") or as ONNX Runtime writes it
    ("tensor(float16)"), and the result a C-contiguous numpy array of that type;
    integer types and None leave the values as they are.
    """
    if device is not None or isinstance(dtype, torch.dtype):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(device=device or "cpu", dtype=dtype)  # type: ignore[arg-type]
    if dtype is None:
        return np.ascontiguousarray(value)
    name = dtype.removeprefix("tensor(").removesuffix(")")
    name = _FLOATS.get(name, name)
    if name == "bfloat16":
        import ml_dtypes

        return np.ascontiguousarray(value.astype(ml_dtypes.bfloat16))
    if name in _FLOATS.values():
        return np.ascontiguousarray(value.astype(name))
    return np.ascontiguousarray(value)  # other types (integers) pass through as given
