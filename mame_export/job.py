"""The main job: model alias -> patched model -> ONNX graph -> audit -> parity -> metadata.

The CLI only parses arguments and prints; everything it does happens here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
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
from mame_export.errors import UserError, check_file, warn
from mame_export.export import PRECISIONS, export_onnx, reduced_precision_copy
from mame_export.families import IOSpec, ModelSpec, build_model, get_family, resolve
from mame_export.families.base import UnsupportedModelError, with_kwargs
from mame_export.parity import ParityReport, check_parity, tolerance_for
from mame_export.patch import apply, merge_plan, solve_r
from mame_export.plan import MergePlan
from mame_export.request import MAX_BATCH, ExportRequest, check_parity_settings, settings_tag
from mame_export.runners import Runner
from mame_export.runners.factory import GRAPH_RUNNERS, check_runner_names, make_runner
from mame_export.sidecar import MetadataError, metadata, read_sidecar, sidecar_json, versions

__all__ = ["ExportRequest", "build_patched", "parity_for_graph", "run_export", "versions"]

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def graph_stem(spec: ModelSpec, req: ExportRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.alias)
    batch = "bdyn" if req.dynamic_batch else f"b{req.batch}"
    img = f"_{req.img_size}px" if req.img_size and req.img_size != spec.img_size else ""
    return f"{name}_r{req.r:g}{img}_{batch}_{req.precision}_{settings_tag(req)}"


def check_destination(out_dir: Path, stem: str) -> None:
    """Refuse, before any work, a graph or sidecar path that a folder already holds."""
    for name in (f"{stem}.onnx", f"{stem}.json", f"{stem}.onnx.data"):
        p = out_dir / name
        if os.path.isdir(p):
            raise OutputDirError(f"cannot write {p}: a folder of that name is in the way")


def io_spec(spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
    """The family's declared inputs and outputs."""
    return get_family(spec.family).io_spec(spec, model, img_size)


def tolerance(req: ExportRequest, io: IOSpec, model: nn.Module) -> Any:
    """The parity tolerance of this graph: its precision, whether its model selects tokens
    by data (a plan that merges), and whether its outputs are class scores."""
    plan = getattr(model, "_mame_plan", None)
    merged = bool(plan is not None and plan.merge_layers)
    return tolerance_for(req.precision, merged, class_scores=io.class_scores)


def request_spec(req: ExportRequest, spec: ModelSpec) -> ModelSpec:
    """``spec`` with the request's family-specific variant (``--llava``) applied."""
    if not req.llava:
        return spec
    if "llava" not in get_family(spec.family).capabilities:
        raise UnsupportedModelError(f"--llava needs a LLaVA vision encoder (clip_l336); "
                                    f"{spec.alias} is a {spec.family} model")
    return with_kwargs(spec, spec.alias, llava=True)


def feeds_maker(io: IOSpec, batch: int):
    """Fresh random float32 inputs per call; runners cast to their own precision."""
    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        arrays = io.make_inputs(batch, gen)
        return {n: a.numpy() for n, a in zip(io.input_names, arrays, strict=True)}

    return make


