"""Profile a model of any family by its spec: build it, take its inputs and outputs
(``Family.io_spec``), its patch options and the variants that apply to it from its family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mame_export.errors import UserError
from mame_export.families import ModelSpec, get_family
from mame_export.profile.checks import check_graphs
from mame_export.profile.graphs import GraphVariant
from mame_export.profile.report import ProfileReport
from mame_export.profile.run import Log, profile, stderr_log
from mame_export.profile.variants import MergeSettings, family_variants
from mame_export.request import Job, build
from mame_export.settings import QUANTIZED_PRECISIONS


def check_variants(variants: Sequence[str], spec: ModelSpec, plan: bool = False,
                   graphs_only: bool = False) -> list[str]:
    """``variants`` if each applies to ``spec``'s family, else a one-line UserError;
    ``plan``: a plan file was given, so "mame-plan" applies (and is added);
    ``graphs_only``: no variant at all (given graphs are timed alone)."""
    if graphs_only:
        if variants or plan:
            raise UserError("--variants none times the given graphs only; it takes no other "
                            "variant and no --plan")
        return []
    able = family_variants(get_family(spec.family)) + (("mame-plan",) if plan else ())
    variants = [*variants, *(["mame-plan"] if plan and "mame-plan" not in variants else [])]
    bad = [v for v in variants if v not in able]
    if bad:
        raise UserError(f"--variants {','.join(bad)} does not apply to {spec.alias} (a "
                        f"{spec.family} model); its variants: {', '.join(able)}")
    if not variants:
        raise UserError(f"--variants is empty; choose from {', '.join(able)}")
    return list(dict.fromkeys(variants))


def profile_model(
    job: Job,
    *,
    variants: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    backends: Sequence[str] = ("torch", "onnxrt"),
    graphs: Sequence[GraphVariant] = (),
    log: Log = stderr_log,
    graphs_only: bool = False,
    **options: Any,
) -> ProfileReport:
    """Build the resolved job's model (seeded random weights unless the job names others)
    and :func:`profile` it at each of the job's rs.

    ``variants``: default every variant that applies to the family (the baseline, MaMe,
    ToMe for timm ViTs, ToMe-SD for the UNet); ``batches``: default the job's batch (the
    spec's ``default_batch``: 2 for the UNet). MaMe is applied with the job's settings;
    ``graphs`` are checked against the model's inputs before it is built where the family
    has a skeleton. ``options`` go to :func:`profile` (device, settings, workdir, seed,
    command, one_session); precision and threads are the job's.

    ``graphs_only``: time the ``graphs`` alone (``variants`` empty); the model is not built
    where the family has a weightless skeleton to take the inputs from (a denoiser's weights
    are gigabytes), and speed-ups are over the first graph.
    """
    family, spec, img_size = job.family, job.spec, job.img_size
    if graphs_only and not graphs:
        raise UserError("--variants none times given graphs only: add --graph NAME=PATH")
    variants = check_variants(family_variants(family) if variants is None else variants, spec,
                              plan=job.plan_file is not None, graphs_only=graphs_only)
    batches = [job.batch] if batches is None else batches
    skeleton = family.skeleton(spec, img_size) if graphs else None
    if skeleton is not None:  # a graph that does not fit is refused before the build
        io = family.io_spec(spec, skeleton, img_size)
        check_graphs(graphs, io, batches, backends, spec.alias)
        if graphs_only:
            log(f"profiling {len(graphs)} graph(s) of {spec.alias} (the model is not built)")
            report = profile(None, model_name=spec.alias, rs=[], io=io, variants=[],
                             batches=batches, backends=backends, graphs=graphs, log=log,
                             precision=job.precision, threads=job.threads, **options)
            report.settings["weights"] = "the graphs' own"
            return report
    torch.manual_seed(0)  # the same random weights in every run
    built = build(job, log=lambda _m: None, patch=False)
    job, model = built.job, built.model
    assert job.io is not None
    log(f"profiling {spec.alias} ({spec.source_name}, weights: {built.source})")
    layers = None if job.layers is None else list(job.layers)
    plan = job.plan_variant_settings() if job.plan_file is not None else None
    merge = MergeSettings(job.tau, layers, job.prop_attn, family.patch_options(spec, img_size),
                          plan=plan,
                          plan_r=job.plan_file.r if job.plan_file is not None else 0.0)
    quantization = None
    if job.precision in QUANTIZED_PRECISIONS:
        from mame_export.quant.calib import calibration_feeds
        from mame_export.quant.graphs import Quantization

        feeds = calibration_feeds(family, spec, model, job.io, img_size, 1, job.calib)
        where = (f"{len(feeds.feeds)} image(s) from {job.calib}" if job.calib is not None
                 else f"{len(feeds.feeds)} random input set(s)")
        quantization = Quantization(job.precision, job.calib_method, feeds, where,
                                    job.quant_keep)
    report = profile(model, model_name=spec.alias, rs=job.rs, io=job.io, merge=merge,
                     variants=variants, batches=batches, backends=backends, graphs=graphs,
                     log=log, precision=job.precision, threads=job.threads,
                     quantization=quantization, **options)
    report.settings["weights"] = built.source
    return report
