"""The command line end to end on vit_t, and every bad input ending in one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mame_export.cli import main
from mame_export.families import build_model, registry

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mame_export", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def assert_one_line_error(res_err: str, needle: str) -> None:
    lines = [ln for ln in res_err.strip().splitlines() if ln.startswith("mame-export:")]
    assert len(lines) == 1, res_err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res_err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("graphs")
    res = run_cli("vit_t", "--r", "0.5", "--out", str(out), "--json", "--seed", "1")
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout), res


def test_export_json_contract(exported) -> None:
    out, meta, res = exported
    # stdout is exactly one JSON object; progress went to stderr
    assert res.stdout.strip().startswith("{") and res.stdout.strip().endswith("}")
    assert "[2/5] exporting" in res.stderr
    assert Path(meta["onnx"]).is_file() and Path(meta["onnx"]).parent == out
    assert meta["plan"]["tokens_per_block"][0] == 197
    assert meta["plan"]["final_patches"] == 98
    assert 0.5 < meta["plan"]["flops_ratio"] < 0.75
    assert meta["audit"]["forbidden_ops"] == [] and meta["audit"]["passed"]
    assert meta["parity"]["passed"] is True
    assert meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"]["max_abs"]
    runners = {r["runner"]: r["status"] for r in meta["parity"]["runners"]}
    assert runners["onnxrt"] == "passed"
    assert runners["onnxrt-cuda"] in ("skipped", "passed")  # never "passed" without a GPU
    assert meta["weights"].startswith("random init")  # offline: random, and said so
    assert "random" in res.stderr.lower() and "warning" in res.stderr.lower()


def test_export_writes_graph_and_sidecar_atomically(exported) -> None:
    out, meta, _ = exported
    sidecar = Path(meta["metadata_path"])
    on_disk = json.loads(sidecar.read_text())
    assert on_disk["onnx_sha256"] == meta["onnx_sha256"]
    for key in ("model", "settings", "plan", "inputs", "versions", "weights", "audit", "parity"):
        assert key in on_disk
    assert on_disk["inputs"][0]["shape"] == [1, 3, 224, 224]
    assert leftovers(out) == []
    onnx.checker.check_model(meta["onnx"])


def test_audit_and_parity_commands_on_the_exported_graph(exported) -> None:
    _, meta, _ = exported
    res = run_cli("audit", meta["onnx"], "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True
    res = run_cli("parity", meta["onnx"], "--runners", "onnxrt,onnxrt-cuda,tensorrt", "--json")
    report = json.loads(res.stdout)
    status = {r["runner"]: r for r in report["runners"]}
    assert status["onnxrt"]["status"] == "passed"
    assert status["tensorrt"]["status"] == "skipped" and status["tensorrt"]["reason"]
    assert res.returncode == 0


def test_parity_refuses_a_graph_made_with_another_merge_op(exported, tmp_path, capsys) -> None:
    _, meta, _ = exported
    graph = tmp_path / "old.onnx"
    os.link(meta["onnx"], graph)
    sidecar = json.loads(Path(meta["metadata_path"]).read_text())
    assert sidecar["merge_op"]
    del sidecar["merge_op"]  # as written by mame-export 0.1.0 (fixed source positions)
    sidecar["versions"]["mame-export"] = "0.1.0"
    graph.with_suffix(".json").write_text(json.dumps(sidecar))
    assert main(["parity", str(graph)]) == 2
    assert_one_line_error(capsys.readouterr().err, "exported by mame-export 0.1.0")


def test_target_macs_solves_r_and_out_of_reach_is_one_line(capsys) -> None:
    assert main(["plan", "vit_t", "--target-macs", "0.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["flops_ratio"] <= 0.5 and 0.6 < plan["r"] < 0.75
    assert plan["merge_layers"] == list(range(8))  # the default: the first min(8, depth)
    assert main(["plan", "vit_t", "--target-macs", "0.05"]) == 2
    assert_one_line_error(capsys.readouterr().err, "out of reach")
    assert main(["plan", "vit_t", "--target-macs", "1.5"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--target-macs must be in (0, 1]")


def test_img_size_builds_the_model_before_the_checkpoint_loads(tmp_path, capsys) -> None:
    # A DINOv2-style model defaults to 518 px; a checkpoint saved at 224 must load at 224.
    import timm
    from safetensors.torch import save_file

    kw = dict(img_size=224, depth=1, embed_dim=48, num_heads=2, num_classes=0)
    small = timm.create_model("vit_small_patch14_dinov2", **kw)
    ckpt = tmp_path / "dinov2_224.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(ckpt))
    from mame_export.families import build_model, resolve

    spec = resolve("vit_small_patch14_dinov2")
    assert spec.img_size == 518  # the untagged name builds at its default tag's size
    spec = type(spec)(**{**spec.__dict__, "kwargs": dict(depth=1, embed_dim=48, num_heads=2)})
    model, source = build_model(spec, str(ckpt), img_size=224)
    assert model.patch_embed.img_size == (224, 224) and source.startswith("file:")


def _graph_with(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_audit_flags_forbidden_ops(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    vals = helper.make_tensor_value_info("vals", TensorProto.FLOAT, [2, 3])
    picked = helper.make_tensor_value_info("picked", TensorProto.FLOAT, [2, 3, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=1, name="topk"),
        helper.make_node("Gather", ["x", "idx"], ["picked"], axis=0, name="gather_computed"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(_graph_with(nodes, [x], [vals, picked], [k]), str(path))
    res = run_cli("audit", str(path), "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    ops = sorted(f["op"] for f in report["forbidden_ops"])
    assert ops == ["Gather", "TopK"]


def test_audit_accepts_gather_with_constant_indices(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    idx = helper.make_tensor("idx", TensorProto.INT64, [2], [0, 3])
    node = helper.make_node("Gather", ["x", "idx"], ["y"], axis=0, name="gather_const")
    path = tmp_path / "ok.onnx"
    onnx.save(_graph_with([node], [x], [y], [idx]), str(path))
    assert main(["audit", str(path)]) == 0


def test_audit_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", str(tmp_path / "missing.onnx")]) != 0
    assert_one_line_error(capsys.readouterr().err, "not found")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model" * 10)
    assert main(["audit", str(garbage)]) != 0
    assert_one_line_error(capsys.readouterr().err, "cannot read ONNX graph")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["vit_tt"], "unknown model 'vit_tt'; closest: vit_t"),
        (["vit_t", "--r", "1.0"], "r must be in [0, 1)"),
        (["vit_t", "--r", "-0.1"], "r must be in [0, 1)"),
        (["vit_t", "--tau", "1.5"], "tau must be in [-1, 1]"),
        (["vit_t", "--batch", "0"], "--batch must be in [1, 4096]"),
        (["plan", "vit_t", "--weights", "/nonexistent/ckpt.pth"], "checkpoint not found"),
    ],
)
def test_bad_arguments_one_line(args, needle, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr().err, needle)


@pytest.fixture(scope="module")
def vit_t_state() -> dict[str, torch.Tensor]:
    return build_model(registry()["vit_t"], "random")[0].state_dict()


def test_checkpoint_formats_load(tmp_path: Path, vit_t_state, capsys) -> None:
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in vit_t_state.items()}, str(st))
    wrapped = tmp_path / "w.pth"
    torch.save({"model": vit_t_state, "epoch": 3}, wrapped)
    sd_wrapped = tmp_path / "w2.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit_t_state.items()}}, sd_wrapped)
    for path in (st, wrapped, sd_wrapped):
        assert main(["plan", "vit_t", "--weights", str(path), "--json"]) == 0, capsys.readouterr()
        assert json.loads(capsys.readouterr().out)["plan"]["final_patches"] == 98


def test_bad_checkpoints(tmp_path: Path, vit_t_state, capsys) -> None:
    good = tmp_path / "good.pth"
    torch.save(vit_t_state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    vit_s = build_model(registry()["vit_s"], "random")[0].state_dict()
    other = tmp_path / "vit_s.pth"
    torch.save(vit_s, other)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in vit_t_state.items() if not k.startswith("head")}, partial)
    cases = [
        (truncated, "cannot read checkpoint"),
        (garbage, "cannot read checkpoint"),
        (other, "with other shapes"),
        (partial, "missing (e.g. head."),
    ]
    for path, needle in cases:
        assert main(["plan", "vit_t", "--weights", str(path)]) == 2
        assert_one_line_error(capsys.readouterr().err, needle)


def test_unwritable_output_dir(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["vit_t", "--out", str(blocker / "sub"), "--weights", "random"]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot write to")


def _tiny_export_args(out: Path) -> list[str]:
    return ["vit_t", "--r", "0.5", "--weights", "random", "--out", str(out),
            "--parity-batches", "1"]


def test_full_disk_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    import mame_export.export as ex

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", full)
    out = tmp_path / "g"
    assert main(_tiny_export_args(out)) == 2
    assert_one_line_error(capsys.readouterr().err, "no space left on device")
    assert not out.exists()  # the run made the folder, and took it back


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    import mame_export.export as ex

    def interrupted_sha(path, *a, **k):
        assert Path(path).is_file()  # the graph exists in the temporary folder ...
        raise KeyboardInterrupt  # ... when the user presses Ctrl-C

    monkeypatch.setattr(ex, "sha256_file", interrupted_sha)
    out = tmp_path / "g"
    assert main(_tiny_export_args(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()  # ... and nothing is left behind, not even the folder


def test_adaptive_mode_refuses_export(capsys) -> None:
    from mame_export.errors import UserError
    from mame_export.request import ExportRequest

    with pytest.raises(UserError, match="--mode static"):
        ExportRequest(model="vit_t", mode="adaptive").validate()


def test_plan_command_table(capsys) -> None:
    assert main(["plan", "vit_b", "--r", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "196 patches + 1 protected" in out and "(no merge)" in out
    assert main(["plan", "vit_b", "--r", "0.5", "--layers", "0-3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["merge_layers"] == [0, 1, 2, 3] and plan["final_patches"] == 98


def test_trt_without_tensorrt_keeps_graph_and_writes_no_engine(tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    import types

    # An empty namespace package, as tensorrt-stubs leaves behind, must not count as TensorRT.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    out, engines = tmp_path / "g", tmp_path / "e"
    code = main(_tiny_export_args(out) + ["--trt", "--engines", str(engines)])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "pip install 'mame-export[trt]'")
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".onnx"]
    assert not engines.exists() or list(engines.iterdir()) == []


def test_trt_option_validation_happens_before_export(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g"
    code = main(_tiny_export_args(out) + ["--trt", "--dynamic-batch", "--min-batch", "8",
                                          "--max-batch", "4"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "--min-batch 8 is larger than --max-batch 4")
    assert not out.exists() or list(out.iterdir()) == []


def test_fp16_graph_parity_through_onnxruntime(tmp_path: Path) -> None:
    res = run_cli("vit_t", "--r", "0.5", "--weights", "random", "--precision", "fp16",
                  "--out", str(tmp_path), "--parity-batches", "2", "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    graph = onnx.load(meta["onnx"], load_external_data=False)
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    parity = meta["parity"]
    assert parity["precision"] == "fp16" and parity["passed"]
    onnxrt = next(r for r in parity["runners"] if r["runner"] == "onnxrt")
    out = onnxrt["outputs"][0]
    assert out["cosine"] >= 0.999
    # Top-1 is judged where the reference's margin exceeds twice the element tolerance.
    assert out["decisive_samples"] is not None
    assert out["top1_decisive"] is None or out["top1_decisive"] >= 0.98


def test_bf16_graph_cannot_pass_without_a_bf16_runner(tmp_path: Path) -> None:
    # ONNX Runtime's CPU provider has no bf16 kernels: the check must say so, not pass.
    res = run_cli("vit_t", "--r", "0.5", "--weights", "random", "--precision", "bf16",
                  "--out", str(tmp_path), "--parity-batches", "1", "--json")
    assert res.returncode == 1
    parity = json.loads(res.stdout)["parity"]
    assert parity["passed"] is False
    onnxrt = next(r for r in parity["runners"] if r["runner"] == "onnxrt")
    assert onnxrt["status"] == "error" and onnxrt["reason"]


def test_mode_flag_plans_adaptive_but_refuses_to_export_it(tmp_path: Path, capsys) -> None:
    assert main(["plan", "vit_t", "--r", "0.5", "--mode", "adaptive", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["mode"] == "adaptive" and plan["notes"]
    out = tmp_path / "g"
    assert main(["vit_t", "--mode", "adaptive", "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "export with --mode static")
    assert not out.exists() or list(out.iterdir()) == []


def test_parity_of_a_model_exports_once_and_reports_every_runner(capsys) -> None:
    code = main(["parity", "vit_t", "--r", "0.5", "--weights", "random", "--parity-batches",
                 "1", "--runners", "onnxrt,tensorrt"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("[2/5] exporting") == 1
    assert "onnxrt         PASSED" in captured.out
    assert "tensorrt       SKIPPED" in captured.out
