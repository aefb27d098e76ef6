"""`mame-export triton`: a Triton model repository derived from the graph, checked with Triton's
schema, and (where nvidia-pytriton is installed) served end to end by a real Triton server
on 127.0.0.1 with the Python backend."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import cli_error, export_args, onnx_model, run_main, vi
from onnx import TensorProto, helper

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason="needs tritonclient[grpc,http] (the serve extra)")

HAS_SERVER = importlib.util.find_spec("pytriton") is not None
QUEUE_DELAY_US = 200_000  # long enough that concurrent requests on a busy CPU share a batch


def parse(path: Path):  # noqa: ANN201 - a ModelConfig message
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig())


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its sha256 and mtime (to show it was not touched)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`triton MODEL`: the TINY ViT exported with a dynamic batch, then written as a
    Python-backend model 'tiny' (the one export of this module)."""
    out = tmp_path_factory.mktemp("served")
    repo = out / "repo"
    code, stdout, err = run_main("triton", *export_args(out / "graphs", "--dynamic-batch"),
                                 "--repo", str(repo), "--backend", "python", "--name", "tiny",
                                 "--max-queue-delay-us", str(QUEUE_DELAY_US), "--json")
    assert code == 0, err
    record = json.loads(stdout)
    return {"repo": repo, "graph": Path(record["export"]["onnx"]), "record": record}


def tiny_graph(path: Path, inputs: list, outputs: list, nodes: list) -> Path:
    onnx.save(onnx_model(nodes, inputs, outputs), path)
    return path


# ---------------------------------------------------------------- the repository


@pytest.mark.slow  # pays for the module's one export (the served fixture)
def test_model_source_is_exported_and_written_with_a_config_from_the_graph(served):
    repo, graph = served["repo"], served["graph"]
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (repo / "tiny" / "1").iterdir()) == \
        ["model.json", "model.onnx", "model.py"]
    sidecar = json.loads((repo / "tiny" / "1" / "model.json").read_text())
    assert {"plan", "audit", "parity"} <= set(sidecar)
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == graph.read_bytes()
    cfg = parse(repo / "tiny" / "config.pbtxt")
    model = onnx.load(str(graph))
    assert cfg.name == "tiny" and cfg.backend == "python" and not cfg.platform
    assert cfg.max_batch_size == 8  # dynamic batch axis: the batch range, batch not in dims
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [(x.name, "TYPE_FP32", [d.dim_value for d in x.type.tensor_type.shape.dim[1:]])
         for x in model.graph.input]
    assert [(o.name, list(o.dims)) for o in cfg.output] == \
        [(y.name, [d.dim_value for d in y.type.tensor_type.shape.dim[1:]])
         for y in model.graph.output]
    assert [(g.count, g.kind) for g in cfg.instance_group] == \
        [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert served["record"]["triton"]["version"] == 1


def test_graph_source_gets_onnxruntime_platform_and_ort_tensorrt_options(served, tmp_path):
    repo = tmp_path / "repo"
    code, _, err = run_main("triton", str(served["graph"]), "--repo", str(repo), "--name", "vit",
                            "--instances", "2", "--max-batch", "16", "--preferred-batch", "8,16",
                            "--triton-ort-trt", "--triton-ort-trt-precision", "fp16",
                            "--triton-ort-trt-workspace", "1GiB")
    assert code == 0, err
    cfg = parse(repo / "vit" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [(g.count, g.kind) for g in cfg.instance_group] == \
        [(2, pb.ModelInstanceGroup.KIND_GPU)]
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert dict(trt.parameters) == {"precision_mode": "FP16",
                                    "max_workspace_size_bytes": str(1 << 30)}
    assert (repo / "vit" / "1" / "model.json").is_file()


def test_fixed_batch_graph_gets_max_batch_size_0_and_every_dtype_mapped(tmp_path):
    graph = tiny_graph(tmp_path / "fixed.onnx",
                       [vi("x", [2, 3], TensorProto.FLOAT16), vi("q", [2, 3], TensorProto.INT8),
                        vi("b", [2, 3], TensorProto.BFLOAT16)],
                       [vi("y", [2, 3], TensorProto.FLOAT16), vi("qy", [2, 3], TensorProto.INT8),
                        vi("by", [2, 3], TensorProto.BFLOAT16)],
                       [helper.make_node("Identity", ["x"], ["y"]),
                        helper.make_node("Identity", ["q"], ["qy"]),
                        helper.make_node("Identity", ["b"], ["by"])])
    code, _, err = run_main("triton", str(graph), "--repo", str(tmp_path / "repo"),
                            "--device", "cpu")
    assert code == 0, err
    assert "no metadata sidecar" in err  # served without its record, and said so
    cfg = parse(tmp_path / "repo" / "fixed" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("x", "TYPE_FP16", [2, 3]), ("q", "TYPE_INT8", [2, 3]), ("b", "TYPE_BF16", [2, 3])]
    assert [pb.DataType.Name(o.data_type) for o in cfg.output] == \
        ["TYPE_FP16", "TYPE_INT8", "TYPE_BF16"]
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["fixed"]  # no tmp left


def test_batch_only_input_is_dims_1_reshaped_to_none(tmp_path):
    """The UNet's timestep (B,): Triton needs dims, so [1] with reshape [] for the model."""
    graph = tiny_graph(tmp_path / "unet_like.onnx",
                       [vi("sample", ["batch", 4]), vi("timestep", ["batch"])],
                       [vi("out_sample", ["batch", 4])],
                       [helper.make_node("Unsqueeze", ["timestep", "axes"], ["t2"]),
                        helper.make_node("Add", ["sample", "t2"], ["out_sample"]),
                        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
                            "axes", TensorProto.INT64, [1], [1]))])
    code, _, err = run_main("triton", str(graph), "--repo", str(tmp_path / "repo"),
                            "--device", "cpu", "--max-batch", "4")
    assert code == 0, err
    cfg = parse(tmp_path / "repo" / "unet_like" / "config.pbtxt")
    sample, timestep = cfg.input
    assert list(sample.dims) == [4] and not sample.HasField("reshape")
    assert list(timestep.dims) == [1] and timestep.HasField("reshape")
    assert list(timestep.reshape.shape) == []
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]


