"""The main job: model alias -> patched model -> ONNX graph -> audit -> parity -> metadata.

Every command runs on one resolved :class:`~mame_export.request.Job` (checked once, in
:func:`~mame_export.request.resolve_job`); :func:`build` builds its model and settles
what needs the model (r solved from a MACs target, the IO spec). The CLI only parses
arguments and prints; everything it does happens here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mame_export.artifacts import (
    OutputDirError,
    atomic_write_text,
    check_out_dir,
    clean_stale_dirs,
    commit_files,
    locked_dir,
    make_dirs,
    private_dir,
    remove_dirs,
    sha256_file,
)
from mame_export.audit import audit
from mame_export.checkpoints import state_dict_sha256
from mame_export.errors import check_file, stderr_log, warn
from mame_export.export import export_onnx, reduced_precision_copy
from mame_export.families import IOSpec, ModelSpec, build_model, get_family
from mame_export.parity import ParityReport, check_parity, tolerance_for
from mame_export.plan import MergePlan
from mame_export.request import (
    MAX_BATCH,
    Built,
    ExportRequest,
    Job,
    build,
    check_parity_settings,
    request_spec,
    resolve_job,
    settings_tag,
)
from mame_export.runners import Runner
from mame_export.runners.factory import GRAPH_RUNNERS, check_runner_names, make_runner
from mame_export.settings import QUANTIZED_PRECISIONS
from mame_export.sidecar import MetadataError, metadata, read_sidecar, sidecar_json, versions

__all__ = ["Built", "ExportRequest", "Job", "build", "build_model", "build_patched",
           "parity_for_graph", "request_spec", "resolve_job", "run_export", "versions"]

Log = Callable[[str], None]


def graph_stem(spec: ModelSpec, job: Job | ExportRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.alias)
    batch = "bdyn" if job.dynamic_batch else f"b{job.batch}"
    img = f"_{job.img_size}px" if job.img_size and job.img_size != spec.img_size else ""
    stem = f"{name}_r{job.r:g}{img}_{batch}_{job.precision}_{settings_tag(job)}"
    if job.precision in QUANTIZED_PRECISIONS:  # the calibrator and images change the graph
        from mame_export.quant.step import calib_tag

        stem += f"_{calib_tag(job)}"
    return stem


def check_destination(out_dir: Path, stem: str) -> None:
    """Refuse, before any work, a graph or sidecar path that a folder already holds."""
    for name in (f"{stem}.onnx", f"{stem}.json", f"{stem}.onnx.data"):
        p = out_dir / name
        if os.path.isdir(p):
            raise OutputDirError(f"cannot write {p}: a folder of that name is in the way")


def io_spec(spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
    """The family's declared inputs and outputs."""
    return get_family(spec.family).io_spec(spec, model, img_size)


def tolerance(req: Job | ExportRequest, io: IOSpec, model: nn.Module) -> Any:
    """The parity tolerance of this graph: its precision, whether its model selects tokens
    by data (a plan that merges), and whether its outputs are class scores."""
    plan = getattr(model, "_mame_plan", None)
    merged = bool(plan is not None and plan.merge_layers)
    return tolerance_for(req.precision, merged, class_scores=io.class_scores)


def feeds_maker(io: IOSpec, batch: int | Sequence[int]):
    """Fresh random float32 inputs per call (runners cast to their own precision); with
    several batch sizes, the calls take them in turn."""
    sizes = [batch] if isinstance(batch, int) else list(batch)
    calls = [0]

    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        b = sizes[calls[0] % len(sizes)]
        calls[0] += 1
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        arrays = io.make_inputs(b, gen)
        return {n: a.numpy() for n, a in zip(io.input_names, arrays, strict=True)}

    return make


