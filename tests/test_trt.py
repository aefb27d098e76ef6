"""TensorRT code without TensorRT: detection, options, profiles, paths, cache keys, the build
path against a fake ``tensorrt`` module, engine reuse, atomic writes, and the pre-flight."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import onnx_model, vi
from onnx import TensorProto, helper, numpy_helper

from mame_export.artifacts import sha256_file
from mame_export.errors import UserError
from mame_export.families import IOSpec
from mame_export.graph import graph_inputs
from mame_export.job import build_and_check_engine
from mame_export.request import ExportRequest
from mame_export.runners import OrtRunner, Runner
from mame_export.runners.tensorrt import TrtRunner
from mame_export.trt import detect, engine, support
from mame_export.trt.engine import (
    EngineBuildError,
    EngineOptions,
    OptionsError,
    TensorRTUnavailable,
    build_engine,
    engine_cache_key,
    engine_path,
    resolve_profile,
    sidecar_path,
)
from mame_export.trt.support import trt_preflight

GPU = "NVIDIA H100 80GB HBM3"


# --- a fake tensorrt: just the calls engine._build_plan makes, recording them --------------

class FakeTRT(types.ModuleType):
    """Stands in for ``tensorrt``; ``calls`` records what the build asked of it."""

    def __init__(self, version: str = "10.13.0.35") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: dict[str, Any] = {"builds": 0}
        self.parse_ok = True
        self.build_ok = True
        fake = self

        class Severity:
            WARNING = 2

        class ILogger:
            pass

        ILogger.Severity = Severity  # type: ignore[attr-defined]

        class Logger(ILogger):
            def __init__(self, severity: int) -> None:
                self.severity = severity

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 1

        class MemoryPoolType:
            WORKSPACE = "workspace"

        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> bytes:
                return self.blob + b"+tuned"

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                self.shapes[name] = (lo, opt, hi)

        class Config:  # no set_flag: a precision flag would fail loudly
            def __init__(self) -> None:
                self.builder_optimization_level = 3
                self.pools: dict[str, int] = {}
                self.profiles: list[Profile] = []
                self.cache: TimingCache | None = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.pools[pool] = size

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, blob: bytes) -> TimingCache:
                fake.calls["timing_cache_loaded"] = bytes(blob)
                return TimingCache(bytes(blob))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int = 0) -> Network:
                fake.calls["network_flags"] = flags
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                fake.calls["builds"] += 1
                fake.calls["config"] = config
                return b"PLAN-" + str(fake.calls["builds"]).encode() if fake.build_ok else None

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.errors: list[str] = []

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = path
                if not fake.parse_ok:
                    self.errors = ["In node 3 (importDet): UNSUPPORTED_NODE: Det\nmore"]
                return fake.parse_ok

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> str:
                return self.errors[i]

        self.ILogger, self.Logger = ILogger, Logger
        self.Builder, self.OnnxParser = Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.MemoryPoolType = MemoryPoolType
        self.Dims = tuple


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTRT:
    fake = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engine, "gpu_name", lambda: GPU)
    monkeypatch.setattr(engine, "compute_capability", lambda: "9.0")
    return fake


@pytest.fixture
def no_trt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError


# --- small graphs ---------------------------------------------------------------------------

def tiny_graph(batch: int | str = "batch", dtype: int = TensorProto.FLOAT,
               image: int | str = 8) -> onnx.ModelProto:
    """images[batch,3,8,8] -> Conv -> Flatten -> MatMul -> logits[batch,10]."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 4, 4)).astype(np_dtype), "w")
    fc = numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np_dtype), "fc")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], strides=[4, 4], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", dtype, [batch, 3, image, image])],
        [helper.make_tensor_value_info("logits", dtype, [batch, 10])],
        [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# --- detection ------------------------------------------------------------------------------

def test_detect_reports_missing_tensorrt_with_install_hint(no_trt: None) -> None:
    module, reason = detect.tensorrt_status()
    assert module is None
    assert "pip install 'mame-export[trt]'" in reason and "\n" not in reason


def test_detect_is_not_fooled_by_the_stubs_namespace_package(monkeypatch) -> None:
    stub = types.ModuleType("tensorrt")  # what `pip install tensorrt-stubs` leaves behind
    stub.__path__ = ["/venv/site-packages/tensorrt"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    module, reason = detect.tensorrt_status()
    assert module is None
    assert "not the TensorRT library" in reason and "mame-export[trt]" in reason


def test_detect_needs_both_version_and_builder(monkeypatch) -> None:
    half = types.ModuleType("tensorrt")
    half.__version__ = "10.13.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", half)
    assert detect.tensorrt_status()[0] is None


@pytest.mark.parametrize("version,usable", [("10.13.0.35", True), ("11.4.0.12", True),
                                            ("10.12.0", True), ("10.11.0.33", False),
                                            ("8.6.1", False)])
def test_detect_accepts_tensorrt_10_12_and_later(monkeypatch, version: str, usable: bool) -> None:
    fake = FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    module, reason = detect.tensorrt_status()
    assert (module is fake) is usable
    assert (reason == "") is usable
    if not usable:
        assert "too old" in reason


# --- refusal without TensorRT ----------------------------------------------------------------

def test_build_without_tensorrt_refuses_and_writes_nothing(no_trt: None, tmp_path: Path) -> None:
    graph = save(tiny_graph(), tmp_path / "g.onnx")
    engines = tmp_path / "engines"
    with pytest.raises(TensorRTUnavailable) as err:
        build_engine(graph, EngineOptions(max_batch=4), engines, "g")
    assert isinstance(err.value, UserError)
    assert "mame-export[trt]" in str(err.value) and "\n" not in str(err.value)
    assert not engines.exists() or not any(engines.iterdir())
    assert graph.is_file()  # the graph is kept


def test_build_with_only_the_stubs_refuses(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(TensorRTUnavailable, match="not the TensorRT library"):
        build_engine(save(tiny_graph(), tmp_path / "g.onnx"), EngineOptions(), tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_runner_is_skipped_without_tensorrt_or_cuda(no_trt: None, monkeypatch,
                                                     tmp_path: Path) -> None:
    runner = TrtRunner(tmp_path / "x.plan")
    ok, reason = runner.availability()
    assert not ok and "mame-export[trt]" in reason
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT())
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert runner.availability() == (False, "no CUDA device visible to PyTorch")
    assert runner.name == "tensorrt"
    assert runner.infer_with_decisions({}) is None  # an engine does not show its merges


def test_runner_refuses_an_engine_built_elsewhere(fake_trt: FakeTRT, monkeypatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("mame_export.runners.tensorrt.gpu_name", lambda: "NVIDIA L4")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    sidecar_path(plan).write_text(json.dumps({"tensorrt_version": "10.13.0.35",
                                              "gpu": {"name": GPU}}))
    ok, reason = TrtRunner(plan).availability()
    assert not ok and "rebuild" in reason and "NVIDIA L4" in reason


# --- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"precision": "int4"}, "--precision"),  # int8 and fp8: QDQ graphs (mame_export.quant)
    ({"min_batch": 0}, "--min-batch must be a positive integer"),
    ({"max_batch": -2}, "--max-batch"),
    ({"opt_batch": 2.5}, "--opt-batch"),
    ({"min_batch": 8, "opt_batch": 4}, "--min-batch 8 is larger than --opt-batch 4"),
    ({"opt_batch": 16, "max_batch": 8}, "--opt-batch 16 is larger than --max-batch 8"),
    ({"min_batch": 9, "max_batch": 8}, "--min-batch 9 is larger than --max-batch 8"),
    ({"builder_opt_level": 6}, "--builder-opt-level must be 0..5"),
    ({"builder_opt_level": -1}, "--builder-opt-level"),
    ({"workspace_bytes": 0}, "--workspace"),
])
def test_bad_options_fail_with_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        EngineOptions(**kwargs).validate()
    assert isinstance(err.value, UserError)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_good_options_validate() -> None:
    EngineOptions().validate()
    EngineOptions("bf16", 1, 8, 32, 4 << 30, Path("cache.bin"), 5).validate()
    EngineOptions("fp16", opt_batch=4).validate()


def test_timing_cache_must_not_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="is a folder"):
        EngineOptions(timing_cache=tmp_path).validate()


