"""INT8 QDQ graphs (mame_export.quant): the merge's nodes found by their name scope and kept
out of quantization, the audit's counts, parity against the fp32 graph within the int8
tolerance, and bad calibration input refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import TINY, cli_error, run_main, tiny_model, write_png

from mame_export.audit import audit
from mame_export.quant.scope import (
    ATTENTION_KEPT,
    MERGE_KEPT,
    count_quantized,
    merge_nodes,
    merge_scope_of,
    quantized_nodes,
)


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory, one_thread) -> dict:
    """A 2-block tiny ViT (16 patches, r = 0.5) exported in fp32, then quantized (random
    calibration); the merge-aware QDQ graph and one with the merge quantized too."""
    import mame_export.quant.qdq as qdq
    from mame_export.job import build, export_onnx, resolve_job
    from mame_export.quant.calib import Feeds
    from mame_export.request import ExportRequest

    out = tmp_path_factory.mktemp("quant")
    _, spec = tiny_model("vit_t")
    built = build(resolve_job(ExportRequest("vit_t", r=0.5, weights="random"), spec=spec),
                  log=lambda _: None)
    io = built.job.io
    example = io.make_inputs(1, __import__("torch").Generator().manual_seed(0))
    fp32 = out / "fp32.onnx"
    export_onnx(built.model, example, fp32, input_names=io.input_names,
                output_names=io.output_names)
    rng = np.random.default_rng(0)
    feeds = Feeds([{"pixels": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
                   for _ in range(4)])
    kept = out / "int8.onnx"
    qdq.quantize_graph(fp32, kept, feeds, report=False)
    everything = out / "int8-merge-quantized.onnx"
    real_rule = qdq.merge_nodes
    qdq.merge_nodes = lambda model: []  # a quantizer that does not know the merge
    try:
        feeds.rewind()
        qdq.quantize_graph(fp32, everything, feeds, report=False)
    finally:
        qdq.merge_nodes = real_rule
    return {"fp32": fp32, "int8": kept, "naive": everything, "feeds": feeds.feeds}


def test_the_merge_runs_under_its_name_scope(tiny_graphs):
    """Every merge node carries the block's ``mame_merge`` scope, the constant triangular
    prefix-count matmuls among them; nodes outside the merge do not."""
    model = onnx.load(str(tiny_graphs["fp32"]))
    inits = {i.name for i in model.graph.initializer}
    merge = set(merge_nodes(model))
    scopes = {merge_scope_of(n) for n in model.graph.node if n.name in merge}
    assert scopes == {"blocks.0.mame_merge", "blocks.1.mame_merge"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in merge]
    assert any(i in inits for n in matmuls for i in n.input), "constant triangular matmul"
    comparisons = [n for n in model.graph.node if n.op_type in ("Less", "Greater", "Equal")]
    assert comparisons and all(n.name in merge for n in comparisons)
    linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
               and n.name not in merge]
    assert linears and all(merge_scope_of(n) is None for n in linears)


@pytest.mark.slow
def test_the_scope_changes_no_node(tiny_graphs, tmp_path, monkeypatch):
    """The scope is metadata only: exported without it, the graph has the same ops."""
    import contextlib

    import mame_export.export as export_module
    from mame_export.audit import op_census
    from mame_export.job import build, resolve_job
    from mame_export.request import ExportRequest

    _, spec = tiny_model("vit_t")
    built = build(resolve_job(ExportRequest("vit_t", r=0.5, weights="random"), spec=spec),
                  log=lambda _: None)
    io = built.job.io
    monkeypatch.setattr(export_module, "merge_scopes", lambda m: contextlib.nullcontext(0))
    plain = tmp_path / "plain.onnx"
    export_module.export_onnx(built.model, io.make_inputs(1, __import__("torch").Generator()),
                              plain, input_names=io.input_names, output_names=io.output_names)
    unscoped = onnx.load(str(plain))
    assert merge_nodes(unscoped) == []
    assert op_census(unscoped) == op_census(onnx.load(str(tiny_graphs["fp32"])))


def test_no_merge_node_is_quantized_and_the_audit_counts(tiny_graphs):
    model = onnx.load(str(tiny_graphs["int8"]))
    quantized, kept, merge_quantized, n_merge = count_quantized(model)
    assert merge_quantized == [] and n_merge > 0
    assert not set(merge_nodes(model)) & quantized_nodes(model)
    assert quantized >= 2 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    assert kept[MERGE_KEPT] == len([n for n in model.graph.node if n.op_type == "MatMul"
                                    and merge_scope_of(n) is not None])
    assert kept[ATTENTION_KEPT] == 2 * 2  # scores and values, 2 blocks
    report = audit(tiny_graphs["int8"])
    assert report.passed, report.summary()
    assert report.quantization["merge_nodes_quantized"] == []
    assert "merge nodes quantized: 0 of" in report.summary()


def test_a_quantized_merge_fails_the_audit(tiny_graphs):
    """The rule at work: a quantizer that does not exclude the merge puts Q/DQ in front of
    its matmuls (the triangular ones too), and the audit says so."""
    report = audit(tiny_graphs["naive"])
    assert not report.passed
    assert any(f.kind == "quantized-merge" for f in report.findings)
    assert report.quantization["merge_nodes_quantized"]


def test_int8_parity_against_the_fp32_graph(tiny_graphs):
    """The QDQ graph against the fp32 graph it was made from, within the int8 tolerance
    (mame_export.parity.TOLERANCES['int8']), and the merges it picks."""
    from mame_export.parity import check_parity, tolerance_for
    from mame_export.quant.agreement import selection_agreement
    from mame_export.runners.factory import make_runner

    feeds = tiny_graphs["feeds"]
    tol = tolerance_for("int8", merged=True, class_scores=True)
    ref = make_runner("onnxrt", onnx_path=tiny_graphs["fp32"], threads=1)
    cand = make_runner("onnxrt", onnx_path=tiny_graphs["int8"], threads=1)
    calls = iter(range(10**6))
    report = check_parity(ref, [cand], lambda rng: feeds[next(calls) % len(feeds)], "int8",
                          batches=4, seed=0, tolerance=tol)
    assert report.results[0].status == "passed", report.summary()
    same = selection_agreement(tiny_graphs["fp32"], tiny_graphs["fp32"], feeds, 1)
    assert same == {"same": 8, "merges": 8, "fraction": 1.0,  # 4 samples, 2 merging blocks
                    "same_tokens": 4 * (8 + 6), "tokens": 4 * (8 + 6), "token_fraction": 1.0,
                    "by_block": {"blocks.0": 1.0, "blocks.1": 1.0}}
    agreement = selection_agreement(tiny_graphs["fp32"], tiny_graphs["int8"], feeds, 1)
    # (random weights: near-tied similarities, so targets move; real weights: docs)
    assert agreement["merges"] == 8 and 0 <= agreement["same"] <= 8
    assert agreement["tokens"] == 56 and 0 <= agreement["token_fraction"] <= 1
    # per block: 4 samples x 8 candidates in block 0, x 6 in block 1
    by_block = agreement["by_block"]
    assert list(by_block) == ["blocks.0", "blocks.1"]
    assert round((by_block["blocks.0"] * 32 + by_block["blocks.1"] * 24) / 56, 3) == round(
        agreement["token_fraction"], 3)


# ---------------------------------------------------------------- bad input, the CLI


def _int8(out: Path, *extra: str) -> list[str]:
    return ["export", *TINY, "--precision", "int8", "--out", str(out), *extra]


def test_empty_calib_folder_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "calib").mkdir()
    line = cli_error(*_int8(tmp_path / "out", "--calib", str(tmp_path / "calib")))
    assert "--calib" in line and "no images" in line
    assert not (tmp_path / "out").exists()


def test_missing_calib_folder_is_one_line(tmp_path):
    line = cli_error(*_int8(tmp_path / "out", "--calib", str(tmp_path / "nowhere")))
    assert "--calib" in line and "not found" in line
    assert not (tmp_path / "out").exists()


def test_calib_folder_smaller_than_a_batch_is_one_line(tmp_path):
    for i in range(2):
        write_png(tmp_path / "calib" / f"{i}.png", i * 50)
    line = cli_error(*_int8(tmp_path / "out", "--batch", "4", "--calib",
                            str(tmp_path / "calib")))
    assert "2 image(s), fewer than one batch" in line
    assert not (tmp_path / "out").exists()


def test_unreadable_calib_image_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "broken.png").write_bytes(b"not a png")
    line = cli_error(*_int8(tmp_path / "out", "--calib", str(tmp_path / "calib")))
    assert "--calib" in line and "cannot read image" in line and "broken.png" in line
    assert not (tmp_path / "out").exists()


def test_calib_needs_a_quantized_precision(tmp_path):
    write_png(tmp_path / "calib" / "a.png", 10)
    line = cli_error("export", *TINY, "--calib", str(tmp_path / "calib"),
                     "--out", str(tmp_path / "out"))
    assert "--precision int8 or fp8" in line


def test_the_unet_is_refused_for_int8():
    """Its merge runs inside its own forward, not a block's _merge: no scope, refused."""
    pytest.importorskip("diffusers")
    from mame_export.errors import UserError
    from mame_export.families.sd_unet.model import build_tiny_unet
    from mame_export.quant.step import check_quantizable

    with pytest.raises(UserError, match="not supported for sd21-unet"):
        check_quantizable(build_tiny_unet(), True, "sd21-unet", "int8")