def preflight(spec: ModelSpec, req: ExportRequest, export: bool) -> None:
    """What can be refused from the model's structure alone, refused in a moment and
    before any weights are built, read or downloaded: other families and blocks, hybrid
    ViTs for export, input sizes off the patch grid, layers out of range."""
    family = get_family(spec.family)
    skel = family.skeleton(spec)
    if skel is None:
        return
    family.check(skel, spec.alias, req.img_size, export)
    if req.img_size is not None:
        skel = family.skeleton(spec, req.img_size)
        if skel is None:
            return
    try:
        apply(skel, req.r if req.target_macs is None else 0.0, tau=req.tau,
              layers=req.layers, prop_attn=req.prop_attn, mode=req.mode,
              **family.patch_options(spec, req.img_size))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def build_patched(
    req: ExportRequest, log: Log = stderr_log, export: bool = False,
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, nn.Module, MergePlan, str]:
    """Build ``req``'s model and patch it at ``req.r`` (solved from ``req.target_macs``
    when given); ``spec`` overrides the registry's entry for ``req.model``."""
    spec = request_spec(req, spec or resolve(req.model))
    family = get_family(spec.family)
    preflight(spec, req, export)
    log(f"[1/5] building {spec.alias} ({spec.source_name}), weights: {req.weights}")
    model, source = build_model(spec, req.weights, req.img_size)
    family.check(model, spec.alias, req.img_size, export)
    settings = dict(tau=req.tau, layers=req.layers, prop_attn=req.prop_attn, mode=req.mode,
                    **family.patch_options(spec, req.img_size))
    try:
        if req.target_macs is not None:
            req.r = solve_r(model, req.target_macs, **settings)
            log(f"      MACs ratio {req.target_macs:g} -> r = {req.r:g}")
        model = apply(model, req.r, **settings)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:  # layers out of range, a family MaMe lacks, ...
        raise UserError(str(e)) from None
    plan = merge_plan(model)
    if req.r > 0 and not plan.merge_layers:
        warn(f"r={req.r:g} has no effect here: {plan.num_patches} patch token(s) in "
             f"{len(plan.blocks)} blocks leave nothing to merge at this input size and these "
             "layers, so the model runs unmerged")
    return spec, model, plan, source


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


def run_export(req: ExportRequest, log: Log = stderr_log,
               spec: ModelSpec | None = None) -> dict[str, Any]:
    """Build, patch, export, audit and check one graph; returns its metadata.

    The metadata's ``ok`` is True only if the audit found nothing and parity
    passed on at least one runner.

    The graph and its sidecar are written, audited and checked in a folder of this run's
    own inside ``req.out_dir``, then moved into place together (all or nothing, with
    signals held and the folder locked), so a reader never sees a graph without its
    matching sidecar, and two runs never check each other's files. A run that fails
    leaves the folder as it was (and removes it if it made it).
    """
    req.validate()
    spec = request_spec(req, spec or resolve(req.model))
    if req.batch is None:
        req.batch = spec.default_batch
    check_out_dir(req.out_dir)
    if req.target_macs is None:
        check_destination(req.out_dir, graph_stem(spec, req))
    spec, model, plan, source = build_patched(req, log, export=True, spec=spec)
    log(plan.table())
    io = io_spec(spec, model, req.img_size)
    stem = graph_stem(spec, req)
    check_destination(req.out_dir, stem)
    onnx_path = req.out_dir / f"{stem}.onnx"
    meta_path = req.out_dir / f"{stem}.json"

    created = make_dirs(req.out_dir)
    try:
        clean_stale_dirs(req.out_dir, (".tmp-",))  # .tmp-mame-PID-*, and older .tmp-*
        with private_dir(req.out_dir) as tmp:
            meta = _export_in(tmp, req, spec, model, plan, source, io, stem, log)
            meta["onnx"] = str(onnx_path)
            atomic_write_text(tmp / meta_path.name, sidecar_json(meta))
            names = sorted((f.name for f in tmp.iterdir() if not f.name.startswith(".")),
                           key=lambda n: (n.endswith(".onnx"), n.endswith(".json"), n))
            commit_files(tmp, req.out_dir, names)  # data files, then sidecar, graph last
    except BaseException:
        remove_dirs(created)
        raise
    meta["metadata_path"] = str(meta_path)
    log(f"[5/5] wrote {onnx_path} and {meta_path}")
    if req.trt is not None and meta["ok"]:
        meta["engine"] = build_and_check_engine(req, model, io, onnx_path, log)
        meta["ok"] = meta["engine"]["parity"]["passed"]
        update_sidecar(meta_path, onnx_path, {k: v for k, v in meta.items()
                                              if k != "metadata_path"})
    return meta


