"""Issue 24: hostile graphs the audit used to pass or crash on (items 1, 2, 5, 18).

Each hostile graph is a small fixture built here with onnx.helper. A value "from data" is
Cast(ReduceMax(x)): an integer that only the input's values decide.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mame_export.audit import audit, value_shaped_inputs
from mame_export.cli import main
from mame_export.graph import Constants, walk

FLAGS = [(), ("--no-tensorrt",)]


def _vi(name: str, shape: list | None, t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, shape)


def _int(name: str, values: list[int], shape: list[int] | None = None) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)] if shape is None else shape,
                              values)


def _model(nodes, inputs, outputs, inits=(), functions=(), opset=18,
           domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in domains)]
    return helper.make_model(g, opset_imports=imports, functions=list(functions), ir_version=10)


def _from_data(x: str = "x", out: str = "n") -> list[onnx.NodeProto]:
    """``out``: an int64 scalar computed from the values of ``x``; ``out``1: it as a 1-D."""
    return [helper.make_node("ReduceMax", [x], [f"{out}_f"], keepdims=0),
            helper.make_node("Cast", [f"{out}_f"], [out], to=TensorProto.INT64),
            helper.make_node("Reshape", [out, "one"], [f"{out}1"])]


def _audit(tmp_path: Path, model: onnx.ModelProto, *flags: str) -> tuple[int, dict]:
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["audit", str(path), "--json", *flags])
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), err
    return code, json.loads(out.getvalue())


def _forbidden(rep: dict) -> list[tuple[str, str]]:
    return [(f["op"], f["why"]) for f in rep["forbidden_ops"]]


# ---------------------------------------------------------------- 1. function overloads

OPSET = [helper.make_opsetid("", 18)]


def _overloads(called: str, bad_first: bool) -> onnx.ModelProto:
    """evil::F overload "good" (Relu) and "bad" (TopK); the graph calls overload ``called``."""
    k = helper.make_node("Constant", [], ["k"], value=_int("kv", [2]))
    good = helper.make_function("evil", "F", ["a"], ["b"],
                                [helper.make_node("Relu", ["a"], ["b"])], OPSET, overload="good")
    bad = helper.make_function("evil", "F", ["a"], ["b"],
                               [k, helper.make_node("TopK", ["a", "k"], ["b", "i"], axis=1)],
                               OPSET, overload="bad")
    call = helper.make_node("F", ["x"], ["y"], domain="evil", name="call")
    call.overload = called
    return _model([call], [_vi("x", [2, 8])], [_vi("y", None)],
                  functions=[bad, good] if bad_first else [good, bad], domains=[("evil", 1)])


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("bad_first", [True, False])
def test_1_topk_in_the_called_overload_is_found(tmp_path, flags, bad_first) -> None:
    code, rep = _audit(tmp_path, _overloads("bad", bad_first), *flags)
    assert code == 1
    assert [(f["op"], f["node"]) for f in rep["forbidden_ops"]] == [
        ("TopK", "F[bad](call)/<unnamed>")]


def test_1_an_overload_nothing_calls_is_still_audited(tmp_path) -> None:
    code, rep = _audit(tmp_path, _overloads("good", bad_first=False), "--no-tensorrt")
    assert code == 1
    assert [(f["op"], f["node"]) for f in rep["forbidden_ops"]] == [("TopK", "F[bad]/<unnamed>")]


@pytest.mark.parametrize("flags", FLAGS)
def test_1_a_call_of_an_undefined_overload_or_function_is_a_finding(tmp_path, flags) -> None:
    model = _overloads("missing", bad_first=True)
    model.functions.pop(0)  # only the good overload is left
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        ("F", "calls model-local function 'evil::F' (overload 'missing'), which the model "
              "does not define")]
    model.graph.node[0].op_type, model.graph.node[0].overload = "G", ""
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        ("G", "calls model-local function 'evil::G', which the model does not define")]


def test_1_walk_keys_functions_by_overload() -> None:
    sites = list(walk(_overloads("bad", bad_first=False)))
    assert [(s.node.op_type, s.function) for s in sites] == [
        ("F", None), ("Constant", ("evil", "F", "bad")), ("TopK", ("evil", "F", "bad")),
        ("Relu", ("evil", "F", "good"))]
    assert sites[0].calls == ("evil", "F", "bad") and sites[3].where == "F[good]/"


# ---------------------------------------------------------------- 2. shapes decided by data

ONE = _int("one", [1])


def _loop(cond_from_data: bool, body_cond_from_data: bool) -> onnx.ModelProto:
    """A Loop of 3 iterations (a constant trip count) that scans out x + x."""
    body_nodes = [helper.make_node("Add", ["x", "x"], ["acc"])]
    if body_cond_from_data:  # the body's condition: max(x) > 0
        body_nodes += [helper.make_node("ReduceMax", ["x"], ["bm"], keepdims=0),
                       helper.make_node("Greater", ["bm", "zero"], ["c_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body = helper.make_graph(
        body_nodes, "body", [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL)],
        [_vi("c_out", [], TensorProto.BOOL), _vi("acc", [2, 8])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["data_cond"]),
             helper.make_node("Loop", ["trips", "data_cond" if cond_from_data else "yes"],
                              ["ys"], body=body, name="loop")]
    inits = [_int("trips", [3], []), helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    return _model(nodes, [_vi("x", [2, 8])], [_vi("ys", [3, 2, 8])], inits)


@pytest.mark.parametrize("flags", FLAGS)
def test_2_loop_with_a_constant_trip_count_but_a_condition_from_data(tmp_path, flags) -> None:
    code, rep = _audit(tmp_path, _loop(cond_from_data=True, body_cond_from_data=False), *flags)
    assert code == 1 and _forbidden(rep) == [
        ("Loop", "the loop condition ('data_cond') is computed from data, so the number of "
                 "iterations depends on input values")]
    code, rep = _audit(tmp_path, _loop(cond_from_data=False, body_cond_from_data=True), *flags)
    assert code == 1 and _forbidden(rep) == [
        ("Loop", "the loop condition its body computes depends on data, so the number of "
                 "iterations depends on input values")]


def test_2_loop_with_a_constant_trip_count_and_condition_is_fine(tmp_path) -> None:
    code, rep = _audit(tmp_path, _loop(cond_from_data=False, body_cond_from_data=False),
                       "--no-tensorrt")
    assert code == 0, rep["findings"]


def _window(op: str) -> tuple[list, list, list, int]:
    return [helper.make_node(op, ["n"], ["y"], name="w")], [_vi("x", [2, 8])], [_vi("y", None)], 17


def _dft() -> tuple[list, list, list, int]:
    signal = _vi("s", [1, 8, 1])
    return ([helper.make_node("DFT", ["s", "n", ""], ["y"], name="w")], [signal, _vi("x", [2, 8])],
            [_vi("y", None)], 20)


def _mel() -> tuple[list, list, list, int]:
    consts = [helper.make_node("Constant", [], [name], value=t) for name, t in (
        ("dft", _int("dv", [16], [])), ("rate", _int("rv", [8000], [])),
        ("lo", numpy_helper.from_array(np.array(0.0, np.float32))),
        ("hi", numpy_helper.from_array(np.array(4000.0, np.float32))))]
    mel = helper.make_node("MelWeightMatrix", ["n", "dft", "rate", "lo", "hi"], ["y"], name="w")
    return [*consts, mel], [_vi("x", [2, 8])], [_vi("y", None)], 17


def _affine_grid() -> tuple[list, list, list, int]:
    size = helper.make_node("Concat", ["one", "one", "n1", "n1"], ["size"], axis=0)
    grid = helper.make_node("AffineGrid", ["theta", "size"], ["y"], name="w")
    return [size, grid], [_vi("theta", [1, 2, 3]), _vi("x", [2, 8])], [_vi("y", None)], 20


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("build,op,pos,name", [
    (lambda: _window("HannWindow"), "HannWindow", 0, "n"),
    (lambda: _window("HammingWindow"), "HammingWindow", 0, "n"),
    (lambda: _window("BlackmanWindow"), "BlackmanWindow", 0, "n"),
    (_dft, "DFT", 1, "n"),
    (_mel, "MelWeightMatrix", 0, "n"),
    (_affine_grid, "AffineGrid", 1, "size"),
])
def test_2_window_dft_mel_and_grid_sizes_from_data(tmp_path, flags, build, op, pos,
                                                   name) -> None:
    nodes, inputs, outputs, opset = build()
    model = _model([*_from_data(), *nodes], inputs, outputs, [ONE], opset=opset)
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        (op, f"input {pos} ('{name}') is computed from data, so the output shape depends on "
             "input values")]
    # the same op with a constant size is fine
    consts = [helper.make_node("Constant", [], ["n"], value=_int("nv", [8], [])),
              helper.make_node("Constant", [], ["n1"], value=_int("n1v", [8]))]
    code, rep = _audit(tmp_path, _model([*consts, *nodes], inputs, outputs, [ONE],
                                        opset=opset), "--no-tensorrt")
    assert rep["forbidden_ops"] == [], rep["findings"]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("node,inputs", [
    (helper.make_node("SplitToSequence", ["x"], ["y"], name="op"), [_vi("x", [2, 8])]),
    (helper.make_node("StringSplit", ["s"], ["y", "count"], name="op"),
     [_vi("s", [2], TensorProto.STRING)]),
    (helper.make_node("ImageDecoder", ["png"], ["y"], name="op"),
     [_vi("png", [64], TensorProto.UINT8)]),
])
def test_2_ops_whose_output_shape_the_values_decide(tmp_path, flags, node, inputs) -> None:
    y = helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, None) \
        if node.op_type == "SplitToSequence" else _vi("y", None, TensorProto.UINT8)
    code, rep = _audit(tmp_path, _model([node], inputs, [y], opset=20), *flags)
    assert code == 1 and _forbidden(rep) == [
        (node.op_type, "data-dependent op in a graph that must be static")]


@pytest.mark.parametrize("flags", FLAGS)
def test_2_array_feature_extractor_with_computed_indices(tmp_path, flags) -> None:
    afe = helper.make_node("ArrayFeatureExtractor", ["x", "n1"], ["y"], domain="ai.onnx.ml",
                           name="afe")
    model = _model([*_from_data(), afe], [_vi("x", [2, 8])], [_vi("y", None)], [ONE],
                   domains=[("ai.onnx.ml", 3)])
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        ("ArrayFeatureExtractor", "indices 'n1' are computed at run time")]


def _custom() -> onnx.ModelProto:
    magic = helper.make_node("Magic", ["x"], ["y"], domain="com.acme", name="magic")
    return _model([magic], [_vi("x", [2, 8])], [_vi("y", [2, 8])], domains=[("com.acme", 1)])


@pytest.mark.parametrize("flags", FLAGS)
def test_2_ops_of_custom_domains_are_findings_unless_allowed(tmp_path, flags) -> None:
    code, rep = _audit(tmp_path, _custom(), *flags)
    assert code == 1 and _forbidden(rep) == [
        ("Magic", "op of custom domain 'com.acme': what it does to shapes is unknown to the "
                  "audit (if its outputs have static shapes, allow it: --allow-domain "
                  "com.acme)")]
    code, rep = _audit(tmp_path, _custom(), *flags, "--allow-domain", "com.other",
                       "--allow-domain", "com.acme")
    assert rep["forbidden_ops"] == [] and rep["allowed_domains"] == ["com.acme", "com.other"]
    if flags:  # the TensorRT parser still needs a plugin for it
        assert code == 0, rep["findings"]
    else:
        assert code == 1 and [f.split(")")[0] for f in rep["findings"]] == [
            "[tensorrt] (Magic magic"]
    report = audit(tmp_path / "g.onnx", allow_domains=["com.acme"], tensorrt=False)
    assert report.passed


# The hand-kept table the audit had before it read the ONNX schemas: every input it named
# must still be one whose values decide the output's shape.
OLD_SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3),
    "Resize": (2, 3), "Upsample": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "OneHot": (1,), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "CenterCropPad": (1,), "Col2Im": (1, 2), "TopK": (1,),
    **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                           "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                           "ReduceSumSquare")},
}


def test_2_schema_derived_shape_inputs_cover_the_old_table() -> None:
    for op, positions in OLD_SHAPE_INPUTS.items():
        derived = value_shaped_inputs("", op, 18)
        assert all(derived.get(p) == "shape" for p in positions), (op, derived)
    assert value_shaped_inputs("", "Gather", 18) == {1: "indices"}
    # what the schemas tell that the old table did not (and the opset moves inputs)
    assert value_shaped_inputs("", "HannWindow", 17) == {0: "shape"}
    assert value_shaped_inputs("", "MelWeightMatrix", 17) == {0: "shape", 1: "shape"}
    assert value_shaped_inputs("", "Resize", 10) == {1: "shape"}
    assert value_shaped_inputs("", "CumSum", 18) == {}  # an axis that keeps the shape
    assert value_shaped_inputs("com.acme", "Magic", 1) == {}


# ---------------------------------------------------------------- 18. deep nesting


def _nested_calls(depth: int) -> onnx.ModelProto:
    """local::f0 calls f1 ... calls f{depth-1}, which holds a TopK."""
    imports = [*OPSET, helper.make_opsetid("local", 1)]
    k = helper.make_node("Constant", [], ["k"], value=_int("kv", [2]))
    deepest = [k, helper.make_node("TopK", ["a", "k"], ["b", "i"], axis=1, name="deep_topk")]
    functions = [helper.make_function(
        "local", f"f{i}", ["a"], ["b"],
        [helper.make_node(f"f{i + 1}", ["a"], ["b"], domain="local")] if i + 1 < depth
        else deepest, imports) for i in range(depth)]
    call = helper.make_node("f0", ["x"], ["y"], domain="local", name="call")
    return _model([call], [_vi("x", [2, 8])], [_vi("y", [2, 2])], functions=functions,
                  domains=[("local", 1)])


@pytest.mark.parametrize("depth", [500, 5000])
def test_18_calls_nested_thousands_deep(tmp_path, depth) -> None:
    code, rep = _audit(tmp_path, _nested_calls(depth))
    assert code == 1
    assert [f["node"].rsplit("/", 1)[-1] for f in rep["forbidden_ops"]] == ["deep_topk"]
    assert rep["op_census"]["TopK"] == 1 and rep["nodes"] == depth + 2
    assert "Function call chain depth exceeds limit" in rep["checker"]  # ONNX's own limit


def test_18_a_function_called_twice_at_each_level_is_analysed_once_per_kind() -> None:
    depth = 12  # each level calls the next twice: 4096 paths to the leaf
    imports = [*OPSET, helper.make_opsetid("local", 1)]
    functions = [helper.make_function(
        "local", f"f{i}", ["a"], ["b"],
        [helper.make_node(f"f{i + 1}", ["a"], ["t"], domain="local"),
         helper.make_node(f"f{i + 1}", ["t"], ["b"], domain="local")] if i + 1 < depth
        else [helper.make_node("Relu", ["a"], ["b"], name="leaf")], imports)
        for i in range(depth)]
    model = _model([helper.make_node("f0", ["x"], ["y"], domain="local")], [_vi("x", [2, 8])],
                   [_vi("y", [2, 8])], functions=functions, domains=[("local", 1)])
    seen: list[str] = []

    def check(node: onnx.NodeProto, ins: list[int], bodies: list[list[int]], where: str) -> bool:
        seen.append(node.op_type)
        return False

    Constants(model, check)
    assert seen == ["Relu"]


# ---------------------------------------------------------------- 5. a dynamic batch axis


def _relu(batch: int | str) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [batch, 8])],
                  [_vi("y", [batch, 8])])


def test_5_expect_dynamic_batch_flags_a_fixed_batch(tmp_path) -> None:
    code, rep = _audit(tmp_path, _relu(1), "--expect-dynamic-batch")
    assert code == 1 and rep["expect_dynamic_batch"] is True
    assert rep["findings"] == [
        "[static-batch] input 'x' has a fixed first dim 1; a dynamic-batch graph needs a "
        "symbolic batch axis there",
        "[static-batch] output 'y' has a fixed first dim 1; a dynamic-batch graph's outputs "
        "follow the batch"]
    code, rep = _audit(tmp_path, _relu(1))  # not asked for: a static batch is fine
    assert code == 0 and rep["expect_dynamic_batch"] is False
    code, rep = _audit(tmp_path, _relu("batch"), "--expect-dynamic-batch")
    assert code == 0, rep["findings"]


def test_5_expect_dynamic_batch_wants_a_named_dim(tmp_path) -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [None, 8])],
                   [_vi("y", [None, 8])])
    onnx.save(model, str(tmp_path / "g.onnx"))
    report = audit(tmp_path / "g.onnx", expect_dynamic_batch=True, tensorrt=False)
    assert [str(f) for f in report.findings] == [
        "[static-batch] input 'x' has an unnamed first dim; a dynamic-batch graph needs a "
        "symbolic batch axis there"]
