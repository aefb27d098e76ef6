"""``eval --precision int8``: the unmerged model and MaMe at each r, also as quantized QDQ
graphs run through ONNX Runtime (:mod:`mame_export.quant.graphs`), scored beside the fp32
eager rows against the same fp32 unmerged reference: one command shows what INT8 costs
with and without the merge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from mame_export.errors import UserError
from mame_export.evaluate.deployed import GraphModel
from mame_export.evaluate.variants import Variant
from mame_export.quant.calib import calibration_feeds
from mame_export.quant.graphs import Quantization, quantized_graph
from mame_export.quant.step import check_quantizable
from mame_export.request import Job

# The eager variants that have a quantized twin (ToMe's argsort/scatter merge is not put
# under the merge scope the quantizer keeps out, and ToMe-SD does not export).
QUANTIZED_METHODS = ("unmerged", "mame", "mame-plan")


def quantized_method(method: str, precision: str) -> str:
    return f"{method}-{precision}"


def quantization_for(job: Job, model: nn.Module, log: Callable[[str], None]) -> Quantization:
    """The calibration of every quantized variant: ``--calib`` images read with the
    family's preprocessing, or random inputs with the warning that accuracy is then
    unknown (calibrate on images disjoint from ``--data``)."""
    io = job.io
    assert io is not None
    feeds = calibration_feeds(job.family, job.spec, model, io, job.img_size, 1, job.calib)
    where = (f"{len(feeds.feeds)} image(s) from {job.calib}" if job.calib is not None
             else f"{len(feeds.feeds)} random input set(s)")
    log(f"quantized rows: {job.precision} QDQ graphs ({job.calib_method} calibration on "
        f"{where}; the merge stays fp32), run through ONNX Runtime")
    return Quantization(job.precision, job.calib_method, feeds, where, job.quant_keep)


def quantized_variants(job: Job, model: nn.Module, variants: list[Variant], workdir: Path,
                       log: Callable[[str], None], notes: list[str]) -> list[Variant]:
    """Each of ``variants`` that has a quantized twin, exported (dynamic batch) and
    quantized into ``workdir``, as a graph variant named "<name> <precision>"."""
    io = job.io
    assert io is not None
    for v in variants:  # refused before any calibration or export
        if v.method in ("mame", "mame-plan") and isinstance(v.model, nn.Module):
            check_quantizable(v.model, True, job.spec.alias, job.precision)
    q = quantization_for(job, model, log)
    out = []
    for i, v in enumerate(variants):
        if v.method not in QUANTIZED_METHODS or not isinstance(v.model, nn.Module):
            continue
        log(f"  exporting and quantizing {v.name} to {job.precision} ...")
        summary = quantized_graph(v.model, io, q, workdir / f"variant{i}-{job.precision}.onnx",
                                  merged=v.method != "unmerged", alias=job.spec.alias)
        if summary.merge_nodes_quantized:  # the rule the audit enforces on exported graphs
            raise UserError(f"{v.name}: {len(summary.merge_nodes_quantized)} merge node(s) "
                            "were quantized; report this as a bug")
        runner = GraphModel(workdir / f"variant{i}-{job.precision}.onnx", io, None, job.threads)
        out.append(Variant(f"{v.name} {job.precision}", quantized_method(v.method, job.precision),
                           v.r, runner, v.plan))
    notes.append(f"{job.precision} rows: QDQ graphs in ONNX Runtime (CPU), calibrated on "
                 f"{q.calibration} ({job.calib_method}); the merge and attention's two "
                 "activation products stay fp32" + (f", and {', '.join(job.quant_keep)}"
                                                   if job.quant_keep else "")
                 + (". Calibrated on random inputs: pass --calib DIR (images disjoint from "
                    "--data) for the accuracy on real data" if job.calib is None else ""))
    if any(v.method == "tome" for v in variants):
        notes.append(f"ToMe has no {job.precision} row: its merge is not kept out of "
                     "quantization (only MaMe's merge scope is)")
    return out
