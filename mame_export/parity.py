"""Numerical parity of runners against a reference runner (eager PyTorch): run, then compare.

Each runner runs inside its life cycle (activate; infer every feed; deactivate, also on
an error), and what it gave is kept (:class:`RunResults`: named outputs per feed, and
the merge decisions behind them where the runner shows them). A separate step compares
each candidate's results with the reference's, matching outputs by name: an output
missing on either side fails the comparison, never silently dropped.

Fresh random inputs every run, several batches; per-precision tolerances: fp32 by max
abs / rel diff; fp16 and bf16 by cosine similarity and top-1 agreement of the outputs,
plus a loose max abs diff. A runner that cannot run here is reported as skipped, never
as passed.
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
from mame_export.runners.decisions import per_sample_differences
from mame_export.runners.results import RunResults, run_runner

# Where genuine selection flips come from (near-ties within rounding), they are rare:
# none in 2000 samples of vit_t (64 px, r = 0.5) through ONNX Runtime, one seen on vit_b.
# A systematic error (a wrong constant) moves most samples; so at most this fraction of
# the samples compared (and at least one) may pass as flips.
MAX_FLIP_FRACTION = 0.05


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    max_rel: float | None = None  # elementwise |a-b| <= max_abs + max_rel * |ref|
    min_cosine: float | None = None
    min_top1: float | None = None
    # Merged models choose tokens by data: where two candidates are within rounding of
    # each other, the graph and eager PyTorch can merge different ones. A sample off the
    # element bound still passes if its merge decisions differ from the reference's
    # (mame_export.runners.decisions), its relative L2 error ||out - ref|| / ||ref|| is at
    # most this, and its top-1 agrees (or is not decisive); it counts as a selection flip.
    flip_rel_l2: float | None = None
    # At most this fraction of the samples compared (and at least one) may be flips.
    max_flip_fraction: float | None = None
    # The outputs are class scores (2-D logits): top-1 agreement is measured. False for
    # dense outputs (features, noise predictions), where an argmax decides nothing.
    class_scores: bool = True

    def flip_limit(self, samples: int) -> int:
        """How many of ``samples`` compared samples may pass as selection flips."""
        if self.flip_rel_l2 is None:
            return 0
        fraction = MAX_FLIP_FRACTION if self.max_flip_fraction is None else self.max_flip_fraction
        return max(1, int(samples * fraction))

    def describe(self) -> str:
        parts = [f"max_abs<={self.max_abs:g}"]
        if self.max_rel is not None:
            parts.append(f"+ {self.max_rel:g}*|ref|")
        if self.min_cosine is not None:
            parts.append(f"cosine>={self.min_cosine:g}")
        if self.min_top1 is not None:
            parts.append(f"top1>={self.min_top1:g} on decisive samples")
        if self.flip_rel_l2 is not None:
            fraction = (MAX_FLIP_FRACTION if self.max_flip_fraction is None
                        else self.max_flip_fraction)
            parts.append(f"or, as a selection flip (merge decisions that differ from the "
                         f"reference's), relative L2 error<={self.flip_rel_l2:g} and the same "
                         f"top-1, in at most {fraction:.0%} of the samples (at least 1)")
        return ", ".join(parts)


# Compared against fp32 eager PyTorch. fp32 bounds cover reassociation in
# matmuls and softmax across backends; reduced precision is judged by direction
# (cosine) and decisions (top-1), since absolute error grows with the logits.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, max_rel=1e-3),
    "fp16": Tolerance(max_abs=5e-2, max_rel=5e-2, min_cosine=0.999, min_top1=0.98),
    "bf16": Tolerance(max_abs=2e-1, max_rel=1e-1, min_cosine=0.995, min_top1=0.95),
    # QDQ graphs (mame_export.quant): per-tensor INT8 activations round each matmul input
    # to 1/127 of its calibrated range, so elements move more; direction and decisions
    # judge them, as for bf16, more loosely. fp8 (E4M3, 3 mantissa bits) more loosely still.
    "int8": Tolerance(max_abs=1.0, max_rel=0.5, min_cosine=0.98, min_top1=0.9),
    "fp8": Tolerance(max_abs=2.0, max_rel=1.0, min_cosine=0.95, min_top1=0.8),
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
        tol = replace(tol, flip_rel_l2=FLIP_REL_L2[precision],
                      max_flip_fraction=MAX_FLIP_FRACTION)
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
    samples: int = 0  # samples compared (over all batches)
    selection_flips: int = 0  # samples that passed only as selection flips
    flip_limit: int = 0  # how many of them may (Tolerance.flip_limit)

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
        counts = ("samples", "selection_flips", "flip_limit")
        results = [RunnerResult(r["runner"], r["status"], r["reason"],
                                [OutputStats(**{k: _nan_if_none(v) if k in floats else v
                                                for k, v in o.items()})
                                 for o in r["outputs"]],
                                **{k: r[k] for k in counts if k in r})
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
            note = (f" ({r.selection_flips} of {r.samples} sample(s) passed as selection "
                    "flips)" if r.selection_flips else "")
            if r.reason:
                note += f" ({r.reason})"
            lines.append(f"  {r.runner:<14} {r.status.upper()}: max_abs={worst.max_abs_diff:.3g} "
                         f"max_rel={worst.max_rel_diff:.3g} cosine={worst.cosine:.6f}{top1}{note}")
        if not self.compared:
            lines.append("  NOT COMPARED: no candidate runner could run here")
        return "\n".join(lines)


def compare_outputs(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance,
                    selection_differs: np.ndarray | None = None) -> OutputStats:
    """One output of one batch against the reference's. ``selection_differs``: per sample,
    whether the two runs' merge decisions differ; only such a sample may pass as a
    selection flip (None: none may)."""
    return _compare(name, ref, out, tol, selection_differs)[0]


def _compare(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance,
             selection_differs: np.ndarray | None) -> tuple[OutputStats, np.ndarray, np.ndarray]:
    """:func:`compare_outputs`, with two per-sample masks: the samples that passed as
    selection flips, and those that would have but made the reference's decisions."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    none = np.zeros(len(ref64) if ref64.ndim else 1, dtype=bool)
    if ref64.shape != out64.shape or not ref64.ndim or not len(ref64):
        return OutputStats(name, float("inf"), float("inf"), 0.0, None, False), none, none
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
    flips, flipped, unexcused = None, none, none
    if tol.flip_rel_l2 is not None:
        with np.errstate(invalid="ignore"):
            rel_l2 = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
        like_flip = ~within & (rel_l2 <= tol.flip_rel_l2) & (agree | ~decisive)
        differs = (selection_differs if selection_differs is not None
                   and selection_differs.shape == none.shape else none)
        flipped, unexcused = like_flip & differs, like_flip & ~differs
        flips = int(flipped.sum())
        within |= flipped
    ok = finite and bool(within.all())
    if tol.min_cosine is not None:
        ok &= cos >= tol.min_cosine
    if tol.min_top1 is not None and decisive_top1 is not None:
        ok &= decisive_top1 >= tol.min_top1
    stats = OutputStats(name, max_abs, max_rel, cos, top1, ok, decisive_top1, n_decisive, flips,
                        nonfinite)
    return stats, flipped, unexcused


