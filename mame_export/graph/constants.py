"""What every tensor of an ONNX file depends on: nothing (fixed at export time), input shapes
only, or input values (data), followed through the main graph, the bodies its nodes hold and
each call of a model-local function.

Nothing here recurses: each step that would (a held body, a function call) is a generator that
hands its sub-step to :func:`_run`, which keeps the stack (a hostile file can nest calls
thousands deep).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from mame_export.graph.walk import (
    DEFAULT_DOMAINS,
    FunctionKey,
    function_key,
    function_label,
    local_functions,
    subgraphs,
    walk,
)

# What a tensor's value depends on: nothing (fixed at export time), input shapes only, or
# input values (data).
CONST, SHAPE, DATA = 0, 1, 2
CONSTANT_SOURCES = frozenset({"Constant", "ConstantOfShape"})
_SHAPE_OF = frozenset({"Shape", "Size"})  # outputs that depend on input shapes, not values
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})

Check = Callable[[onnx.NodeProto, list[int], list[list[int]], str], bool]
"""(node, what each of its inputs depends on, what each output of each body it holds depends
on, where) -> True when the node makes the shape of its outputs depend on data (the audit's
rules; see :class:`Constants`). Called once a node's bodies are analysed."""

# A step of the analysis: a generator that yields the sub-steps it needs (their results are
# sent back in) and returns its own result.
Step = Generator[Any, Any, Any]


def _run(step: Step) -> Any:
    """Run ``step`` and every sub-step it yields, on an explicit stack (no recursion)."""
    stack = [step]
    value: Any = None
    while stack:
        try:
            sub = stack[-1].send(value)
        except StopIteration as done:
            stack.pop()
            value = done.value
            continue
        stack.append(sub)
        value = None
    return value


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

    A Loop body's iteration number depends on shapes only and its condition input on the
    Loop's; other body inputs count as data. ``check``, when given, sees each node with the
    kinds of its inputs and of its bodies' outputs, as it is reached; a function's body is
    checked once per distinct kinds of a call's inputs.
    """

    def __init__(self, model: onnx.ModelProto, check: Check | None = None) -> None:
        self.check = check
        self.kinds: dict[tuple[FunctionKey | None, str], int] = {}
        self.weights: dict[tuple[FunctionKey | None, str], onnx.TensorProto | None] = {}
        self._functions = local_functions(model)
        # Calls under analysis: a recursive call is not followed.
        self._active: set[FunctionKey] = set()
        # (function, input kinds, inputs with data-dependent shapes) -> output kinds and
        # outputs with data-dependent shapes: calls alike are analysed once
        self._done: dict[tuple[FunctionKey, tuple[int, ...], frozenset[int]],
                         tuple[list[int], frozenset[int]]] = {}
        _run(self._scan(list(model.graph.node), self._enter(model.graph, {}, None), set(), "",
                        None))
        # Functions the graph never calls are still part of the file: follow them on their own.
        called = {s.calls for s in walk(model) if s.calls is not None}
        for f in model.functions:
            key = (f.domain, f.name, f.overload)
            if key not in called or self._functions[key] is not f:
                inner = self._bind(key, {i: DATA for i in f.input})
                _run(self._scan(list(f.node), inner, set(), f"{function_label(key)}/", key))

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
    def _enter(self, graph: onnx.GraphProto, outer: dict[str, int], scope: FunctionKey | None,
               input_kinds: list[int] | None = None) -> dict[str, int]:
        """The kinds a (sub)graph's nodes see: the outer tensors, its inputs (data unless
        ``input_kinds`` says otherwise) and its initializers (weights)."""
        for init in graph.initializer:
            self.weights[(scope, init.name)] = init
        given = input_kinds or []
        fresh = {vi.name: given[i] if i < len(given) else DATA
                 for i, vi in enumerate(graph.input)}
        fresh.update({init.name: CONST for init in graph.initializer})
        return {**outer, **self._bind(scope, fresh)}

    def _bind(self, scope: FunctionKey | None, kinds: dict[str, int]) -> dict[str, int]:
        for name, kind in kinds.items():
            self._record(scope, name, kind)
        return kinds

    def _record(self, scope: FunctionKey | None, name: str, kind: int) -> None:
        self.kinds[(scope, name)] = max(kind, self.kinds.get((scope, name), CONST))

    def _scan(self, nodes: list[onnx.NodeProto], kinds: dict[str, int], dyn_shape: set[str],
              where: str, scope: FunctionKey | None) -> Step:
        for node in nodes:
            ins = [kinds.get(i, DATA) if i else CONST for i in node.input]
            key = function_key(node)
            if key in self._functions and key not in self._active:
                outs = yield self._call(self._functions[key], node, ins, dyn_shape, where)
            else:
                outs = yield self._node(node, ins, kinds, dyn_shape, where, scope)
            for name, kind in zip(node.output, outs, strict=False):
                if name:
                    kinds[name] = kind
                    self._record(scope, name, kind)
            if any(i in dyn_shape for i in node.input if i):
                dyn_shape.update(o for o in node.output if o)
        return None

    def _call(self, fn: onnx.FunctionProto, node: onnx.NodeProto, ins: list[int],
              dyn_shape: set[str], where: str) -> Step:
        """A call of a model-local function: its body, with the caller's inputs."""
        key = (fn.domain, fn.name, fn.overload)
        dyn_in = frozenset(i for i, actual in enumerate(node.input[:len(fn.input)])
                           if actual in dyn_shape)
        memo = (key, tuple(ins[:len(fn.input)]), dyn_in)
        if memo not in self._done:
            inner = self._bind(key, dict(zip(fn.input, ins, strict=False)))
            inner_dyn = {fn.input[i] for i in dyn_in}
            self._active.add(key)
            yield self._scan(list(fn.node), inner, inner_dyn,
                             f"{where}{function_label(key)}({node.name or '<unnamed>'})/", key)
            self._active.discard(key)
            self._done[memo] = ([inner.get(o, DATA) for o in fn.output],
                                frozenset(i for i, o in enumerate(fn.output) if o in inner_dyn))
        outs, dyn_out = self._done[memo]
        dyn_shape.update(o for i, o in enumerate(node.output) if o and i in dyn_out)
        return list(outs)

    def _node(self, node: onnx.NodeProto, ins: list[int], kinds: dict[str, int],
              dyn_shape: set[str], where: str, scope: FunctionKey | None) -> Step:
        op = node.op_type
        default = node.domain in DEFAULT_DOMAINS
        if op == "Constant" and default and node.output:
            self.weights[(scope, node.output[0])] = constant_value(node)
        # Subgraph bodies see the outer tensors; their own inputs count as data (but Loop's).
        bodies: list[list[int]] = []
        for g in subgraphs(node):
            inner = self._enter(g, kinds, scope, _loop_body_inputs(node, ins) if
                                default and op == "Loop" else None)
            yield self._scan(list(g.node), inner, set(dyn_shape), f"{where}{node.name or op}/",
                             scope)
            bodies.append([inner.get(o.name, DATA) for o in g.output])
        if self.check is not None and self.check(node, ins, bodies, where):
            dyn_shape.update(o for o in node.output if o)
        body_kind = max((k for outs in bodies for k in outs), default=CONST)
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


def _loop_body_inputs(node: onnx.NodeProto, ins: list[int]) -> list[int]:
    """A Loop body's inputs: the iteration number (the same in every run), the condition (as
    the Loop's, or true when it has none), then the loop-carried values (data)."""
    cond = ins[1] if len(ins) > 1 and node.input[1] else CONST
    return [SHAPE, max(SHAPE, cond)]
