"""Audit an ONNX graph: op census, forbidden (data-dependent) ops, checker, shape
inference, and the TensorRT parser pre-flight."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mame_export.graph import (
    CONST,
    DATA,
    DEFAULT_DOMAINS,
    Constants,
    Finding,
    load_graph,
    walk,
)

# Ops that mean data-dependent indexing or shapes: what MaMe exists to avoid.
FORBIDDEN_OPS = frozenset({
    "TopK", "Sort", "NonZero", "Scatter", "ScatterND", "ScatterElements",
    "GatherElements", "GatherND", "Unique", "ArgMax", "ArgMin",
    "NonMaxSuppression", "Compress",  # output length decided by the values
})
# Inputs (by position) that decide the shape of an op's output. Fed from data, the
# output shape depends on input values: a static graph must not do that.
_REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3),
    "Resize": (2, 3), "Upsample": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "OneHot": (1,), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "CenterCropPad": (1,), "Col2Im": (1, 2), "TopK": (1,),
    **{op: (1,) for op in _REDUCE_OPS},
}


@dataclass
class AuditReport:
    path: str
    nodes: int
    op_census: dict[str, int]
    forbidden_ops: list[dict[str, str]]
    checker: str  # "ok" or the error
    shape_inference: str
    tensorrt: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["findings"] = [str(f) for f in self.findings]
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        top = ", ".join(f"{op} {n}" for op, n in sorted(self.op_census.items(),
                                                        key=lambda kv: -kv[1])[:8])
        lines = [f"audit {self.path}: {self.nodes} nodes ({top}, ...)",
                 f"  checker: {self.checker}; shape inference: {self.shape_inference}",
                 f"  forbidden ops: {len(self.forbidden_ops)}; "
                 f"TensorRT pre-flight: {self.tensorrt.get('status')}"]
        lines += [f"  FINDING {f}" for f in self.findings]
        lines.append("  PASSED" if self.passed else f"  FAILED ({len(self.findings)} findings)")
        return "\n".join(lines)


def _data_dependence(node: onnx.NodeProto, ins: list[int]) -> str | None:
    """Why ``node`` (its inputs of these kinds) makes its output depend on input values."""
    op = node.op_type
    default = node.domain in DEFAULT_DOMAINS
    if op in FORBIDDEN_OPS:
        return "data-dependent op in a graph that must be static"
    if op == "Gather" and len(ins) > 1 and ins[1] != CONST:
        return f"indices '{node.input[1]}' are computed at run time"
    if default and op in SHAPE_INPUTS:
        for pos in SHAPE_INPUTS[op]:
            if pos < len(ins) and ins[pos] == DATA:
                return (f"input {pos} ('{node.input[pos]}') is computed from data, so the "
                        "output shape depends on input values")
    elif default and op == "If" and ins and ins[0] == DATA:
        return f"the branch taken depends on data ('{node.input[0]}')"
    elif default and op == "Loop" and (not node.input or not node.input[0] or ins[0] == DATA):
        return "the number of iterations depends on data"
    return None


def forbidden_ops(model: onnx.ModelProto) -> list[Finding]:
    """Data-dependent ops, Gather whose indices are computed at run time, and ops whose
    output shape is computed from data (a Reshape, Slice, Expand, ... fed a computed,
    non-constant shape), in the graph, its subgraphs and its model-local functions."""
    findings: list[Finding] = []

    def check(node: onnx.NodeProto, ins: list[int], where: str) -> bool:
        why = _data_dependence(node, ins)
        if why is not None:
            findings.append(Finding("forbidden-op", node.op_type,
                                    where + (node.name or "<unnamed>"), why))
        return why is not None

    Constants(model, check)
    return findings


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(site.node.op_type for site in walk(model)))


def _tensorrt_preflight(model: onnx.ModelProto) -> tuple[dict[str, Any], list[Finding]]:
    try:
        from mame_export.trt.support import support_table_info, trt_preflight
    except ImportError:
        return {"status": "not available (support table missing)"}, []
    findings = trt_preflight(model)
    info = dict(support_table_info())
    info["status"] = "ok" if not findings else f"{len(findings)} findings"
    return info, findings


def audit(path: str | os.PathLike, tensorrt: bool = True) -> AuditReport:
    """Audit the ONNX graph at ``path``; ``report.passed`` is False on any finding."""
    p = Path(path)
    model = load_graph(p)
    findings = forbidden_ops(model)
    try:
        onnx.checker.check_model(str(p), full_check=False)
        checker = "ok"
    except Exception as e:  # noqa: BLE001 - the checker's message is the finding
        checker = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        findings.append(Finding("checker", "", "", checker))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        shape_inf = "ok"
    except Exception as e:  # noqa: BLE001
        inferred = model
        shape_inf = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        findings.append(Finding("shape-inference", "", "", shape_inf))
    trt_info: dict[str, Any] = {"status": "skipped"}
    if tensorrt:
        trt_info, trt_findings = _tensorrt_preflight(inferred)
        findings.extend(trt_findings)
    census = op_census(model)
    return AuditReport(
        path=str(p),
        nodes=sum(census.values()),
        op_census=census,
        forbidden_ops=[{"op": f.op_type, "node": f.node, "why": f.message}
                       for f in findings if f.kind == "forbidden-op"],
        checker=checker,
        shape_inference=shape_inf,
        tensorrt=trt_info,
        findings=findings,
    )
