"""Walking an ONNX file: every node of the main graph, of the bodies its nodes hold (If, Loop,
Scan) and of the model-local functions, once each.

Nothing here recurses: a hostile file can nest function calls thousands deep, so the walk keeps
its own stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
# A model-local function: (domain, name, overload). IR 10 lets several functions share a
# domain and name, told apart by the overload a node names.
FunctionKey = tuple[str, str, str]


def function_key(node: onnx.NodeProto) -> FunctionKey:
    """The model-local function ``node`` would call."""
    return (node.domain, node.op_type, node.overload)


def function_label(key: FunctionKey) -> str:
    """``name`` or ``name[overload]``: how a function is named in a node's place."""
    return f"{key[1]}[{key[2]}]" if key[2] else key[1]


def local_functions(model: onnx.ModelProto) -> dict[FunctionKey, onnx.FunctionProto]:
    """The model-local functions by key; of two with one key (the checker refuses that), the
    first."""
    out: dict[FunctionKey, onnx.FunctionProto] = {}
    for f in model.functions:
        out.setdefault((f.domain, f.name, f.overload), f)
    return out


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


# A body still being walked: its remaining nodes, where it is, the function holding it, and
# whether the main graph reaches it.
_Body = tuple[Iterator[onnx.NodeProto], str, "FunctionKey | None", bool]


def walk(model: onnx.ModelProto) -> Iterator[Site]:
    """Every node of the file, once: the main graph in order, the bodies a node holds right
    after it, a function's body right after its first call, and the bodies of functions no
    call reaches (and of second definitions of one key) at the end."""
    functions = local_functions(model)
    seen: set[FunctionKey] = set()

    def drain(stack: list[_Body]) -> Iterator[Site]:
        while stack:
            body, where, function, reachable = stack[-1]
            node = next(body, None)
            if node is None:
                stack.pop()
                continue
            key = function_key(node)
            calls = key if key in functions else None
            yield Site(node, where, function, reachable, calls)
            # The top of the stack is walked first: the called body, then each held graph.
            for g in reversed(subgraphs(node)):
                stack.append((iter(g.node), f"{where}{node.name or node.op_type}/", function,
                              reachable))
            if calls is not None and calls not in seen:
                seen.add(calls)
                stack.append((iter(functions[calls].node), f"{function_label(calls)}/", calls,
                               reachable))

    yield from drain([(iter(model.graph.node), "", None, True)])
    for f in model.functions:
        key = (f.domain, f.name, f.overload)
        if key not in seen or functions[key] is not f:
            seen.add(key)
            yield from drain([(iter(f.node), f"{function_label(key)}/", key, False)])
