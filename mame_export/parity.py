"""Numerical parity of runners against a reference runner (eager PyTorch).

Fresh random inputs every run, several batches; per-precision tolerances:
fp32 by max abs / rel diff; fp16 and bf16 by cosine similarity and top-1
agreement of the outputs, plus a loose max abs diff. A runner that cannot run
here is reported as skipped, never as passed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from mame_export.jsonsafe import json_safe
from mame_export.runners import Runner


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    max_rel: float | None = None  # elementwise |a-b| <= max_abs + max_rel * |ref|
    min_cosine: float | None = None
    min_top1: float | None = None
    # Merged models choose tokens by data: where two candidates are within rounding of
    # each other, the graph and eager PyTorch can merge different ones. A sample off the
    # element bound still passes if its relative L2 error ||out - ref|| / ||ref|| is at
    # most this and its top-1 agrees (or is not decisive); it counts as a selection flip.
    flip_rel_l2: float | None = None
    # The outputs are class scores (2-D logits): top-1 agreement is measured. False for
    # dense outputs (features, noise predictions), where an argmax decides nothing.
    class_scores: bool = True

    def describe(self) -> str:
        parts = [f"max_abs<={self.max_abs:g}"]
        if self.max_rel is not None:
            parts.append(f"+ {self.max_rel:g}*|ref|")
        if self.min_cosine is not None:
            parts.append(f"cosine>={self.min_cosine:g}")
        if self.min_top1 is not None:
            parts.append(f"top1>={self.min_top1:g} on decisive samples")
        if self.flip_rel_l2 is not None:
            parts.append(f"or, as a selection flip, relative L2 error<={self.flip_rel_l2:g} "
                         "and the same top-1")
        return ", ".join(parts)


# Compared against fp32 eager PyTorch. fp32 bounds cover reassociation in
# matmuls and softmax across backends; reduced precision is judged by direction
# (cosine) and decisions (top-1), since absolute error grows with the logits.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, max_rel=1e-3),
    "fp16": Tolerance(max_abs=5e-2, max_rel=5e-2, min_cosine=0.999, min_top1=0.98),
    "bf16": Tolerance(max_abs=2e-1, max_rel=1e-1, min_cosine=0.995, min_top1=0.95),
}
# The fp32 allowance for selection flips in merged models (see Tolerance.flip_rel_l2);
# fp16 and bf16 already judge by cosine and decisive top-1.
FLIP_REL_L2 = {"fp32": 1e-2}


def tolerance_for(precision: str, merged: bool, class_scores: bool = True) -> Tolerance:
    """The tolerance of a graph at ``precision``; ``merged``: its model selects tokens by
    data (any MaMe plan that merges), so selection flips are allowed for;
    ``class_scores``: its outputs are logits, so top-1 agreement counts (else it is not
    measured, and reduced precision is judged by cosine and the element bound)."""
    tol = TOLERANCES[precision]
    if merged and precision in FLIP_REL_L2:
        tol = replace(tol, flip_rel_l2=FLIP_REL_L2[precision])
    if not class_scores:
        tol = replace(tol, min_top1=None, class_scores=False)
    return tol


@dataclass
class OutputStats:
    name: str
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    top1_agreement: float | None
    passed: bool
    # Agreement over the samples whose reference top-1 margin is more than twice the
    # element tolerance: a flip inside the tolerance band is not a disagreement.
    top1_decisive: float | None = None
    decisive_samples: int | None = None
    selection_flips: int | None = None  # samples that passed only as a selection flip
    # Where NaN or infinity turned up: "reference", "output" or "both"; such a
    # comparison fails whatever its other numbers say.
    nonfinite: str | None = None


def _nan_if_none(v: Any) -> Any:
    return float("nan") if v is None else v


def _worst_key(o: OutputStats) -> float:
    return o.max_abs_diff if math.isfinite(o.max_abs_diff) else math.inf


@dataclass
class RunnerResult:
    runner: str
    status: str  # "passed" | "failed" | "skipped" | "error"
    reason: str = ""
    outputs: list[OutputStats] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float | None:
        vals = [o.max_abs_diff for o in self.outputs]
        if any(not math.isfinite(v) for v in vals):
            return float("nan")
        return max(vals, default=None)


@dataclass
class ParityReport:
    reference: str
    precision: str
    tolerance: Tolerance
    batches: int
    seed: int
    results: list[RunnerResult]

    @property
    def compared(self) -> list[RunnerResult]:
        return [r for r in self.results if r.status in ("passed", "failed", "error")]

    @property
    def passed(self) -> bool:
        """True only if at least one runner was compared and every compared one passed."""
        return bool(self.compared) and all(r.status == "passed" for r in self.compared)

    @property
    def max_abs_diff(self) -> float | None:
        vals = [r.max_abs_diff for r in self.compared if r.max_abs_diff is not None]
        if any(not math.isfinite(v) for v in vals):
            return float("nan")  # written as null: no finite number describes it
        return max(vals) if vals else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParityReport:
        """The inverse of :meth:`to_dict` (e.g. for a report read from a graph's sidecar)."""
        tol = Tolerance(**{k: v for k, v in d["tolerance"].items() if k != "text"})
        floats = ("max_abs_diff", "max_rel_diff", "cosine")
        results = [RunnerResult(r["runner"], r["status"], r["reason"],
                                [OutputStats(**{k: _nan_if_none(v) if k in floats else v
                                                for k, v in o.items()})
                                 for o in r["outputs"]])
                   for r in d["runners"]]
        return cls(d["reference"], d["precision"], tol, d["batches"], d["seed"], results)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN and infinite numbers are written as None (null)."""
        return json_safe({
            "reference": self.reference,
            "precision": self.precision,
            "tolerance": asdict(self.tolerance) | {"text": self.tolerance.describe()},
            "batches": self.batches,
            "seed": self.seed,
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "runners": [asdict(r) for r in self.results],
        })

    def summary(self) -> str:
        lines = [f"parity vs {self.reference} ({self.precision}, {self.tolerance.describe()}, "
                 f"{self.batches} fresh random batches, seed {self.seed}):"]
        for r in self.results:
            if r.status in ("skipped", "error"):
                lines.append(f"  {r.runner:<14} {r.status.upper()}: {r.reason}")
                continue
            if not r.outputs:
                lines.append(f"  {r.runner:<14} {r.status.upper()}: {r.reason or 'no outputs'}")
                continue
            worst = max(r.outputs, key=_worst_key)
            top1 = "" if worst.top1_agreement is None else f" top1={worst.top1_agreement:.3f}"
            if worst.decisive_samples is not None and self.tolerance.min_top1 is not None:
                top1 += (f" (decisive {worst.top1_decisive:.3f} of {worst.decisive_samples})"
                         if worst.decisive_samples else " (no decisive sample)")
            flips = sum(o.selection_flips or 0 for o in r.outputs)
            note = f" ({flips} sample(s) passed as selection flips)" if flips else ""
            if r.reason:
                note += f" ({r.reason})"
            lines.append(f"  {r.runner:<14} {r.status.upper()}: max_abs={worst.max_abs_diff:.3g} "
                         f"max_rel={worst.max_rel_diff:.3g} cosine={worst.cosine:.6f}{top1}{note}")
        if not self.compared:
            lines.append("  NOT COMPARED: no candidate runner could run here")
        return "\n".join(lines)


def compare_outputs(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> OutputStats:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    if ref64.shape != out64.shape or not len(ref64):
        return OutputStats(name, float("inf"), float("inf"), 0.0, None, False)
    diff = np.abs(ref64 - out64)
    ref_finite, out_finite = bool(np.isfinite(ref64).all()), bool(np.isfinite(out64).all())
    finite = ref_finite and out_finite
    nonfinite = None if finite else ("both" if not (ref_finite or out_finite)
                                     else "reference" if not ref_finite else "output")
    with np.errstate(invalid="ignore", over="ignore"):
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / (np.abs(ref64) + 1e-6)).max()) if diff.size else 0.0
        if not finite:  # NaN compares false and would hide in max(): say it plainly
            max_abs = max_rel = float("nan")
        a, b = ref64.reshape(len(ref64), -1), out64.reshape(len(out64), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos_each = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
    cos = float(np.min(cos_each)) if finite else float("nan")
    bound = tol.max_abs + (tol.max_rel * np.abs(ref64) if tol.max_rel is not None else 0.0)
    within = (diff <= bound).reshape(len(ref64), -1).all(axis=1)  # per sample
    top1 = decisive_top1 = n_decisive = None
    agree = decisive = np.ones(len(ref64), dtype=bool)
    if tol.class_scores and ref64.ndim == 2 and ref64.shape[1] > 1:
        agree = ref64.argmax(1) == out64.argmax(1)
        top1 = float(agree.mean())
        top2 = np.sort(ref64, axis=1)[:, -2:]
        band = tol.max_abs + (tol.max_rel * np.abs(top2).max(1) if tol.max_rel is not None
                              else 0.0)
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * band
        n_decisive = int(decisive.sum())
        decisive_top1 = float(agree[decisive].mean()) if n_decisive else None
    flips = None
    if tol.flip_rel_l2 is not None:
        rel_l2 = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
        flipped = ~within & (rel_l2 <= tol.flip_rel_l2) & (agree | ~decisive)
        flips = int(flipped.sum())
        within |= flipped
    ok = finite and bool(within.all())
    if tol.min_cosine is not None:
        ok &= cos >= tol.min_cosine
    if tol.min_top1 is not None and decisive_top1 is not None:
        ok &= decisive_top1 >= tol.min_top1
    return OutputStats(name, max_abs, max_rel, cos, top1, ok, decisive_top1, n_decisive, flips,
                       nonfinite)


def check_parity(
    reference: Runner,
    candidates: Sequence[Runner],
    make_feeds: Callable[[np.random.Generator], Mapping[str, np.ndarray]],
    precision: str = "fp32",
    batches: int = 3,
    seed: int | None = None,
    tolerance: Tolerance | None = None,
) -> ParityReport:
    """Compare each candidate with ``reference`` on ``batches`` fresh random input sets."""
    tol = tolerance or TOLERANCES[precision]
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    feeds = [dict(make_feeds(rng)) for _ in range(batches)]
    reference.activate()
    refs = [reference.infer(f) for f in feeds]
    results = []
    for cand in candidates:
        ok, reason = cand.availability()
        if not ok:
            results.append(RunnerResult(cand.name, "skipped", reason))
            continue
        try:
            cand.activate()
            outs = [cand.infer(f) for f in feeds]
        except Exception as e:  # noqa: BLE001 - a runner that breaks is a failed comparison
            results.append(RunnerResult(cand.name, "error", f"{type(e).__name__}: {e}"[:300]))
            continue
        stats = []
        for ref, out in zip(refs, outs, strict=False):
            for (name, r), o in zip(ref.items(), out.values(), strict=False):
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    stats.append(compare_outputs(name, r, o, tol))
        worst: dict[str, OutputStats] = {}
        for s in stats:
            if s.name not in worst or _worst_key(s) > _worst_key(worst[s.name]):
                worst[s.name] = s
        for name, w in worst.items():
            w.passed = all(s.passed for s in stats if s.name == name)
            if tol.flip_rel_l2 is not None:
                w.selection_flips = sum(s.selection_flips or 0 for s in stats if s.name == name)
        passed = all(s.passed for s in stats)
        where = {s.nonfinite for s in stats if s.nonfinite}
        reason = ""
        if where & {"reference", "both"}:
            reason = ("the eager reference gives NaN or infinite outputs (check the weights); "
                      "non-finite outputs never pass")
        elif where:
            reason = "the runner gives NaN or infinite outputs; non-finite outputs never pass"
        results.append(RunnerResult(cand.name, "passed" if passed else "failed", reason,
                                    list(worst.values())))
    return ParityReport(reference.name, precision, tol, batches, seed, results)
