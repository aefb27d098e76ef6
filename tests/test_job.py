"""The one resolved job: settings checked once (layers, opsets, the mode), defaults filled,
r without effect warned, and the export job's dynamic batch (issue 24 item 5) and
held-signal imports (item 20). Sections name the issue and item a test comes from."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import export_args, one_line_error, run_main

from mame_export.errors import UserError
from mame_export.request import ExportRequest, Job, resolve_job


def test_resolve_fills_defaults_once() -> None:
    job = resolve_job(ExportRequest(model="vit_t", weights="random"))
    assert isinstance(job, Job)
    assert job.tau == 1.0 and job.batch == 1 and job.rs == (0.5,) and job.r == 0.5
    assert job.spec.alias == "vit_t" and job.family.name == "timm-vit"
    assert job.patch_settings()["tau"] == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.batch = 4  # type: ignore[misc]
    adaptive = resolve_job(ExportRequest(model="vit_t", mode="adaptive"), export=False)
    assert adaptive.tau == 0.8


def test_resolve_unet_default_batch() -> None:
    pytest.importorskip("diffusers")
    assert resolve_job(ExportRequest(model="sd21-unet")).batch == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=1.0), "--r must be in [0, 1)"),
    (dict(r=float("nan")), "--r must be in [0, 1)"),
    (dict(batch=0), "--batch must be in [1, 4096]"),
    (dict(precision="fp64"), "--precision must be one of fp32, fp16, bf16"),
    (dict(img_size=8), "patch size"),
    (dict(img_size=100), "multiple"),
    (dict(llava=True), "--llava needs a LLaVA vision encoder"),
])
def test_resolve_refuses_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")) as e:
        resolve_job(ExportRequest(model="vit_t", **kwargs))
    assert "\n" not in str(e.value)


def test_several_rs_checked() -> None:
    assert resolve_job(ExportRequest(model="vit_t"), rs=[0.25, 0.5]).rs == (0.25, 0.5)
    with pytest.raises(UserError, match="needs at least one value"):
        resolve_job(ExportRequest(model="vit_t"), rs=[])


def test_adaptive_mode_refuses_export() -> None:
    with pytest.raises(UserError, match="--mode static"):
        ExportRequest(model="vit_t", mode="adaptive").validate()


# ---------------------------------------------------------------- issue 12 item 6: layers, r


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


# ---------------------------------------------------------------- issue 12 items 7, 8: opsets


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


# ---------------------------------------------------------------- the export job


def test_dynamic_batch_graph_is_dynamic_and_checked_at_several_batches(tmp_path) -> None:
    """`--dynamic-batch` exported a graph fixed at batch 1 (the example's), failed parity
    with an ORT shape error, and wrote "dynamic" in the sidecar."""
    from mame_export.job import run_export
    from mame_export.runners.factory import make_runner

    req = ExportRequest(model="vit_t", img_size=32, weights="random", dynamic_batch=True,
                        out_dir=tmp_path, parity_batches=3, seed=0)
    meta = run_export(req, log=lambda _m: None)
    assert meta["ok"], meta["parity"]
    assert meta["audit"]["passed"]
    graph = onnx.load(meta["onnx"], load_external_data=False)
    dim0 = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    runner = make_runner("onnxrt", onnx_path=meta["onnx"])
    runner.activate()
    try:
        for b in (1, 3, 8):
            out = runner.infer({"pixels": np.random.default_rng(b).standard_normal(
                (b, 3, 32, 32)).astype(np.float32)})
            assert next(iter(out.values())).shape[0] == b
    finally:
        runner.deactivate()


def test_onnxruntime_import_holds_signals(monkeypatch, capsys) -> None:
    """A SIGTERM that lands while onnxruntime is imported ends the run as an interrupt
    (exit 143), after the import: it is never swallowed by the import."""
    import importlib

    import mame_export.cli as cli

    real = importlib.import_module
    seen: list[str] = []

    def import_module(name: str, *a, **k):
        if name == "onnxruntime":
            seen.append(name)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    code = cli.main(["plan", "vit_t", "--img-size", "32"])
    assert seen == ["onnxruntime"]
    assert code == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err


def test_sidecar_rebuilds_the_exported_schedule(tmp_path) -> None:
    """The sidecar recorded the blocks that merged instead of the layers asked for; at 64
    px one default block merges nothing, and the rebuilt reference took another schedule."""
    from mame_export.request import build
    from mame_export.sidecar import read_sidecar

    req = ExportRequest(model="vit_t", img_size=64, weights="random", out_dir=tmp_path,
                        parity_batches=1, seed=0, runners=("onnxrt",))
    from mame_export.job import run_export

    meta = run_export(req, log=lambda _m: None)
    _, again = read_sidecar(Path(meta["onnx"]))
    rebuilt = build(resolve_job(again, export=False), log=lambda _m: None)
    assert rebuilt.plan is not None
    assert rebuilt.plan.tokens_per_block == meta["plan"]["tokens_per_block"]
