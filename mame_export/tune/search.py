"""The schedule search of ``mame-export tune``: which tokens each block keeps, and how tokens
are compared, for the best fidelity at or under a MACs budget.

Pure search over schedules: the caller gives ``macs(keep, similarity)`` (the plan's MACs
ratio, merge products counted: arithmetic, instant) and ``score(keep, similarity)`` (the
fidelity on each calibration image: a forward pass over them, the expensive part). Every
candidate sits at or under the budget; each is scored at most once.

Schedule shapes (a few knobs) are taken by their mean score. The similarity and the
per-block moves, which can fit the calibration images' noise, replace the best so far
only when better by more than that noise: their mean gain must exceed
:data:`SIGNIFICANCE_Z` standard errors of the gains, image by image, or group by group
when the images come in groups (class folders: e.g. augmented views of one photo, which
are not independent). Gains inside the noise are what the calibration images happen to
favour, and measured, they do not carry over to other images (docs/method.md).

A schedule is the mergeable tokens *leaving* each block (``counts``, non-increasing from
the patch count; a block whose count does not drop does not merge); the plan's keep
schedule follows from it. The search runs in three stages, each bounded:

1. **Shape.** Schedules of a family with four knobs: the first and last merging block,
   the profile (``geometric``: each block keeps the same fraction, MaMe's default;
   ``linear``: each block removes the same count, ToMe's) and a curve ``gamma`` (a block
   ``t`` of the way through the merge blocks has done ``t ** gamma`` of the removal:
   below 1 merges early, above 1 late). For each shape, the smallest removal that meets
   the budget is solved (the plan's MACs are monotone in it). It scores MaMe's default
   (the first 8 blocks, geometric, gamma 1) and ToMe's schedule (every block, linear),
   then moves one knob at a time towards the best mean score.
2. **Similarity.** The best shape with the other similarity (size-aware vs cosine).
3. **Per-block moves** (seeded): one block keeps ``delta`` more tokens, another fewer
   to pay for it, kept when it beats the best so far: what no curve can express.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Counts = tuple[int, ...]
Keep = tuple[int | None, ...]

GAMMAS = (0.5, 0.7, 1.0, 1.4, 2.0)
DEFAULT_GAMMA = 1.0
STARTS = (0, 1, 2, 3)
PROFILES = ("geometric", "linear")
SIGNIFICANCE_Z = 2.0  # standard errors a candidate's mean gain must exceed to be taken


def keep_of(counts: Sequence[int], num_patches: int) -> Keep:
    """Tokens leaving each block -> the plan's keep schedule (None: no merge)."""
    prev = [num_patches, *counts[:-1]]
    return tuple(c if c < p else None for c, p in zip(counts, prev, strict=True))


def shape_counts(num_patches: int, depth: int, start: int, end: int, gamma: float,
                 r: float, profile: str = "geometric") -> Counts:
    """Tokens leaving each block when blocks ``start..end-1`` merge away a fraction ``r``
    of the patches along the curve ``gamma``: the kept fraction is ``(1 - r) ** t``
    (geometric) or ``1 - r t`` (linear) at ``t = (block's place) ** gamma``; each count
    rounded from it, at least 1."""
    out, n = [], num_patches
    span = end - start
    for i in range(depth):
        if start <= i < end:
            t = ((i - start + 1) / span) ** gamma
            kept = (1.0 - r) ** t if profile == "geometric" else 1.0 - r * t
            n = max(1, min(n, round(num_patches * kept)))
        out.append(n)
    return tuple(out)


@dataclass(frozen=True)
class Shape:
    start: int
    end: int
    gamma: float
    profile: str = "geometric"

    def describe(self) -> str:
        return f"blocks {self.start}-{self.end - 1}, {self.profile}, gamma {self.gamma:g}"


