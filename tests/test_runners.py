"""The runner life cycle (availability, activate, infer, timed step, deactivate) and the
runner factory, on this machine's CPU. No test asserts a timing, only that it is one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, save

from mame_export.errors import UserError
from mame_export.profile import TimingSettings, measure_interleaved
from mame_export.runners import OrtRunner, TorchRunner, cast_input
from mame_export.runners.factory import (
    GRAPH_RUNNERS,
    RUNNER_NAMES,
    check_runner_names,
    make_runner,
    runner_availability,
)

FEEDS = [{"pixels": np.array([[1.0, -2.0]], np.float32)},
         {"pixels": np.array([[-3.0, 4.0]], np.float32)}]


@pytest.fixture()
def relu_graph(tmp_path):
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["logits"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _positive_times(step, n: int = 3) -> list[float]:
    return [step.time_ms(step.inputs[i % len(step.inputs)]) for i in range(n)]


def test_torch_life_cycle():
    runner = make_runner("torch", model=torch.nn.ReLU())
    assert isinstance(runner, TorchRunner) and runner.availability() == (True, "")
    with runner:
        out = runner.infer(FEEDS[0])
        assert list(out) == ["logits"] and out["logits"].dtype == np.float32
        assert np.array_equal(out["logits"], [[1.0, 0.0]])
        step = runner.prepare_timing(FEEDS)
        assert all(isinstance(t, torch.Tensor) for (t,) in step.inputs)  # staged once
        assert all(t > 0 for t in _positive_times(step))
    assert runner._fn is None  # deactivated on leaving the block
    runner.activate()  # and can run again
    assert np.array_equal(runner.infer(FEEDS[1])["logits"], [[0.0, 4.0]])
    runner.deactivate()
    runner.deactivate()  # idempotent


def test_torch_compile_is_a_runner():
    runner = make_runner("torch-compile", model=torch.nn.ReLU(), compile_backend="eager")
    assert runner.name == "torch-compile" and runner.compile
    with runner:
        assert np.array_equal(runner.infer(FEEDS[1])["logits"], [[0.0, 4.0]])


def test_ort_cpu_life_cycle(relu_graph):
    runner = make_runner("onnxrt", onnx_path=relu_graph, threads=1, spinning=False)
    assert isinstance(runner, OrtRunner) and runner.availability() == (True, "")
    runner.activate()
    assert runner.session is not None
    assert np.array_equal(runner.infer(FEEDS[1])["logits"], [[0.0, 4.0]])
    step = runner.prepare_timing(FEEDS)
    assert all(t > 0 for t in _positive_times(step))
    runner.deactivate()
    assert runner.session is None  # the session (and its threads) let go
    assert np.array_equal(runner.infer(FEEDS[0])["logits"], [[1.0, 0.0]])  # reactivates


def test_timed_steps_feed_the_shared_timer(relu_graph):
    steps = {"torch": make_runner("torch", model=torch.nn.ReLU()).prepare_timing(FEEDS),
             "onnxrt": make_runner("onnxrt", onnx_path=relu_graph).prepare_timing(FEEDS)}
    settings = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=3, max_iters=3,
                              budget_s=0.0, input_sets=2)
    got = measure_interleaved(steps, settings)
    for samples in got.values():
        assert isinstance(samples, np.ndarray) and len(samples) == 3 and (samples > 0).all()


class _Counting(OrtRunner):
    """An ORT runner that counts how many of its kind are loaded at once, and its calls."""

    loaded = 0
    most = 0

    def __init__(self, path) -> None:
        super().__init__(path, threads=1, spinning=False)
        self.calls = 0

    def _activate(self) -> None:
        super()._activate()
        type(self).loaded += 1
        type(self).most = max(type(self).most, type(self).loaded)
        run = self.session.run

        def counted(*a, **k):
            self.calls += 1
            return run(*a, **k)

        self.session.run = counted

    def _deactivate(self) -> None:
        super()._deactivate()
        type(self).loaded -= 1


def test_reloading_steps_hold_one_session_at_a_time(relu_graph):
    """Timed in turns, reloading steps never hold two sessions at once; each timed call is
    one load, ``warmup`` untimed calls and one timed call, and the runner ends let go."""
    from mame_export.runners import ReloadingStep

    runners = [_Counting(relu_graph) for _ in range(2)]
    steps = {i: ReloadingStep(r, FEEDS, warmup=2) for i, r in enumerate(runners)}
    settings = TimingSettings(warmup_iters=5, warmup_s=0.0, min_iters=3, max_iters=3,
                              budget_s=0.0, input_sets=2)
    got = measure_interleaved(steps, settings)
    assert _Counting.most == 1 and _Counting.loaded == 0
    for i, r in enumerate(runners):
        assert len(got[i]) == 3 and (got[i] > 0).all()
        assert r.calls == 3 * (2 + 1)  # the timer's own warm-up (5 calls) is skipped
        assert len(steps[i].load_s) == 3 and r.session is None


@pytest.mark.parametrize("name", ["onnxrt-cuda", "tensorrt"])
def test_gpu_runners_say_why_they_cannot_run_here(name, relu_graph):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    ok, reason = runner_availability(name)
    assert not ok and reason and "\n" not in reason
    runner = make_runner(name, onnx_path=relu_graph)
    assert runner.availability() == (False, reason)  # the same reason, decided in one place


def test_torch_on_cuda_without_a_gpu_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert runner_availability("torch", "cuda") == (False, "no CUDA device visible to PyTorch")
    assert runner_availability("torch-compile", "cpu") == (True, "")


def test_factory_refuses_unknown_names_in_one_line():
    for call in (lambda: make_runner("warp", model=torch.nn.ReLU()),
                 lambda: runner_availability("warp"),
                 lambda: check_runner_names(["onnxrt", "warp"])):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value).startswith("unknown runner(s) warp; choose from ")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--runners is empty"):
        check_runner_names([])
    assert check_runner_names(["onnxrt", "onnxrt"]) == ["onnxrt"]
    assert set(GRAPH_RUNNERS) < set(RUNNER_NAMES)
    with pytest.raises(ValueError, match="needs an ONNX graph"):
        make_runner("onnxrt")


def test_one_input_cast():
    a = np.array([[1.5, -2.0]], np.float32)
    assert cast_input(a, "tensor(float16)").dtype == np.float16
    assert cast_input(a, "float32").dtype == np.float32
    assert str(cast_input(a, "tensor(bfloat16)").dtype) == "bfloat16"
    ints = np.array([1, 2], np.int64)
    assert cast_input(ints, "tensor(int64)").dtype == np.int64
    t = cast_input(a, torch.float16, "cpu")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float16
    assert cast_input(a, None, "cpu").dtype == torch.float32


# ---- merge decisions: the same comparisons, read from a graph and from eager PyTorch ------


class ClampNegatives(torch.nn.Module):
    """logits = pixels where pixels >= 0, else 0: one data-dependent comparison."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * (pixels < 0.0).logical_not()