@pytest.mark.parametrize("text,expected", [("4GiB", 4 << 30), ("512MiB", 512 << 20),
                                           ("1.5G", 1_500_000_000), ("1024", 1024)])
def test_parse_size(text: str, expected: int) -> None:
    assert engine.parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(OptionsError):
        engine.parse_size("4 lots")


# --- profiles from the graph --------------------------------------------------------------

def test_profile_for_a_dynamic_batch_graph() -> None:
    inputs = graph_inputs(tiny_graph(batch="batch"))
    assert inputs[0].dynamic_batch and inputs[0].shape == ("batch", 3, 8, 8)
    (p,) = resolve_profile(inputs, EngineOptions(min_batch=2, opt_batch=8, max_batch=32))
    assert (p.input, p.min, p.opt, p.max) == ("images", (2, 3, 8, 8), (8, 3, 8, 8),
                                              (32, 3, 8, 8))


@pytest.mark.parametrize("kwargs,expected", [
    ({}, (1, 1, 1)),
    ({"max_batch": 16}, (1, 16, 16)),
    ({"opt_batch": 4}, (1, 4, 4)),
    ({"min_batch": 4}, (4, 4, 4)),
    ({"opt_batch": 4, "max_batch": 16}, (1, 4, 16)),
])
def test_profile_defaults(kwargs: dict, expected: tuple) -> None:
    (p,) = resolve_profile(graph_inputs(tiny_graph()), EngineOptions(**kwargs))
    assert (p.min[0], p.opt[0], p.max[0]) == expected


