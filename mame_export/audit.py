"""Audit an ONNX graph: op census, forbidden (data-dependent) ops, checker, shape
inference, and the TensorRT parser pre-flight."""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from mame_export.graph import (
    CONST,
    DATA,
    DEFAULT_DOMAINS,
    Constants,
    Finding,
    function_key,
    graph_inputs,
    graph_outputs,
    load_graph,
    local_functions,
    walk,
)

# Ops that mean data-dependent indexing or shapes: what MaMe exists to avoid.
FORBIDDEN_OPS = frozenset({
    "TopK", "Sort", "NonZero", "Scatter", "ScatterND", "ScatterElements",
    "GatherElements", "GatherND", "Unique", "ArgMax", "ArgMin",
    "NonMaxSuppression", "Compress",  # output length decided by the values
    "SplitToSequence", "StringSplit", "StringNormalizer", "ImageDecoder",  # likewise
})
# Which inputs decide the shape of an op's output comes from the ONNX operator schemas (see
# value_shaped_inputs); these are the ones a schema cannot tell from their (numeric) type.
_SHAPE_INPUTS_BY_NAME: dict[tuple[str, str], frozenset[str]] = {
    ("", "ConstantOfShape"): frozenset({"input"}),
    ("", "Range"): frozenset({"start", "limit", "delta"}),
    ("", "OneHot"): frozenset({"depth"}),
    ("", "Resize"): frozenset({"scales"}),
    ("", "Upsample"): frozenset({"scales"}),
    ("", "DFT"): frozenset({"axis"}),  # which dim dft_length and onesided resize
}
_INT_TYPES = frozenset({"tensor(int32)", "tensor(int64)"})
# An integer input named for a shape, size, length, count, axes or bounds sets an output's
# shape (Reshape shape, Slice starts, HannWindow size, MelWeightMatrix num_mel_bins, ...) ...
_SHAPE_NAME = re.compile(r"shape|size|length|split|repeats|axes|starts|ends|steps?$|pads|"
                         r"^K$|^num_")
# ... one that holds indices picks values by position (Gather, ArrayFeatureExtractor, ...).
_INDICES = re.compile(r"indices")
InputRole = Literal["shape", "indices"]


@functools.lru_cache(maxsize=4096)
def value_shaped_inputs(domain: str, op: str, opset: int) -> Mapping[int, InputRole]:
    """The inputs (by position) of ``domain::op`` at ``opset`` whose values, not only their
    shapes, decide what the output is: "shape" (they set its shape) or "indices" (they pick
    input elements by position). Read from the ONNX operator schema; {} for an op ONNX does
    not define. Cached: do not change the result."""
    domain = "" if domain in DEFAULT_DOMAINS else domain
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return {}
    named = _SHAPE_INPUTS_BY_NAME.get((domain, op), frozenset())
    out: dict[int, InputRole] = {}
    for pos, formal in enumerate(schema.inputs):
        ints = bool(formal.types) and set(formal.types) <= _INT_TYPES
        first_sentence = formal.description.split(". ")[0]
        if formal.name in named or (ints and _SHAPE_NAME.search(formal.name)):
            out[pos] = "shape"
        elif ints and (_INDICES.search(formal.name) or _INDICES.search(first_sentence)):
            out[pos] = "indices"
    return out


@functools.lru_cache(maxsize=1)
def onnx_domains() -> frozenset[str]:
    """The operator domains ONNX itself defines ("", ai.onnx.ml, ...)."""
    return frozenset({s.domain for s in onnx.defs.get_all_schemas_with_history()}
                     | set(DEFAULT_DOMAINS))


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
    expect_dynamic_batch: bool = False  # the batch axis was checked to be symbolic
    allowed_domains: list[str] = field(default_factory=list)  # custom domains let through
    quantization: dict[str, Any] | None = None  # a QDQ graph's counts (quantization_census)

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
        if self.quantization is not None:
            q = self.quantization
            kept = ", ".join(f"{n} {why}" for why, n in q["kept"].items()) or "none"
            lines.append(f"  quantized MatMul/Gemm/Conv: {q['quantized']}; kept in high "
                         f"precision: {kept}; merge nodes quantized: "
                         f"{len(q['merge_nodes_quantized'])} of {q['merge_nodes']}")
        lines += [f"  FINDING {f}" for f in self.findings]
        lines.append("  PASSED" if self.passed else f"  FAILED ({len(self.findings)} findings)")
        return "\n".join(lines)


class _Rules:
    """Why a node of one model makes the shape of its outputs depend on input values."""

    def __init__(self, model: onnx.ModelProto, allow_domains: Sequence[str]) -> None:
        self.functions = local_functions(model)
        self.local_domains = {key[0] for key in self.functions} - onnx_domains()
        self.allowed = frozenset(allow_domains)
        # Each domain's opset: the model's import, else a function's (unknown: the newest).
        self.opsets: dict[str, int] = {}
        for o in [*model.opset_import, *(o for f in model.functions for o in f.opset_import)]:
            self.opsets.setdefault("" if o.domain in DEFAULT_DOMAINS else o.domain, o.version)

    def why(self, node: onnx.NodeProto, ins: list[int], bodies: list[list[int]]) -> str | None:
        op, domain = node.op_type, node.domain
        if op in FORBIDDEN_OPS:
            return "data-dependent op in a graph that must be static"
        if function_key(node) in self.functions:
            return None  # a recursive call: the body is checked where it is first called
        if node.overload or (domain in self.local_domains and domain not in self.allowed):
            overload = f" (overload '{node.overload}')" if node.overload else ""
            return (f"calls model-local function '{domain}::{op}'{overload}, which the model "
                    "does not define")
        if domain not in onnx_domains():
            if domain in self.allowed:
                return None
            return (f"op of custom domain '{domain}': what it does to shapes is unknown to the "
                    f"audit (if its outputs have static shapes, allow it: --allow-domain "
                    f"{domain})")
        opset = self.opsets.get("" if domain in DEFAULT_DOMAINS else domain, 1_000_000)
        for pos, role in value_shaped_inputs(domain, op, opset).items():
            if pos >= len(ins) or not node.input[pos]:
                continue
            if role == "shape" and ins[pos] == DATA:
                return (f"input {pos} ('{node.input[pos]}') is computed from data, so the "
                        "output shape depends on input values")
            if role == "indices" and ins[pos] != CONST:
                return f"indices '{node.input[pos]}' are computed at run time"
        if domain in DEFAULT_DOMAINS and op == "If" and ins and ins[0] == DATA:
            return f"the branch taken depends on data ('{node.input[0]}')"
        if domain in DEFAULT_DOMAINS and op == "Loop":
            return _loop_data_dependence(node, ins, bodies)
        return None


