"""Profile a model of any family by its spec: build it, take its inputs and outputs
(``Family.io_spec``), its patch options and the variants that apply to it from its family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mame_export.errors import UserError
from mame_export.families import ModelSpec, build_model, get_family
from mame_export.profile.graphs import GraphVariant
from mame_export.profile.report import ProfileReport
from mame_export.profile.run import Log, check_graphs, profile, stderr_log
from mame_export.profile.variants import MergeSettings, family_variants


def check_variants(variants: Sequence[str], spec: ModelSpec) -> list[str]:
    """``variants`` if each applies to ``spec``'s family, else a one-line UserError."""
    able = family_variants(get_family(spec.family))
    bad = [v for v in variants if v not in able]
    if bad:
        raise UserError(f"--variants {','.join(bad)} does not apply to {spec.alias} (a "
                        f"{spec.family} model); its variants: {', '.join(able)}")
    if not variants:
        raise UserError(f"--variants is empty; choose from {', '.join(able)}")
    return list(dict.fromkeys(variants))


def profile_model(
    spec: ModelSpec,
    *,
    rs: Sequence[float],
    weights: str = "random",
    img_size: int | None = None,
    variants: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    tau: float | None = None,
    layers: list[int] | None = None,
    prop_attn: bool = True,
    backends: Sequence[str] = ("torch", "onnxrt"),
    graphs: Sequence[GraphVariant] = (),
    log: Log = stderr_log,
    **options: Any,
) -> ProfileReport:
    """Build ``spec``'s model (seeded random weights by default) and :func:`profile` it.

    ``variants``: default every variant that applies to the family (the baseline, MaMe,
    ToMe for timm ViTs, ToMe-SD for the UNet); ``batches``: default the spec's
    ``default_batch`` (2 for the UNet). MaMe is applied with ``tau``, ``layers``,
    ``prop_attn`` and the family's patch options; ``graphs`` are checked against the
    model's inputs before it is built where the family has a skeleton. ``options`` go to
    :func:`profile` (device, precision, threads, settings, workdir, seed, command).
    """
    family = get_family(spec.family)
    variants = check_variants(family_variants(family) if variants is None else variants, spec)
    batches = [spec.default_batch] if batches is None else batches
    skeleton = family.skeleton(spec, img_size) if graphs else None
    if skeleton is not None:  # a graph that does not fit is refused before the build
        check_graphs(graphs, family.io_spec(spec, skeleton, img_size), batches, backends,
                     spec.alias)
    torch.manual_seed(0)  # the same random weights in every run
    model, source = build_model(spec, weights, img_size)
    family.check(model, spec.alias, img_size, export=False)
    log(f"profiling {spec.alias} ({spec.source_name}, weights: {source})")
    merge = MergeSettings(tau, layers, prop_attn, family.patch_options(spec, img_size))
    return profile(model, model_name=spec.alias, rs=rs, io=family.io_spec(spec, model, img_size),
                   merge=merge, variants=variants, batches=batches, backends=backends,
                   graphs=graphs, log=log, **options)
