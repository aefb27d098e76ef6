"""Quantize an fp32 graph into a QDQ graph with ONNX Runtime, the merge left in fp32.

The form is TensorRT's explicit quantization, which ONNX Runtime's CPU provider also runs:
QuantizeLinear / DequantizeLinear pairs in front of the inputs of MatMul, Gemm and Conv
(where NVIDIA's Model Optimizer puts them for INT8 too), signed symmetric INT8 with zero
points 0 for activations and weights, per output channel for weights. The merge's nodes
(:func:`mame_export.quant.scope.merge_nodes`) are passed as ``nodes_to_exclude``: its
similarities, rank comparisons, one-hot selections and constant triangular prefix counts
keep computing in fp32, so which tokens merge is decided as in the fp32 graph, up to the
rounding of its inputs. Attention's two activation-by-activation matmuls stay fp32 as well
(:func:`mame_export.quant.scope.activation_matmuls`; docs/quantization.md says why).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from mame_export.errors import UserError
from mame_export.quant.calib import Feeds
from mame_export.quant.scope import (
    KEEP_KEY,
    QUANTIZED_OPS,
    activation_matmuls,
    count_quantized,
    has_scope_metadata,
    kept_by_pattern,
    merge_nodes,
    merge_scope_of,
    module_path,
)

CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile,
               # ONNX Runtime calibrates float8 with this one only
               "distribution": CalibrationMethod.Distribution}
QUANT_TYPES = {"int8": QuantType.QInt8, "fp8": QuantType.QFLOAT8E4M3FN}
# The per-layer report reads every intermediate tensor of both graphs: a few input sets.
REPORT_BATCHES = 2
REPORT_WORST = 10


@dataclass
class QuantSummary:
    """What quantization did: the counts the audit reports, and the worst layers."""

    precision: str
    method: str
    calibration: str  # "N image batches from DIR" or "N random input batches"
    matmuls_quantized: int
    matmuls_kept: dict[str, int]  # why -> count ("merge (mame_merge scope)", ...)
    merge_nodes: int
    merge_nodes_quantized: list[str]
    worst_layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        kept = ", ".join(f"{n} {why}" for why, n in self.matmuls_kept.items()) or "none"
        lines = [f"quantized {self.precision} ({self.method}, {self.calibration}): "
                 f"{self.matmuls_quantized} MatMul/Gemm/Conv quantized; kept in high "
                 f"precision: {kept}; merge nodes quantized: "
                 f"{len(self.merge_nodes_quantized)} of {self.merge_nodes}"]
        for w in self.worst_layers[:5]:
            lines.append(f"  SQNR {w['sqnr_db']:6.1f} dB  {w['tensor']}  ({w['scope']})")
        return "\n".join(lines)


def quantize_graph(src: Path, dst: Path, feeds: Feeds, precision: str = "int8",
                   method: str = "minmax", calibration: str = "",
                   external_data: bool = False, report: bool = True,
                   keep: tuple[str, ...] = ()) -> QuantSummary:
    """Write the QDQ form of the fp32 graph ``src`` to ``dst`` (see the module docstring),
    calibrated on ``feeds``; ``report``: measure the per-layer error (SQNR of each
    quantized tensor against the fp32 graph's) on the first input sets. ``keep``: module
    path patterns (``blocks.*.mlp.fc2``) whose MatMul/Gemm/Conv stay in high precision too;
    a pattern that matches no layer is refused."""
    model = onnx.load(str(src), load_external_data=False)
    if not has_scope_metadata(model):
        raise UserError(f"{src.name} has no name-scope metadata (not written by this "
                        "toolkit's exporter): the merge's nodes cannot be found to keep them "
                        "out of quantization; export it again")
    kept = kept_by_pattern(model, keep)
    for pattern in keep:
        if not kept_by_pattern(model, (pattern,)):
            paths = sorted({module_path(n) for n in model.graph.node
                            if n.op_type in QUANTIZED_OPS and merge_scope_of(n) is None})
            raise UserError(f"--quant-keep {pattern!r} matches no MatMul/Gemm/Conv layer of "
                            f"{src.name}; its layers are e.g. {', '.join(paths[:4])}")
    exclude = merge_nodes(model) + activation_matmuls(model) + kept
    metadata = {n.name: list(n.metadata_props) for n in model.graph.node}
    del model
    # (Not CalibMaxIntermediateOutputs: ONNX Runtime 1.32 drops the chunks it clears.)
    # Biases stay float: TensorRT's DequantizeLinear takes no INT32 input (ONNX Runtime
    # would quantize them to INT32 by default).
    options = {"ActivationSymmetric": True, "WeightSymmetric": True,
               "CalibTensorRangeSymmetric": True, "QuantizeBias": False}
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    qtype = QUANT_TYPES[precision]
    if precision == "fp8":
        method = "distribution"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs advice on every run
    try:
        # Its calibrators print progress to stdout, which --json keeps for the one object.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(src), str(dst), feeds, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                activation_type=qtype, weight_type=qtype, nodes_to_exclude=exclude,
                calibrate_method=CALIBRATORS[method], extra_options=options,
                use_external_data_format=external_data)
    finally:
        logging.disable(previous)
    out = onnx.load(str(dst), load_external_data=False)
    changed = restore_metadata(out, metadata)
    if keep:
        onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props},
                                          KEEP_KEY: ",".join(keep)})
        changed = True
    if changed:
        onnx.save(out, str(dst))  # external weights stay where the quantizer wrote them
    quantized, kept, merge_quantized, n_merge = count_quantized(out)
    summary = QuantSummary(precision, method, calibration, quantized, kept, n_merge,
                           merge_quantized)
    if report:
        feeds.rewind()
        summary.worst_layers = layer_errors(src, dst, feeds.head(REPORT_BATCHES), out)
    return summary


def restore_metadata(model: onnx.ModelProto, metadata: dict[str, list]) -> bool:
    """Put back the exporter's node metadata (the name scopes) that the quantizer's opset
    conversion drops (fp8 needs opset 19), by node name; True if any was missing."""
    changed = False
    for node in model.graph.node:
        if not node.metadata_props and metadata.get(node.name):
            node.metadata_props.extend(metadata[node.name])
            changed = True
    return changed


def layer_errors(src: Path, dst: Path, feeds: Feeds, quantized: onnx.ModelProto
                 ) -> list[dict[str, Any]]:
    """The worst quantized tensors, by the SQNR (dB, lower is worse) of the QDQ graph's
    tensor against the fp32 graph's, from ONNX Runtime's ``qdq_loss_debug``."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    producer = {o: n for n in quantized.graph.node for o in n.output}
    with tempfile.TemporaryDirectory(prefix=".layers-", dir=dst.parent) as work:
        fp, qp = Path(work) / "fp32.onnx", Path(work) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(src), str(fp))
        modify_model_output_intermediate_tensors(str(dst), str(qp))
        with contextlib.redirect_stdout(sys.stderr):
            float_acts = collect_activations(str(fp), feeds)
            feeds.rewind()
            qdq_acts = collect_activations(str(qp), feeds)
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    rows = []
    for tensor, err in errors.items():
        sqnr = err.get("xmodel_err")
        if sqnr is None:
            continue
        node = producer.get(tensor + "_QuantizeLinear_Input") or producer.get(tensor)
        scope = node_scope(node) if node is not None else ""
        rows.append({"tensor": tensor, "sqnr_db": float(sqnr), "scope": scope})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows[:REPORT_WORST]


def node_scope(node: onnx.NodeProto) -> str:
    """The merge scope of ``node``, else the module it was traced in ('' if none)."""
    return merge_scope_of(node) or module_path(node)
