"""The command line end to end on vit_t, and every bad input ending in one clear line:
argument limits, argparse errors, models refused before any work, Ctrl-C while importing.
Sections name the issue and item a test comes from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from helpers import (
    REPO,
    TINY,
    cli_env,
    export_args,
    one_line_error,
    run_cli,
    run_main,
    vit_t_export_args,
)
from onnx import TensorProto

from mame_export.cli import main


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
    one_line_error(capsys.readouterr().err, "exported by mame-export 0.1.0")


def test_target_macs_solves_r_and_out_of_reach_is_one_line(capsys) -> None:
    assert main(["plan", "vit_t", "--target-macs", "0.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["flops_ratio"] <= 0.5 and 0.6 < plan["r"] < 0.75
    assert plan["merge_layers"] == list(range(8))  # the default: the first min(8, depth)
    assert main(["plan", "vit_t", "--target-macs", "0.05"]) == 2
    one_line_error(capsys.readouterr().err, "out of reach")
    assert main(["plan", "vit_t", "--target-macs", "1.5"]) == 2
    one_line_error(capsys.readouterr().err, "--target-macs must be in (0, 1]")


def test_plan_command_table(capsys) -> None:
    assert main(["plan", "vit_b", "--r", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "196 patches + 1 protected" in out and "(no merge)" in out
    assert main(["plan", "vit_b", "--r", "0.5", "--layers", "0-3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["merge_layers"] == [0, 1, 2, 3] and plan["final_patches"] == 98


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
    one_line_error(capsys.readouterr().err, needle)


def test_trt_without_tensorrt_keeps_graph_and_writes_no_engine(tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    import types

    # An empty namespace package, as tensorrt-stubs leaves behind, must not count as TensorRT.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    out, engines = tmp_path / "g", tmp_path / "e"
    code = main(vit_t_export_args(out) + ["--trt", "--engines", str(engines)])
    assert code == 2
    one_line_error(capsys.readouterr().err, "pip install 'mame-export[trt]'")
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".onnx"]
    assert not engines.exists() or list(engines.iterdir()) == []


def test_trt_option_validation_happens_before_export(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g"
    code = main(vit_t_export_args(out) + ["--trt", "--dynamic-batch", "--min-batch", "8",
                                          "--max-batch", "4"])
    assert code == 2
    one_line_error(capsys.readouterr().err, "--min-batch 8 is larger than --max-batch 4")
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
    one_line_error(capsys.readouterr().err, "export with --mode static")
    assert not out.exists() or list(out.iterdir()) == []


def test_parity_of_a_model_exports_once_and_reports_every_runner(capsys) -> None:
    code = main(["parity", "vit_t", "--r", "0.5", "--weights", "random", "--parity-batches",
                 "1", "--runners", "onnxrt,tensorrt"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("[2/5] exporting") == 1
    assert "onnxrt         PASSED" in captured.out
    assert "tensorrt       SKIPPED" in captured.out


# ---------------------------------------------------------------- issue 12 item 3: limits


@pytest.mark.parametrize("extra, needle", [
    (["--seed", "-1"], "--seed must be in [0, 2**63 - 1]"),
    (["--parity-batches", "100000"], "--parity-batches must be in [1, 1000]"),
    (["--parity-batches", "0"], "--parity-batches must be in [1, 1000]"),
    (["--batch", "100000"], "--batch must be in [1, 4096]"),
    (["--batch", "0"], "--batch must be in [1, 4096]"),
])
def test_3_limits_are_checked_before_any_work(tmp_path, extra, needle) -> None:
    out = tmp_path / "g"
    args = [a for a in export_args(out) if a not in ("--seed", "0")]
    t0 = time.perf_counter()
    code, _, err = run_main(*args, *extra)
    assert code == 2
    one_line_error(err, needle)
    assert "[1/5]" not in err and time.perf_counter() - t0 < 10
    assert not out.exists()


# ---------------------------------------------------------------- issue 12 item 12: Ctrl-C, imports


def _package_import_loads_torch() -> bool:
    res = subprocess.run([sys.executable, "-c",
                          "import sys, mame_export.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    return res.stdout.strip() == "True"


@pytest.mark.xfail(_package_import_loads_torch(), strict=True,
                   reason="mame_export/__init__.py imports torch (through mame_export.patch) "
                          "before main() can catch Ctrl-C; it needs lazy exports")
def test_12_ctrl_c_in_the_first_second_is_one_line() -> None:
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "mame_export", "plan", "vit_t"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(), cwd=REPO)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        one_line_error(err, "interrupted")


def test_12_the_command_line_module_imports_nothing_heavy() -> None:
    code = ("import sys; import mame_export; before = set(sys.modules); "
            "import mame_export.cli as c; c.build_parser(); "
            "print(sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] in ('torch', 'timm', 'onnx', 'onnxruntime', 'numpy')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ---------------------------------------------------------------- issue 12 item 13: user errors


@pytest.mark.parametrize("args, needle", [
    (["vit_t", "--layers", "12"], "out of range"),
    (["vit_t", "--layers", "0-99"], "out of range"),
    (["vit_t", "--img-size", "8"], "smaller than vit_t's patch size 16"),
    (["resnet18"], "MaMe supports timm VisionTransformer"),
    (["convnext_atto"], "MaMe supports timm VisionTransformer"),
    (["swin_tiny_patch4_window7_224"], "MaMe supports timm VisionTransformer"),
    (["eva02_tiny_patch14_224"], "MaMe supports timm VisionTransformer"),
    (["beit_base_patch16_224"], "MaMe supports timm VisionTransformer"),
    (["vit_relpos_small_patch16_224"], "MaMe supports timm VisionTransformer"),
    (["vit_small_patch16_rope_224"], "MaMe supports timm VisionTransformer"),
    (["naflexvit_base_patch16_gap"], "MaMe supports timm VisionTransformer"),
    (["vit_small_patch16_18x2_224"], "block 0 is ParallelThingsBlock"),
    (["vit_pwee_patch16_reg1_gap_256"], "block 0 is ParallelScalingBlock"),
    (["vit_tiny_patch16_224.bogus_tag"], "has no pretrained tag 'bogus_tag'"),
])
def test_13_user_errors_before_any_work(tmp_path, args, needle) -> None:
    out = tmp_path / "g"
    t0 = time.perf_counter()
    code, _, err = run_main(*args, "--weights", "random", "--out", str(out))
    assert code == 2, err
    one_line_error(err, needle)
    assert "[1/5]" not in err  # refused before the model was built
    assert time.perf_counter() - t0 < 30
    assert not out.exists()


def test_14_hybrid_vit_is_refused_before_export(tmp_path) -> None:
    code, _, err = run_main("plan", "vit_tiny_r_s16_p8_224", "--weights", "random")
    assert code == 0, err
    code, _, err = run_main("vit_tiny_r_s16_p8_224", "--weights", "random",
                            "--out", str(tmp_path / "g"))
    assert code == 2
    one_line_error(err, "is a hybrid ViT")
    assert "[2/5]" not in err and not (tmp_path / "g").exists()


def test_13_profile_plot_to_an_unwritable_path(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    code, _, err = run_main("profile", "vit_t", "--r", "0.5", "--plot",
                            str(blocker / "latency.png"))
    assert code == 2
    one_line_error(err, "is not a folder")
    assert "profiling" not in err and time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- issue 12 item 14: messages


def test_14_folders_fifos_and_symlink_loops_are_named(tmp_path) -> None:
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop)
    for path, needle in ((folder, "is a folder"), (fifo, "is a FIFO"),
                         (loop, "is a symlink loop")):
        code, _, err = run_main("audit", str(path))
        assert code == 2
        one_line_error(err, needle)
        code, _, err = run_main("plan", *TINY[:-1], str(path))
        assert code == 2
        one_line_error(err, needle)


@pytest.mark.parametrize("args, needle", [
    (["vit_t", "--precision", "fp64"], "argument --precision: invalid choice"),
    (["vit_t", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["plan"], "the following arguments are required: MODEL"),
    (["vit_t", "--batch", "two"], "argument --batch: invalid int value"),
])
def test_14_argparse_errors_are_one_line(args, needle) -> None:
    code, _, err = run_main(*args)
    assert code == 2
    one_line_error(err, needle, alone=True)


@pytest.mark.parametrize("value", ["-inf", "-1e-3", "-.5", "-nan"])
def test_14_negative_r_is_read_as_a_number(value) -> None:
    code, _, err = run_main("plan", "vit_t", "--r", value)
    assert code == 2
    one_line_error(err, "r must be in [0, 1)")


def test_14_img_size_off_the_patch_grid(tmp_path) -> None:
    code, _, err = run_main("plan", "vit_t", "--img-size", "100")
    assert code == 2
    one_line_error(err, "not a multiple of vit_t's patch size 16")
    assert "use 96 or 112" in err
