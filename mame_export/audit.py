"""Audit an ONNX graph: op census, forbidden (data-dependent) ops, checker, shape
inference, and the TensorRT parser pre-flight."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mame_export.errors import UserError, check_file

# Ops that mean data-dependent indexing or shapes: what MaMe exists to avoid.
FORBIDDEN_OPS = frozenset({
    "TopK", "Sort", "NonZero", "Scatter", "ScatterND", "ScatterElements",
    "GatherElements", "GatherND", "Unique", "ArgMax", "ArgMin",
    "NonMaxSuppression", "Compress",  # output length decided by the values
})
_CONSTANT_SOURCES = frozenset({"Constant", "ConstantOfShape"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
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
# Outputs that depend on input shapes only, never on input values.
_SHAPE_OF = frozenset({"Shape", "Size"})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})


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
    p = check_file(path, "graph", GraphReadError)
    if p.stat().st_size == 0:
        raise GraphReadError(f"graph {p} is empty (0 bytes): not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise GraphReadError(f"cannot read ONNX graph {p}: {type(e).__name__}") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise GraphReadError(f"cannot read ONNX graph {p}: it holds no graph "
                             "(not an ONNX model, or an empty one)")
    return model


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` and the nodes of every subgraph they hold (If/Loop/Scan bodies)."""
    out = []
    for node in nodes:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_all_nodes(attr.g.node))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out.extend(_all_nodes(g.node))
    return out


def _model_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of the graph, its subgraphs and its model-local functions (once each)."""
    out = _all_nodes(model.graph.node)
    for f in model.functions:
        out.extend(_all_nodes(f.node))
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


# What a tensor's value depends on: nothing (fixed at export time), input shapes only,
# or input values (data).
_CONST, _SHAPE, _DATA = 0, 1, 2


class _Scanner:
    """Walks the graph, its subgraphs and the bodies of its model-local functions,
    following which tensors are computed from data, and collects the findings."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.findings: list[Finding] = []
        self._stack: list[tuple[str, str]] = []

    def flag(self, node: onnx.NodeProto, where: str, message: str) -> None:
        name = where + (node.name or "<unnamed>")
        self.findings.append(Finding("forbidden-op", node.op_type, name, message))

    def scan(self, nodes: Any, kinds: dict[str, int], dyn_shape: set[str], where: str) -> None:
        for node in nodes:
            ins = [kinds.get(i, _DATA) if i else _CONST for i in node.input]
            key = (node.domain, node.op_type)
            if key in self.functions and key not in self._stack:
                outs = self._call(self.functions[key], node, ins, dyn_shape, where)
            else:
                outs = self._node(node, ins, kinds, dyn_shape, where)
            for name, kind in zip(node.output, outs, strict=False):
                if name:
                    kinds[name] = kind
            if any(i in dyn_shape for i in node.input if i):
                dyn_shape.update(o for o in node.output if o)

    def _call(self, fn: onnx.FunctionProto, node: onnx.NodeProto, ins: list[int],
              dyn_shape: set[str], where: str) -> list[int]:
        """A call of a model-local function: its body, with the caller's inputs."""
        inner = {formal: kind for formal, kind in zip(fn.input, ins, strict=False)}
        inner_dyn = {formal for formal, actual in zip(fn.input, node.input, strict=False)
                     if actual in dyn_shape}
        self._stack.append((fn.domain, fn.name))
        try:
            self.scan(fn.node, inner, inner_dyn,
                      f"{where}{fn.name}({node.name or '<unnamed>'})/")
        finally:
            self._stack.pop()
        outs = [inner.get(o, _DATA) for o in fn.output]
        if any(o in inner_dyn for o in fn.output):
            dyn_shape.update(o for o in node.output if o)
        return outs

    def _node(self, node: onnx.NodeProto, ins: list[int], kinds: dict[str, int],
              dyn_shape: set[str], where: str) -> list[int]:
        op = node.op_type
        default = node.domain in _DEFAULT_DOMAINS
        flagged = False
        if op in FORBIDDEN_OPS:
            self.flag(node, where, "data-dependent op in a graph that must be static")
            flagged = True
        elif op == "Gather" and len(ins) > 1 and ins[1] != _CONST:
            self.flag(node, where, f"indices '{node.input[1]}' are computed at run time")
            flagged = True
        elif default and op in SHAPE_INPUTS:
            for pos in SHAPE_INPUTS[op]:
                if pos < len(ins) and ins[pos] == _DATA:
                    self.flag(node, where, f"input {pos} ('{node.input[pos]}') is computed from "
                              "data, so the output shape depends on input values")
                    flagged = True
                    break
        elif default and op == "If" and ins and ins[0] == _DATA:
            self.flag(node, where, f"the branch taken depends on data ('{node.input[0]}')")
            flagged = True
        elif default and op == "Loop" and (not node.input or not node.input[0]
                                           or ins[0] == _DATA):
            self.flag(node, where, "the number of iterations depends on data")
            flagged = True
        if flagged:
            dyn_shape.update(o for o in node.output if o)
        # Subgraph bodies see the outer tensors; their own inputs count as data.
        body_kind = _CONST
        for attr in node.attribute:
            graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
            for g in graphs:
                inner = dict(kinds)
                inner.update({i.name: _DATA for i in g.input})
                inner.update({init.name: _CONST for init in g.initializer})
                self.scan(g.node, inner, set(dyn_shape), f"{where}{node.name or op}/")
                for o in g.output:
                    body_kind = max(body_kind, inner.get(o.name, _DATA))
        if op in _SHAPE_OF:
            kind = _DATA if any(i in dyn_shape for i in node.input if i) else _SHAPE
            if all(k == _CONST for k in ins):
                kind = _CONST
        elif op in _RANDOM_OPS:
            kind = _DATA
        elif op in _CONSTANT_SOURCES:
            kind = max([_CONST, *ins])
        elif not ins:
            kind = _CONST if default else _DATA
        else:
            kind = max([*ins, body_kind])
        return [kind] * len(node.output)


def forbidden_ops(model: onnx.ModelProto) -> list[Finding]:
    """Data-dependent ops, Gather whose indices are computed at run time, and ops whose
    output shape is computed from data (a Reshape, Slice, Expand, ... fed a computed,
    non-constant shape), in the graph, its subgraphs and its model-local functions."""
    scanner = _Scanner(model)
    kinds: dict[str, int] = {i.name: _DATA for i in model.graph.input}
    kinds.update({init.name: _CONST for init in model.graph.initializer})
    scanner.scan(model.graph.node, kinds, set(), "")
    # Functions the graph never calls are still part of the file: check them on their own.
    called = {(n.domain, n.op_type) for n in _model_nodes(model)}
    for f in model.functions:
        if (f.domain, f.name) not in called:
            scanner.scan(f.node, {i: _DATA for i in f.input}, set(), f"{f.name}/")
    return scanner.findings


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in _model_nodes(model)))


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
        nodes=len(_model_nodes(model)),
        op_census=op_census(model),
        forbidden_ops=[{"op": f.op_type, "node": f.node, "why": f.message}
                       for f in findings if f.kind == "forbidden-op"],
        checker=checker,
        shape_inference=shape_inf,
        tensorrt=trt_info,
        findings=findings,
    )
