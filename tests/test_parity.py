"""Parity verdicts: element bounds, cosine, top-1 on decisive samples; runners run in their
life cycle, then outputs are compared by name; a selection flip must be shown (the merge
decisions differ) and is bounded; NaN never passes; the sidecar is not trusted for the
graph's precision, and one of another graph or with impossible settings is refused.

Hostile graphs are made here by editing exported ones with onnx, never committed."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import one_line_error, run_main
from onnx import TensorProto, helper, numpy_helper

from mame_export.export import export_onnx
from mame_export.ops import mame_step
from mame_export.parity import (
    TOLERANCES,
    ParityReport,
    check_parity,
    compare_outputs,
    tolerance_for,
)
from mame_export.runners import OrtRunner, Runner, TorchRunner
from mame_export.runners.decisions import DecisionRecorder, graph_decisions

FP16 = TOLERANCES["fp16"]
MERGED = tolerance_for("fp32", merged=True)


def test_a_flip_inside_the_tolerance_band_is_not_a_disagreement():
    ref = np.array([[1.00, 0.98, 0.0, 0.0]])  # margin 0.02 < 2 x (0.05 + 0.05 x 1)
    out = np.array([[0.98, 1.00, 0.0, 0.0]])
    s = compare_outputs("logits", ref, out, FP16)
    assert s.top1_agreement == 0.0 and s.decisive_samples == 0 and s.top1_decisive is None
    assert s.passed


def test_a_flip_on_a_decisive_sample_fails():
    ref = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    out = ref.copy()
    out[0] = [0.0, 4.0, 0.0]  # far outside the element bound too
    s = compare_outputs("logits", ref, out, FP16)
    assert s.decisive_samples == 2 and s.top1_decisive == 0.5 and not s.passed


def test_agreeing_decisive_samples_pass():
    ref = np.array([[3.0, 0.5, 0.0]] * 50)
    out = ref + 0.01
    s = compare_outputs("logits", ref, out, FP16)
    assert s.decisive_samples == 50 and s.top1_decisive == 1.0 and s.passed


def test_fp32_has_no_top1_criterion_but_reports_agreement():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = compare_outputs("logits", ref, ref + 5e-4, TOLERANCES["fp32"])
    assert s.passed and s.top1_agreement == 1.0
    assert not compare_outputs("logits", ref, ref + 2e-3, TOLERANCES["fp32"]).passed


def test_a_selection_flip_needs_decisions_that_differ_and_is_never_a_real_error():
    ref = np.array([[3.0, 1.0, 0.5, 0.2]] * 4)
    flip = ref.copy()
    flip[0, 2] += 0.006  # off the element bound, direction kept: a merge picked another token
    plain = TOLERANCES["fp32"]
    first = np.array([True, False, False, False])  # sample 0's merges chose other tokens
    assert not compare_outputs("logits", ref, flip, plain, first).passed
    s = compare_outputs("logits", ref, flip, MERGED, first)
    assert s.passed and s.selection_flips == 1
    assert not compare_outputs("logits", ref, flip, MERGED).passed  # decisions unknown
    same = np.zeros(4, dtype=bool)
    assert not compare_outputs("logits", ref, flip, MERGED, same).passed
    every = np.ones(4, dtype=bool)
    wrong = ref.copy()
    wrong[1] = [1.0, 3.0, 0.5, 0.2]  # a decisive top-1 change is never a flip
    assert not compare_outputs("logits", ref, wrong, MERGED, every).passed
    scaled = ref * 1.02  # the same direction, 2% too large: not a flip
    assert not compare_outputs("logits", ref, scaled, MERGED, every).passed
    bent = ref + np.array([[0.0, 0.3, -0.3, 0.3]])  # 15% relative error
    assert not compare_outputs("logits", ref, bent, MERGED, every).passed
    assert tolerance_for("fp16", merged=True) == TOLERANCES["fp16"]


def test_the_flip_allowance_is_a_stated_fraction_of_the_samples():
    assert [MERGED.flip_limit(n) for n in (1, 3, 10, 39, 40, 100)] == [1, 1, 1, 1, 2, 5]
    assert TOLERANCES["fp32"].flip_limit(100) == 0
    text = MERGED.describe()
    assert "in at most 5% of the samples (at least 1)" in text
    assert "merge decisions that differ from the reference's" in text


def test_9_nan_outputs_never_pass() -> None:
    ref = np.ones((2, 5), dtype=np.float32)
    nan = np.full((2, 5), np.nan, dtype=np.float32)
    for a, b in ((ref, nan), (nan, nan), (nan, ref)):
        s = compare_outputs("logits", a, b, TOLERANCES["fp32"])
        assert not s.passed and s.nonfinite and np.isnan(s.cosine)


# ---- runners that do as told: the run step, the comparison by name, flips ---------------

Outputs = Callable[[np.ndarray], dict[str, np.ndarray]]
Decisions = Callable[[np.ndarray], list[np.ndarray]]


class Scripted(Runner):
    """Outputs (and merge decisions) as functions of the input ``x``; ``events`` records
    the life cycle."""

    def __init__(self, name: str, outputs: Outputs, decisions: Decisions | None = None,
                 fail: bool = False) -> None:
        self.name, self.outputs, self.decisions = name, outputs, decisions
        self.fail, self.events = fail, []

    def _activate(self) -> None:
        self.events.append("activate")

    def _deactivate(self) -> None:
        self.events.append("deactivate")

    def infer(self, feeds):
        self.events.append("infer")
        if self.fail:
            raise RuntimeError("out of device memory")
        return self.outputs(feeds["x"])

    def infer_with_decisions(self, feeds):
        if self.decisions is None:
            return None
        return self.outputs(feeds["x"]), self.decisions(feeds["x"])


def feeds_counting() -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    """Fresh random x of shape (1, 4) whose first entry is the batch's number (1, 2, ...)."""
    count = [0]

    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        count[0] += 1
        x = rng.standard_normal((1, 4)).astype(np.float32)
        x[0, 0] = count[0]
        return {"x": x}

    return make


