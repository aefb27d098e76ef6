"""An ONNX graph as data: reading it, walking every node, which tensors are constants, its
inputs and outputs, precision, opset and hash, and the ``Finding`` that reports a problem in it.

Below the audit and the TensorRT pre-flight, which are both built on it: this package imports
onnx, numpy, the standard library and the lowest ``mame_export`` modules (errors, artifacts).
Walking (``graph.walk``), here, always means the whole file: the main graph, the bodies of
If/Loop/Scan nodes and the bodies of the model-local functions; ``graph.constants`` follows
what each tensor depends on through all of them.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from mame_export.artifacts import sha256_file
from mame_export.errors import UserError, check_file
from mame_export.graph.constants import (
    CONST,
    CONSTANT_SOURCES,
    DATA,
    SHAPE,
    Check,
    Constants,
    constant_value,
)
from mame_export.graph.walk import (
    DEFAULT_DOMAINS,
    FunctionKey,
    Site,
    function_key,
    function_label,
    local_functions,
    subgraphs,
    walk,
)

__all__ = [
    "CONST", "CONSTANT_SOURCES", "DATA", "DEFAULT_DOMAINS", "SHAPE", "Check", "Constants",
    "Finding", "FunctionKey", "GraphReadError", "Site", "TensorSpec", "constant_value",
    "function_key", "function_label", "graph_inputs", "graph_opset",
    "graph_outputs", "graph_precision", "graph_sha256", "load_graph", "local_functions",
    "subgraphs", "tensor_types", "walk", "with_inferred_types",
]

_PRECISION = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    # QDQ graphs (mame_export.quant): most weight elements are quantized
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.FLOAT8E4M3FN: "fp8",
}


class GraphReadError(UserError):
    """The graph file is missing or not a readable ONNX model."""


@dataclass(frozen=True)
class Finding:
    """One problem in a graph: a data-dependent op, a checker or shape-inference error, or
    something the TensorRT ONNX parser would reject."""

    kind: str  # "forbidden-op", "static-batch", "checker", "shape-inference", "tensorrt"
    op_type: str
    node: str
    message: str

    def __str__(self) -> str:
        where = f" ({self.op_type} {self.node})" if self.op_type else ""
        return f"[{self.kind}]{where} {self.message}"


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


# ------------------------------------------------------------------ inputs, outputs, types


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as declared: dtype (ONNX element type number, None when unknown) and dims
    (ints, names of symbolic dims, or None for unknown; ``ranked`` False: not even the rank
    is known, and ``shape`` is empty)."""

    name: str
    elem_type: int | None
    shape: tuple[int | str | None, ...]
    ranked: bool = True

    @property
    def dtype(self) -> str:
        """The element type's ONNX name ('FLOAT', 'FLOAT16', ...)."""
        return onnx.TensorProto.DataType.Name(self.elem_type or 0)

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] > 0)


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                  for d in tt.shape.dim)
    return TensorSpec(vi.name, tt.elem_type or None, shape, tt.HasField("shape"))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's real inputs (initializers listed as inputs by old exporters excluded)."""
    weights = {init.name for init in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in weights]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in model.graph.output]


def tensor_types(model: onnx.ModelProto) -> dict[str, TensorSpec]:
    """The dtype and shape of every tensor the graph and its subgraphs declare (inputs,
    outputs, value_info after shape inference, weights); function bodies declare none."""
    graphs = [model.graph, *(g for s in walk(model) if s.function is None
                             for g in subgraphs(s.node))]
    out: dict[str, TensorSpec] = {}
    for graph in graphs:
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.HasField("tensor_type"):
                out[vi.name] = _spec(vi)
        for init in graph.initializer:
            out[init.name] = TensorSpec(init.name, init.data_type, tuple(init.dims))
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                value = constant_value(node)
                if value is not None:
                    out[node.output[0]] = TensorSpec(node.output[0], value.data_type,
                                                     tuple(value.dims))
    return out


def with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after ONNX shape inference, or as it is when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - >2 GiB protos or odd graphs: use the declared types
        return model


# ------------------------------------------------------------------ precision, opset, hash


def graph_precision(model: onnx.ModelProto) -> str:
    """fp32, fp16 or bf16: the float type holding most weight elements (else of the inputs)."""
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_type in _PRECISION:
            key = _PRECISION[init.data_type]
            counts[key] = counts.get(key, 0) + math.prod(init.dims)
    if counts:
        return max(counts, key=lambda k: counts[k])
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type in _PRECISION:
            return _PRECISION[vi.type.tensor_type.elem_type]
    return "fp32"


def graph_opset(model: onnx.ModelProto | str | os.PathLike) -> int | None:
    """The default-domain opset the graph declares (from a file, its weights are not read)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)


def graph_sha256(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> str:
    """sha256 of the graph file; when weights live in side files, of the file and those files."""
    path = Path(path)
    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    side_files = sorted({
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    })
    digest = sha256_file(path)
    if not side_files:
        return digest
    h = hashlib.sha256(digest.encode())
    for name in side_files:
        h.update(f"\n{name}:{sha256_file(path.parent / name)}".encode())
    return h.hexdigest()
