"""mame_export.graph: the one walker, the one constant analysis, a graph's IO, precision,
opset and hash, and the one Finding type the audit and the TensorRT pre-flight share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import onnx_model, vi
from onnx import TensorProto, helper, numpy_helper

from mame_export import audit as audit_mod
from mame_export.graph import (
    CONST,
    DATA,
    SHAPE,
    Constants,
    Finding,
    GraphReadError,
    graph_inputs,
    graph_opset,
    graph_outputs,
    graph_precision,
    graph_sha256,
    load_graph,
    tensor_types,
    walk,
)
from mame_export.trt.support import trt_preflight


def _branch(name: str, op: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"], name=f"{name}_op")],
                             name, [], [vi(f"{name}_y", [2, 8])])


def nested_model() -> onnx.ModelProto:
    """Main graph: a call of local::twice (Relu inside), an If whose branches hold a Neg and an
    Abs, and a function nothing calls (Sigmoid inside)."""
    twice = helper.make_function("local", "twice", ["a"], ["b"],
                                 [helper.make_node("Relu", ["a"], ["b"], name="inner_relu")],
                                 [helper.make_opsetid("", 18)])
    unused = helper.make_function("local", "unused", ["a"], ["b"],
                                  [helper.make_node("Sigmoid", ["a"], ["b"], name="lonely")],
                                  [helper.make_opsetid("", 18)])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nodes = [
        helper.make_node("twice", ["x"], ["t"], domain="local", name="call"),
        helper.make_node("If", ["cond"], ["z"], name="branch",
                         then_branch=_branch("then", "Neg"), else_branch=_branch("else", "Abs")),
    ]
    return onnx_model(nodes, [vi("x", [2, 8])], [vi("t", [2, 8]), vi("z", [2, 8])], [cond],
                      [twice, unused])


# ------------------------------------------------------------------ the walker


def test_walk_visits_function_bodies_and_if_subgraphs_once() -> None:
    sites = {s.node.name: s for s in walk(nested_model())}
    assert list(sites) == ["call", "inner_relu", "branch", "else_op", "then_op", "lonely"]
    assert sites["call"].calls == ("local", "twice", "") and sites["call"].typed
    assert sites["inner_relu"].function == ("local", "twice", "")
    assert sites["inner_relu"].reachable and not sites["inner_relu"].typed
    assert sites["then_op"].where == "branch/" and sites["then_op"].typed
    assert sites["lonely"].where == "unused/" and not sites["lonely"].reachable


def test_census_counts_every_node_once() -> None:
    census = audit_mod.op_census(nested_model())
    assert census == {"twice": 1, "Relu": 1, "If": 1, "Neg": 1, "Abs": 1, "Sigmoid": 1}


# ------------------------------------------------------------------ constants


def constant_model() -> onnx.ModelProto:
    shape = helper.make_node("Constant", [], ["shape"], name="c",
                             value=numpy_helper.from_array(np.array([4, 4], np.int64)))
    nodes = [
        shape,
        helper.make_node("Add", ["shape", "one"], ["folded"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["r"]),
    ]
    one = numpy_helper.from_array(np.array([1, 1], np.int64), "one")
    return onnx_model(nodes, [vi("x", [2, 8])], [vi("r", [4, 4])], [one])


def test_constant_analysis_kinds_and_values() -> None:
    c = Constants(constant_model())
    assert c.kind("one") == c.kind("shape") == c.kind("folded") == CONST
    assert c.kind("xs") == SHAPE and c.kind("y") == DATA and c.kind("x") == DATA
    assert c.is_initializer("one") and c.is_initializer("shape")
    assert not c.is_initializer("folded") and c.is_constant("folded")
    assert not c.is_constant("y") and not c.is_constant("nowhere")
    np.testing.assert_array_equal(c.value("shape"), [4, 4])
    assert c.value("folded") is None


def test_constants_inside_a_function_are_scoped_and_joined_over_calls() -> None:
    k = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64,
                                                                         [1], [2]))
    fn = helper.make_function("local", "f", ["a"], ["b"],
                              [k, helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    seven = numpy_helper.from_array(np.array([7.0], np.float32), "seven")
    nodes = [helper.make_node("f", ["seven"], ["u"], domain="local"),
             helper.make_node("f", ["x"], ["v"], domain="local")]
    c = Constants(onnx_model(nodes, [vi("x", [1])], [vi("u", [1]), vi("v", [1])], [seven], [fn]))
    key = ("local", "f", "")
    assert c.is_initializer("k", key) and not c.is_initializer("k")  # scoped to the body
    assert c.kind("u") == CONST and c.kind("v") == DATA
    assert c.kind("b", key) == DATA  # the least constant over both calls


def test_constants_check_hook_sees_input_kinds() -> None:
    seen: dict[str, list[int]] = {}

    def check(node: onnx.NodeProto, ins: list[int], bodies: list[list[int]], where: str) -> bool:
        seen[node.op_type] = ins
        return False

    Constants(constant_model(), check)
    assert seen["Reshape"] == [DATA, CONST] and seen["Add"] == [CONST, CONST]


def test_constants_check_hook_sees_what_a_loop_body_gives() -> None:
    # body: the condition passed through (as the Loop's: constant) and x + x (data)
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Add", ["x", "x"], ["acc"])],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL)],
        [vi("c_out", [], TensorProto.BOOL), vi("acc", [2, 8])])
    inits = [helper.make_tensor("n", TensorProto.INT64, [], [3]),
             helper.make_tensor("yes", TensorProto.BOOL, [], [True])]
    loop = helper.make_node("Loop", ["n", "yes"], ["ys"], body=body)
    seen: dict[str, tuple[list[int], list[list[int]]]] = {}

    def check(node: onnx.NodeProto, ins: list[int], bodies: list[list[int]], where: str) -> bool:
        seen[node.op_type] = (ins, bodies)
        return False

    c = Constants(onnx_model([loop], [vi("x", [2, 8])], [vi("ys", [3, 2, 8])], inits), check)
    assert seen["Loop"] == ([CONST, CONST], [[SHAPE, DATA]])
    assert c.kind("i") == SHAPE and not c.is_constant("i")  # the iteration number


# ------------------------------------------------------------------ IO, precision, opset, hash


def test_io_types_precision_and_opset() -> None:
    model = onnx_model([helper.make_node("Relu", ["x"], ["y"])],
                       [vi("x", ["batch", 8], TensorProto.FLOAT16), vi("w", [8])],
                       [vi("y", None, TensorProto.FLOAT16)],
                       [numpy_helper.from_array(np.zeros(8, np.float16), "w")])
    (x,) = graph_inputs(model)  # the initializer listed as an input is not a real input
    assert (x.name, x.dtype, x.shape, x.dynamic_batch) == ("x", "FLOAT16", ("batch", 8), True)
    (y,) = graph_outputs(model)
    assert y.elem_type == TensorProto.FLOAT16 and not y.ranked
    assert tensor_types(model)["w"].shape == (8,)
    assert graph_precision(model) == "fp16"
    assert graph_opset(model) == 18


def test_hash_of_the_file_and_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    onnx.save(constant_model(), str(path))
    assert graph_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert graph_opset(path) == 18
    assert [n.op_type for n in load_graph(path).graph.node][-1] == "Reshape"
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(GraphReadError, match="empty"):
        load_graph(tmp_path / "empty.onnx")


# ------------------------------------------------------------------ one Finding


def test_audit_and_preflight_report_the_same_finding_type() -> None:
    topk = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, name="topk")
    model = onnx_model([topk], [vi("x", [2, 8])], [vi("v", [2, 2])],
                       [helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    (forbidden,) = audit_mod.forbidden_ops(model)
    assert isinstance(forbidden, Finding) and forbidden.kind == "forbidden-op"
    assert str(forbidden) == "[forbidden-op] (TopK topk) data-dependent op in a graph that " \
                             "must be static"
    det = onnx_model([helper.make_node("Det", ["m"], ["d"], name="det")],
                     [vi("m", [3, 3])], [vi("d", [])])
    (trt,) = trt_preflight(det)
    assert isinstance(trt, Finding) and trt.kind == "tensorrt"
    assert str(trt).startswith("[tensorrt] (Det det) ")
