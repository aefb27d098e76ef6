"""Issue 12: every hole an adversarial probe found, one test (or a few) per numbered item.

Exports use a tiny model (vit_tiny_patch16_224 at 32 px: 4 patches) to stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mame_export.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--weights", "random"]


def run_main(*args: str) -> tuple[int, str, str]:
    """main() in this process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def export_args(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--out", str(out), "--parity-batches", "1", "--seed", "0", *extra]


def one_line_error(err: str, needle: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mame-export:")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "\x1b" not in err
    return lines[0]


def cli_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)


def pair_is_consistent(folder: Path) -> bool:
    """Every graph in ``folder`` has its own sidecar and every sidecar its graph."""
    graphs = sorted(p.stem for p in folder.glob("*.onnx"))
    sidecars = sorted(p.stem for p in folder.glob("*.json"))
    if graphs != sidecars:
        return False
    from mame_export.artifacts import sha256_file

    return all(json.loads((folder / f"{s}.json").read_text())["onnx_sha256"]
               == sha256_file(folder / f"{s}.onnx") for s in graphs)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) \
        if folder.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tiny")
    code, stdout, err = run_main(*export_args(out, "--json"))
    assert code == 0, err
    return json.loads(stdout)


# ---------------------------------------------------------------- 1. graph and sidecar together


def test_1_ctrl_c_between_the_renames_lands_both_or_neither(tmp_path, monkeypatch) -> None:
    out = tmp_path / "g"
    real_replace = os.replace
    fired = []

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if Path(dst).parent == out and not fired:  # the first file lands in the folder ...
            fired.append(Path(dst).name)
            signal.raise_signal(signal.SIGINT)  # ... and the user presses Ctrl-C

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_main(*export_args(out))
    assert fired and code == 130, err
    assert "interrupted" in err
    assert pair_is_consistent(out), sorted(p.name for p in out.iterdir())
    assert hidden(out) == []


def test_1_parity_refuses_a_sidecar_of_another_graph(tiny, tmp_path) -> None:
    graph = tmp_path / "other.onnx"
    model = onnx.load(tiny["onnx"])
    model.doc_string = "another graph"
    onnx.save(model, str(graph))
    graph.with_suffix(".json").write_text(Path(tiny["metadata_path"]).read_text())
    code, _, err = run_main("parity", str(graph), "--runners", "onnxrt")
    assert code == 2
    one_line_error(err, "belongs to another graph")


def test_1_parity_accepts_the_graphs_own_sidecar(tiny) -> None:
    code, _, err = run_main("parity", tiny["onnx"], "--runners", "onnxrt",
                            "--parity-batches", "1")
    assert code == 0, err


# ---------------------------------------------------------------- 2. two runs, one folder


def test_2_names_differ_per_setting() -> None:
    from mame_export.families import resolve
    from mame_export.job import ExportRequest, graph_stem

    spec = resolve("vit_t")
    base = dict(model="vit_t", batch=1)
    variants = [dict(), dict(tau=0.5), dict(layers=[0, 1]), dict(prop_attn=False),
                dict(weights="random"), dict(weights="/some/ckpt.safetensors"), dict(opset=20)]
    stems = [graph_stem(spec, ExportRequest(**base, **v)) for v in variants]
    assert len(set(stems)) == len(stems), stems
    # the same settings always give the same name
    assert graph_stem(spec, ExportRequest(**base)) == stems[0]


def test_2_parity_runs_on_the_runs_own_copy(tmp_path, monkeypatch) -> None:
    import mame_export.job as job

    out = tmp_path / "g"
    seen = []
    real = job.select_runners

    def spy(reference, io_, onnx_path, *a, **k):
        seen.append(Path(onnx_path))
        # another run lands its graph under the same name meanwhile
        out.mkdir(exist_ok=True)
        (out / Path(onnx_path).name).write_bytes(b"another run's graph")
        return real(reference, io_, onnx_path, *a, **k)

    monkeypatch.setattr(job, "select_runners", spy)
    code, stdout, err = run_main(*export_args(out, "--json"))
    assert code == 0, err
    assert seen and seen[0].parent != out and seen[0].parent.name.startswith(".tmp-mame-")
    assert pair_is_consistent(out)  # this run's pair, whole
    assert json.loads(stdout)["parity"]["passed"]


# ---------------------------------------------------------------- 3. lost sidecar, late failures