def test_second_version_leaves_the_first_untouched(served, tmp_path):
    repo = tmp_path / "repo"
    args = ["triton", str(served["graph"]), "--repo", str(repo), "--name", "vit",
            "--device", "cpu"]
    assert run_main(*args)[0] == 0
    before = digest(repo / "vit")
    code, stdout, err = run_main(*args, "--json")
    assert code == 0, err
    assert json.loads(stdout)["triton"]["version"] == 2
    after = digest(repo / "vit")
    assert {k: v for k, v in after.items() if not k.startswith("2/")} == before
    assert sorted(p.name for p in (repo / "vit").iterdir()) == ["1", "2", "config.pbtxt"]
    line = cli_error(*args, "--model-version", "1")
    assert "version 1 of model vit exists" in line
    line = cli_error(*args, "--instances", "3")
    assert "differs from this source's config (in 'instance_group')" in line
    assert digest(repo / "vit") == after


def test_written_config_is_checked_against_the_graph(served):
    from mame_export.graph import load_graph
    from mame_export.serve import ServeError, check_config, model_io

    text = (served["repo"] / "tiny" / "config.pbtxt").read_text()
    io = model_io(load_graph(served["graph"]), "g")
    check_config(text, io, "c")
    bad = {"dtype": text.replace("TYPE_FP32", "TYPE_FP16", 1),
           "output": text.replace('name: "logits"', 'name: "scores"'),
           "max_batch_size": text.replace("max_batch_size: 8", "max_batch_size: 0"),
           "dims": text.replace("dims: 32", "dims: 16", 1),
           "schema": text.replace("max_batch_size", "max_batch")}
    messages = {}
    for what, t in bad.items():
        with pytest.raises(ServeError) as e:
            check_config(t, io, "c")
        messages[what] = str(e.value)
    assert "is TYPE_FP16, the graph's is TYPE_FP32" in messages["dtype"]
    assert "are not the graph's" in messages["output"]
    assert "does not match the graph's dynamic batch axis" in messages["max_batch_size"]
    assert "has dims [3, 16, 32]" in messages["dims"]
    assert "is not a valid Triton config" in messages["schema"]


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_repository_path_that_is_a_file(served, tmp_path):
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    line = cli_error("triton", str(served["graph"]), "--repo", str(repo), alone=True)
    assert "is not a folder" in line
    # a MODEL (triton MODEL, export --triton) is refused before the export's work
    out = tmp_path / "graphs"
    for args in (["triton", *export_args(out), "--repo", str(repo)],
                 [*export_args(out), "--triton", str(repo)]):
        assert "is not a folder" in cli_error(*args, alone=True)
    assert repo.read_text() == "not a folder" and not out.exists()


