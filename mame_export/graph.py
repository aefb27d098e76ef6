"""An ONNX graph as data: reading it, walking every node, which tensors are constants, its
inputs and outputs, precision, opset and hash, and the ``Finding`` that reports a problem in it.

Below the audit and the TensorRT pre-flight, which are both built on it: this module imports
onnx, numpy, the standard library and the lowest ``mame_export`` modules (errors, artifacts).
Walking, here, always means the whole file: the main graph, the bodies of If/Loop/Scan nodes
and the bodies of the model-local functions.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mame_export.artifacts import sha256_file
from mame_export.errors import UserError, check_file

DEFAULT_DOMAINS = ("", "ai.onnx")
FunctionKey = tuple[str, str]  # (domain, name) of a model-local function

_PRECISION = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
}


class GraphReadError(UserError):
    """The graph file is missing or not a readable ONNX model."""


@dataclass(frozen=True)
class Finding:
    """One problem in a graph: a data-dependent op, a checker or shape-inference error, or
    something the TensorRT ONNX parser would reject."""

    kind: str  # "forbidden-op", "checker", "shape-inference", "tensorrt"
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


# ------------------------------------------------------------------ walking


def local_functions(model: onnx.ModelProto) -> dict[FunctionKey, onnx.FunctionProto]:
    return {(f.domain, f.name): f for f in model.functions}


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds (If branches, Loop and Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


@dataclass(frozen=True)
class Site:
    """A node and where it stands in the file."""

    node: onnx.NodeProto
    where: str  # "" in the main graph; "If_0/" in that node's branches; "fn/" in function fn
    function: FunctionKey | None  # the model-local function whose body holds the node
    reachable: bool  # the main graph reaches it (a parser imports only those)
    calls: FunctionKey | None  # the model-local function the node calls, if it calls one

    @property
    def typed(self) -> bool:
        """Shape inference gives dtypes here (it types no function body)."""
        return self.function is None


def walk(model: onnx.ModelProto) -> Iterator[Site]:
    """Every node of the file, once: the main graph in order, the bodies a node holds right
    after it, a function's body right after its first call, and the bodies of functions no
    call reaches at the end."""
    functions = local_functions(model)
    seen: set[FunctionKey] = set()

    def nodes(body: list[onnx.NodeProto], where: str, function: FunctionKey | None,
              reachable: bool) -> Iterator[Site]:
        for node in body:
            key = (node.domain, node.op_type)
            calls = key if key in functions else None
            yield Site(node, where, function, reachable, calls)
            if calls is not None and calls not in seen:
                seen.add(calls)
                yield from nodes(list(functions[calls].node), f"{calls[1]}/", calls, reachable)
            for g in subgraphs(node):
                yield from nodes(list(g.node), f"{where}{node.name or node.op_type}/",
                                 function, reachable)

    yield from nodes(list(model.graph.node), "", None, True)
    for key, f in functions.items():
        if key not in seen:
            seen.add(key)
            yield from nodes(list(f.node), f"{f.name}/", key, False)


# ------------------------------------------------------------------ constants

# What a tensor's value depends on: nothing (fixed at export time), input shapes only, or
# input values (data).
CONST, SHAPE, DATA = 0, 1, 2
CONSTANT_SOURCES = frozenset({"Constant", "ConstantOfShape"})
_SHAPE_OF = frozenset({"Shape", "Size"})  # outputs that depend on input shapes, not values
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})

Check = Callable[[onnx.NodeProto, list[int], str], bool]
"""(node, what each of its inputs depends on, where) -> True when the node makes the shape of
its outputs depend on data (the audit's rules; see :class:`Constants`)."""


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
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


class Constants:
    """What every tensor of the file depends on (CONST, SHAPE or DATA), following the values
    through the graph, the bodies its nodes hold and each call of a model-local function (a
    function's tensors take the least constant kind over its calls), and the weights
    (initializers and Constant outputs). Tensors are named per scope: ``None`` for the main
    graph and its subgraphs (ONNX names are unique across them), a function's key inside it.

    ``check``, when given, sees each node with the kinds of its inputs, as it is reached.
    """

    def __init__(self, model: onnx.ModelProto, check: Check | None = None) -> None:
        self.check = check
        self.kinds: dict[tuple[FunctionKey | None, str], int] = {}
        self.weights: dict[tuple[FunctionKey | None, str], onnx.TensorProto | None] = {}
        self._functions = local_functions(model)
        self._stack: list[FunctionKey] = []
        self._scan(list(model.graph.node), self._enter(model.graph, {}, None), set(), "", None)
        # Functions the graph never calls are still part of the file: follow them on their own.
        called = {s.calls for s in walk(model) if s.calls is not None}
        for key, f in self._functions.items():
            if key not in called:
                inner = self._bind(key, {i: DATA for i in f.input})
                self._scan(list(f.node), inner, set(), f"{f.name}/", key)

    # -- queries
    def kind(self, name: str, scope: FunctionKey | None = None) -> int:
        return self.kinds.get((scope, name), DATA)

    def is_initializer(self, name: str, scope: FunctionKey | None = None) -> bool:
        """An initializer, or a Constant node's output (a parser imports both as weights)."""
        return (scope, name) in self.weights

    def is_constant(self, name: str, scope: FunctionKey | None = None) -> bool:
        """Known at build time: a weight, or computed only from weights."""
        return self.is_initializer(name, scope) or self.kind(name, scope) == CONST

    def value(self, name: str, scope: FunctionKey | None = None) -> np.ndarray | None:
        """The weight's value, or None when it is not stored in the model proto."""
        proto = self.weights.get((scope, name))
        if proto is None or any(e.key == "location" for e in proto.external_data):
            return None
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # noqa: BLE001 - an unreadable constant is simply not used
            return None

    # -- the analysis
    def _enter(self, graph: onnx.GraphProto, outer: dict[str, int],
               scope: FunctionKey | None) -> dict[str, int]:
        """The kinds a (sub)graph's nodes see: the outer tensors, its inputs (data) and its
        initializers (weights)."""
        for init in graph.initializer:
            self.weights[(scope, init.name)] = init
        fresh = {i.name: DATA for i in graph.input}
        fresh.update({init.name: CONST for init in graph.initializer})
        return {**outer, **self._bind(scope, fresh)}

    def _bind(self, scope: FunctionKey | None, kinds: dict[str, int]) -> dict[str, int]:
        for name, kind in kinds.items():
            self._record(scope, name, kind)
        return kinds

    def _scan(self, nodes: list[onnx.NodeProto], kinds: dict[str, int], dyn_shape: set[str],
              where: str, scope: FunctionKey | None) -> None:
        for node in nodes:
            ins = [kinds.get(i, DATA) if i else CONST for i in node.input]
            key = (node.domain, node.op_type)
            if key in self._functions and key not in self._stack:
                outs = self._call(self._functions[key], node, ins, dyn_shape, where)
            else:
                outs = self._node(node, ins, kinds, dyn_shape, where, scope)
            for name, kind in zip(node.output, outs, strict=False):
                if name:
                    kinds[name] = kind
                    self._record(scope, name, kind)
            if any(i in dyn_shape for i in node.input if i):
                dyn_shape.update(o for o in node.output if o)

    def _record(self, scope: FunctionKey | None, name: str, kind: int) -> None:
        self.kinds[(scope, name)] = max(kind, self.kinds.get((scope, name), CONST))

    def _call(self, fn: onnx.FunctionProto, node: onnx.NodeProto, ins: list[int],
              dyn_shape: set[str], where: str) -> list[int]:
        """A call of a model-local function: its body, with the caller's inputs."""
        key = (fn.domain, fn.name)
        inner = self._bind(key, dict(zip(fn.input, ins, strict=False)))
        inner_dyn = {formal for formal, actual in zip(fn.input, node.input, strict=False)
                     if actual in dyn_shape}
        self._stack.append(key)
        try:
            self._scan(list(fn.node), inner, inner_dyn,
                       f"{where}{fn.name}({node.name or '<unnamed>'})/", key)
        finally:
            self._stack.pop()
        if any(o in inner_dyn for o in fn.output):
            dyn_shape.update(o for o in node.output if o)
        return [inner.get(o, DATA) for o in fn.output]

    def _node(self, node: onnx.NodeProto, ins: list[int], kinds: dict[str, int],
              dyn_shape: set[str], where: str, scope: FunctionKey | None) -> list[int]:
        op = node.op_type
        default = node.domain in DEFAULT_DOMAINS
        if op == "Constant" and default and node.output:
            self.weights[(scope, node.output[0])] = constant_value(node)
        if self.check is not None and self.check(node, ins, where):
            dyn_shape.update(o for o in node.output if o)
        # Subgraph bodies see the outer tensors; their own inputs count as data.
        body_kind = CONST
        for g in subgraphs(node):
            inner = self._enter(g, kinds, scope)
            self._scan(list(g.node), inner, set(dyn_shape), f"{where}{node.name or op}/", scope)
            for o in g.output:
                body_kind = max(body_kind, inner.get(o.name, DATA))
        if op in _SHAPE_OF:
            kind = DATA if any(i in dyn_shape for i in node.input if i) else SHAPE
            if all(k == CONST for k in ins):
                kind = CONST
        elif op in _RANDOM_OPS:
            kind = DATA
        elif op in CONSTANT_SOURCES:
            kind = max([CONST, *ins])
        elif not ins:
            kind = CONST if default else DATA
        else:
            kind = max([*ins, body_kind])
        return [kind] * len(node.output)


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