def test_3_full_disk_while_the_sidecar_is_written_lands_nothing(tmp_path, monkeypatch) -> None:
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "g"
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "no space left on device")
    assert not out.exists() or list(out.iterdir()) == []


def test_3_full_disk_keeps_the_previous_pair(tiny, tmp_path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "g"
    out.mkdir()
    for p in (Path(tiny["onnx"]), Path(tiny["metadata_path"])):
        shutil.copy(p, out / p.name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def full(src, dst, *a, **k):  # the sidecar lands, then the graph's rename fails
        if str(dst).endswith(".onnx") and Path(dst).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = run_main(*export_args(out, "--seed", "7"))
    assert code == 2
    one_line_error(err, "no space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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


# ---------------------------------------------------------------- 4. SIGTERM, SIGHUP, stale folders

_SIGNAL_SCRIPT = """
import os, signal, sys, time
import mame_export.export as ex
from mame_export.cli import main

real = ex.sha256_file

def slow(path, *a, **k):  # the graph is half done in the temporary folder when ...
    os.kill(os.getpid(), signal.{sig})  # ... a timeout or a CI cancel stops the run
    time.sleep(30)
    return real(path, *a, **k)

ex.sha256_file = slow
sys.exit(main({args!r}))
"""


@pytest.mark.parametrize("sig, command", [("SIGTERM", "export"), ("SIGHUP", "parity")])
def test_4_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig, command) -> None:
    out, tmpdir = tmp_path / "g", tmp_path / "tmp"
    tmpdir.mkdir()
    args = export_args(out) if command == "export" else ["parity", *TINY, "--runners", "onnxrt",
                                                        "--parity-batches", "1"]
    script = _SIGNAL_SCRIPT.format(sig=sig, args=args)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=cli_env(TMPDIR=str(tmpdir)), cwd=REPO)
    assert res.returncode == 128 + getattr(signal, sig), res.stderr
    one_line_error(res.stderr, f"interrupted ({sig})")
    assert hidden(out) == [] and (not out.exists() or list(out.iterdir()) == [])
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("mame-")] == []


def test_4_a_later_run_removes_stale_temporary_folders(tmp_path) -> None:
    out = tmp_path / "g"
    out.mkdir()
    old = time.time() - 2 * 3600
    dead = 4_194_305  # above Linux's pid_max: no such process
    stale = [out / f".tmp-mame-{dead}-abc123"]  # ours
    kept = [out / f".tmp-mame-{dead}-fresh1",  # too recent to judge
            out / f".tmp-mame-{os.getpid()}-alive1",  # its process still runs
            out / ".tmp-k2j3h4g5"]  # no pid: maybe a user's (issue 24 item 11)
    for d in stale + kept:
        d.mkdir()
        (d / "partial.onnx").write_bytes(b"half a graph")
    for d in stale + kept[1:]:
        os.utime(d, (old, old))
    code, _, err = run_main(*export_args(out))
    assert code == 0, err
    assert [d for d in stale if d.exists()] == []
    assert all(d.exists() for d in kept)


def test_4_stale_parity_folders_in_tmp_are_removed(tmp_path) -> None:
    from mame_export.artifacts import clean_stale_dirs

    old = time.time() - 2 * 3600
    stale = tmp_path / "mame-parity-4194305-xyz"
    alive = tmp_path / f"mame-parity-{os.getpid()}-xyz"
    other = tmp_path / "someone-elses-4194305-xyz"
    for d in (stale, alive, other):
        d.mkdir()
        os.utime(d, (old, old))
    assert clean_stale_dirs(tmp_path, ("mame-parity-",)) == [stale]
    assert alive.exists() and other.exists()


# ---------------------------------------------------------------- 5. the audit


def _model(nodes, inputs, outputs, inits=(), functions=(), opset=18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)]
    if functions:
        imports.append(helper.make_opsetid("local", 1))
    return helper.make_model(g, opset_imports=imports, functions=list(functions))


def _audit(tmp_path: Path, model: onnx.ModelProto, *flags: str) -> tuple[int, dict]:
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    code, out, err = run_main("audit", str(path), "--json", *flags)
    return code, json.loads(out)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


