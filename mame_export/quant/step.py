"""The quantize step of an int8 / fp8 export (``--precision int8``), between the fp32 export
and the audit: calibrate, quantize with the merge excluded, and compare the quantized graph
with the fp32 graph it came from (parity, and the fraction of merges that pick the same
tokens)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.parity import ParityReport, check_parity, tolerance_for
from mame_export.quant.agreement import selection_agreement
from mame_export.quant.calib import Feeds, calibration_feeds, find_calib_images
from mame_export.quant.qdq import quantize_graph
from mame_export.quant.scope import merging_blocks
from mame_export.runners.factory import make_runner
from mame_export.settings import QUANTIZED_PRECISIONS

Log = Callable[[str], None]


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED_PRECISIONS


def check_calib_early(job: Any) -> None:
    """Refuse a bad ``--calib`` folder in one line before any model is built or file
    written (missing, unreadable, empty, fewer images than one batch)."""
    if is_quantized(job.precision) and job.calib is not None:
        find_calib_images(job.calib, job.batch if not job.dynamic_batch else 1)


def check_quantizable(model: nn.Module, merges: bool, alias: str, precision: str) -> None:
    """A model whose merge cannot be put under its name scope (the UNet merges inside its
    own forward, not through a block's ``_merge``) is refused for int8 / fp8."""
    if merges and not merging_blocks(model):
        raise UserError(f"--precision {precision} is not supported for {alias}: its merge runs "
                        "outside the blocks' merge scope, so it could not be kept out of "
                        "quantization; export it in fp32, fp16 or bf16")


def calib_tag(job: Any) -> str:
    """What the graph's file name adds for a quantized graph: the calibrator, and which
    calibration images (``rand``: none given)."""
    keep = ("-keep" + hashlib.sha256(",".join(job.quant_keep).encode()).hexdigest()[:4]
            if job.quant_keep else "")
    if job.calib is None:
        return f"{job.calib_method}-rand{keep}"
    digest = hashlib.sha256(str(Path(job.calib).resolve()).encode()).hexdigest()[:6]
    return f"{job.calib_method}-{digest}{keep}"


def quantize_step(job: Any, model: nn.Module, fp32_graph: Path, graph: Path,
                  external_data: bool, log: Log) -> tuple[dict[str, Any], Feeds]:
    """Write the QDQ form of ``fp32_graph`` to ``graph``; returns its summary (counts, the
    worst layers) for the sidecar, and the calibration inputs."""
    io = job.io
    batch = job.batch if not job.dynamic_batch else 1
    feeds = calibration_feeds(job.family, job.spec, model, io, job.img_size, batch, job.calib)
    where = (f"{len(feeds.feeds)} batch(es) of {batch} image(s) from {job.calib}"
             if job.calib is not None else f"{len(feeds.feeds)} random input batch(es)")
    log(f"[2b] quantizing to {job.precision} QDQ ({job.calib_method} calibration on {where}; "
        "the merge stays fp32) ...")
    summary = quantize_graph(fp32_graph, graph, feeds, job.precision, job.calib_method,
                             where, external_data, keep=job.quant_keep)
    log(summary.summary())
    return summary.to_dict(), feeds


def parity_inputs(job: Any, calib: Feeds, random_inputs: Callable,
                  sizes: tuple[int, ...]) -> Callable:
    """The inputs parity checks a quantized graph on: with ``--calib``, the calibration
    images (its ranges fit real images, not random noise), in turn, stacked to each batch
    size of ``sizes`` in turn; else ``random_inputs`` (what it was calibrated on)."""
    if job.calib is None or not calib.feeds:
        return random_inputs
    name = next(iter(calib.feeds[0]))
    images = np.concatenate([f[name] for f in calib.feeds])
    calls = [0, 0]  # batches made, images used

    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        size = sizes[calls[0] % len(sizes)]
        picks = [(calls[1] + i) % len(images) for i in range(size)]
        calls[0], calls[1] = calls[0] + 1, calls[1] + size
        return {name: images[picks]}

    return make


def compare_with_fp32(job: Any, fp32_graph: Path, graph: Path, make_feeds: Callable,
                      sizes: tuple[int, ...], merged: bool, log: Log
                      ) -> tuple[ParityReport, dict[str, Any]]:
    """Parity of the quantized graph against the fp32 graph (both in ONNX Runtime, the
    same inputs), and the selection agreement of their merges."""
    tol = tolerance_for(job.precision, merged, class_scores=job.io.class_scores)
    log(f"[4b] parity vs the fp32 graph ({job.precision} tolerance) and selection "
        "agreement ...")
    ref = make_runner("onnxrt", onnx_path=fp32_graph, threads=job.threads, label="onnxrt-fp32")
    cand = make_runner("onnxrt", onnx_path=graph, threads=job.threads,
                       label=f"onnxrt-{job.precision}")
    batches = max(job.parity_batches, len(sizes))
    parity = check_parity(ref, [cand], make_feeds, job.precision, batches=batches,
                          seed=job.seed, tolerance=tol)
    log(parity.summary())
    rng = np.random.default_rng(parity.seed)
    feeds = [dict(make_feeds(rng)) for _ in range(batches)]  # the same inputs again
    agreement = selection_agreement(fp32_graph, graph, feeds, job.threads)
    if "token_fraction" in agreement:
        log(f"selection agreement with the fp32 graph: {agreement['token_fraction']:.4f} of "
            f"candidate tokens ({agreement['same_tokens']} of {agreement['tokens']}) kept or "
            f"merged into the same target; {agreement['same']} of {agreement['merges']} "
            "merges identical in every token")
    return parity, agreement