def test_static_graph_needs_no_profile_and_forbids_other_batches() -> None:
    inputs = graph_inputs(tiny_graph(batch=4))
    assert not inputs[0].dynamic_batch
    assert resolve_profile(inputs, EngineOptions()) == []
    assert resolve_profile(inputs, EngineOptions(min_batch=4, opt_batch=4, max_batch=4)) == []
    with pytest.raises(OptionsError, match="static batch of 4, so --max-batch 8"):
        resolve_profile(inputs, EngineOptions(max_batch=8))


def test_only_the_batch_dim_may_be_dynamic() -> None:
    with pytest.raises(OptionsError, match="only the batch dim may be dynamic"):
        resolve_profile(graph_inputs(tiny_graph(image="h")), EngineOptions())


# --- paths and cache keys -------------------------------------------------------------------

def test_engine_path_names_stem_gpu_and_precision(tmp_path: Path) -> None:
    plan = engine_path(tmp_path, "vit_b.mame-r0.5", GPU, "fp16")
    assert plan == tmp_path / "vit_b.mame-r0.5.nvidia-h100-80gb-hbm3.fp16.plan"
    assert sidecar_path(plan).name == plan.name + ".json"
    assert engine.slugify("NVIDIA GeForce RTX 4090 (D)") == "nvidia-geforce-rtx-4090-d"