@pytest.fixture()
def compare_graph(tmp_path):
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Less", ["pixels", "zero"], ["negative"]),
             helper.make_node("Not", ["negative"], ["kept"]),
             helper.make_node("Cast", ["kept"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pixels", "mask"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [zero])
    path = tmp_path / "clamp.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_both_sides_show_the_same_decisions(compare_graph):
    expected = [np.array([[False, True]]), np.array([[True, False]])]
    ort = make_runner("onnxrt", onnx_path=compare_graph, threads=1)
    eager = make_runner("torch", model=ClampNegatives())
    for runner in (ort, eager):
        for feeds, negative in zip(FEEDS, expected, strict=True):
            outputs, decisions = runner.infer_with_decisions(feeds)
            assert np.array_equal(outputs["logits"], runner.infer(feeds)["logits"])
            assert len(decisions) == 1 and np.array_equal(decisions[0], negative)
    assert [o.name for o in ort.session.get_outputs()] == ["logits"]  # the graph as it is
    # one copy of the weights at a time: the decisions' session replaces the main one
    ort.infer_with_decisions(FEEDS[0])
    assert ort.session is None and ort._decisions is not None
    ort.infer(FEEDS[0])
    assert ort.session is not None and ort._decisions is None
    ort.deactivate()
    compiled = make_runner("torch-compile", model=ClampNegatives(), compile_backend="eager")
    assert compiled.infer_with_decisions(FEEDS[0]) is None  # compiled: nothing to record


def test_decisions_that_cannot_be_paired_say_why():
    from mame_export.runners.decisions import per_sample_differences

    a, b = np.array([[True, False]]), np.array([[True, True]])
    assert per_sample_differences([a], [b], 1).tolist() == [True]
    assert per_sample_differences([a], [a], 1).tolist() == [False]
    assert "2 data-dependent comparisons" in per_sample_differences([a], [a, a], 1)
    assert "shape [1, 3]" in per_sample_differences([a], [np.ones((1, 3), bool)], 1)
    assert "no axis of 2 sample(s)" in per_sample_differences([a], [b], 2)


class TwoOutputs(torch.nn.Module):
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, pixels + 1


def test_a_model_output_without_a_name_is_an_error_not_dropped():
    two = make_runner("torch", model=TwoOutputs())  # one declared name: logits
    with pytest.raises(ValueError, match="returned 2 output"):
        two.infer(FEEDS[0])


def test_decisions_of_a_graph_with_external_weights(compare_graph, tmp_path):
    model = onnx.load(str(compare_graph))
    model.graph.initializer[0].CopyFrom(  # raw data: only that can go to a side file
        numpy_helper.from_array(np.zeros((2,), np.float32), "zero"))
    external = tmp_path / "external" / "clamp.onnx"
    external.parent.mkdir()
    onnx.save(model, str(external), save_as_external_data=True, size_threshold=0,
              location="clamp.onnx.data")
    assert onnx.load(str(external), load_external_data=False).graph.initializer[0].external_data
    runner = make_runner("onnxrt", onnx_path=external, threads=1)
    _, decisions = runner.infer_with_decisions(FEEDS[0])
    assert np.array_equal(decisions[0], [[False, True]])