@pytest.mark.parametrize("flags", [(), ("--no-tensorrt",)])
def test_5_topk_inside_a_model_local_function(tmp_path, flags) -> None:
    k = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64,
                                                                         [1], [2]))
    fn = helper.make_function("local", "pick", ["x"], ["v"],
                              [k, helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                              [helper.make_opsetid("", 18)])
    call = helper.make_node("pick", ["x"], ["y"], domain="local", name="call")
    code, rep = _audit(tmp_path, _model([call], [_vi("x", [2, 8])], [_vi("y", [2, 2])],
                                        functions=[fn]), *flags)
    assert code == 1 and "TopK" in {f["op"] for f in rep["forbidden_ops"]}, rep["findings"]


@pytest.mark.parametrize("flags", [(), ("--no-tensorrt",)])
def test_5_nms_and_compress(tmp_path, flags) -> None:
    boxes, scores = _vi("boxes", [1, 10, 4]), _vi("scores", [1, 1, 10])
    nms = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")
    code, rep = _audit(tmp_path, _model([nms], [boxes, scores],
                                        [_vi("sel", None, TensorProto.INT64)]), *flags)
    assert code == 1 and {f["op"] for f in rep["forbidden_ops"]} == {"NonMaxSuppression"}
    x, cond = _vi("x", [4, 3]), _vi("c", [4], TensorProto.BOOL)
    comp = helper.make_node("Compress", ["x", "c"], ["y"], axis=0, name="compress")
    code, rep = _audit(tmp_path, _model([comp], [x, cond], [_vi("y", None)]), *flags)
    assert code == 1 and {f["op"] for f in rep["forbidden_ops"]} == {"Compress"}


@pytest.mark.parametrize("flags", [(), ("--no-tensorrt",)])
def test_5_slice_whose_start_is_computed_from_data(tmp_path, flags) -> None:
    x = _vi("x", [1, 16])
    inits = [helper.make_tensor("ends", TensorProto.INT64, [1], [16]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["mi", "one"], ["start"]),
        helper.make_node("Slice", ["x", "start", "ends", "axes"], ["y"], name="slice_by_data"),
    ]
    code, rep = _audit(tmp_path, _model(nodes, [x], [_vi("y", None)], inits), *flags)
    assert code == 1, rep
    assert [(f["op"], f["node"]) for f in rep["forbidden_ops"]] == [("Slice", "slice_by_data")]


def test_5_shapes_from_shape_ops_are_fine(tmp_path) -> None:
    # dynamic batch: Reshape to (Shape(x)[0], -1) depends on the input's shape, not its values
    x = _vi("x", ["batch", 4, 4])
    inits = [helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("s1", TensorProto.INT64, [1], [1])]
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Slice", ["shp", "s0", "s1"], ["b"]),
        helper.make_node("Concat", ["b", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    code, rep = _audit(tmp_path, _model(nodes, [x], [_vi("y", ["batch", 16])], inits),
                       "--no-tensorrt")
    assert code == 0, rep["findings"]


def test_5_exported_mame_graph_still_passes(tiny) -> None:
    assert tiny["audit"]["passed"] and tiny["audit"]["forbidden_ops"] == []


# ---------------------------------------------------------------- 6. accepted, but wrong


@pytest.mark.parametrize("layers, needle", [
    ("7-0", "runs backwards"), ("", "--layers is empty"), ("5--3", "bad --layers '5--3'"),
    ("-2", "bad --layers"), ("0,,2", "bad --layers"),
])
def test_6_bad_layer_lists_are_refused(tmp_path, layers, needle) -> None:
    out = tmp_path / "g"
    code, _, err = run_main(*export_args(out), f"--layers={layers}")
    assert code == 2
    one_line_error(err, needle)
    assert not out.exists()


def test_6_r_without_effect_is_warned() -> None:
    code, _, err = run_main("plan", "vit_t", "--img-size", "16", "--r", "0.5")
    assert code == 0
    assert "warning: r=0.5 has no effect" in err
    code, _, err = run_main("plan", "vit_t", "--r", "0.5")
    assert code == 0 and "no effect" not in err


# ---------------------------------------------------------------- 7, 8. opsets


@pytest.mark.parametrize("opset", ["17", "23", "16", "99"])
def test_7_8_opsets_outside_the_tested_range_are_refused(tmp_path, opset) -> None:
    out = tmp_path / "g"
    code, _, err = run_main(*export_args(out), "--opset", opset)
    assert code == 2
    one_line_error(err, "--opset must be in [18, 22]")
    assert not out.exists()


def _advertised_opsets() -> list[int]:
    from mame_export.request import OPSETS

    return list(range(OPSETS[0], OPSETS[1] + 1))


@pytest.mark.parametrize("opset", _advertised_opsets())
def test_7_8_every_advertised_opset_exports_and_runs(tmp_path, opset) -> None:
    code, stdout, err = run_main(*export_args(tmp_path, "--json"), "--opset", str(opset))
    assert code == 0, err
    meta = json.loads(stdout)
    graph = onnx.load(meta["onnx"])
    real = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert real == opset == meta["settings"]["opset"]
    assert "Attention" not in {n.op_type for n in graph.graph.node}
    assert meta["parity"]["passed"] and meta["audit"]["passed"]
    assert "Traceback" not in err


# ---------------------------------------------------------------- 9, 10. weights


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).state_dict()


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_9_nan_weights_give_null_and_fail_parity(tmp_path, tiny_state) -> None:
    from safetensors.torch import save_file

    sd = {k: v.clone().contiguous() for k, v in tiny_state.items()}
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(sd, str(ckpt))
    args = [a if a != "random" else str(ckpt) for a in export_args(tmp_path / "g", "--json")]
    code, stdout, err = run_main(*args)
    assert code == 1, err
    meta = _strict_json(stdout)  # no NaN in the JSON
    assert _strict_json(Path(meta["metadata_path"]).read_text())["parity"]["passed"] is False
    parity = meta["parity"]
    assert parity["passed"] is False and parity["max_abs_diff"] is None
    onnxrt = next(r for r in parity["runners"] if r["runner"] == "onnxrt")
    assert onnxrt["status"] == "failed" and "NaN" in onnxrt["reason"]
    assert onnxrt["outputs"][0]["cosine"] is None
    assert "NaN or infinite values" in err  # the checkpoint warning


def test_9_nan_outputs_never_pass() -> None:
    from mame_export.parity import TOLERANCES, compare_outputs

    ref = np.ones((2, 5), dtype=np.float32)
    nan = np.full((2, 5), np.nan, dtype=np.float32)
    for a, b in ((ref, nan), (nan, nan), (nan, ref)):
        s = compare_outputs("logits", a, b, TOLERANCES["fp32"])
        assert not s.passed and s.nonfinite and np.isnan(s.cosine)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.complex64])