@dataclass
class Candidate:
    counts: Counts
    similarity: str
    macs_ratio: float
    per_image: tuple[float, ...]
    stage: str
    how: str

    @property
    def score(self) -> float:
        return sum(self.per_image) / max(len(self.per_image), 1)

    def beats(self, other: Candidate, groups: Sequence[int] | None = None) -> bool:
        """Better than ``other`` by more than the images' noise (see the module
        docstring): the mean of the gains over SIGNIFICANCE_Z standard errors, the gains
        averaged per group first when ``groups`` (one id per image) are given."""
        gains = [a - b for a, b in zip(self.per_image, other.per_image, strict=True)]
        if groups is not None:
            by_group: dict[int, list[float]] = {}
            for g, gain in zip(groups, gains, strict=True):
                by_group.setdefault(g, []).append(gain)
            gains = [sum(v) / len(v) for v in by_group.values()]
        n = len(gains)
        mean = sum(gains) / n
        if n < 2:
            return mean > 0
        var = sum((g - mean) ** 2 for g in gains) / (n - 1)
        return mean > SIGNIFICANCE_Z * math.sqrt(var / n)

    def record(self, num_patches: int) -> dict[str, Any]:
        return {"keep_counts": list(keep_of(self.counts, num_patches)),
                "similarity": self.similarity, "macs_ratio": round(self.macs_ratio, 6),
                "score": self.score, "stage": self.stage, "how": self.how}


@dataclass
class SearchResult:
    best: Candidate
    default: Candidate | None  # MaMe's uniform default at this budget (None: out of reach)
    candidates: list[Candidate] = field(default_factory=list)


class BudgetUnreachable(ValueError):
    """No schedule of the searched family meets the MACs budget."""