# ---- compare: a candidate's results against the reference's, by output name --------------


def _samples(outputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(outputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def compare_runs(reference: RunResults, candidate: RunResults, tol: Tolerance) -> RunnerResult:
    """Each of ``candidate``'s outputs against the reference output of the same name."""
    if candidate.status != "ran":
        return RunnerResult(candidate.runner, candidate.status, candidate.reason)
    stats: list[OutputStats] = []
    missing: dict[str, None] = {}
    extra: dict[str, None] = {}
    samples = flips = 0
    unexcused: dict[str, int] = {}  # why samples that looked like flips were not: how many
    for k, (ref, out) in enumerate(zip(reference.outputs, candidate.outputs, strict=True)):
        missing.update(dict.fromkeys(n for n in ref if n not in out))
        extra.update(dict.fromkeys(n for n in out if n not in ref))
        n_samples = _samples(ref)
        samples += n_samples
        differs, why = _selection_differs(reference, candidate, k, n_samples)
        flipped = np.zeros(n_samples, dtype=bool)
        refused = np.zeros(n_samples, dtype=bool)
        for name in (n for n in ref if n in out):
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                s, f, u = _compare(name, ref[name], out[name], tol, differs)
            stats.append(s)
            if len(f) == n_samples:
                flipped, refused = flipped | f, refused | u
        flips += int(flipped.sum())
        if refused.any():
            unexcused[why] = unexcused.get(why, 0) + int(refused.sum())
    worst: dict[str, OutputStats] = {}
    for s in stats:
        if s.name not in worst or _worst_key(s) > _worst_key(worst[s.name]):
            worst[s.name] = s
    for name, w in worst.items():
        w.passed = all(s.passed for s in stats if s.name == name)
        if tol.flip_rel_l2 is not None:
            w.selection_flips = sum(s.selection_flips or 0 for s in stats if s.name == name)
    limit = tol.flip_limit(samples)
    reasons = _reasons(stats, list(missing), list(extra), unexcused)
    if flips > limit:
        reasons.append(f"{flips} of {samples} samples passed only as selection flips, more "
                       f"than the {limit} allowed: an error that moves most samples is no flip")
    passed = (all(s.passed for s in stats) and bool(stats) and not missing and not extra
              and flips <= limit)
    return RunnerResult(candidate.runner, "passed" if passed else "failed", "; ".join(reasons),
                        list(worst.values()), samples, flips, limit)


def _selection_differs(reference: RunResults, candidate: RunResults, k: int,
                       samples: int) -> tuple[np.ndarray | None, str]:
    """Per sample of feed ``k``, whether the two runs' merge decisions differ; or None and
    why they cannot be compared."""
    if not reference.decisions or not candidate.decisions:
        return None, "merge decisions were not recorded"
    ref, out = reference.decisions[k], candidate.decisions[k]
    if isinstance(ref, str) or isinstance(out, str):
        return None, f"the merge decisions are not known: {ref if isinstance(ref, str) else out}"
    differs = per_sample_differences(ref, out, samples)
    if isinstance(differs, str):
        return None, f"the merge decisions cannot be paired: {differs}"
    return differs, "they made the same merge decisions as the reference"


def _reasons(stats: list[OutputStats], missing: list[str], extra: list[str],
             unexcused: dict[str, int]) -> list[str]:
    out = []
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"extra {', '.join(extra)}"] if extra else [])
        out.append(f"the outputs do not match the reference's by name: {'; '.join(parts)}")
    where = {s.nonfinite for s in stats if s.nonfinite}
    if where & {"reference", "both"}:
        out.append("the eager reference gives NaN or infinite outputs (check the weights); "
                   "non-finite outputs never pass")
    elif where:
        out.append("the runner gives NaN or infinite outputs; non-finite outputs never pass")
    for why, n in unexcused.items():
        out.append(f"{n} sample(s) off the element bound are not selection flips: {why}")
    return out


def check_parity(
    reference: Runner,
    candidates: Sequence[Runner],
    make_feeds: Callable[[np.random.Generator], Mapping[str, np.ndarray]],
    precision: str = "fp32",
    batches: int = 3,
    seed: int | None = None,
    tolerance: Tolerance | None = None,
) -> ParityReport:
    """Compare each candidate with ``reference`` on ``batches`` fresh random input sets:
    every runner runs (:func:`run_runner`), then each is compared (:func:`compare_runs`)."""
    tol = tolerance or TOLERANCES[precision]
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    feeds = [dict(make_feeds(rng)) for _ in range(batches)]
    decisions = tol.flip_rel_l2 is not None  # only a flip needs them
    ref = run_runner(reference, feeds, decisions, reference=True)
    runs = [run_runner(c, feeds, decisions) for c in candidates]
    return ParityReport(reference.name, precision, tol, batches, seed,
                        [compare_runs(ref, run, tol) for run in runs])