def build_patched(
    req: ExportRequest | Job, log: Log = stderr_log, export: bool = False,
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, nn.Module, MergePlan, str]:
    """Build ``req``'s model and patch it at its r (solved from its MACs target when
    given; a request's ``r`` is updated to it); ``spec`` overrides the registry's entry."""
    job = req if isinstance(req, Job) else resolve_job(req, export=export, spec=spec)
    built = build(job, log)
    if isinstance(req, ExportRequest):
        req.r = built.job.r
    assert built.plan is not None
    return built.job.spec, built.model, built.plan, built.source


def reference_runner(model: nn.Module, io: IOSpec) -> Runner:
    """What every graph and engine is compared against: the eager model in fp32."""
    return make_runner("torch", model=model, input_names=io.input_names,
                       output_names=io.output_names, label="torch-eager-fp32")


def select_runners(reference: nn.Module, io: IOSpec, onnx_path: Path,
                   names: Sequence[str] = GRAPH_RUNNERS, trt_options: Any = None,
                   engines_dir: Path = Path("engines")) -> tuple[Runner, list[Runner]]:
    """The fp32 eager reference and the named candidate runners for one graph."""
    ref = reference_runner(reference, io)
    cands = [make_runner(n, onnx_path=onnx_path, trt_options=trt_options,
                         engines_dir=engines_dir) for n in check_runner_names(names)]
    return ref, cands


def run_export(req: ExportRequest | Job, log: Log = stderr_log,
               spec: ModelSpec | None = None) -> dict[str, Any]:
    """Build, patch, export, audit and check one graph; returns its metadata.

    ``req``: a request (resolved here) or a resolved job. The metadata's ``ok`` is True
    only if the audit found nothing and parity passed on at least one runner.

    The graph and its sidecar are written, audited and checked in a folder of this run's
    own inside the output folder, then moved into place together (all or nothing, with
    signals held and the folder locked), so a reader never sees a graph without its
    matching sidecar, and two runs never check each other's files. A run that fails
    leaves the folder as it was (and removes it if it made it).
    """
    job = req if isinstance(req, Job) else resolve_job(req, export=True, spec=spec)
    check_out_dir(job.out_dir)
    if job.precision in QUANTIZED_PRECISIONS:
        from mame_export.quant.step import check_calib_early

        check_calib_early(job)  # a bad --calib folder: one line, before any work
    if job.target_macs is None:
        check_destination(job.out_dir, graph_stem(job.spec, job))
    built = build(job, log)
    job, model, plan = built.job, built.model, built.plan
    assert plan is not None and job.io is not None
    if isinstance(req, ExportRequest):
        req.r = job.r
    log(plan.table())
    stem = graph_stem(job.spec, job)
    check_destination(job.out_dir, stem)
    onnx_path = job.out_dir / f"{stem}.onnx"
    meta_path = job.out_dir / f"{stem}.json"

    created = make_dirs(job.out_dir)
    try:
        clean_stale_dirs(job.out_dir)  # this toolkit's .tmp-mame-PID-* left by killed runs
        with private_dir(job.out_dir) as tmp:
            meta = _export_in(tmp, built, stem, log)
            meta["onnx"] = str(onnx_path)
            atomic_write_text(tmp / meta_path.name, sidecar_json(meta))
            names = sorted((f.name for f in tmp.iterdir() if not f.name.startswith(".")),
                           key=lambda n: (n.endswith(".onnx"), n.endswith(".json"), n))
            commit_files(tmp, job.out_dir, names)  # data files, then sidecar, graph last
    except BaseException:
        remove_dirs(created)
        raise
    meta["metadata_path"] = str(meta_path)
    log(f"[5/5] wrote {onnx_path} and {meta_path}")
    if job.trt is not None and meta["ok"]:
        meta["engine"] = build_and_check_engine(job, model, job.io, onnx_path, log)
        meta["ok"] = meta["engine"]["parity"]["passed"]
        update_sidecar(meta_path, onnx_path, {k: v for k, v in meta.items()
                                              if k != "metadata_path"})
    return meta


