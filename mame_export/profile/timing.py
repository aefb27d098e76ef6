"""The shared interleaved timer: several runners' timed steps, in turns, with statistics.

Every latency figure of the project (``mame-export profile``, ``tools/``) comes from
:func:`measure_interleaved` over :class:`~mame_export.runners.TimedStep` objects,
which their runners prepare with their own synchronisation.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from mame_export.errors import UserError
from mame_export.families import IOSpec
from mame_export.runners.base import TimedStep

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class TimingSettings:
    """How long to measure one row.

    Timed iterations run until at least ``min_iters`` are done *and* ``budget_s``
    seconds have passed, or ``max_iters`` are done, whichever comes first.
    """

    warmup_iters: int = 5
    warmup_s: float = 1.0
    min_iters: int = 30
    max_iters: int = 5000
    budget_s: float = 10.0
    input_sets: int = 4

    def __post_init__(self) -> None:
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise UserError(f"need 1 <= min_iters <= max_iters; got {self.min_iters}, "
                            f"{self.max_iters}")
        if self.input_sets < 2:
            raise UserError("input_sets must be >= 2 (inputs are rotated)")
        if self.warmup_iters < 0 or not (0 <= self.budget_s < math.inf) \
                or not (0 <= self.warmup_s < math.inf):  # NaN fails both comparisons
            raise UserError("warm-up and budget must be finite and >= 0")


QUICK = TimingSettings(warmup_iters=2, warmup_s=0.0, min_iters=5, max_iters=20, budget_s=0.5,
                       input_sets=2)


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int


def summarize(samples_ms: Sequence[float] | np.ndarray) -> Stats:
    """Median, p90, p99 (linear interpolation between order statistics) and mean."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("need at least one finite sample")
    med, p90, p99 = np.percentile(a, [50, 90, 99])
    return Stats(float(med), float(p90), float(p99), float(a.mean()), int(a.size))


def throughput(batch: int, median_ms: float) -> float:
    """Images per second at the median latency."""
    return batch * 1000.0 / median_ms


def input_feeds(io: IOSpec, batch: int, n_sets: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n_sets`` different sets of the model's inputs at ``batch`` (its family's
    ``IOSpec.make_inputs``: float32, random, never zeros), by input name."""
    gen = torch.Generator().manual_seed(seed)
    return [dict(zip(io.input_names, (a.numpy() for a in io.make_inputs(batch, gen)),
                     strict=True)) for _ in range(n_sets)]


def _warm_up(step: TimedStep, settings: TimingSettings) -> None:
    """``warmup_iters`` calls, continued up to ``warmup_s`` (at most 10x the count)."""
    i, t_end = 0, time.perf_counter() + settings.warmup_s
    while i < settings.warmup_iters or (
        time.perf_counter() < t_end and i < 10 * max(settings.warmup_iters, 1)
    ):
        step.run(step.inputs[i % len(step.inputs)])
        i += 1
    step.wait()


def measure_interleaved(
    steps: Mapping[Key, TimedStep], settings: TimingSettings
) -> dict[Key, np.ndarray | Exception]:
    """Time several steps in turns; return per-step latencies in ms (or the error it raised).

    Each step is warmed up (a step that ``warms_itself`` is not: each of its calls loads and
    warms its runner, :class:`~mame_export.runners.ReloadingStep`), then the steps run
    round-robin, one call each per
    round, with the starting step rotating from round to round. A slow drift of
    a shared machine (another process, clock or thermal state) therefore lands
    on every step alike and their ratios stay fair, which timing them one after
    another does not give. Each step's inputs rotate through its own sets, and
    each call is timed by its step (CUDA events, or a wall clock up to its sync).
    Rounds go on until every step has ``min_iters`` samples and
    ``budget_s`` x (number of steps) seconds have passed, or ``max_iters``.
    A step that raises (e.g. out of memory) leaves the rotation with its error;
    the others go on.
    """
    out: dict[Key, np.ndarray | Exception] = {}
    active: dict[Key, TimedStep] = {}
    for key, step in steps.items():
        try:
            if not step.warms_itself:
                _warm_up(step, settings)
            active[key] = step
        except Exception as e:  # noqa: BLE001 - reported per step
            out[key] = e
    samples: dict[Key, list[float]] = {k: [] for k in active}
    budget = settings.budget_s * max(len(active), 1)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start_all, rnd = time.perf_counter(), 0
        while active:
            keys = list(active)
            shift = rnd % len(keys)
            for key in keys[shift:] + keys[:shift]:
                step, got = active[key], samples[key]
                try:
                    got.append(step.time_ms(step.inputs[len(got) % len(step.inputs)]))
                except Exception as e:  # noqa: BLE001 - reported per step
                    out[key] = e
                    del active[key]
            rnd += 1
            n = min((len(samples[k]) for k in active), default=0)
            if n >= settings.max_iters or (
                n >= settings.min_iters and time.perf_counter() - start_all >= budget
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for key in active:
        out[key] = np.asarray(samples[key])
    return {k: out[k] for k in steps}