def test_10_checkpoints_of_the_wrong_dtype_are_named(tmp_path, tiny_state, dtype) -> None:
    ckpt = tmp_path / "w.pth"
    torch.save({k: v.to(dtype) for k, v in tiny_state.items()}, ckpt)
    code, _, err = run_main("plan", *[a if a != "random" else str(ckpt) for a in TINY])
    assert code == 2
    line = one_line_error(err, "of the wrong dtype")
    assert str(dtype).replace("torch.", "") in line and "floating-point" in line


# ---------------------------------------------------------------- 11. file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_11_files_follow_the_umask(tmp_path, umask_022) -> None:
    from mame_export.artifacts import atomic_write_text

    f = tmp_path / "meta.json"
    f.write_text("{}")
    os.chmod(f, 0o644)
    atomic_write_text(f, "{}\n")  # re-writing keeps a readable file readable
    assert f.stat().st_mode & 0o777 == 0o644
    os.umask(0o027)
    g = tmp_path / "new.json"
    atomic_write_text(g, "{}\n")
    assert g.stat().st_mode & 0o777 == 0o640


def test_11_exported_sidecar_and_plot_follow_the_umask(tmp_path, umask_022) -> None:
    pytest.importorskip("matplotlib")
    from mame_export.profile import plot

    code, stdout, err = run_main(*export_args(tmp_path / "g", "--json"))
    assert code == 0, err
    meta = json.loads(stdout)
    assert Path(meta["metadata_path"]).stat().st_mode & 0o777 == 0o644
    assert Path(meta["onnx"]).stat().st_mode & 0o777 == 0o644
    rows = [{"model": "m", "batch": 1, "backend": "torch", "variant": "baseline", "r": 0.0,
             "median_ms": 1.0}]
    png = plot(rows, tmp_path / "p.png")
    assert png.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- 12. Ctrl-C while importing


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


# ---------------------------------------------------------------- 13. user errors, before the work


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