@pytest.mark.parametrize("name", ["my model", "a/b", ".hidden", "x" * 129])
def test_model_name_triton_refuses(served, tmp_path, name):
    line = cli_error("triton", str(served["graph"]), "--repo", str(tmp_path / "repo"),
                     "--name", name, alone=True)
    assert "has characters Triton refuses" in line
    assert not (tmp_path / "repo").exists()


def test_engine_built_for_another_gpu(served, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    plan = engines / "tiny.nvidia-a100-sxm4-80gb.fp32.plan"
    plan.write_bytes(b"serialized engine")
    meta = {"gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
            "precision": "fp32", "profiles": [],
            "source_graph": {"path": str(served["graph"])}}
    Path(str(plan) + ".json").write_text(json.dumps(meta))
    repo = tmp_path / "repo"
    line = cli_error("triton", str(plan), "--repo", str(repo), "--gpu", "NVIDIA H200",
                     alone=True)
    assert "was built for NVIDIA A100-SXM4-80GB, but the repository is for NVIDIA H200" in line
    assert not repo.exists()
    # for its own GPU model: a tensorrt_plan model named by the GPU, the sidecars beside it
    assert run_main("triton", str(plan), "--repo", str(repo), "--name", "vit",
                    "--gpu", "NVIDIA A100-SXM4-80GB")[0] == 0
    cfg = parse(repo / "vit" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.default_model_filename == "model.nvidia-a100-sxm4-80gb.plan"
    assert dict(cfg.cc_model_filenames) == {"8.0": "model.nvidia-a100-sxm4-80gb.plan"}
    assert sorted(p.name for p in (repo / "vit" / "1").iterdir()) == \
        ["model.json", "model.nvidia-a100-sxm4-80gb.plan", "model.nvidia-a100-sxm4-80gb.plan.json"]


@pytest.mark.parametrize("dims, needle", [(["batch", "h"], "a dynamic ('h') axis 1"),
                                          (["batch", None], "an unnamed axis 1")])
def test_graph_with_a_dynamic_or_unnamed_non_batch_axis(tmp_path, dims, needle):
    graph = tiny_graph(tmp_path / "g.onnx", [vi("x", dims)], [vi("y", dims)],
                       [helper.make_node("Relu", ["x"], ["y"])])
    line = cli_error("triton", str(graph), "--repo", str(tmp_path / "repo"), alone=True)
    assert needle in line and "only the batch axis (0) may be dynamic" in line
    assert not (tmp_path / "repo").exists()


def test_failed_write_leaves_no_half_written_model_folder(served, tmp_path, monkeypatch):
    from mame_export.serve import repository

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository.shutil, "copyfile", fail)
    repo = tmp_path / "repo"
    line = cli_error("triton", str(served["graph"]), "--repo", str(repo), alone=True)
    assert "no space left on device" in line
    assert not repo.exists()


# ---------------------------------------------------------------- a real Triton server


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SERVER, reason="needs nvidia-pytriton (the tritonserver binary)")
def test_real_triton_server_serves_the_python_backend_model(served):
    import onnxruntime as ort
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    from mame_export.serve.server import local_server

    session = ort.InferenceSession(str(served["graph"]), providers=["CPUExecutionProvider"])
    (inp,), outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    rng = np.random.default_rng(0)

    def check(result, x):  # noqa: ANN001 - a client's InferResult
        ref = session.run(outputs, {inp.name: x})
        for name, r in zip(outputs, ref, strict=True):
            np.testing.assert_allclose(result.as_numpy(name), r, rtol=1e-4, atol=1e-5)

    with local_server(served["repo"]) as server:
        http = thttp.InferenceServerClient(server.http_url, concurrency=8)
        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        assert http.is_server_ready() and http.is_model_ready("tiny")
        assert grpc.is_server_ready() and grpc.is_model_ready("tiny")

        def http_request(x, dtype="FP32", name=inp.name):  # noqa: ANN001, ANN202
            t = thttp.InferInput(name, x.shape, dtype)
            t.set_data_from_numpy(x)
            return [t]

        x = rng.standard_normal(shape, dtype=np.float32)
        check(http.infer("tiny", http_request(x)), x)
        t = tgrpc.InferInput(inp.name, x.shape, "FP32")
        t.set_data_from_numpy(x)
        check(grpc.infer("tiny", [t]), x)

        # concurrent requests: the dynamic batcher runs them together
        before = grpc.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(8)]
        # the HTTP client's own pool (gevent: its client is not for threads)
        pending = [http.async_infer("tiny", http_request(a)) for a in xs]
        results = [p.get_result() for p in pending]
        for result, a in zip(results, xs, strict=True):
            check(result, a)
        after = grpc.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        executions = int(after["execution_count"]) - int(before["execution_count"])
        assert inferences == 8 and executions < 8, (inferences, executions)

        # malformed requests get Triton's error; the server stays up and keeps answering
        bad = {"shape": http_request(rng.standard_normal([1, 3, 16, 16], dtype=np.float32)),
               "dtype": http_request(x.astype(np.float64), "FP64"),
               "missing input": [],
               "unknown input": http_request(x, name="nope")}
        for what, inputs in bad.items():
            with pytest.raises(InferenceServerException) as e:
                http.infer("tiny", inputs)
            assert str(e.value), what
            assert http.is_server_live() and http.is_model_ready("tiny"), what
        check(http.infer("tiny", http_request(x)), x)
        http.close()
        grpc.close()
    assert server.process.poll() is not None  # stopped