@pytest.mark.slow
def test_int8_export_end_to_end(tmp_path):
    """``export --precision int8`` (random calibration, with its warning): a QDQ graph whose
    audit passes with the merge in fp32, parity against eager and the fp32 graph, and the
    quantization record in the sidecar."""
    code, stdout, err = run_main(*_int8(tmp_path, "--parity-batches", "1", "--seed", "0",
                                        "--json"))
    meta = json.loads(stdout)
    assert "calibrating on random inputs" in err
    assert meta["audit"]["passed"], err
    q = meta["quantization"]
    assert q["merge_nodes_quantized"] == [] and q["matmuls_quantized"] > 0
    assert "fraction" in q["selection_agreement"]
    assert Path(meta["onnx"]).name.endswith("_int8_" + Path(meta["onnx"]).stem.split(
        "_int8_")[1] + ".onnx")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert code in (0, 1)


def test_fp8_takes_the_same_path(tiny_graphs, tmp_path):
    """fp8 (E4M3): ONNX Runtime's distribution calibrator and opset 19; the name scopes the
    opset conversion drops are put back, so the audit still finds the merge, unquantized."""
    from mame_export.graph import graph_precision
    from mame_export.quant.calib import Feeds
    from mame_export.quant.qdq import quantize_graph

    out = tmp_path / "fp8.onnx"
    summary = quantize_graph(tiny_graphs["fp32"], out, Feeds(tiny_graphs["feeds"][:2]),
                             precision="fp8", report=False)
    assert summary.method == "distribution" and summary.merge_nodes_quantized == []
    model = onnx.load(str(out))
    assert graph_precision(model) == "fp8"
    report = audit(out)
    assert report.passed and report.quantization["merge_nodes"] > 0, report.summary()
