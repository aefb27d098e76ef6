"""Quantized graphs of in-process variants, for ``eval`` and ``profile --precision int8``:
each variant (the unmerged model, MaMe at an r) is exported in fp32 under its merge scopes,
then quantized exactly as ``export --precision int8`` does (:func:`quantize_graph`: the
merge and attention's activation products kept in fp32), calibrated on the same inputs for
every variant, so their rows differ by the merge only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.export import export_onnx
from mame_export.families import IOSpec
from mame_export.quant.calib import Feeds
from mame_export.quant.qdq import QuantSummary, quantize_graph
from mame_export.quant.step import check_quantizable


class QuantizedOnlyOnGraphsError(UserError):
    """A quantized precision asked of a run that has no graph backend to run it on."""


@dataclass(frozen=True)
class Quantization:
    """How the run quantizes: the precision, the calibrator, the calibration inputs (the
    same for every variant), where they came from, and ``--quant-keep``'s patterns."""

    precision: str
    method: str
    feeds: Feeds
    calibration: str
    keep: tuple[str, ...] = ()


def quantized_graph(model: nn.Module, io: IOSpec, q: Quantization, path: Path,
                    batch: int | None = None, merged: bool = False,
                    alias: str = "this model") -> QuantSummary:
    """Export ``model`` in fp32 next to ``path`` (static ``batch``, or a dynamic batch when
    None), quantize it into ``path`` and remove the fp32 graph; the quantizer's summary.
    ``merged``: the model merges, so its merge must run under the merge scope (else it is
    refused, as ``export`` refuses it)."""
    check_quantizable(model, merged, alias, q.precision)
    fp32 = path.with_name(path.stem + "-fp32.onnx")
    example = tuple(io.make_inputs(batch or 2, torch.Generator().manual_seed(1)))
    export_onnx(model, example, fp32, input_names=io.input_names,
                output_names=io.output_names, dynamic_batch=batch is None)
    written = [p for p in fp32.parent.iterdir() if p.name.startswith(fp32.name)]
    try:
        feeds = q.feeds.rebatched(batch) if batch is not None else q.feeds
        feeds.rewind()
        return quantize_graph(fp32, path, feeds, q.precision, q.method, q.calibration,
                              external_data=len(written) > 1, report=False, keep=q.keep)
    finally:
        for leftover in written:  # the fp32 graph and its external weights
            leftover.unlink(missing_ok=True)
