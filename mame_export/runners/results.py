"""Run each runner inside its life cycle and keep what it gave, for a later comparison.

:func:`run_runner` activates a runner, infers every feed (and, when asked, reads the merge
decisions behind each result, :mod:`mame_export.runners.decisions`), and deactivates it,
also on an error; the results are data (:class:`RunResults`), compared afterwards by
:mod:`mame_export.parity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mame_export.runners.base import Runner


@dataclass
class RunResults:
    """What one runner gave for every feed, kept for the comparison step."""

    runner: str
    status: str  # "ran" | "skipped" | "error"
    reason: str = ""
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    # Per feed: the merge decisions behind its outputs, or one line saying why they are
    # not known (empty when decisions were not asked for).
    decisions: list[list[np.ndarray] | str] = field(default_factory=list)


def run_runner(runner: Runner, feeds: Sequence[Mapping[str, np.ndarray]],
               decisions: bool = False, reference: bool = False) -> RunResults:
    """Activate ``runner``, infer every feed (with its merge decisions if ``decisions``),
    deactivate it (also on an error). A candidate's error is its result; the
    ``reference``'s is raised, as nothing can be compared without it."""
    ok, reason = runner.availability()
    if not ok:
        if reference:
            raise RuntimeError(f"the reference {runner.name} cannot run here: {reason}")
        return RunResults(runner.name, "skipped", reason)
    try:
        runner.activate()
        outputs = [runner.infer(f) for f in feeds]
        shown = [_decisions(runner, f, o) for f, o in zip(feeds, outputs, strict=True)
                 ] if decisions else []
    except Exception as e:  # noqa: BLE001 - a runner that breaks is a failed comparison
        if reference:
            raise
        return RunResults(runner.name, "error", f"{type(e).__name__}: {e}"[:300])
    finally:
        runner.deactivate()
    return RunResults(runner.name, "ran", "", outputs, shown)


def _decisions(runner: Runner, feeds: Mapping[str, np.ndarray],
               outputs: dict[str, np.ndarray]) -> list[np.ndarray] | str:
    try:
        got = runner.infer_with_decisions(feeds)
    except Exception as e:  # noqa: BLE001 - the decisions are evidence; without them, no flip
        return f"{runner.name} failed to show them ({type(e).__name__}: {e})"[:200]
    if got is None:
        return f"{runner.name} does not show them"
    again, decisions = got
    same = again.keys() == outputs.keys() and all(
        np.array_equal(again[n], outputs[n], equal_nan=True) for n in outputs)
    if not same:
        return f"the {runner.name} run that showed them gave other outputs than the one checked"
    return decisions
