"""TensorRT pre-flight: will the TensorRT ONNX parser take this graph? No GPU needed.

The parser's operator support table ships as data (``mame_export/data/trt_onnx_support.json``,
transcribed from onnx-tensorrt's ``docs/operators.md``). Each node is checked for: an op the
parser lacks, a dtype outside the op's supported types (dtypes from ONNX shape inference), and
the restrictions that the table states and this module can check statically (constant inputs,
attribute values, ranks, outputs the parser ignores).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element type -> the names the support table uses.
_DTYPE_NAMES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.INT4: "INT4",
}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    _DTYPE_NAMES[onnx.TensorProto.FLOAT4E2M1] = "FP4"


@dataclass(frozen=True)
class Finding:
    """One reason the TensorRT ONNX parser would reject (part of) a graph."""

    op_type: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.op_type} '{self.node}': {self.message}"


@functools.lru_cache(maxsize=1)
def support_table() -> dict[str, Any]:
    """The packaged operator support table (parsed once)."""
    text = resources.files("mame_export.data").joinpath("trt_onnx_support.json").read_text()
    table: dict[str, Any] = json.loads(text)
    return table


def support_table_info() -> dict[str, Any]:
    """What the table describes and where it comes from, for reports."""
    t = support_table()
    return {
        "table": t["describes"],
        "tensorrt_version": t["tensorrt_version"],
        "opset_range": list(t["opset_range"]),
        "source": t["source"]["url"],
        "source_commit": t["source"]["commit"],
    }


@dataclass
class _TensorInfo:
    dtype: int | None = None
    shape: tuple[int | str | None, ...] | None = None


class _GraphFacts:
    """Dtypes, shapes and constant values of the tensors in a model (all subgraphs included)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.tensors: dict[str, _TensorInfo] = {}
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.constant_nodes: dict[str, onnx.TensorProto | None] = {}
        self.folded: set[str] = set()
        for graph in _graphs(model.graph):
            self._collect(graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            shape = None
            if tt.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else
                              (d.dim_param or None) for d in tt.shape.dim)
            self.tensors[vi.name] = _TensorInfo(tt.elem_type or None, shape)
        for init in graph.initializer:
            self.initializers[init.name] = init
            self.tensors[init.name] = _TensorInfo(init.data_type, tuple(init.dims))
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                value = _constant_value(node)
                self.constant_nodes[node.output[0]] = value
                if value is not None:
                    self.tensors[node.output[0]] = _TensorInfo(value.data_type, tuple(value.dims))
            elif [i for i in node.input if i] and all(self.is_constant(i) for i in node.input if i):
                self.folded.update(o for o in node.output if o)

    def is_initializer(self, name: str) -> bool:
        """An initializer, or a Constant node's output (the parser imports both as weights)."""
        return name in self.initializers or name in self.constant_nodes

    def is_constant(self, name: str) -> bool:
        """Known at build time: an initializer, a Constant, or computed only from those."""
        return self.is_initializer(name) or name in self.folded

    def value(self, name: str) -> np.ndarray | None:
        """The constant's value, or None when it is not stored in the model proto."""
        proto = self.initializers.get(name) or self.constant_nodes.get(name)
        if proto is None or any(e.key == "location" for e in proto.external_data):
            return None
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # noqa: BLE001 - an unreadable constant is simply not checked
            return None


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a tensor (None for sparse or string values)."""
    for a in node.attribute:
        if a.name == "value":
            value: onnx.TensorProto = a.t
            return value
        if a.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(a),
                                                      dtype=np.float32))
        if a.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(a),
                                                      dtype=np.int64))
    return None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, bool]]:
    """(node, typed): every node of the graph, its subgraphs and its model-local functions.
    ``typed`` is False inside functions, where shape inference gives no dtypes."""
    functions = {(f.domain, f.name): f for f in model.functions}
    seen: set[tuple[str, str]] = set()

    def walk(nodes: Iterable[onnx.NodeProto], typed: bool) -> Iterator[tuple[onnx.NodeProto, bool]]:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in seen:  # a function body is checked once, not per call
                    seen.add(key)
                    yield from walk(functions[key].node, False)
                continue
            yield node, typed
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node, typed)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g.node, typed)

    yield from walk(model.graph.node, True)


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - >2 GiB protos or odd graphs: check with declared types
        return model


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


def trt_preflight(model: onnx.ModelProto) -> list[Finding]:
    """Check every node against the TensorRT ONNX parser's support table.

    Returns one ``Finding`` per problem (empty: the parser should take the graph). Dtypes come
    from ONNX shape inference, run here if the model has not been through it.
    """
    table = support_table()
    findings: list[Finding] = []
    opset = _default_opset(model)
    low, high = table["opset_range"]
    if opset is not None and not low <= opset <= high:
        findings.append(Finding("opset", "", f"default-domain opset {opset} is outside "
                                f"{low}..{high}, the range TensorRT {table['tensorrt_version']} "
                                "parses"))
    facts = _GraphFacts(_with_inferred_types(model))
    for node, typed in _nodes(model):
        findings.extend(_check_node(node, typed, table, facts))
    return findings


def _check_node(node: onnx.NodeProto, typed: bool, table: Mapping[str, Any],
                facts: _GraphFacts) -> list[Finding]:
    name = node.name or (node.output[0] if node.output else "<unnamed>")

    def finding(message: str) -> Finding:
        return Finding(node.op_type, name, message)

    if node.domain not in _DEFAULT_DOMAINS:
        return [finding(f"custom-domain op '{node.domain}::{node.op_type}' has no importer in "
                        "the TensorRT ONNX parser (it would need a plugin)")]
    entry = table["ops"].get(node.op_type)
    if entry is None:
        return [finding(f"not in the TensorRT {table['tensorrt_version']} ONNX parser's "
                        "operator table")]
    if not entry["supported"]:
        return [finding(f"not supported by the TensorRT {table['tensorrt_version']} ONNX parser")]
    out = [finding(m) for m in _restriction_messages(node, entry.get("checks", {}), facts)]
    if typed:
        out += [finding(m) for m in _dtype_messages(node, entry, table["dtypes"], facts)]
    return out


def _positions(names: Iterable[str], chosen: list[int] | None) -> Iterator[tuple[int, str]]:
    for i, n in enumerate(names):
        if n and (chosen is None or i in chosen):
            yield i, n


def _dtype_messages(node: onnx.NodeProto, entry: Mapping[str, Any],
                    dtypes: Mapping[str, Any], facts: _GraphFacts) -> Iterator[str]:
    allowed = set(entry.get("types", []))
    cast_down: Mapping[str, str] = dtypes["cast_down"]
    typed_io = entry.get("typed_io", {})
    for kind, names in (("input", node.input), ("output", node.output)):
        for i, tensor in _positions(names, typed_io.get(f"{kind}s")):
            info = facts.tensors.get(tensor)
            if info is None or info.dtype is None:
                continue
            dtype = _DTYPE_NAMES.get(info.dtype, onnx.TensorProto.DataType.Name(info.dtype))
            if cast_down.get(dtype, dtype) not in allowed:
                yield (f"{kind} {i} '{tensor}' is {dtype}; TensorRT supports "
                       f"{', '.join(sorted(allowed))} here")


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _rank(facts: _GraphFacts, tensor: str) -> int | None:
    info = facts.tensors.get(tensor)
    return None if info is None or info.shape is None else len(info.shape)


def _restriction_messages(node: onnx.NodeProto, checks: Mapping[str, Any],
                          facts: _GraphFacts) -> Iterator[str]:
    inputs = list(node.input)

    def present(i: int) -> str | None:
        return inputs[i] if i < len(inputs) and inputs[i] else None

    for i in checks.get("initializer_inputs", []):
        if (t := present(i)) and not facts.is_initializer(t):
            yield f"input {i} '{t}' must be an initializer (it is computed at run time)"
    for i in checks.get("constant_inputs", []):
        if (t := present(i)) and not facts.is_constant(t):
            yield f"input {i} '{t}' must be a build-time constant"
    for i in checks.get("forbid_inputs", []):
        if t := present(i):
            yield f"input {i} '{t}' is not supported by the TensorRT importer"
    for key, limit in checks.get("const_input_max", {}).items():
        t = present(int(key))
        v = facts.value(t) if t else None
        if v is not None and v.size and float(np.max(v)) > limit:
            yield f"input {key} '{t}' is {v.tolist()}, above the supported maximum {limit}"
    for i in checks.get("zero_inputs", []):
        if t := present(i):
            v = facts.value(t)
            if not facts.is_initializer(t) or (v is not None and np.any(v != 0)):
                yield f"input {i} '{t}' must be a constant zero"
    for key, types in checks.get("input_types", {}).items():
        t = present(int(key))
        info = facts.tensors.get(t) if t else None
        if info is not None and info.dtype is not None:
            dtype = _DTYPE_NAMES.get(info.dtype, str(info.dtype))
            if dtype not in types:
                yield f"input {key} '{t}' is {dtype}; must be {', '.join(types)}"
    for key, ranks in checks.get("input_rank", {}).items():
        t = present(int(key))
        r = _rank(facts, t) if t else None
        if r is not None and r not in ranks:
            yield f"input {key} '{t}' has rank {r}; supported: {', '.join(map(str, ranks))}"
    for i in checks.get("static_inputs", []):
        t = present(i)
        info = facts.tensors.get(t) if t else None
        if info is not None and info.shape is not None and not all(
                isinstance(d, int) and d > 0 for d in info.shape):
            yield f"input {i} '{t}' must have static dims, has {list(info.shape)}"
    if (limit := checks.get("max_outputs")) is not None:
        extra = [o for o in node.output[limit:] if o]
        if extra:
            yield f"only the first {limit} output(s) are supported; also uses {extra}"
    for name in checks.get("forbid_attrs", []):
        if _attr(node, name) is not None:
            yield f"attribute '{name}' is not supported"
    for name, allowed in checks.get("attr_values", {}).items():
        value = _attr(node, name)
        if isinstance(value, bytes):
            value = value.decode()
        if value is not None and value not in allowed:
            yield f"attribute {name}={value!r} is not supported (supported: {allowed})"
    for name in checks.get("all_ones_attrs", []):
        value = _attr(node, name)
        if value and any(v != 1 for v in value):
            yield f"attribute {name}={list(value)} is not supported (must be all ones)"