@pytest.mark.slow
def test_a_denoiser_graph_gets_its_conditioning_inputs(tmp_path):
    """The dit family through `triton`: a tiny SD3 graph (MaMe + MaRe, r = 0.5) keeps its
    four inputs; the (B,) timestep becomes dims [1] reshaped to [] for the model."""
    pytest.importorskip("diffusers")
    from helpers import tiny_model

    from mame_export.job import run_export
    from mame_export.request import ExportRequest

    _, spec = tiny_model("sd3_medium")
    req = ExportRequest(model=spec.alias, r=0.5, weights="random", out_dir=tmp_path,
                        parity_batches=1, seed=0, runners=("onnxrt",), dynamic_batch=True)
    meta = run_export(req, log=lambda _: None, spec=spec)
    assert meta["ok"], meta
    code, _, err = run_main("triton", meta["onnx"], "--repo", str(tmp_path / "repo"),
                            "--name", "sd3", "--device", "cpu", "--max-batch", "2")
    assert code == 0, err
    cfg = parse(tmp_path / "repo" / "sd3" / "config.pbtxt")
    names = [i.name for i in cfg.input]
    assert names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    timestep = cfg.input[1]
    assert list(timestep.dims) == [1] and list(timestep.reshape.shape) == []
    assert [o.name for o in cfg.output] == ["out_sample"]
    assert list(cfg.output[0].dims) == list(cfg.input[0].dims)  # the full latent comes back
