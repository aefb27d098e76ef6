"""The audit: ops a static graph must not hold, shapes the input's values decide, function
overloads, deep nesting, a dynamic batch axis, and the `audit` command on files it cannot
read. Sections name the issue and item a test comes from.

Each hostile graph is a small fixture built here with onnx.helper. A value "from data" is
Cast(ReduceMax(x)): an integer that only the input's values decide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import int64s, one_line_error, onnx_model, run_cli, run_main, vi
from onnx import TensorProto, helper, numpy_helper

from mame_export.audit import audit, value_shaped_inputs
from mame_export.graph import Constants, walk

FLAGS = [(), ("--no-tensorrt",)]


def _from_data(x: str = "x", out: str = "n") -> list[onnx.NodeProto]:
    """``out``: an int64 scalar computed from the values of ``x``; ``out``1: it as a 1-D."""
    return [helper.make_node("ReduceMax", [x], [f"{out}_f"], keepdims=0),
            helper.make_node("Cast", [f"{out}_f"], [out], to=TensorProto.INT64),
            helper.make_node("Reshape", [out, "one"], [f"{out}1"])]


def _audit(tmp_path: Path, model: onnx.ModelProto, *flags: str) -> tuple[int, dict]:
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    code, out, err = run_main("audit", str(path), "--json", *flags)
    assert "Traceback" not in err and "internal error" not in err, err
    return code, json.loads(out)


def _forbidden(rep: dict) -> list[tuple[str, str]]:
    return [(f["op"], f["why"]) for f in rep["forbidden_ops"]]


# ---------------------------------------------------------------- the audit command


def test_audit_flags_forbidden_ops(tmp_path: Path) -> None:
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=1, name="topk"),
        helper.make_node("Gather", ["x", "idx"], ["picked"], axis=0, name="gather_computed"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(onnx_model(nodes, [vi("x", [2, 8])],
                         [vi("vals", [2, 3]), vi("picked", [2, 3, 8])], [k]), str(path))
    res = run_cli("audit", str(path), "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    ops = sorted(f["op"] for f in report["forbidden_ops"])
    assert ops == ["Gather", "TopK"]


def test_audit_accepts_gather_with_constant_indices(tmp_path: Path) -> None:
    idx = helper.make_tensor("idx", TensorProto.INT64, [2], [0, 3])
    node = helper.make_node("Gather", ["x", "idx"], ["y"], axis=0, name="gather_const")
    path = tmp_path / "ok.onnx"
    onnx.save(onnx_model([node], [vi("x", [4, 8])], [vi("y", [2, 8])], [idx]), str(path))
    assert run_main("audit", str(path))[0] == 0


def test_audit_bad_files(tmp_path: Path) -> None:
    code, _, err = run_main("audit", str(tmp_path / "missing.onnx"))
    assert code != 0
    one_line_error(err, "not found")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model" * 10)
    code, _, err = run_main("audit", str(garbage))
    assert code != 0
    one_line_error(err, "cannot read ONNX graph")


def test_14_empty_graph_file(tmp_path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = run_main("audit", str(empty))
    assert code == 2
    one_line_error(err, "is empty (0 bytes)")


def test_5_exported_mame_graph_still_passes(tiny_export) -> None:
    assert tiny_export["audit"]["passed"] and tiny_export["audit"]["forbidden_ops"] == []


# ---------------------------------------------------------------- issue 12 item 5: hidden ops


@pytest.mark.parametrize("flags", FLAGS)
def test_5_topk_inside_a_model_local_function(tmp_path, flags) -> None:
    k = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64,
                                                                         [1], [2]))
    fn = helper.make_function("local", "pick", ["x"], ["v"],
                              [k, helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                              [helper.make_opsetid("", 18)])
    call = helper.make_node("pick", ["x"], ["y"], domain="local", name="call")
    code, rep = _audit(tmp_path, onnx_model([call], [vi("x", [2, 8])], [vi("y", [2, 2])],
                                            functions=[fn]), *flags)
    assert code == 1 and "TopK" in {f["op"] for f in rep["forbidden_ops"]}, rep["findings"]


@pytest.mark.parametrize("flags", FLAGS)
def test_5_nms_and_compress(tmp_path, flags) -> None:
    boxes, scores = vi("boxes", [1, 10, 4]), vi("scores", [1, 1, 10])
    nms = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")
    code, rep = _audit(tmp_path, onnx_model([nms], [boxes, scores],
                                            [vi("sel", None, TensorProto.INT64)]), *flags)
    assert code == 1 and {f["op"] for f in rep["forbidden_ops"]} == {"NonMaxSuppression"}
    x, cond = vi("x", [4, 3]), vi("c", [4], TensorProto.BOOL)
    comp = helper.make_node("Compress", ["x", "c"], ["y"], axis=0, name="compress")
    code, rep = _audit(tmp_path, onnx_model([comp], [x, cond], [vi("y", None)]), *flags)
    assert code == 1 and {f["op"] for f in rep["forbidden_ops"]} == {"Compress"}


@pytest.mark.parametrize("flags", FLAGS)
def test_5_slice_whose_start_is_computed_from_data(tmp_path, flags) -> None:
    x = vi("x", [1, 16])
    inits = [helper.make_tensor("ends", TensorProto.INT64, [1], [16]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["mi", "one"], ["start"]),
        helper.make_node("Slice", ["x", "start", "ends", "axes"], ["y"], name="slice_by_data"),
    ]
    code, rep = _audit(tmp_path, onnx_model(nodes, [x], [vi("y", None)], inits), *flags)
    assert code == 1, rep
    assert [(f["op"], f["node"]) for f in rep["forbidden_ops"]] == [("Slice", "slice_by_data")]


def test_5_shapes_from_shape_ops_are_fine(tmp_path) -> None:
    # dynamic batch: Reshape to (Shape(x)[0], -1) depends on the input's shape, not its values
    x = vi("x", ["batch", 4, 4])
    inits = [helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("s1", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Slice", ["shp", "s0", "s1"], ["b"]),
        helper.make_node("Concat", ["b", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    code, rep = _audit(tmp_path, onnx_model(nodes, [x], [vi("y", ["batch", 16])], inits),
                       "--no-tensorrt")
    assert code == 0, rep["findings"]


# ---------------------------------------------------------------- issue 24 item 1: overloads

OPSET = [helper.make_opsetid("", 18)]


def _overloads(called: str, bad_first: bool) -> onnx.ModelProto:
    """evil::F overload "good" (Relu) and "bad" (TopK); the graph calls overload ``called``."""
    k = helper.make_node("Constant", [], ["k"], value=int64s("kv", [2]))
    good = helper.make_function("evil", "F", ["a"], ["b"],
                                [helper.make_node("Relu", ["a"], ["b"])], OPSET, overload="good")
    bad = helper.make_function("evil", "F", ["a"], ["b"],
                               [k, helper.make_node("TopK", ["a", "k"], ["b", "i"], axis=1)],
                               OPSET, overload="bad")
    call = helper.make_node("F", ["x"], ["y"], domain="evil", name="call")
    call.overload = called
    return onnx_model([call], [vi("x", [2, 8])], [vi("y", None)],
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


# ---------------------------------------------------------------- issue 24 item 2: shapes by data

ONE = int64s("one", [1])


def _loop(cond_from_data: bool, body_cond_from_data: bool) -> onnx.ModelProto:
    """A Loop of 3 iterations (a constant trip count) that scans out x + x."""
    body_nodes = [helper.make_node("Add", ["x", "x"], ["acc"])]
    if body_cond_from_data:  # the body's condition: max(x) > 0
        body_nodes += [helper.make_node("ReduceMax", ["x"], ["bm"], keepdims=0),
                       helper.make_node("Greater", ["bm", "zero"], ["c_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body = helper.make_graph(
        body_nodes, "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL)],
        [vi("c_out", [], TensorProto.BOOL), vi("acc", [2, 8])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["data_cond"]),
             helper.make_node("Loop", ["trips", "data_cond" if cond_from_data else "yes"],
                              ["ys"], body=body, name="loop")]
    inits = [int64s("trips", [3], []), helper.make_tensor("yes", TensorProto.BOOL, [], [True]),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    return onnx_model(nodes, [vi("x", [2, 8])], [vi("ys", [3, 2, 8])], inits)


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
    return [helper.make_node(op, ["n"], ["y"], name="w")], [vi("x", [2, 8])], [vi("y", None)], 17


def _dft() -> tuple[list, list, list, int]:
    signal = vi("s", [1, 8, 1])
    return ([helper.make_node("DFT", ["s", "n", ""], ["y"], name="w")], [signal, vi("x", [2, 8])],
            [vi("y", None)], 20)


def _mel() -> tuple[list, list, list, int]:
    consts = [helper.make_node("Constant", [], [name], value=t) for name, t in (
        ("dft", int64s("dv", [16], [])), ("rate", int64s("rv", [8000], [])),
        ("lo", numpy_helper.from_array(np.array(0.0, np.float32))),
        ("hi", numpy_helper.from_array(np.array(4000.0, np.float32))))]
    mel = helper.make_node("MelWeightMatrix", ["n", "dft", "rate", "lo", "hi"], ["y"], name="w")
    return [*consts, mel], [vi("x", [2, 8])], [vi("y", None)], 17


def _affine_grid() -> tuple[list, list, list, int]:
    size = helper.make_node("Concat", ["one", "one", "n1", "n1"], ["size"], axis=0)
    grid = helper.make_node("AffineGrid", ["theta", "size"], ["y"], name="w")
    return [size, grid], [vi("theta", [1, 2, 3]), vi("x", [2, 8])], [vi("y", None)], 20


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
    model = onnx_model([*_from_data(), *nodes], inputs, outputs, [ONE], opset=opset)
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        (op, f"input {pos} ('{name}') is computed from data, so the output shape depends on "
             "input values")]
    # the same op with a constant size is fine
    consts = [helper.make_node("Constant", [], ["n"], value=int64s("nv", [8], [])),
              helper.make_node("Constant", [], ["n1"], value=int64s("n1v", [8]))]
    code, rep = _audit(tmp_path, onnx_model([*consts, *nodes], inputs, outputs, [ONE],
                                            opset=opset), "--no-tensorrt")
    assert rep["forbidden_ops"] == [], rep["findings"]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("node,inputs", [
    (helper.make_node("SplitToSequence", ["x"], ["y"], name="op"), [vi("x", [2, 8])]),
    (helper.make_node("StringSplit", ["s"], ["y", "count"], name="op"),
     [vi("s", [2], TensorProto.STRING)]),
    (helper.make_node("ImageDecoder", ["png"], ["y"], name="op"),
     [vi("png", [64], TensorProto.UINT8)]),
])
def test_2_ops_whose_output_shape_the_values_decide(tmp_path, flags, node, inputs) -> None:
    y = helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, None) \
        if node.op_type == "SplitToSequence" else vi("y", None, TensorProto.UINT8)
    code, rep = _audit(tmp_path, onnx_model([node], inputs, [y], opset=20), *flags)
    assert code == 1 and _forbidden(rep) == [
        (node.op_type, "data-dependent op in a graph that must be static")]


@pytest.mark.parametrize("flags", FLAGS)
def test_2_array_feature_extractor_with_computed_indices(tmp_path, flags) -> None:
    afe = helper.make_node("ArrayFeatureExtractor", ["x", "n1"], ["y"], domain="ai.onnx.ml",
                           name="afe")
    model = onnx_model([*_from_data(), afe], [vi("x", [2, 8])], [vi("y", None)], [ONE],
                       domains=[("ai.onnx.ml", 3)])
    code, rep = _audit(tmp_path, model, *flags)
    assert code == 1 and _forbidden(rep) == [
        ("ArrayFeatureExtractor", "indices 'n1' are computed at run time")]


def _custom() -> onnx.ModelProto:
    magic = helper.make_node("Magic", ["x"], ["y"], domain="com.acme", name="magic")
    return onnx_model([magic], [vi("x", [2, 8])], [vi("y", [2, 8])], domains=[("com.acme", 1)])


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


# ---------------------------------------------------------------- issue 24 item 18: deep nesting


def _nested_calls(depth: int) -> onnx.ModelProto:
    """local::f0 calls f1 ... calls f{depth-1}, which holds a TopK."""
    imports = [*OPSET, helper.make_opsetid("local", 1)]
    k = helper.make_node("Constant", [], ["k"], value=int64s("kv", [2]))
    deepest = [k, helper.make_node("TopK", ["a", "k"], ["b", "i"], axis=1, name="deep_topk")]
    functions = [helper.make_function(
        "local", f"f{i}", ["a"], ["b"],
        [helper.make_node(f"f{i + 1}", ["a"], ["b"], domain="local")] if i + 1 < depth
        else deepest, imports) for i in range(depth)]
    call = helper.make_node("f0", ["x"], ["y"], domain="local", name="call")
    return onnx_model([call], [vi("x", [2, 8])], [vi("y", [2, 2])], functions=functions,
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
    model = onnx_model([helper.make_node("f0", ["x"], ["y"], domain="local")], [vi("x", [2, 8])],
                       [vi("y", [2, 8])], functions=functions, domains=[("local", 1)])
    seen: list[str] = []

    def check(node: onnx.NodeProto, ins: list[int], bodies: list[list[int]], where: str) -> bool:
        seen.append(node.op_type)
        return False

    Constants(model, check)
    assert seen == ["Relu"]


# ---------------------------------------------------------------- issue 24 item 5: dynamic batch


def _relu(batch: int | str) -> onnx.ModelProto:
    return onnx_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [batch, 8])],
                      [vi("y", [batch, 8])])


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
    model = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [None, 8])],
                       [vi("y", [None, 8])])
    onnx.save(model, str(tmp_path / "g.onnx"))
    report = audit(tmp_path / "g.onnx", expect_dynamic_batch=True, tensorrt=False)
    assert [str(f) for f in report.findings] == [
        "[static-batch] input 'x' has an unnamed first dim; a dynamic-batch graph needs a "
        "symbolic batch axis there"]