def export_example(job: Job) -> tuple[torch.Tensor, ...]:
    """The inputs the exporter traces with, in the graph's precision. A dynamic-batch
    graph is traced at batch 2: at batch 1 the exporter specialises the axis to 1."""
    assert job.io is not None
    batch = 2 if job.dynamic_batch else job.batch
    return tuple(t.to(job.dtype) if t.is_floating_point() else t
                 for t in job.io.make_inputs(batch, torch.Generator().manual_seed(0)))


def _export_in(tmp: Path, built: Built, stem: str, log: Log) -> dict[str, Any]:
    """Export, audit and check the graph inside the private folder ``tmp``."""
    job, model, plan = built.job, built.model, built.plan
    io = job.io
    assert io is not None and plan is not None
    graph = tmp / f"{stem}.onnx"
    quantized = job.precision in QUANTIZED_PRECISIONS
    # A quantized graph is made from an fp32 export, kept hidden (not committed) beside it.
    exported = tmp / f".{stem}.fp32.onnx" if quantized else graph
    if quantized:
        from mame_export.quant import step as quant_step

        quant_step.check_quantizable(model, bool(plan.merge_layers), job.spec.alias,
                                     job.precision)
    export_model = (model if job.dtype == torch.float32
                    else reduced_precision_copy(model, job.dtype))
    example = export_example(job)
    log(f"[2/5] exporting to ONNX (opset {job.opset}, "
        f"{'fp32, then ' if quantized else ''}{job.precision}, "
        f"batch {'dynamic' if job.dynamic_batch else job.batch}) ...")
    result = export_onnx(export_model, example, exported, input_names=io.input_names,
                         output_names=io.output_names, dynamic_batch=job.dynamic_batch,
                         opset=job.opset, max_batch=MAX_BATCH)
    del export_model
    log(f"      wrote {stem}.onnx ({result.bytes / 1e6:.1f} MB"
        f"{', external data' if result.external_data else ''}) in {result.seconds:.1f} s")
    quantization = None
    if quantized:
        quantization, calib = quant_step.quantize_step(job, model, exported, graph,
                                                       result.external_data, log)
        result = replace(result, path=graph, sha256=sha256_file(graph),
                         bytes=graph.stat().st_size)

    log("[3/5] auditing the graph ...")
    report = audit(graph, expect_dynamic_batch=job.dynamic_batch)
    log(report.summary())

    sizes = job.parity_batch_sizes()
    at = f" at batch {', '.join(map(str, sizes))} in turn" if job.dynamic_batch else ""
    inputs = ("batches of the calibration images" if quantized and job.calib is not None
              else "fresh random batches")
    log(f"[4/5] parity vs eager PyTorch (fp32) on {job.parity_batches} {inputs}{at} ...")
    ref, cands = select_runners(model, io, graph, job.runners, job.trt, job.engines_dir)
    make_feeds = feeds_maker(io, sizes)
    if quantized:
        make_feeds = quant_step.parity_inputs(job, calib, make_feeds, sizes)
    parity = check_parity(ref, cands, make_feeds, job.precision,
                          batches=max(job.parity_batches, len(sizes)), seed=job.seed,
                          tolerance=tolerance(job, io, model))
    log(parity.summary())
    if quantized:
        assert quantization is not None
        vs_fp32, agreement = quant_step.compare_with_fp32(
            job, exported, graph, make_feeds, sizes, bool(plan.merge_layers), log)
        quantization.update(parity_vs_fp32=vs_fp32.to_dict(), selection_agreement=agreement)

    meta = metadata(job, job.spec, plan, built.source, result, report.to_dict(), parity, io,
                    example)
    meta["weights_sha256"] = state_dict_sha256(model)
    if quantization is not None:
        meta["quantization"] = quantization
    return meta


def update_sidecar(meta_path: Path, onnx_path: Path, meta: dict[str, Any]) -> None:
    """Rewrite a committed sidecar, but only while its graph is still the one it
    describes (another run may have replaced the pair since)."""
    with locked_dir(meta_path.parent):
        if sha256_file(onnx_path) != meta["onnx_sha256"]:
            warn(f"{onnx_path} was replaced by another run; {meta_path} is left as that run "
                 "wrote it")
            return
        atomic_write_text(meta_path, sidecar_json(meta))