def batch_number(x: np.ndarray) -> int:
    return int(x[0, 0])


def logits(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"logits": x * np.float32(3.0)}


def merges_by_sign(x: np.ndarray) -> list[np.ndarray]:
    return [x > 0]


def parity(*candidates: Runner, tol=MERGED, batches: int = 10,
           reference: Runner | None = None) -> ParityReport:
    ref = reference or Scripted("eager", logits, merges_by_sign)
    return check_parity(ref, candidates, feeds_counting(), batches=batches, seed=0,
                        tolerance=tol)


def test_outputs_are_paired_by_name_and_none_is_dropped():
    extra = Scripted("extra", lambda x: {**logits(x), "topk": np.sort(x)[:, -1:]})
    renamed = Scripted("renamed", lambda x: {"scores": logits(x)["logits"]})
    swapped = Scripted("swapped", lambda x: {"b": x, "a": x * np.float32(2.0)})
    report = parity(extra, renamed, tol=TOLERANCES["fp32"], batches=2)
    by_name = {r["runner"]: r for r in report.to_dict()["runners"]}
    assert by_name["extra"]["status"] == "failed"
    assert "do not match the reference's by name: extra topk" in by_name["extra"]["reason"]
    assert by_name["renamed"]["status"] == "failed"
    assert "missing logits; extra scores" in by_name["renamed"]["reason"]
    assert not report.passed
    pair = Scripted("eager", lambda x: {"a": x * np.float32(2.0), "b": x})
    assert parity(swapped, reference=pair, tol=TOLERANCES["fp32"], batches=2).passed


def test_every_runner_runs_in_its_life_cycle_even_when_it_fails():
    ref = Scripted("eager", logits)
    broken = Scripted("broken", logits, fail=True)
    fine = Scripted("fine", logits)
    report = parity(broken, fine, reference=ref, tol=TOLERANCES["fp32"], batches=3)
    assert [r.status for r in report.results] == ["error", "passed"]
    assert "out of device memory" in report.results[0].reason
    assert broken.events == ["activate", "infer", "deactivate"]
    for runner in (ref, fine):  # all feeds inside one activation, then let go
        assert runner.events == ["activate", "infer", "infer", "infer", "deactivate"]