def _loop_data_dependence(node: onnx.NodeProto, ins: list[int],
                          bodies: list[list[int]]) -> str | None:
    """Why a Loop runs a data-dependent number of times (so its scan outputs have a
    data-dependent length)."""
    if not node.input or not node.input[0] or ins[0] == DATA:
        return "the number of iterations depends on data"
    if len(ins) > 1 and node.input[1] and ins[1] == DATA:
        return (f"the loop condition ('{node.input[1]}') is computed from data, so the number "
                "of iterations depends on input values")
    if bodies and bodies[0] and bodies[0][0] == DATA:
        return ("the loop condition its body computes depends on data, so the number of "
                "iterations depends on input values")
    return None


def forbidden_ops(model: onnx.ModelProto, allow_domains: Sequence[str] = ()) -> list[Finding]:
    """Data-dependent ops; Gather (and the like) whose indices are computed at run time; ops
    whose output shape is computed from data (a Reshape, Slice, Expand, HannWindow, ... fed a
    computed, non-constant shape or size; a Loop whose trip count or condition comes from
    data); calls of functions the model does not define; and ops of custom domains not in
    ``allow_domains``: in the graph, its subgraphs and its model-local functions."""
    findings: list[Finding] = []
    rules = _Rules(model, allow_domains)

    def check(node: onnx.NodeProto, ins: list[int], bodies: list[list[int]], where: str) -> bool:
        why = rules.why(node, ins, bodies)
        if why is not None:
            findings.append(Finding("forbidden-op", node.op_type,
                                    where + (node.name or "<unnamed>"), why))
        return why is not None

    Constants(model, check)
    return findings


def static_batch(model: onnx.ModelProto) -> list[Finding]:
    """For a graph meant to take any batch: inputs whose first dim is not a named symbolic
    dim, and outputs whose first dim is fixed."""
    findings: list[Finding] = []
    for spec in graph_inputs(model):
        first = spec.shape[0] if spec.shape else None
        if isinstance(first, str):
            continue
        what = ("has no declared shape" if not spec.ranked else "is a scalar" if not spec.shape
                else f"has a fixed first dim {first}" if first is not None
                else "has an unnamed first dim")
        findings.append(Finding("static-batch", "", "", f"input '{spec.name}' {what}; a "
                                "dynamic-batch graph needs a symbolic batch axis there"))
    for spec in graph_outputs(model):
        if spec.shape and isinstance(spec.shape[0], int):
            findings.append(Finding("static-batch", "", "", f"output '{spec.name}' has a fixed "
                                    f"first dim {spec.shape[0]}; a dynamic-batch graph's "
                                    "outputs follow the batch"))
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


def audit(path: str | os.PathLike, *, expect_dynamic_batch: bool = False,
          allow_domains: Sequence[str] = (), tensorrt: bool = True) -> AuditReport:
    """Audit the ONNX graph at ``path``; ``report.passed`` is False on any finding.

    ``expect_dynamic_batch``: also a finding when an input's first dim is not symbolic or an
    output's is fixed. ``allow_domains``: custom op domains whose ops are known to keep shapes
    static (by default, any op outside ONNX's domains is a finding). ``tensorrt``: run the
    TensorRT parser pre-flight.
    """
    p = Path(path)
    model = load_graph(p)
    findings = forbidden_ops(model, allow_domains)
    if expect_dynamic_batch:
        findings += static_batch(model)
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
    quantization = quantization_census(model)
    if quantization is not None:
        findings += [Finding("quantized-merge", "", name, "a node of the merge computes on "
                             "dequantized inputs: which tokens merge can change; keep the "
                             "merge's nodes (name scope mame_merge) out of quantization")
                     for name in quantization["merge_nodes_quantized"]]
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
        expect_dynamic_batch=expect_dynamic_batch,
        allowed_domains=sorted(set(allow_domains)),
        quantization=quantization,
    )


def quantization_census(model: onnx.ModelProto) -> dict[str, Any] | None:
    """For a QDQ graph (one with DequantizeLinear nodes): how many MatMul/Gemm/Conv are
    quantized, how many kept in high precision and why, and which merge nodes (found by
    their name scope, :mod:`mame_export.quant.scope`) compute on dequantized inputs."""
    from mame_export.quant.scope import count_quantized

    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return None
    quantized, kept, merge_quantized, n_merge = count_quantized(model)
    return {"quantized": quantized, "kept": kept, "merge_nodes": n_merge,
            "merge_nodes_quantized": merge_quantized}