def test_cache_key_changes_with_every_input_and_only_then() -> None:
    base = EngineOptions("fp16", 1, 8, 32, 1 << 30, None, 3)
    key = engine_cache_key("a" * 64, base, "10.13.0.35", GPU)
    assert key == engine_cache_key("a" * 64, EngineOptions("fp16", 1, 8, 32, 1 << 30, None, 3),
                                   "10.13.0.35", GPU)
    variants = [
        ("b" * 64, base, "10.13.0.35", GPU),
        ("a" * 64, base, "11.0.0.1", GPU),
        ("a" * 64, base, "10.13.0.35", "NVIDIA H200"),
        *[("a" * 64, EngineOptions(**{**base.__dict__, field: value}), "10.13.0.35", GPU)
          for field, value in [("precision", "bf16"), ("min_batch", 2), ("opt_batch", 4),
                               ("max_batch", 64), ("workspace_bytes", 2 << 30),
                               ("builder_opt_level", 5)]],
    ]
    keys = {engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # The timing cache changes how fast TensorRT builds, not what it builds.
    same = EngineOptions(**{**base.__dict__, "timing_cache": Path("t.cache")})
    assert engine_cache_key("a" * 64, same, "10.13.0.35", GPU) == key


# --- the build path against the fake ------------------------------------------------------

def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_build_writes_plan_and_sidecar(fake_trt: FakeTRT, tmp_path: Path) -> None:
    graph = save(tiny_graph(), tmp_path / "vit.onnx")
    engines, cache = tmp_path / "engines", tmp_path / "trt.cache"
    opts = EngineOptions(min_batch=1, opt_batch=4, max_batch=8, workspace_bytes=1 << 30,
                         timing_cache=cache, builder_opt_level=2)
    res = build_engine(graph, opts, engines, "vit")

    assert not res.reused
    assert res.plan == engines / "vit.nvidia-h100-80gb-hbm3.fp32.plan"
    assert listing(engines) == [res.plan.name, res.plan.name + ".json"]  # no temp files left
    assert res.plan.read_bytes() == b"PLAN-1"
    meta = json.loads(res.sidecar.read_text())
    assert meta == res.metadata
    assert meta["tensorrt_version"] == "10.13.0.35"
    assert meta["gpu"] == {"name": GPU, "compute_capability": "9.0"}
    assert meta["precision"] == "fp32" and meta["strongly_typed"] is True
    assert meta["profiles"] == [{"images": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8],
                                            "max": [8, 3, 8, 8]}}]
    assert meta["source_graph"]["sha256"] == sha256_file(graph)
    assert meta["build_seconds"] >= 0 and meta["plan_bytes"] == len(b"PLAN-1")
    assert meta["cache_key"] == engine_cache_key(sha256_file(graph), opts, "10.13.0.35", GPU)

    # What TensorRT was asked: a strongly typed network, the profile, workspace, level.
    assert fake_trt.calls["network_flags"] == 1 << 1
    assert fake_trt.calls["parsed"] == str(graph)
    config = fake_trt.calls["config"]
    assert config.pools == {"workspace": 1 << 30} and config.builder_optimization_level == 2
    (profile,) = config.profiles
    assert profile.shapes == {"images": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}
    assert fake_trt.calls["timing_cache_loaded"] == b""  # no cache file yet
    assert cache.read_bytes() == b"+tuned"


def test_static_graph_builds_without_profile(fake_trt: FakeTRT, tmp_path: Path) -> None:
    res = build_engine(save(tiny_graph(batch=2), tmp_path / "g.onnx"), EngineOptions(),
                       tmp_path / "e", "g")
    assert fake_trt.calls["config"].profiles == [] and res.metadata["profiles"] == []
    assert "timing_cache_loaded" not in fake_trt.calls  # no --timing-cache: none used


def test_timing_cache_is_reused_across_builds(fake_trt: FakeTRT, tmp_path: Path) -> None:
    graph, cache = save(tiny_graph(), tmp_path / "g.onnx"), tmp_path / "trt.cache"
    build_engine(graph, EngineOptions(timing_cache=cache), tmp_path / "e")
    build_engine(graph, EngineOptions(timing_cache=cache, builder_opt_level=4), tmp_path / "e")
    assert fake_trt.calls["timing_cache_loaded"] == b"+tuned"
    assert cache.read_bytes() == b"+tuned+tuned"


def test_identical_request_reuses_the_engine(fake_trt: FakeTRT, tmp_path: Path) -> None:
    graph, engines = save(tiny_graph(), tmp_path / "g.onnx"), tmp_path / "e"
    first = build_engine(graph, EngineOptions(max_batch=8), engines, "g")
    again = build_engine(graph, EngineOptions(max_batch=8), engines, "g")
    assert again.reused and again.plan == first.plan and fake_trt.calls["builds"] == 1
    assert again.metadata["cache_key"] == first.metadata["cache_key"]

    changed = build_engine(graph, EngineOptions(max_batch=16), engines, "g")
    assert not changed.reused and fake_trt.calls["builds"] == 2
    assert changed.plan == first.plan and changed.plan.read_bytes() == b"PLAN-2"

    changed.plan.write_bytes(b"PLAN")  # truncated plan: the sidecar no longer vouches for it
    assert not build_engine(graph, EngineOptions(max_batch=16), engines, "g").reused


def test_new_tensorrt_version_rebuilds(fake_trt: FakeTRT, tmp_path: Path) -> None:
    graph = save(tiny_graph(), tmp_path / "g.onnx")
    build_engine(graph, EngineOptions(), tmp_path / "e")
    fake_trt.__version__ = "11.1.0.7"
    assert not build_engine(graph, EngineOptions(), tmp_path / "e").reused


def test_failed_build_leaves_no_file(fake_trt: FakeTRT, tmp_path: Path) -> None:
    graph, engines = save(tiny_graph(), tmp_path / "g.onnx"), tmp_path / "e"
    fake_trt.build_ok = False
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_engine(graph, EngineOptions(), engines)
    assert listing(engines) == []