def test_13_meta_tensor_checkpoint(tmp_path, tiny_state) -> None:
    ckpt = tmp_path / "meta.pth"
    torch.save({k: torch.empty_like(v, device="meta") for k, v in tiny_state.items()}, ckpt)
    code, _, err = run_main("plan", *[a if a != "random" else str(ckpt) for a in TINY])
    assert code == 2
    one_line_error(err, "meta tensor(s) without values")


@pytest.mark.parametrize("kind", ["binary", "folder", "not-an-object", "impossible-r",
                                  "impossible-batch", "impossible-precision", "wrong-types"])
def test_13_bad_sidecars(tiny, tmp_path, kind) -> None:
    graph = tmp_path / "g.onnx"
    os.link(tiny["onnx"], graph)
    sidecar = graph.with_suffix(".json")
    meta = json.loads(Path(tiny["metadata_path"]).read_text())
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
            meta["settings"]["precision"] = "fp8"
        else:
            meta["settings"] = {**meta["settings"], "layers": "all", "r": "half"}
            needle = "unreadable metadata sidecar"
        sidecar.write_text(json.dumps(meta))
    code, _, err = run_main("parity", str(graph), "--runners", "onnxrt")
    assert code == 2, err
    one_line_error(err, needle)


def test_13_output_file_that_is_a_folder(tiny, tmp_path) -> None:
    out = tmp_path / "g"
    (out / Path(tiny["onnx"]).name).mkdir(parents=True)
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "a folder of that name is in the way")
    assert "[1/5]" not in err


def test_13_profile_plot_to_an_unwritable_path(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    code, _, err = run_main("profile", "vit_t", "--r", "0.5", "--plot",
                            str(blocker / "latency.png"))
    assert code == 2
    one_line_error(err, "is not a folder")
    assert "profiling" not in err and time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- 14. messages


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


def test_14_checkpoint_extension_case_does_not_matter(tmp_path, tiny_state) -> None:
    from safetensors.torch import save_file

    ckpt = tmp_path / "GOOD.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(ckpt))
    code, _, err = run_main("plan", *[a if a != "random" else str(ckpt) for a in TINY])
    assert code == 0, err


def test_14_empty_graph_file(tmp_path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = run_main("audit", str(empty))
    assert code == 2
    one_line_error(err, "is empty (0 bytes)")


class NotATensor:  # a pickled object weights_only loading must refuse
    pass


def test_14_pickle_refusal_is_one_whole_sentence(tmp_path) -> None:
    ckpt = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, ckpt)
    res = subprocess.run([sys.executable, "-m", "mame_export", "plan", "vit_t", "--weights",
                          str(ckpt)], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         timeout=300)
    assert res.returncode == 2
    line = one_line_error(res.stderr, "refused to load checkpoint")
    assert line.endswith("as safetensors")
    assert "Warning" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_14_hybrid_vit_is_refused_before_export(tmp_path) -> None:
    code, _, err = run_main("plan", "vit_tiny_r_s16_p8_224", "--weights", "random")
    assert code == 0, err
    code, _, err = run_main("vit_tiny_r_s16_p8_224", "--weights", "random",
                            "--out", str(tmp_path / "g"))
    assert code == 2
    one_line_error(err, "is a hybrid ViT")
    assert "[2/5]" not in err and not (tmp_path / "g").exists()


@pytest.mark.parametrize("args, needle", [
    (["vit_t", "--precision", "fp64"], "argument --precision: invalid choice"),
    (["vit_t", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["plan"], "the following arguments are required: MODEL"),
    (["vit_t", "--batch", "two"], "argument --batch: invalid int value"),
])
def test_14_argparse_errors_are_one_line(args, needle) -> None:
    code, _, err = run_main(*args)
    assert code == 2
    one_line_error(err, needle)
    assert len(err.strip().splitlines()) == 1


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


def test_14_failed_runs_leave_no_output_folder(tmp_path, monkeypatch) -> None:
    import mame_export.job as job
    from mame_export.errors import ExportError

    out = tmp_path / "new" / "deeper"
    code, _, err = run_main("vit_t", "--layers", "99", "--out", str(out))
    assert code == 2
    assert not (tmp_path / "new").exists()

    def fails(*_a, **_k):  # a failure after the folder was made removes it too
        assert out.is_dir()
        raise ExportError("ONNX export failed: on purpose")

    monkeypatch.setattr(job, "export_onnx", fails)
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "on purpose")
    assert not (tmp_path / "new").exists()
