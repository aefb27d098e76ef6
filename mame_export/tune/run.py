"""One ``tune`` run: read the calibration images, cache the unmerged model's outputs on
them, search a schedule per MACs budget (:mod:`.search`) and write each as a plan file.

The score of a schedule is its fidelity to the unmerged model on the calibration images:
the mean feature cosine (the pre-logit features of a classifier, the outputs of an
encoder: what ``eval`` reports as feature cosine), or for classifiers the agreement of
the top-1 with the unmerged model's. The unmerged outputs are computed once; each
candidate costs one merged forward over the images. A plan file is written whole, at
the end of its budget's search (Ctrl-C leaves none half-written).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import mame_export
from mame_export import settings
from mame_export.errors import UserError
from mame_export.evaluate import data as eval_data
from mame_export.evaluate.images import readout
from mame_export.evaluate.metrics import cosines
from mame_export.evaluate.variants import Variant, copy_of, run_once
from mame_export.families import IOSpec
from mame_export.patch import apply
from mame_export.planfile import PlanFile, weights_sha256
from mame_export.request import Job, build
from mame_export.tune.search import BudgetUnreachable, Search, keep_of

Log = Callable[[str], None]
DEFAULT_CANDIDATES = settings.DEFAULT_TUNE_CANDIDATES
DEFAULT_PLANS_DIR = Path("plans")


@dataclass(frozen=True)
class TuneSettings:
    """What only tune asks for (the model and its input size are the job's)."""

    data: Path
    targets: tuple[float, ...]
    metric: str = "feature-cosine"
    max_candidates: int = DEFAULT_CANDIDATES
    similarities: tuple[str, ...] = settings.SIMILARITIES
    limit: int | None = None
    seed: int = 0
    out: Path | None = None  # a file (one target) or a folder; None: plans/


def check_tunable(job: Job) -> None:
    """One line for a model whose family has no token schedule to search (a denoiser's
    MaMe + MaRe merges by its own plan) or a metric its outputs cannot give."""
    if not job.family.patcher.schedules:
        raise UserError(f"tune searches the token schedule of ViT-style encoders and "
                        f"classifiers; {job.spec.alias} is a {job.spec.family} model, which "
                        "merges by its own plan (mame-export plan shows it)")
    if job.mode != "static":
        raise UserError("tune searches static schedules: drop --mode adaptive")


def plan_paths(s: TuneSettings, job: Job) -> list[Path]:
    """Where each budget's plan goes: ``--out FILE`` for one budget, else one file per
    budget in ``--out DIR`` (default plans/)."""
    size = job.img_size or job.spec.img_size
    names = [f"{job.spec.alias}_{size}_macs{t:g}.json" for t in s.targets]
    if s.out is not None and s.out.suffix == ".json":
        if len(s.targets) > 1:
            raise UserError(f"--out {s.out} is one file, but --target-macs gives "
                            f"{len(s.targets)} budgets: give a folder")
        return [s.out]
    folder = s.out if s.out is not None else DEFAULT_PLANS_DIR
    return [folder / n for n in names]


class Scorer:
    """Scores schedules against the unmerged model's cached outputs."""

    def __init__(self, model: nn.Module, io: IOSpec, batches: Sequence[torch.Tensor],
                 metric: str, options: dict[str, Any]) -> None:
        self.io, self.batches, self.metric, self.options = io, list(batches), metric, options
        self.work = copy_of(model)  # re-patched for every candidate (apply replaces)
        ref = Variant("unmerged", "unmerged", 0.0, model)
        self.reference = [self._read(ref, x) for x in self.batches]
        if metric == "top1-agreement" and not io.class_scores:
            raise UserError("--metric top1-agreement needs a classifier (class scores); "
                            "this model is an encoder: use feature-cosine")
        if metric == "feature-cosine" and any(f is None for _, f in self.reference):
            raise UserError("this model gives no features to compare (feature-cosine); use "
                            "--metric top1-agreement")

    def _read(self, variant: Variant, x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return readout(*run_once(variant, self.io, (x,), "the calibration images"), self.io)

    def __call__(self, keep: Sequence[int | None], similarity: str) -> list[float]:
        """The metric on each calibration image (feature cosine, or 1.0 / 0.0 for a top-1
        that agrees with the unmerged model's or not)."""
        model = apply(self.work, 0.0, schedule=list(keep), similarity=similarity,
                      **self.options)
        variant = Variant("candidate", "mame", None, model)
        out_scores: list[float] = []
        for x, (ref_out, ref_feat) in zip(self.batches, self.reference, strict=True):
            out, feat = self._read(variant, x)
            if self.metric == "top1-agreement":
                out_scores += (out.argmax(1) == ref_out.argmax(1)).double().tolist()
            else:
                assert feat is not None and ref_feat is not None
                out_scores += cosines(feat, ref_feat).tolist()
        return out_scores


def find_calibration(job: Job, s: TuneSettings, model: nn.Module | None) -> Any:
    """The calibration images (or clips) in ``s.data``, found before any build where the
    family has a weightless skeleton; a UNet's latents are not calibration data."""
    from mame_export.evaluate.run import EvalSettings, find_data, inputs_of

    inputs = inputs_of(job.family, job.spec, model, job.img_size)
    if inputs.kind == "latents":  # pragma: no cover - such families have no schedules
        raise UserError(f"{job.spec.alias} takes latents: tune needs a model of images")
    return find_data(inputs, EvalSettings(data=s.data, limit=s.limit), job.spec)


def load_calibration(job: Job, model: nn.Module, items: Any, batch: int,
                     log: Log) -> list[torch.Tensor]:
    """The calibration images, preprocessed the family's way, held in memory (each
    candidate runs over all of them)."""
    prep = job.family.eval_preprocessing(job.spec, model, job.img_size)
    transform = eval_data.transform_from(**prep)
    log(f"reading {len(items.paths)} calibration {items.kind}")
    return list(eval_data.load_batches(items, transform, batch))


def run_tune(job: Job, s: TuneSettings, log: Log, batch: int = 16) -> dict[str, Any]:
    """Search a plan per budget of ``s.targets`` and write each (see the module docstring);
    returns the report: per budget the default and the chosen schedule, their scores, and
    the file written."""
    check_tunable(job)
    paths = plan_paths(s, job)
    started = time.perf_counter()
    skeleton = job.family.skeleton(job.spec, job.img_size)
    items = find_calibration(job, s, skeleton) if skeleton is not None else None
    built = build(job, log, patch=False)
    job, model, source = built.job, built.model, built.source
    assert job.io is not None
    if items is None:
        items = find_calibration(job, s, model)
    batches = load_calibration(job, model, items, batch, log)
    images = sum(len(x) for x in batches)
    options = job.family.patch_options(job.spec, job.img_size)
    log(f"unmerged {s.metric} reference on {images} calibration images")
    scorer = Scorer(model, job.io, batches, s.metric, options)
    patcher = job.family.patcher
    skeleton = skeleton or copy_of(model)
    num_patches = patcher.num_patches(skeleton)
    depth = len(patcher.block_tokens(skeleton))
    digest = weights_sha256(model)
    size = job.img_size or job.spec.img_size

    def macs(keep: Sequence[int | None], similarity: str) -> float:
        return patcher.build_plan(skeleton, 0.0, schedule=list(keep), similarity=similarity,
                                  **options).flops_ratio

    results = []
    for target, path in zip(s.targets, paths, strict=True):
        log(f"searching a plan at MACs ratio {target:g} ({s.max_candidates} candidates at most)")
        t0 = time.perf_counter()
        search = Search(num_patches, depth, target, macs, scorer, s.max_candidates, s.seed,
                        s.similarities, default_end=len(patcher.default_layers(depth)), log=log,
                        groups=items.labels)
        try:
            result = search.run()
        except BudgetUnreachable as e:
            raise UserError(str(e)) from None
        best = result.best
        keep = keep_of(best.counts, num_patches)
        plan = PlanFile(
            model=job.model, source_name=job.spec.source_name, family=job.spec.family,
            weights=source, weights_sha256=digest, img_size=int(size), num_patches=num_patches,
            depth=depth, target_macs=float(target), macs_ratio=best.macs_ratio,
            metric=s.metric, score=best.score, keep_counts=keep, similarity=best.similarity,
            prop_attn=True, tau=1.0,
            search={"calibration": {"data": str(s.data), "images": images, "kind": items.kind,
                                    "groups": len(set(items.labels)) if items.labels else None},
                    "seed": s.seed, "max_candidates": s.max_candidates,
                    "similarities": list(s.similarities), "seconds": round(
                        time.perf_counter() - t0, 1),
                    "default": result.default.record(num_patches) if result.default else None,
                    "candidates": [c.record(num_patches) for c in result.candidates]},
            tool_version=mame_export.__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        plan.write(path)
        table = patcher.build_plan(skeleton, 0.0, schedule=list(keep),
                                   similarity=best.similarity, **options).table()
        log(f"wrote {path}: {s.metric} {best.score:.5f} at MACs {best.macs_ratio:.3f}" + (
            f" (MaMe's default plan: {result.default.score:.5f} at "
            f"{result.default.macs_ratio:.3f})" if result.default else ""))
        results.append({
            "target_macs": target, "plan_file": str(path), "score": best.score,
            "macs_ratio": best.macs_ratio, "keep_counts": list(keep),
            "similarity": best.similarity, "candidates": len(result.candidates),
            "default_score": result.default.score if result.default else None,
            "default_macs_ratio": result.default.macs_ratio if result.default else None,
            "seconds": round(time.perf_counter() - t0, 1), "table": table})
    return {"model": job.spec.alias, "source": job.spec.source_name, "weights": source,
            "img_size": size, "metric": s.metric, "calibration_images": images,
            "plans": results, "seconds": round(time.perf_counter() - started, 1)}