def test_parse_failure_names_the_first_error(fake_trt: FakeTRT, tmp_path: Path) -> None:
    fake_trt.parse_ok = False
    with pytest.raises(EngineBuildError) as err:
        build_engine(save(tiny_graph(), tmp_path / "g.onnx"), EngineOptions(), tmp_path / "e")
    assert "UNSUPPORTED_NODE: Det" in str(err.value) and "\n" not in str(err.value)
    assert listing(tmp_path / "e") == []


def test_interrupted_write_leaves_no_stale_sidecar(fake_trt: FakeTRT, monkeypatch,
                                                   tmp_path: Path) -> None:
    graph, engines = save(tiny_graph(), tmp_path / "g.onnx"), tmp_path / "e"
    old = build_engine(graph, EngineOptions(max_batch=8), engines, "g")
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".plan"):
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        build_engine(graph, EngineOptions(max_batch=16), engines, "g")
    # The old plan stays, its old sidecar is gone (it must not vouch for a mixed state),
    # and no temporary file is left behind.
    assert listing(engines) == [old.plan.name]
    assert old.plan.read_bytes() == b"PLAN-1"


def test_precision_comes_from_the_graph(fake_trt: FakeTRT, tmp_path: Path) -> None:
    fp32 = save(tiny_graph(), tmp_path / "fp32.onnx")
    with pytest.raises(OptionsError, match="is a fp32 graph but the engine was asked for fp16"):
        build_engine(fp32, EngineOptions("fp16"), tmp_path / "e")
    assert fake_trt.calls["builds"] == 0 and listing(tmp_path / "e") == []
    fp16 = save(tiny_graph(dtype=TensorProto.FLOAT16), tmp_path / "fp16.onnx")
    res = build_engine(fp16, EngineOptions("fp16"), tmp_path / "e", "m")
    assert res.plan.name.endswith(".fp16.plan") and res.metadata["precision"] == "fp16"


def test_batch_options_on_a_static_graph_fail_before_building(fake_trt: FakeTRT,
                                                              tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="static batch"):
        build_engine(save(tiny_graph(batch=1), tmp_path / "g.onnx"),
                     EngineOptions(max_batch=8), tmp_path / "e")
    assert fake_trt.calls["builds"] == 0


# --- pre-flight -----------------------------------------------------------------------------

