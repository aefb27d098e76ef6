"""Audit an ONNX graph: op census, forbidden (data-dependent) ops, checker, shape
inference, and the TensorRT parser pre-flight."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mame_export.errors import UserError

# Ops that mean data-dependent indexing or shapes: what MaMe exists to avoid.
FORBIDDEN_OPS = frozenset({
    "TopK", "Sort", "NonZero", "Scatter", "ScatterND", "ScatterElements",
    "GatherElements", "GatherND", "Unique", "ArgMax", "ArgMin",
})
_CONSTANT_SOURCES = frozenset({"Constant", "ConstantOfShape"})


class GraphReadError(UserError):
    """The graph file is missing or not a readable ONNX model."""


@dataclass(frozen=True)
class Finding:
    kind: str  # "forbidden-op", "checker", "shape-inference", "tensorrt"
    op_type: str
    node: str
    message: str

    def __str__(self) -> str:
        where = f" ({self.op_type} {self.node})" if self.op_type else ""
        return f"[{self.kind}]{where} {self.message}"


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


def load_graph(path: str | os.PathLike, load_external_data: bool = False) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise GraphReadError(f"graph not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise GraphReadError(f"cannot read ONNX graph {p}: {type(e).__name__}") from None


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out.extend(_all_nodes(g))
    return out


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors whose value is fixed at export time: initializers, Constant
    outputs, and outputs of nodes all of whose inputs are constant."""
    const = {init.name for init in model.graph.initializer}
    for node in model.graph.node:  # nodes are topologically sorted in a valid graph
        inputs = [i for i in node.input if i]
        if node.op_type in _CONSTANT_SOURCES and all(i in const for i in inputs):
            const.update(node.output)
        elif inputs and all(i in const for i in inputs):
            const.update(node.output)
    return const


def forbidden_ops(model: onnx.ModelProto) -> list[Finding]:
    """Data-dependent ops, and Gather whose indices are computed at run time."""
    const = constant_tensors(model)
    found = []
    for node in _all_nodes(model.graph):
        name = node.name or "<unnamed>"
        if node.op_type in FORBIDDEN_OPS:
            found.append(Finding("forbidden-op", node.op_type, name,
                                 "data-dependent op in a graph that must be static"))
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] not in const:
            found.append(Finding("forbidden-op", "Gather", name,
                                 f"indices '{node.input[1]}' are computed at run time"))
    return found


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in _all_nodes(model.graph)))


def _tensorrt_preflight(model: onnx.ModelProto) -> tuple[dict[str, Any], list[Finding]]:
    try:
        from mame_export.trt.support import support_table_info, trt_preflight
    except ImportError:
        return {"status": "not available (support table missing)"}, []
    issues = trt_preflight(model)
    findings = [Finding("tensorrt", f.op_type, f.node, f.message) for f in issues]
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
    return AuditReport(
        path=str(p),
        nodes=len(_all_nodes(model.graph)),
        op_census=op_census(model),
        forbidden_ops=[{"op": f.op_type, "node": f.node, "why": f.message}
                       for f in findings if f.kind == "forbidden-op"],
        checker=checker,
        shape_inference=shape_inf,
        tensorrt=trt_info,
        findings=findings,
    )
