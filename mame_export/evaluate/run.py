"""One ``eval`` run: find the data, build the model, make the variants, score them.

The settings arrive checked (the CLI checks each against :mod:`mame_export.settings`,
and the model's structure and input size before this runs); what needs the model or
the data is checked here, data first where the model's structure alone says what
data it takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.evaluate import data as eval_data
from mame_export.evaluate.images import check_labels, evaluate_images
from mame_export.evaluate.unet import DEFAULT_LATENTS, evaluate_unet, latent_batches
from mame_export.evaluate.variants import build_variants, copy_of
from mame_export.families import Family, IOSpec, ModelSpec, build_model, get_family

Log = Callable[[str], None]


@dataclass
class EvalSettings:
    """What one eval compares, on what (checked values; see ``mame-export eval --help``)."""

    data: Path | None = None  # images, clips or latents; None: seeded latents (UNets only)
    rs: Sequence[float] = (0.5,)
    target_macs: Sequence[float] | None = None  # solve one r per MACs ratio instead
    tau: float | None = None
    layers: list[int] | None = None
    prop_attn: bool = True
    tome: bool = True
    weights: str = "auto"
    img_size: int | None = None
    limit: int | None = None
    batch: int = 16
    threads: int | None = None  # ONNX Runtime's threads for --graph (torch's: the caller)
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


def solve_rs(model: nn.Module, s: EvalSettings, options: dict[str, Any], log: Log) -> list[float]:
    """``s.rs``, or one r per ``s.target_macs`` solved on copies of the model."""
    from mame_export.patch import solve_r

    if not s.target_macs:
        return list(s.rs)
    rs = []
    for target in s.target_macs:
        try:
            r = solve_r(copy_of(model), target, tau=s.tau, layers=s.layers,
                        prop_attn=s.prop_attn, **options)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None
        log(f"MACs ratio {target:g} -> r = {r:g}")
        rs.append(r)
    return rs


def kind_of(io: IOSpec, inputs: Inputs) -> str:
    return "unet" if inputs.kind == "latents" else "classifier" if io.class_scores else "encoder"


def run_eval(spec: ModelSpec, s: EvalSettings, log: Log) -> dict[str, Any]:
    """Evaluate ``spec``'s model (its family's eval preprocessing, IO spec and variants):
    the report's rows, notes and what was run on; see :mod:`mame_export.evaluate`."""
    family = get_family(spec.family)
    skeleton = family.skeleton(spec, s.img_size)
    inputs = inputs_of(family, spec, skeleton, s.img_size) if skeleton is not None else None
    found = find_data(inputs, s, spec) if inputs is not None else None  # before any build
    if s.graph is not None and skeleton is not None:
        from mame_export.evaluate.deployed import check_graph

        check_graph(s.graph, spec, family.io_spec(spec, skeleton, s.img_size), s.img_size)
    model, source = build_model(spec, s.weights, s.img_size)
    family.check(model, spec.alias, s.img_size, export=False)
    if inputs is None:
        inputs = inputs_of(family, spec, model, s.img_size)
        found = find_data(inputs, s, spec)
    io = family.io_spec(spec, model, s.img_size)
    prep = family.eval_preprocessing(spec, model, s.img_size)
    if inputs.kind != "latents":
        check_labels(found, model)
    count = (len(found.paths) if inputs.kind != "latents" else
             len(found) if found is not None else s.limit or DEFAULT_LATENTS)
    what = ("latent file(s)" if found is not None else "seeded random latents"
            ) if inputs.kind == "latents" else inputs.kind
    log(f"evaluating {spec.alias} ({spec.source_name}, weights: {source}) on {count} {what}"
        + (f" from {s.data}" if s.data is not None else ""))
    options = family.patch_options(spec, s.img_size)
    notes: list[str] = []
    variants = build_variants(model, solve_rs(model, s, options, log), tau=s.tau,
                              layers=s.layers, prop_attn=s.prop_attn, tome=s.tome,
                              family=family, patch_options=options, notes=notes)
    if s.graph is not None:
        from mame_export.evaluate.deployed import graph_variant

        variants.append(graph_variant(s.graph, spec, io, model, s.img_size, s.threads, notes))
    report: dict[str, Any] = {"kind": kind_of(io, inputs), "inputs": inputs.kind,
                              "weights": source}
    if inputs.kind == "latents":
        latents = latent_batches(io, found, count, s.batch)
        res = evaluate_unet(variants, io, latents, found is None, log)
        rows, notes = res.rows, [*res.notes, *notes]
        report.update(images=res.latents, labelled=False, class_mapping=None, classes=0,
                      timesteps=res.timesteps)
    else:
        transform = eval_data.transform_from(**prep)
        rows, more = evaluate_images(variants, io, found, transform, s.batch, log)
        notes = [*more, *notes]
        labelled = found.labels is not None
        report.update(images=len(found.paths), labelled=labelled,
                      class_mapping=found.mapping if labelled else None,
                      classes=len(found.class_names), preprocessing=prep)
    if s.graph is not None:
        report["graph"] = str(s.graph)
    report.update(variants=rows, notes=notes)
    return report
