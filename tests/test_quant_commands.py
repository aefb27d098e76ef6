"""INT8 beyond export: --quant-keep (layers kept in high precision by module path, recorded
in the graph and counted by the audit), and eval / profile --precision int8 (each variant
also as a QDQ graph, beside its fp32 row)."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers import TINY, cli_error, run_main, tiny_model, write_png

from mame_export.quant.scope import KEEP_KEY, count_quantized, module_path, quantized_nodes


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory, one_thread):
    """A tiny merging ViT (2 blocks, r = 0.5) in fp32, and random calibration inputs."""
    import numpy as np
    import torch

    from mame_export.job import build, export_onnx, resolve_job
    from mame_export.quant.calib import Feeds
    from mame_export.request import ExportRequest

    out = tmp_path_factory.mktemp("keep")
    _, spec = tiny_model("vit_t")
    built = build(resolve_job(ExportRequest("vit_t", r=0.5, weights="random"), spec=spec),
                  log=lambda _: None)
    io = built.job.io
    path = out / "fp32.onnx"
    export_onnx(built.model, io.make_inputs(1, torch.Generator().manual_seed(0)), path,
                input_names=io.input_names, output_names=io.output_names)
    rng = np.random.default_rng(0)
    feeds = Feeds([{"pixels": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
                   for _ in range(3)])
    return path, feeds


def test_quant_keep_keeps_the_matched_layers_and_says_why(fp32_graph, tmp_path):
    from mame_export.audit import audit
    from mame_export.quant.qdq import quantize_graph

    src, feeds = fp32_graph
    plain, kept = tmp_path / "plain.onnx", tmp_path / "kept.onnx"
    quantize_graph(src, plain, feeds, report=False)
    feeds.rewind()
    summary = quantize_graph(src, kept, feeds, report=False, keep=("blocks.*.mlp.fc2",))
    model = onnx.load(str(kept))
    done = quantized_nodes(model)
    fc2 = [n for n in model.graph.node if module_path(n).endswith("mlp.fc2")
           and n.op_type == "MatMul"]
    assert len(fc2) == 2 and not {n.name for n in fc2} & done
    assert any(module_path(n).endswith("mlp.fc1") for n in model.graph.node if n.name in done)
    # the graph records the patterns, so the audit (which reads only the graph) says why
    assert {p.key: p.value for p in model.metadata_props}[KEEP_KEY] == "blocks.*.mlp.fc2"
    quantized, why, merge_quantized, _ = count_quantized(model)
    assert why["--quant-keep blocks.*.mlp.fc2"] == 2 and merge_quantized == []
    assert quantized == count_quantized(onnx.load(str(plain)))[0] - 2
    assert summary.matmuls_quantized == quantized
    report = audit(kept)
    assert report.passed, report.summary()
    assert "2 --quant-keep blocks.*.mlp.fc2" in report.summary()


def test_quant_keep_that_matches_nothing_is_refused(fp32_graph, tmp_path):
    from mame_export.errors import UserError
    from mame_export.quant.qdq import quantize_graph

    src, feeds = fp32_graph
    with pytest.raises(UserError, match=r"--quant-keep 'blocks\.\*\.mlp\.fc9' matches no"):
        quantize_graph(src, tmp_path / "x.onnx", feeds, report=False,
                       keep=("blocks.*.mlp.fc9",))
    assert not (tmp_path / "x.onnx").exists()


def test_quant_keep_needs_a_quantized_precision(tmp_path):
    line = cli_error("export", *TINY, "--quant-keep", "blocks.*.mlp.fc2",
                     "--out", str(tmp_path / "out"))
    assert "--quant-keep" in line and "--precision int8 or fp8" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- eval and profile


def _images(folder, n, offset=0):
    import numpy as np

    rng = np.random.default_rng(offset)
    for i in range(n):
        write_png(folder / str(i % 2) / f"{i}.png", rng.integers(0, 255, (40, 40, 3)))
    return folder


@pytest.mark.slow
def test_eval_int8_scores_quantized_twins_beside_fp32(tmp_path, one_thread):
    data, calib = _images(tmp_path / "data", 4), _images(tmp_path / "calib", 2, 1)
    rc, out, err = run_main("eval", *TINY, "--data", str(data), "--r", "0.5", "--no-tome",
                            "--precision", "int8", "--calib", str(calib), "--batch", "2",
                            "--json")
    assert rc == 0, err
    report = json.loads(out)
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["unmerged", "MaMe r=0.5", "unmerged int8", "MaMe r=0.5 int8"]
    assert rows["unmerged int8"]["method"] == "unmerged-int8"
    assert rows["unmerged int8"]["macs_ratio"] == 1.0
    assert rows["MaMe r=0.5 int8"]["macs_ratio"] == rows["MaMe r=0.5"]["macs_ratio"] < 1
    for name in ("unmerged int8", "MaMe r=0.5 int8"):  # rounded, so not 1, yet close
        assert 0.9 < rows[name]["cosine_outputs"] < 1.0
    assert report["precision"] == "int8"
    assert any("int8 rows: QDQ graphs" in n and str(calib) in n for n in report["notes"])


def test_eval_int8_with_an_empty_calib_folder_is_one_line(tmp_path):
    data = _images(tmp_path / "data", 2)
    (tmp_path / "calib").mkdir()
    line = cli_error("eval", *TINY, "--data", str(data), "--precision", "int8",
                     "--calib", str(tmp_path / "calib"))
    assert "--calib" in line and "no images" in line


@pytest.mark.slow
def test_profile_int8_times_fp32_and_int8_rows_in_one_group(tmp_path, one_thread):
    rc, out, err = run_main("profile", *TINY, "--r", "0.5", "--backends", "torch,onnxrt",
                            "--variants", "baseline,mame", "--precision", "int8",
                            "--seconds", "0.2", "--min-iters", "3", "--warmup", "1", "--json",
                            "--markdown", str(tmp_path / "page.md"))
    assert rc == 0, err
    rows = json.loads(out)["results"]
    assert "onnxrt        b1 int8: median" in err  # each progress line names its precision
    page = (tmp_path / "page.md").read_text()
    summary = page.split("## Summary")[1].split("##")[0]
    assert "| precision |" in summary and "| vs fp32 baseline |" in summary
    assert summary.count("| fp32 |") == summary.count("| int8 |") == 2  # torch, onnxrt
    assert "- weights: random init (seed 0); latency does not depend" in page
    got = {(r["variant"], r["backend"], r["precision"]): r for r in rows}
    assert set(got) == {(v, b, p) for v in ("baseline", "mame") for b in ("torch", "onnxrt")
                        for p in ("fp32", "int8")}
    for v in ("baseline", "mame"):
        assert "PyTorch has no int8 path" in got[(v, "torch", "int8")]["skipped"]
        assert got[(v, "torch", "fp32")]["median_ms"] > 0
        fp32, int8 = got[(v, "onnxrt", "fp32")], got[(v, "onnxrt", "int8")]
        assert fp32["median_ms"] > 0 and int8["median_ms"] > 0 and not int8["skipped"]
        base = got[("baseline", "onnxrt", "fp32")]["median_ms"]
        assert int8["speedup_vs_fp32"] == pytest.approx(base / int8["median_ms"])
        assert fp32["speedup_vs_fp32"] is None
    # the int8 mame row's speed-up is over the int8 baseline
    assert got[("mame", "onnxrt", "int8")]["speedup"] == pytest.approx(
        got[("baseline", "onnxrt", "int8")]["median_ms"]
        / got[("mame", "onnxrt", "int8")]["median_ms"])


def test_profile_int8_without_a_graph_backend_is_one_line():
    line = cli_error("profile", *TINY, "--r", "0.5", "--backends", "torch", "--precision",
                     "int8")
    assert "--precision int8" in line and "graph backend" in line