def test_a_flip_is_excused_only_where_the_decisions_differ_and_only_a_few():
    def off(when: Callable[[int], bool]) -> Outputs:
        """Logits 0.02 off (past the element bound, 0.7% in L2) in the batches ``when``."""
        def outputs(x: np.ndarray) -> dict[str, np.ndarray]:
            nudge = np.float32([[0.0, 0.0, 0.0, 0.02]]) * when(batch_number(x))
            return {"logits": logits(x)["logits"] + nudge}

        return outputs

    def other_choices(when: Callable[[int], bool]) -> Decisions:
        return lambda x: [(x > 0) ^ when(batch_number(x))]

    once, always = (lambda k: k == 1), (lambda k: True)
    # Every sample off the bound with other choices: more flips than 5% (at least 1).
    report = parity(Scripted("many", off(always), other_choices(always)))
    assert not report.passed
    assert "10 of 10 samples passed only as selection flips, more than the 1 allowed" in \
        report.results[0].reason
    # Off the bound with the same choices as the reference: no flip at all.
    report = parity(Scripted("same", off(once), merges_by_sign))
    assert not report.passed
    assert "same merge decisions as the reference" in report.results[0].reason
    # A runner that cannot show its choices (TensorRT): no flip.
    report = parity(Scripted("blind", off(once)))
    assert not report.passed and "blind does not show them" in report.results[0].reason
    # One sample off the bound, and its merges chose other tokens: a flip.
    report = parity(Scripted("flip", off(once), other_choices(once)))
    assert report.passed and report.results[0].selection_flips == 1
    assert "1 of 10 sample(s) passed as selection flips" in report.summary()


def test_the_report_round_trips_through_json():
    report = parity(Scripted("fine", logits, merges_by_sign), batches=2)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["tolerance"]["max_flip_fraction"] == 0.05
    assert {"reference", "precision", "tolerance", "batches", "seed", "passed",
            "max_abs_diff", "runners"} <= set(d)
    assert d["runners"][0]["samples"] == 2 and d["runners"][0]["flip_limit"] == 1
    assert ParityReport.from_dict(d).to_dict() == d


# ---- a genuine flip, through the exporter and ONNX Runtime -------------------------------


