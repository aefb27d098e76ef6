"""One ``eval`` run: find the data, build the model, make the variants, score them.

The settings arrive checked (the CLI checks each against :mod:`mame_export.settings`,
and the model's structure and input size before this runs); what needs the model or
the data is checked here, data first where the model's structure alone says what
data it takes.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.evaluate import data as eval_data
from mame_export.evaluate.images import check_labels, evaluate_images
from mame_export.evaluate.unet import DEFAULT_LATENTS, evaluate_unet, latent_batches
from mame_export.evaluate.variants import build_variants, plan_variant
from mame_export.families import Family, IOSpec, ModelSpec
from mame_export.request import Job, build

Log = Callable[[str], None]
EVAL_TMP_PREFIX = "mame-eval-"  # quantized graphs of a run (pid-tagged, stale ones removed)


@dataclass(frozen=True)
class EvalSettings:
    """What only eval asks for (the model and merge settings are the job's)."""

    data: Path | None = None  # images, clips or latents; None: seeded latents (UNets only)
    tome: bool = True
    limit: int | None = None
    graph: Path | None = None


@dataclass(frozen=True)
class Inputs:
    """What the model takes: "images", "clips" (with their frame count) or "latents"."""

    kind: str
    frames: int = 0


def inputs_of(family: Family, spec: ModelSpec, model: nn.Module,
              img_size: int | None) -> Inputs:
    """From the family's eval preprocessing (None: latents) and its IO spec's input."""
    if family.eval_preprocessing(spec, model, img_size) is None:
        return Inputs("latents")
    example = family.io_spec(spec, model, img_size).make_inputs(
        1, torch.Generator().manual_seed(0))[0]
    return Inputs("clips", int(example.shape[2])) if example.dim() == 5 else Inputs("images")


def find_data(inputs: Inputs, s: EvalSettings, spec: ModelSpec) -> Any:
    """The images or clips (an ImageSet), latent files, or None for seeded latents."""
    if inputs.kind == "latents":
        return None if s.data is None else eval_data.find_latents(s.data, s.limit)
    if s.data is None:
        raise UserError(f"--data DIR is needed: {spec.alias} is evaluated on {inputs.kind} "
                        "(only a UNet runs without --data, on seeded random latents)")
    if inputs.kind == "clips":
        return eval_data.find_clips(s.data, inputs.frames, s.limit)
    return eval_data.find_images(s.data, s.limit)


def kind_of(io: IOSpec, inputs: Inputs) -> str:
    if inputs.kind == "latents":
        return "denoiser"
    return "classifier" if io.class_scores else "encoder"


def run_eval(job: Job, s: EvalSettings, log: Log) -> dict[str, Any]:
    """Evaluate the job's model (its family's eval preprocessing, IO spec and variants) at
    each of the job's rs (solved from its MACs targets): the report's rows, notes and what
    was run on; see :mod:`mame_export.evaluate`."""
    family, spec, img_size = job.family, job.spec, job.img_size
    skeleton = family.skeleton(spec, img_size)
    inputs = inputs_of(family, spec, skeleton, img_size) if skeleton is not None else None
    found = find_data(inputs, s, spec) if inputs is not None else None  # before any build
    if job.calib is not None:  # quantized rows: a bad --calib is refused before any build
        from mame_export.quant.calib import find_calib_images

        find_calib_images(job.calib, 1)
    if s.graph is not None and skeleton is not None:
        from mame_export.evaluate.deployed import check_graph

        check_graph(s.graph, spec, family.io_spec(spec, skeleton, img_size), img_size)
    built = build(job, log, patch=False)
    job, model, source = built.job, built.model, built.source
    if inputs is None:
        inputs = inputs_of(family, spec, model, img_size)
        found = find_data(inputs, s, spec)
    io = job.io
    assert io is not None
    prep = family.eval_preprocessing(spec, model, img_size)
    if inputs.kind != "latents":
        check_labels(found, model)
    count = (len(found.paths) if inputs.kind != "latents" else
             len(found) if found is not None else s.limit or DEFAULT_LATENTS)
    what = ("latent file(s)" if found is not None else "seeded random latents"
            ) if inputs.kind == "latents" else inputs.kind
    log(f"evaluating {spec.alias} ({spec.source_name}, weights: {source}) on {count} {what}"
        + (f" from {s.data}" if s.data is not None else ""))
    options = family.patch_options(spec, img_size)
    notes: list[str] = []
    layers = None if job.layers is None else list(job.layers)
    variants = build_variants(model, list(job.rs), tau=job.tau, layers=layers,
                              prop_attn=job.prop_attn, tome=s.tome, family=family,
                              patch_options=options, notes=notes)
    if job.plan_file is not None:
        variants.append(plan_variant(model, job.plan_file, job.plan_variant_settings()))
    if s.graph is not None:
        from mame_export.evaluate.deployed import graph_variant

        variants.append(graph_variant(s.graph, spec, io, model, img_size, job.threads, notes))
    with _quantized_dir(job) as work:
        if work is not None:
            from mame_export.evaluate.quantized import quantized_variants

            variants += quantized_variants(job, model, variants, Path(work), log, notes)
        return _score(job, s, variants, inputs, found, count, prep, source, notes, log)


def _quantized_dir(job: Job) -> contextlib.AbstractContextManager[str | None]:
    """A temporary folder for the quantized graphs (``--precision int8``), else None."""
    from mame_export.settings import QUANTIZED_PRECISIONS

    if job.precision not in QUANTIZED_PRECISIONS:
        return contextlib.nullcontext(None)
    from mame_export.artifacts import clean_stale_dirs, tmp_prefix

    clean_stale_dirs(Path(tempfile.gettempdir()), (EVAL_TMP_PREFIX,))
    return tempfile.TemporaryDirectory(prefix=tmp_prefix(EVAL_TMP_PREFIX))


def _score(job: Job, s: EvalSettings, variants: list[Any], inputs: Inputs, found: Any,
           count: int, prep: Any, source: str, notes: list[str], log: Log) -> dict[str, Any]:
    """Run every variant on the data and make the report."""
    io = job.io
    assert io is not None
    report: dict[str, Any] = {"kind": kind_of(io, inputs), "inputs": inputs.kind,
                              "weights": source, "precision": job.precision}
    if inputs.kind == "latents":
        latents = latent_batches(io, found, count, job.batch)
        res = evaluate_unet(variants, io, latents, found is None, log)
        rows, notes = res.rows, [*res.notes, *notes]
        report.update(images=res.latents, labelled=False, class_mapping=None, classes=0,
                      timesteps=res.timesteps)
    else:
        transform = eval_data.transform_from(**prep)
        rows, more = evaluate_images(variants, io, found, transform, job.batch, log)
        notes = [*more, *notes]
        labelled = found.labels is not None
        report.update(images=len(found.paths), labelled=labelled,
                      class_mapping=found.mapping if labelled else None,
                      classes=len(found.class_names), preprocessing=prep)
    if s.graph is not None:
        report["graph"] = str(s.graph)
    report.update(variants=rows, notes=notes)
    return report
