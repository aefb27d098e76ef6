"""``profile --precision int8``: each variant is timed as an fp32 graph and as its INT8 QDQ
graph (:mod:`mame_export.quant.graphs`, the merge kept fp32), in turns in one group, so one
run shows INT8 + MaMe beside fp32 MaMe and INT8 unmerged. PyTorch has no INT8 path: the
eager backends time the fp32 model, and their int8 rows say why they are skipped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mame_export.errors import UserError
from mame_export.families import IOSpec
from mame_export.profile.variants import ExportInfo, Variant, forbidden_census
from mame_export.quant.graphs import Quantization, quantized_graph
from mame_export.runners.factory import GRAPH_RUNNERS
from mame_export.settings import QUANTIZED_PRECISIONS

EAGER_INT8 = "PyTorch has no {p} path: {p} rows run on a graph backend (onnxrt, tensorrt)"
# ToMe's argsort/scatter merge is not under the merge scope the quantizer keeps out.
NOT_QUANTIZED = ("tome", "tomesd")


def row_precisions(precision: str) -> tuple[str, ...]:
    """The precisions each variant gets a row at: a quantized one adds its fp32 reference."""
    return ("fp32", precision) if precision in QUANTIZED_PRECISIONS else (precision,)


def skip_reason(precision: str, backend: str, variant: str) -> str | None:
    """Why a quantized row cannot run (None: it can, or the row is not quantized)."""
    if precision not in QUANTIZED_PRECISIONS:
        return None
    if backend not in GRAPH_RUNNERS:
        return EAGER_INT8.format(p=precision)
    if variant in NOT_QUANTIZED:
        return f"{variant} has no {precision} graph: its merge is not kept out of quantization"
    return None


def check_quantized_backends(precision: str, backends: Sequence[str]) -> None:
    """A quantized precision needs a graph backend (one line, before any work)."""
    if precision in QUANTIZED_PRECISIONS and not any(b in GRAPH_RUNNERS for b in backends):
        raise UserError(f"--precision {precision} times QDQ graphs: add a graph backend "
                        f"({', '.join(GRAPH_RUNNERS)}) to --backends; PyTorch has no "
                        f"{precision} path")


def export_quantized(var: Variant, batch: int, io: IOSpec, q: Quantization,
                     out_dir: Path) -> ExportInfo:
    """The variant's QDQ graph at a static ``batch``; a failure is the row's reason."""
    assert var.model is not None
    path = out_dir / f"{var.name}_r{var.r:g}_b{batch}_{q.precision}.onnx"
    try:
        quantized_graph(var.model, io, q, path, batch, merged=var.name != "baseline")
    except UserError as e:
        return ExportInfo(None, f"does not quantize: {e}", {})
    return ExportInfo(path, None, forbidden_census(path))