class MergeThenPool(torch.nn.Module):
    """Four tokens -> three (one MaMe step), then a nonlinear pooling: which token merged
    moves the output a little, as a flip deep in a ViT moves its logits."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        sizes = torch.ones_like(tokens[..., :1])
        merged, s, _ = mame_step(tokens, tokens, sizes, 3)
        return (s * torch.tanh(merged)).sum(1)


def tied_tokens() -> np.ndarray:
    """Candidates 0 and 2 exactly as redundant (to targets 1 and 3): the first wins."""
    x = np.zeros((1, 4, 4), np.float32)
    x[0, 0, :2], x[0, 1, :2] = [0.72, 0.24], [0.56, 0.48]
    x[0, 2, 2:], x[0, 3, 2:] = [0.72, 0.24], [0.56, 0.48]
    return x


def edited(path: Path, name: str, edit: Callable[[onnx.GraphProto], None]) -> Path:
    model = onnx.load(str(path))
    edit(model.graph)
    out = path.with_name(name)
    onnx.save(model, str(out))
    return out


def nudge_input(graph: onnx.GraphProto) -> None:
    """tokens + 1e-4 on one channel of token 3: the tie now breaks towards candidate 2."""
    nudge = np.zeros((1, 4, 4), np.float32)
    nudge[0, 3, 2] = 1e-4
    graph.initializer.append(numpy_helper.from_array(nudge, "nudge"))
    for node in graph.node:
        node.input[:] = ["nudged" if i == "tokens" else i for i in node.input]
    graph.node.insert(0, helper.make_node("Add", ["tokens", "nudge"], ["nudged"]))


def scale_output(graph: onnx.GraphProto) -> None:
    """pooled * 1.008: the same merges, every output 0.8% too large."""
    graph.initializer.append(numpy_helper.from_array(np.float32([1.008]), "scale"))
    for node in graph.node:
        node.output[:] = ["unscaled" if o == "pooled" else o for o in node.output]
    graph.node.append(helper.make_node("Mul", ["unscaled", "scale"], ["pooled"]))


@pytest.fixture(scope="module")
def merge_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("merge") / "merge.onnx"
    export_onnx(MergeThenPool().eval(), (torch.from_numpy(tied_tokens()),), path,
                input_names=["tokens"], output_names=["pooled"])
    return path


def merge_parity(graph: Path, tied: Callable[[int], bool]) -> ParityReport:
    calls = [0]

    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        calls[0] += 1
        random = rng.standard_normal((1, 4, 4)).astype(np.float32)
        return {"tokens": tied_tokens() if tied(calls[0]) else random}

    ref = TorchRunner(MergeThenPool().eval(), ["tokens"], ["pooled"], name="eager")
    tol = tolerance_for("fp32", merged=True, class_scores=False)
    return check_parity(ref, [OrtRunner(graph, threads=1)], make, batches=10, seed=0,
                        tolerance=tol)


@pytest.mark.slow
def test_a_genuine_flip_passes_and_a_systematic_error_does_not(merge_graph):
    scaled = merge_parity(edited(merge_graph, "scaled.onnx", scale_output), lambda k: k == 1)
    assert not scaled.passed, scaled.summary()
    assert "same merge decisions as the reference" in scaled.results[0].reason
    nudged = edited(merge_graph, "nudged.onnx", nudge_input)
    every = merge_parity(nudged, lambda k: True)  # ten flips are no accident
    assert not every.passed and "more than the 1 allowed" in every.results[0].reason
    honest = merge_parity(merge_graph, lambda k: True)
    assert honest.passed and honest.results[0].selection_flips == 0
    flip = merge_parity(nudged, lambda k: k == 1)  # one tied sample of ten
    assert flip.passed, flip.summary()
    assert flip.results[0].selection_flips == 1 and flip.max_abs_diff > 2e-3
    model = onnx.load(str(merge_graph))
    names = graph_decisions(model)  # ranks, the merged set, the targets
    kinds = [n.op_type for n in model.graph.node if n.output[0] in names]
    assert kinds == ["Greater", "Equal", "Less", "Equal", "Equal"]


# ---- the CLI on hostile copies of an exported tiny ViT -----------------------------------

@pytest.fixture(scope="module")
def tiny_vit(tiny_export: dict) -> Path:
    return Path(tiny_export["onnx"])


def hostile_copy(graph: Path, name: str, edit: Callable[[onnx.ModelProto], None] | None = None,
                 sidecar: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``graph`` edited, with its sidecar edited to vouch for it (new hash)."""
    model = onnx.load(str(graph))
    if edit is not None:
        edit(model)
    out = graph.with_name(f"{name}.onnx")
    onnx.save(model, str(out))
    meta = json.loads(graph.with_suffix(".json").read_text())
    meta["onnx_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    if sidecar is not None:
        sidecar(meta)
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out


def scale_head(model: onnx.ModelProto) -> None:
    head = next(n for n in model.graph.node if n.op_type == "Gemm")
    w = next(i for i in model.graph.initializer if i.name == head.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.008), w.name))


def add_topk(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.int64([5]), "k"))
    model.graph.node.append(helper.make_node("TopK", ["logits", "k"], ["best", "best_index"]))
    model.graph.output.append(helper.make_tensor_value_info("best", TensorProto.FLOAT, None))


