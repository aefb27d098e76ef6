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
from importlib import resources
from typing import Any

import numpy as np
import onnx

from mame_export.graph import (
    DEFAULT_DOMAINS,
    Constants,
    Finding,
    FunctionKey,
    TensorSpec,
    graph_opset,
    tensor_types,
    walk,
    with_inferred_types,
)

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


class _Facts:
    """What the checks ask of a node's tensors: types (from shape inference; none inside a
    function body) and constants, in the scope of the node."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.types = tensor_types(model)
        self.constants = Constants(model)
        self.scope: FunctionKey | None = None

    def type(self, name: str) -> TensorSpec | None:
        return self.types.get(name) if self.scope is None else None

    def is_initializer(self, name: str) -> bool:
        return self.constants.is_initializer(name, self.scope)

    def is_constant(self, name: str) -> bool:
        return self.constants.is_constant(name, self.scope)

    def value(self, name: str) -> np.ndarray | None:
        return self.constants.value(name, self.scope)


def trt_preflight(model: onnx.ModelProto) -> list[Finding]:
    """Check every node against the TensorRT ONNX parser's support table.

    Returns one ``Finding`` per problem (empty: the parser should take the graph). Dtypes come
    from ONNX shape inference, run here if the model has not been through it.
    """
    table = support_table()
    findings: list[Finding] = []
    opset = graph_opset(model)
    low, high = table["opset_range"]
    if opset is not None and not low <= opset <= high:
        findings.append(Finding("tensorrt", "opset", "", f"default-domain opset {opset} is outside "
                                f"{low}..{high}, the range TensorRT {table['tensorrt_version']} "
                                "parses"))
    facts = _Facts(with_inferred_types(model))
    for site in walk(model):
        if site.calls is not None or not site.reachable:
            continue  # the parser imports a function's body where it is called
        facts.scope = site.function
        findings.extend(_check_node(site.node, site.typed, table, facts))
        findings.extend(_explicit_quantization(site.node, facts))
    return findings


def _explicit_quantization(node: onnx.NodeProto, facts: _Facts) -> list[Finding]:
    """TensorRT's explicit quantization takes symmetric Q/DQ only: a zero point, where
    given, must be a constant of zeros (mame_export.quant writes them so)."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 \
            or not node.input[2]:
        return []
    zero = facts.value(node.input[2])
    if zero is not None and not np.any(zero):
        return []
    why = "is not a constant" if zero is None else "is not 0"
    return [Finding("tensorrt", node.op_type, node.name, f"zero point {node.input[2]!r} {why}; "
                    "TensorRT's explicit quantization takes symmetric scales only (zero "
                    "points 0)")]


def _check_node(node: onnx.NodeProto, typed: bool, table: Mapping[str, Any],
                facts: _Facts) -> list[Finding]:
    name = node.name or (node.output[0] if node.output else "<unnamed>")

    def finding(message: str) -> Finding:
        return Finding("tensorrt", node.op_type, name, message)

    if node.domain not in DEFAULT_DOMAINS:
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
                    dtypes: Mapping[str, Any], facts: _Facts) -> Iterator[str]:
    allowed = set(entry.get("types", []))
    cast_down: Mapping[str, str] = dtypes["cast_down"]
    typed_io = entry.get("typed_io", {})
    for kind, names in (("input", node.input), ("output", node.output)):
        for i, tensor in _positions(names, typed_io.get(f"{kind}s")):
            info = facts.type(tensor)
            if info is None or info.elem_type is None:
                continue
            dtype = _DTYPE_NAMES.get(info.elem_type, info.dtype)
            if cast_down.get(dtype, dtype) not in allowed:
                yield (f"{kind} {i} '{tensor}' is {dtype}; TensorRT supports "
                       f"{', '.join(sorted(allowed))} here")


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _rank(facts: _Facts, tensor: str) -> int | None:
    info = facts.type(tensor)
    return None if info is None or not info.ranked else len(info.shape)


def _restriction_messages(node: onnx.NodeProto, checks: Mapping[str, Any],
                          facts: _Facts) -> Iterator[str]:
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
        info = facts.type(t) if t else None
        if info is not None and info.elem_type is not None:
            dtype = _DTYPE_NAMES.get(info.elem_type, str(info.elem_type))
            if dtype not in types:
                yield f"input {key} '{t}' is {dtype}; must be {', '.join(types)}"
    for key, ranks in checks.get("input_rank", {}).items():
        t = present(int(key))
        r = _rank(facts, t) if t else None
        if r is not None and r not in ranks:
            yield f"input {key} '{t}' has rank {r}; supported: {', '.join(map(str, ranks))}"
    for i in checks.get("static_inputs", []):
        t = present(i)
        info = facts.type(t) if t else None
        if info is not None and info.ranked and not all(
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