class Search:
    """One search at one MACs budget (see the module docstring)."""

    def __init__(self, num_patches: int, depth: int, target: float,
                 macs: Callable[[Keep, str], float],
                 score: Callable[[Keep, str], Sequence[float]],
                 max_candidates: int, seed: int, similarities: Sequence[str],
                 default_end: int, log: Callable[[str], None],
                 groups: Sequence[int] | None = None) -> None:
        self.n, self.depth, self.target = num_patches, depth, target
        self._macs, self._score = macs, score
        self.max_candidates, self.seed = max_candidates, seed
        self.similarities = tuple(similarities)
        self.default_end = default_end
        self.log = log
        self.groups = groups  # one id per calibration image (its class folder), or None
        self.scored: dict[tuple[Counts, str], Candidate] = {}
        self.order: list[Candidate] = []
        self.incumbent: Candidate | None = None  # the best so far (see Candidate.beats)

    # ---- arithmetic -------------------------------------------------------------------

    def macs(self, counts: Counts, similarity: str) -> float:
        return self._macs(keep_of(counts, self.n), similarity)

    def fits(self, counts: Counts, similarity: str) -> bool:
        return self.macs(counts, similarity) <= self.target + 1e-12

    def solve_shape(self, shape: Shape, similarity: str) -> Counts | None:
        """The shape's schedule with the least removal that meets the budget (None: none
        does). Counts step with r, so the bisection ends on the first r that fits."""
        def at(r: float) -> Counts:
            return shape_counts(self.n, self.depth, shape.start, shape.end, shape.gamma, r,
                                shape.profile)

        top = 1.0 - 1.0 / self.n  # every merge block keeps the fewest it can
        if not self.fits(at(top), similarity):
            return None
        lo, hi = 0.0, top
        if self.fits(at(lo), similarity):
            return at(lo)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.fits(at(mid), similarity) else (mid, hi)
        return at(hi)

    # ---- scoring ----------------------------------------------------------------------

    @property
    def spent(self) -> int:
        return len(self.order)

    def left(self) -> int:
        return self.max_candidates - self.spent

    def evaluate(self, counts: Counts, similarity: str, stage: str, how: str) -> Candidate:
        key = (counts, similarity)
        if key in self.scored:
            return self.scored[key]
        per_image = tuple(float(v) for v in self._score(keep_of(counts, self.n), similarity))
        cand = Candidate(counts, similarity, self.macs(counts, similarity), per_image, stage,
                         how)
        self.scored[key] = cand
        self.order.append(cand)
        by_mean = stage in ("default", "shape")  # shapes: by their mean (module docstring)
        taken = self.incumbent is None or (
            cand.score > self.incumbent.score if by_mean else
            cand.beats(self.incumbent, self.groups))
        if taken:
            self.incumbent = cand
        self.log(f"  [{self.spent}/{self.max_candidates}] MACs {cand.macs_ratio:.3f}, "
                 f"{how}, {similarity}: {cand.score:.5f}"
                 + (" (taken)" if taken else f" (best {self.best().score:.5f})"))
        return cand

    def best(self) -> Candidate:
        assert self.incumbent is not None
        return self.incumbent

    # ---- the stages -------------------------------------------------------------------

    def run(self) -> SearchResult:
        sim0 = self.similarities[0]
        default_shape = Shape(0, self.default_end, DEFAULT_GAMMA)
        counts = self.solve_shape(default_shape, sim0)
        default = None
        if counts is not None:
            default = self.evaluate(counts, sim0, "default", "uniform " +
                                    default_shape.describe())
        shape = self._shape_stage(default_shape if counts is not None else None, sim0)
        if not self.order:
            raise BudgetUnreachable(
                f"MACs ratio {self.target:g} is out of reach for every schedule searched "
                "(merging in every block, down to one token): ask for more MACs")
        sim = self._similarity_stage(shape)
        self._move_stage(sim)
        return SearchResult(self.best(), default, list(self.order))

    def _try_shape(self, shape: Shape, similarity: str) -> Candidate | None:
        if self.left() <= 0:
            return None
        counts = self.solve_shape(shape, similarity)
        if counts is None:
            return None
        return self.evaluate(counts, similarity, "shape", shape.describe())

    def _shape_stage(self, start: Shape | None, similarity: str) -> Shape:
        ends = sorted({e for e in (self.depth // 3, self.depth // 2, (2 * self.depth) // 3,
                                   self.default_end, (5 * self.depth) // 6, self.depth)
                       if 2 <= e <= self.depth})
        best_shape = start or Shape(0, self.depth, DEFAULT_GAMMA)
        # The knobs move towards the best mean score, one at a time.
        anchor = max(self.order, key=lambda c: c.score).score if self.order else -math.inf
        # ToMe's own schedule (the same count in every block) is a strong prior: scored early
        prior = Shape(0, self.depth, DEFAULT_GAMMA, "linear")
        cand = self._try_shape(prior, similarity)
        if cand is not None and cand.score > anchor:
            best_shape, anchor = prior, cand.score
        for _round in range(2):
            improved = False
            for knob in ("profile", "end", "gamma", "start"):
                options: list[Shape] = []
                if knob == "profile":
                    options = [Shape(best_shape.start, best_shape.end, best_shape.gamma, p)
                               for p in PROFILES]
                elif knob == "end":
                    options = [Shape(best_shape.start, e, best_shape.gamma, best_shape.profile)
                               for e in ends if e > best_shape.start + 1]
                elif knob == "gamma":
                    options = [Shape(best_shape.start, best_shape.end, g, best_shape.profile)
                               for g in GAMMAS]
                else:
                    options = [Shape(s, best_shape.end, best_shape.gamma, best_shape.profile)
                               for s in STARTS if s < best_shape.end - 1]
                for shape in options:
                    cand = self._try_shape(shape, similarity)
                    if cand is not None and cand.score > anchor:
                        best_shape, anchor, improved = shape, cand.score, True
            if not improved:
                break
        return best_shape

    def _similarity_stage(self, shape: Shape) -> str:
        best = max(self.order, key=lambda c: c.score)  # the explored best, as the shapes
        for sim in self.similarities:
            if sim != best.similarity and self.left() > 0 and self.fits(best.counts, sim):
                self.evaluate(best.counts, sim, "similarity", "the best schedule so far")
        return self.best().similarity

    def _move_stage(self, similarity: str) -> None:
        """Seeded hill climbing on single blocks' counts, each move paid for elsewhere."""
        rng = random.Random(self.seed)
        step = max(1, self.n // 32)
        stale = 0
        while self.left() > 0 and stale < 4 * self.depth:
            best = self.best()
            counts = self._moved(best.counts, rng, step, best.similarity)
            if counts is None:
                stale += 1
                continue
            cand = self.evaluate(counts, best.similarity, "move", "one block +/- tokens")
            stale = 0 if self.incumbent is cand else stale + 1

    def _moved(self, counts: Counts, rng: random.Random, step: int,
               similarity: str) -> Counts | None:
        """``counts`` with block i keeping ``delta`` more tokens and block j fewer, so the
        budget holds; None when the move is impossible or already scored."""
        c = list(counts)
        i = rng.randrange(self.depth)
        delta = step * rng.choice((1, 2))
        upper = self.n if i == 0 else c[i - 1]
        if c[i] >= upper:
            return None
        c[i] = min(upper, c[i] + delta)
        others = [j for j in range(self.depth) if j != i]
        rng.shuffle(others)
        for j in others:
            trial = list(c)
            lower = trial[j + 1] if j + 1 < self.depth else 1
            while trial[j] > lower and not self.fits(tuple(trial), similarity):
                trial[j] = max(lower, trial[j] - step)
            if self.fits(tuple(trial), similarity):
                out = tuple(trial)
                return None if (out, similarity) in self.scored else out
        return None