@pytest.mark.slow
def test_the_vit_decisions_pair_with_eager_pytorch(tiny_vit):
    model = onnx.load(str(tiny_vit))
    names = graph_decisions(model)
    kinds = [n.op_type for n in model.graph.node if n.output[0] in names]
    meta = json.loads(tiny_vit.with_suffix(".json").read_text())
    steps = len(meta["plan"]["merge_layers"])
    assert steps and kinds == ["Greater", "Equal", "Less", "Equal", "Equal"] * steps
    runner = OrtRunner(tiny_vit, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outputs, decisions = runner.infer_with_decisions({"pixels": x})
    assert list(outputs) == ["logits"] and len(decisions) == len(names)
    assert [d.shape[0] for d in decisions] == [1] * len(names)
    assert runner.session is None  # let go while the decisions' copy lives
    assert list(runner.infer({"pixels": x})) == ["logits"]  # the graph as is
    assert isinstance(DecisionRecorder(), torch.overrides.TorchFunctionMode)


@pytest.mark.slow
def test_a_scaled_head_is_no_selection_flip(tiny_vit):
    graph = hostile_copy(tiny_vit, "scaled_head", scale_head)
    code, out, err = run_main("parity", str(graph), "--runners", "onnxrt",
                              "--parity-batches", "10", "--seed", "0")
    assert code == 1, out + err
    assert "FAILED" in out and "passed as selection flips" not in out
    assert "same merge decisions as the reference" in out


@pytest.mark.slow
def test_the_precision_comes_from_the_graph_not_the_sidecar(tiny_vit):
    def claim_fp16(meta: dict) -> None:
        meta["settings"]["precision"] = "fp16"

    graph = hostile_copy(tiny_vit, "claims_fp16", sidecar=claim_fp16)
    code, _, err = run_main("parity", str(graph), "--runners", "onnxrt")
    assert code == 2
    one_line_error(err, "records precision fp16, but claims_fp16.onnx is a fp32 graph")


@pytest.mark.slow
def test_an_extra_output_fails_by_name(tiny_vit):
    graph = hostile_copy(tiny_vit, "with_topk", add_topk)
    code, out, err = run_main("parity", str(graph), "--runners", "onnxrt", "--json",
                              "--parity-batches", "1")
    assert code == 1, err
    onnxrt = json.loads(out)["runners"][0]
    assert onnxrt["status"] == "failed" and "extra best" in onnxrt["reason"]


# ---- sidecars that do not fit the graph (issue 12 items 1, 13) ---------------------------


def test_1_parity_refuses_a_sidecar_of_another_graph(tiny_export, tmp_path) -> None:
    graph = tmp_path / "other.onnx"
    model = onnx.load(tiny_export["onnx"])
    model.doc_string = "another graph"
    onnx.save(model, str(graph))
    graph.with_suffix(".json").write_text(Path(tiny_export["metadata_path"]).read_text())
    code, _, err = run_main("parity", str(graph), "--runners", "onnxrt")
    assert code == 2
    one_line_error(err, "belongs to another graph")


def test_1_parity_accepts_the_graphs_own_sidecar(tiny_export) -> None:
    code, _, err = run_main("parity", tiny_export["onnx"], "--runners", "onnxrt",
                            "--parity-batches", "1")
    assert code == 0, err


@pytest.mark.parametrize("kind", ["binary", "folder", "not-an-object", "impossible-r",
                                  "impossible-batch", "impossible-precision", "wrong-types"])
def test_13_bad_sidecars(tiny_export, tmp_path, kind) -> None:
    graph = tmp_path / "g.onnx"
    os.link(tiny_export["onnx"], graph)
    sidecar = graph.with_suffix(".json")
    meta = json.loads(Path(tiny_export["metadata_path"]).read_text())
    needle = "impossible settings"
    if kind == "binary":
        sidecar.write_bytes(os.urandom(512) + b"\xff\xfe")
        needle = "not JSON text"
    elif kind == "folder":
        sidecar.mkdir()
        needle = "is a folder, not a file"
    elif kind == "not-an-object":
        sidecar.write_text("[1, 2]")
        needle = "not a JSON object"
    else:
        if kind == "impossible-r":
            meta["settings"]["r"] = 5
        elif kind == "impossible-batch":
            meta["settings"]["batch"] = -3
        elif kind == "impossible-precision":
            meta["settings"]["precision"] = "int4"
        else:
            meta["settings"] = {**meta["settings"], "layers": "all", "r": "half"}
            needle = "unreadable metadata sidecar"
        sidecar.write_text(json.dumps(meta))
    code, _, err = run_main("parity", str(graph), "--runners", "onnxrt")
    assert code == 2, err
    one_line_error(err, needle)