def _export_in(tmp: Path, req: ExportRequest, spec: ModelSpec, model: nn.Module,
               plan: MergePlan, source: str, io: IOSpec, stem: str, log: Log) -> dict[str, Any]:
    """Export, audit and check the graph inside the private folder ``tmp``."""
    dtype = PRECISIONS[req.precision]
    graph = tmp / f"{stem}.onnx"
    export_model = model if dtype == torch.float32 else reduced_precision_copy(model, dtype)
    example = tuple(t.to(dtype) if t.is_floating_point() else t
                    for t in io.make_inputs(req.batch, torch.Generator().manual_seed(0)))
    log(f"[2/5] exporting to ONNX (opset {req.opset}, {req.precision}, "
        f"batch {'dynamic' if req.dynamic_batch else req.batch}) ...")
    result = export_onnx(export_model, example, graph, input_names=io.input_names,
                         output_names=io.output_names, dynamic_batch=req.dynamic_batch,
                         opset=req.opset, max_batch=MAX_BATCH)
    del export_model
    log(f"      wrote {stem}.onnx ({result.bytes / 1e6:.1f} MB"
        f"{', external data' if result.external_data else ''}) in {result.seconds:.1f} s")

    log("[3/5] auditing the graph ...")
    report = audit(graph)
    log(report.summary())

    log(f"[4/5] parity vs eager PyTorch (fp32) on {req.parity_batches} fresh random batches ...")
    ref, cands = select_runners(model, io, graph, req.runners, req.trt, req.engines_dir)
    parity_batch = 2 if req.dynamic_batch else req.batch
    parity = check_parity(ref, cands, feeds_maker(io, parity_batch), req.precision,
                          batches=req.parity_batches, seed=req.seed,
                          tolerance=tolerance(req, io, model))
    log(parity.summary())

    meta = metadata(req, spec, plan, source, result, report.to_dict(), parity, io, example)
    meta["weights_sha256"] = state_dict_sha256(model)
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


def build_and_check_engine(req: ExportRequest, model: nn.Module, io: IOSpec, onnx_path: Path,
                           log: Log) -> dict[str, Any]:
    """Build (or reuse) the TensorRT engine of a checked graph and check its parity.

    Without TensorRT this raises a one-line UserError naming what to install; the
    graph and its metadata are already on disk and stay there.
    """
    from mame_export.trt.engine import build_engine
    from mame_export.trt.runner import TrtRunner

    log("[trt] building the TensorRT engine (strongly typed) ...")
    res = build_engine(onnx_path, req.trt, req.engines_dir, onnx_path.stem)
    log(f"[trt] {'reused' if res.reused else 'built'} {res.plan}")
    ref = reference_runner(model, io)
    batch = req.trt.opt_batch or 2 if req.dynamic_batch else req.batch
    parity = check_parity(ref, [TrtRunner(res.plan)], feeds_maker(io, batch), req.precision,
                          batches=req.parity_batches, seed=req.seed,
                          tolerance=tolerance(req, io, model))
    log(parity.summary())
    return {"plan": str(res.plan), "sidecar": str(res.sidecar), "reused": res.reused,
            "metadata": res.metadata, "parity": parity.to_dict()}


def parity_for_graph(graph: Path, runners: list[str], batches: int, seed: int | None,
                     weights: str | None = None, log: Log = stderr_log) -> ParityReport:
    """Rebuild the eager reference from a graph's sidecar and compare the chosen runners.

    The sidecar must be the graph's own: its ``onnx_sha256`` is checked against the file."""
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
    if weights is not None:
        req.weights = weights
    spec, model, plan, _ = build_patched(req, log)
    if meta.get("weights_sha256") and state_dict_sha256(model) != meta["weights_sha256"]:
        raise MetadataError(
            "rebuilt weights differ from the exported ones (other torch/timm version or "
            "checkpoint); pass the original checkpoint with --weights PATH"
        )
    io = io_spec(spec, model, req.img_size)
    ref, cands = select_runners(model, io, graph, runners)
    batch = 2 if req.dynamic_batch else req.batch
    return check_parity(ref, cands, feeds_maker(io, batch), req.precision, batches=batches,
                        seed=seed, tolerance=tolerance(req, io, model))