def build_and_check_engine(req: ExportRequest | Job, model: nn.Module, io: IOSpec,
                           onnx_path: Path, log: Log) -> dict[str, Any]:
    """Build (or reuse) the TensorRT engine of a checked graph and check its parity, with
    the ``tensorrt`` runner of :func:`select_runners`, as for any other runner.

    Without TensorRT this raises a one-line UserError naming what to install; the
    graph and its metadata are already on disk and stay there.
    """
    from mame_export.trt.engine import build_engine

    log("[trt] building the TensorRT engine (strongly typed) ...")
    # Built here, so that a graph TensorRT rejects is a one-line error; the runner reuses it.
    res = build_engine(onnx_path, req.trt, req.engines_dir, onnx_path.stem)
    log(f"[trt] {'reused' if res.reused else 'built'} {res.plan}")
    ref, engine = select_runners(model, io, onnx_path, ["tensorrt"], req.trt, req.engines_dir)
    sizes: tuple[int, ...] = (req.batch,)
    if req.dynamic_batch and res.metadata["profiles"]:  # the profile's min, opt, max in turn
        bounds = next(iter(res.metadata["profiles"][0].values()))
        sizes = tuple(sorted({bounds[k][0] for k in ("min", "opt", "max")}))
    parity = check_parity(ref, engine, feeds_maker(io, sizes), req.precision,
                          batches=max(req.parity_batches, len(sizes)), seed=req.seed,
                          tolerance=tolerance(req, io, model))
    log(parity.summary())
    return {"plan": str(res.plan), "sidecar": str(res.sidecar), "reused": res.reused,
            "metadata": res.metadata, "parity": parity.to_dict()}


def parity_for_graph(graph: Path, runners: list[str], batches: int, seed: int | None,
                     weights: str | None = None, log: Log = stderr_log) -> ParityReport:
    """Rebuild the eager reference from a graph's sidecar and compare the chosen runners.

    The sidecar must be the graph's own: its ``onnx_sha256`` is checked against the file,
    and the precision it records against the graph's."""
    from mame_export.graph import graph_precision, load_graph

    check_file(graph, "graph", MetadataError)
    check_parity_settings(batches, seed)
    check_runner_names(runners)
    meta, req = read_sidecar(graph)
    recorded = meta.get("onnx_sha256")
    digest = sha256_file(graph)
    if recorded != digest:
        raise MetadataError(
            f"metadata sidecar {graph.with_suffix('.json')} belongs to another graph: it "
            f"records sha256 {str(recorded)[:12]}..., {graph.name} has {digest[:12]}...; "
            "re-export the graph, or put its own sidecar beside it"
        )
    precision = graph_precision(load_graph(graph))  # its weights decide, not its sidecar
    if precision != req.precision:
        raise MetadataError(
            f"metadata sidecar {graph.with_suffix('.json')} records precision "
            f"{req.precision}, but {graph.name} is a {precision} graph (the type of its "
            "weights): parity would judge it by the wrong tolerance; re-export the graph, or "
            "put its own sidecar beside it"
        )
    if weights is not None:
        req.weights = weights
    req.parity_batches, req.seed = batches, seed
    built = build(resolve_job(req, export=False), log)
    job, model = built.job, built.model
    if meta.get("weights_sha256") and state_dict_sha256(model) != meta["weights_sha256"]:
        raise MetadataError(
            "rebuilt weights differ from the exported ones (other torch/timm version or "
            "checkpoint); pass the original checkpoint with --weights PATH"
        )
    io = job.io
    assert io is not None
    ref, cands = select_runners(model, io, graph, runners)
    sizes = job.parity_batch_sizes()
    return check_parity(ref, cands, feeds_maker(io, sizes), job.precision,
                        batches=max(batches, len(sizes)), seed=seed,
                        tolerance=tolerance(job, io, model))