def vit_like_graph() -> onnx.ModelProto:
    """Ops a ViT (with MaMe merging) exports to, each used the way the exporter uses it."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)

    def const(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [
        const("w_patch", rng.standard_normal((4, 3, 4, 4))), const("b_patch", np.zeros(4)),
        const("shape_tokens", [1, 4, 4], np.int64), const("cls", np.ones((1, 1, 4))),
        const("pos", rng.standard_normal((1, 5, 4))), const("ln_s", np.ones(4)),
        const("ln_b", np.zeros(4)), const("w_qkv", rng.standard_normal((4, 4))),
        const("b_qkv", np.zeros(4)), const("axes_last", [-1], np.int64),
        const("axes_1", [1], np.int64), const("idx0", 0, np.int64),
        const("starts", [1], np.int64), const("ends", [5], np.int64),
        const("half", 0.5), const("two", 2.0), const("eps", 1e-6),
        const("split", [2, 2], np.int64), const("w_head", rng.standard_normal((4, 10))),
        const("b_head", np.zeros(10)),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "w_patch", "b_patch"], ["p"], strides=[4, 4]),
        n("Reshape", ["p", "shape_tokens"], ["t"]),
        n("Transpose", ["t"], ["tt"], perm=[0, 2, 1]),
        n("Concat", ["cls", "tt"], ["x0"], axis=1),
        n("Add", ["x0", "pos"], ["x"]),
        n("LayerNormalization", ["x", "ln_s", "ln_b"], ["xn"], axis=-1),
        n("MatMul", ["xn", "w_qkv"], ["q0"]), n("Add", ["q0", "b_qkv"], ["q"]),
        n("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "qt"], ["s"]), n("Div", ["s", "two"], ["s2"]),
        n("Softmax", ["s2"], ["a"], axis=-1), n("MatMul", ["a", "q"], ["o"]),
        n("Gelu", ["o"], ["g"]),
        n("Mul", ["g", "half"], ["gh"]), n("Erf", ["gh"], ["ge"]), n("Sub", ["g", "ge"], ["gs"]),
        n("Pow", ["gs", "two"], ["sq"]), n("ReduceMean", ["sq", "axes_last"], ["var"]),
        n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["std"]),
        n("Reciprocal", ["std"], ["rstd"]), n("Mul", ["gs", "rstd"], ["y"]),
        n("Sigmoid", ["y"], ["ys"]), n("Tanh", ["ys"], ["yt"]), n("Neg", ["yt"], ["yn"]),
        n("Relu", ["yn"], ["yr"]), n("Log", ["ys"], ["yl"]), n("Max", ["yr", "yl"], ["ym"]),
        n("Min", ["ym", "y"], ["yy"]),
        n("ReduceMax", ["yy", "axes_last"], ["rmax"]), n("Greater", ["yy", "rmax"], ["gt"]),
        n("Equal", ["yy", "rmax"], ["eq"]), n("Where", ["eq", "yy", "rmax"], ["w"]),
        n("Cast", ["gt"], ["gtf"], to=f), n("Add", ["w", "gtf"], ["z"]),
        n("ReduceSum", ["z", "axes_1"], ["tok_sum"], keepdims=1),
        n("Gather", ["z", "idx0"], ["cls_tok"], axis=1),
        n("Slice", ["z", "starts", "ends", "axes_1"], ["patch_tok"]),
        n("Split", ["patch_tok", "split"], ["pa", "pb"], axis=1),
        n("Unsqueeze", ["cls_tok", "axes_1"], ["cls_u"]),
        n("Concat", ["cls_u", "pa", "pb"], ["zz"], axis=1),
        n("Shape", ["zz"], ["zshape"]), n("Expand", ["tok_sum", "zshape"], ["te"]),
        n("Add", ["zz", "te"], ["zt"]),
        n("ReduceMean", ["zt", "axes_1"], ["pooled0"], keepdims=0),
        n("Identity", ["pooled0"], ["pooled"]),
        n("Gemm", ["pooled", "w_head", "b_head"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "vit_like",
                              [helper.make_tensor_value_info("images", f, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", f, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_preflight_passes_a_clean_vit_like_graph() -> None:
    assert trt_preflight(vit_like_graph()) == []


def test_preflight_flags_an_op_tensorrt_lacks() -> None:
    model = tiny_graph(batch=1)
    det_in = helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 2])
    model.graph.input.append(det_in)
    model.graph.node.append(helper.make_node("Det", ["m"], ["d"], name="det"))
    model.graph.output.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, []))
    findings = trt_preflight(model)
    assert [(f.op_type, f.node) for f in findings] == [("Det", "det")]
    assert "not supported" in findings[0].message
    assert not support.support_table()["ops"]["Det"]["supported"]  # as the real list says


def test_preflight_flags_unsupported_dtypes() -> None:
    i32 = TensorProto.INT32
    model = onnx_model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")],
                       [vi("a", [2, 2], i32), vi("b", [2, 2], i32)], [vi("c", [2, 2], i32)],
                       opset=20)
    messages = [f.message for f in trt_preflight(model)]
    assert len(messages) == 3 and all("INT32" in m for m in messages)


def test_preflight_casts_double_down_like_the_parser() -> None:
    d = TensorProto.DOUBLE
    model = onnx_model([helper.make_node("Add", ["a", "b"], ["c"], name="add")],
                       [vi("a", [2], d), vi("b", [2], d)], [vi("c", [2], d)], opset=20)
    assert trt_preflight(model) == []


def test_preflight_flags_restrictions() -> None:
    f = TensorProto.FLOAT
    cases = [
        (helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm"),
         [vi("x", [2, 3], f), vi("axes", [1], TensorProto.INT64)], "must be an initializer"),
        (helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0, name="topk"),
         [vi("x", [2, 3], f), vi("k", [1], TensorProto.INT64)], "sorted=0"),
        (helper.make_node("LayerNormalization", ["x", "s"], ["y", "mean"], name="ln"),
         [vi("x", [2, 3], f), vi("s", [3], f)], "only the first 1 output"),
        (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2], name="pool1d"),
         [vi("x", [1, 2, 8], f)], "rank 3"),
        (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", name="rs"),
         [vi("x", [1, 1, 4, 4], f), vi("scales", [4], f)], "mode='cubic'"),
    ]
    for node, inputs, needle in cases:
        model = onnx_model([node], inputs, [], opset=20)
        messages = [x.message for x in trt_preflight(model)]
        assert any(needle in m for m in messages), (node.op_type, messages)


def test_preflight_flags_custom_domain_and_old_opsets() -> None:
    f = TensorProto.FLOAT
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="fg")
    model = onnx_model([node], [vi("x", [2], f)], [vi("y", [2], f)], opset=20)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert [x.op_type for x in trt_preflight(model)] == ["FastGelu"]
    old = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2], f)],
                     [vi("y", [2], f)], opset=8)
    assert [x.op_type for x in trt_preflight(old)] == ["opset"]


def test_support_table_covers_vit_ops_and_names_its_source() -> None:
    info = support.support_table_info()
    assert info["tensorrt_version"] == "10.15" and "onnx-tensorrt" in info["source"]
    ops = support.support_table()["ops"]
    vit_ops = ["MatMul", "Gemm", "Add", "Mul", "Div", "Softmax", "LayerNormalization", "Gelu",
               "Erf", "Transpose", "Reshape", "Concat", "Gather", "Slice", "ReduceMean",
               "ReduceSum", "ReduceMax", "Equal", "Where", "Relu", "Cast", "Sqrt", "Log", "Pow",
               "Conv", "Expand", "Shape", "Unsqueeze", "Squeeze", "Split", "Sub", "Max", "Min",
               "Greater", "GreaterOrEqual", "Less", "Identity", "Constant", "ConstantOfShape",
               "Range", "Sigmoid", "Tanh", "Neg", "Reciprocal"]
    assert [op for op in vit_ops if not ops[op]["supported"]] == []
    assert all("FP32" in ops[op]["types"] for op in vit_ops if op not in ("Where", "Equal"))


# --- --trt: the engine's parity through the runner factory and the one comparison ---------

class StandInEngine(Runner):
    """Plays the engine the fake TensorRT built: runs its source graph with ONNX Runtime."""

    name = "tensorrt"

    def __init__(self, plan: Path) -> None:
        meta = engine.read_sidecar(plan)
        assert meta is not None
        self.graph = OrtRunner(meta["source_graph"]["path"], threads=1)

    def _deactivate(self) -> None:
        self.graph.deactivate()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.graph.infer(feeds)


class TinyTorch(torch.nn.Module):
    """What :func:`tiny_graph` computes, in PyTorch: the eager reference."""

    def __init__(self, graph: onnx.ModelProto) -> None:
        super().__init__()
        weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                   for i in graph.graph.initializer}
        self.w, self.fc = weights["w"], weights["fc"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(images, self.w, stride=4).flatten(1) @ self.fc


@pytest.mark.parametrize("dynamic,samples", [(False, 2), (True, 1 + 2 + 4)])
def test_trt_parity_runs_the_factorys_tensorrt_runner(fake_trt: FakeTRT, monkeypatch,
                                                     tmp_path: Path, dynamic: bool,
                                                     samples: int) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("mame_export.runners.tensorrt.TrtRunner", StandInEngine)
    model = tiny_graph(batch="batch" if dynamic else 1)
    graph = save(model, tmp_path / "tiny.onnx")
    options = EngineOptions(min_batch=1, opt_batch=2, max_batch=4) if dynamic else \
        EngineOptions()
    req = ExportRequest("tiny", batch=1, dynamic_batch=dynamic, parity_batches=2, seed=0,
                        trt=options, engines_dir=tmp_path / "engines")
    io = IOSpec(("images",), ("logits",),
                lambda b, g: (torch.randn(b, 3, 8, 8, generator=g),))
    got = build_and_check_engine(req, TinyTorch(model), io, graph, log=lambda msg: None)
    assert got["parity"]["passed"], got["parity"]
    (result,) = got["parity"]["runners"]  # each batch of the engine's profile, in turn
    assert result["runner"] == "tensorrt" and result["samples"] == samples
    assert got["reused"] is False and fake_trt.calls["builds"] == 1  # the runner reused it
