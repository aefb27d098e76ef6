"""The main job: model alias -> patched model -> ONNX graph -> audit -> parity -> metadata.

The CLI only parses arguments and prints; everything it does happens here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import mame_export
from mame_export.audit import audit
from mame_export.errors import UserError, check_file, path_problem
from mame_export.export import (
    PRECISIONS,
    IOSpec,
    OutputDirError,
    atomic_write_text,
    check_out_dir,
    clean_stale_dirs,
    commit_files,
    export_onnx,
    locked_dir,
    make_dirs,
    private_dir,
    reduced_precision_copy,
    remove_dirs,
    sha256_file,
)
from mame_export.models import (
    ModelSpec,
    build_model,
    check_architecture,
    resolve,
    skeleton,
    state_dict_sha256,
    warn,
)
from mame_export.ops.mame import MERGE_OP
from mame_export.parity import ParityReport, check_parity, json_safe, tolerance_for
from mame_export.patch import DEFAULT_TAU, apply, merge_plan, solve_r
from mame_export.plan import MergePlan, check_ratio, check_target_macs, check_tau
from mame_export.runners import OrtRunner, Runner, TorchRunner

Log = Callable[[str], None]

# Limits checked before any work starts.
MAX_BATCH = 4096  # also the dynamic batch axis's upper bound in the graph
MAX_PARITY_BATCHES = 1000
MAX_SEED = 2**63 - 1
# The opsets every export is tested at (tests/test_reliability.py exports each): the
# dynamo exporter writes 18 and converts up; 17 cannot be written, and at 23 it emits
# the ONNX Attention op, whose mask ONNX Runtime's CPU provider rejects.
OPSETS = (18, 22)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ExportRequest:
    """Everything that decides an export; recorded verbatim in the metadata."""

    model: str
    r: float = 0.5
    target_macs: float | None = None  # solve r for this MACs ratio instead
    tau: float | None = None  # None: the mode's default (patch.DEFAULT_TAU)
    layers: list[int] | None = None
    mode: str = "static"
    prop_attn: bool = True
    batch: int | None = None  # None: the model's default (2 for UNets: CFG)
    dynamic_batch: bool = False
    img_size: int | None = None
    weights: str = "auto"
    opset: int = 18
    precision: str = "fp32"
    out_dir: Path = Path("graphs")
    parity_batches: int = 3
    seed: int | None = None
    runners: tuple[str, ...] = ("onnxrt", "onnxrt-cuda")  # compared against eager PyTorch
    trt: Any = None  # mame_export.trt.engine.EngineOptions when an engine is wanted
    engines_dir: Path = Path("engines")

    def validate(self, export: bool = True, check_opset: bool = True) -> None:
        """One-line UserErrors for bad settings, before any work; ``export=False`` allows
        adaptive mode (a plan or an eager run, not a graph); ``check_opset=False`` accepts
        any recorded opset (a graph's sidecar: parity does not export)."""
        try:
            check_ratio(self.r)
            if self.tau is not None:
                check_tau(self.tau)
            if self.target_macs is not None:
                check_target_macs(self.target_macs)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.mode not in ("static", "adaptive"):
            raise UserError(f"--mode must be static or adaptive; got {self.mode!r}")
        if export and self.mode != "static":
            raise UserError(
                f"mode {self.mode!r} cannot be exported: adaptive MaMe has data-dependent token "
                "counts (eager only); export with --mode static"
            )
        # (An empty list is the library's "no merge block"; the CLI refuses an empty --layers.)
        if self.layers is not None and any(not _is_int(i) or i < 0 for i in self.layers):
            raise UserError(f"--layers must be block indices >= 0; got {self.layers}")
        if self.batch is not None and not (_is_int(self.batch) and 1 <= self.batch <= MAX_BATCH):
            raise UserError(f"--batch must be in [1, {MAX_BATCH}]; got {self.batch}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if check_opset and not (_is_int(self.opset) and OPSETS[0] <= self.opset <= OPSETS[1]):
            raise UserError(f"--opset must be in [{OPSETS[0]}, {OPSETS[1]}] (the opsets "
                            f"mame-export exports and tests); got {self.opset}")
        if self.img_size is not None and not (_is_int(self.img_size) and self.img_size >= 1):
            raise UserError(f"--img-size must be positive; got {self.img_size}")
        check_parity_settings(self.parity_batches, self.seed)
        if self.trt is not None:
            self.trt.validate()
            if self.trt.precision != self.precision:
                raise UserError("engine and graph precision must match (strongly typed engines)")
            for flag, v in (("--min-batch", self.trt.min_batch), ("--opt-batch",
                            self.trt.opt_batch), ("--max-batch", self.trt.max_batch)):
                if v is not None and v > MAX_BATCH:
                    raise UserError(f"{flag} must be at most {MAX_BATCH}; got {v}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_parity_settings(batches: int, seed: int | None) -> None:
    """One-line UserErrors for parity settings out of range (checked before any work)."""
    if not (_is_int(batches) and 1 <= batches <= MAX_PARITY_BATCHES):
        raise UserError(f"--parity-batches must be in [1, {MAX_PARITY_BATCHES}]; got {batches}")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise UserError(f"--seed must be in [0, 2**63 - 1]; got {seed}")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mame-export": mame_export.__version__}
    for pkg in ("torch", "timm", "numpy", "onnx", "onnxscript", "onnxruntime",
                "onnxruntime-gpu", "diffusers", "tensorrt", "polygraphy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def settings_tag(req: ExportRequest) -> str:
    """8 hex digits naming every setting that changes the graph but is not spelled out in
    its file name (tau, layers, proportional attention, mode, weights, opset): two exports
    that differ in any of them never share a file."""
    tau = DEFAULT_TAU.get(req.mode, 1.0) if req.tau is None else req.tau
    weights = req.weights if req.weights in ("auto", "random") else \
        str(Path(req.weights).resolve())
    key = {"tau": float(tau), "layers": sorted(set(req.layers)) if req.layers else "default",
           "prop_attn": bool(req.prop_attn), "mode": req.mode, "weights": weights,
           "opset": req.opset}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


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
    if spec.family == "sd-unet":
        from mame_export.models_sd import sd_unet_io_spec

        return sd_unet_io_spec(model, latent=img_size or spec.img_size)
    h, w = model.patch_embed.img_size
    chans = model.patch_embed.proj.in_channels

    def make(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, chans, h, w, generator=gen),)

    return IOSpec(("pixels",), ("logits",), make)


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
    skel = skeleton(spec)
    if skel is None:
        return
    check_architecture(skel, spec.alias, req.img_size, export)
    if req.img_size is not None:
        skel = skeleton(spec, req.img_size)
        if skel is None:
            return
    try:
        apply(skel, req.r if req.target_macs is None else 0.0, tau=req.tau,
              layers=req.layers, prop_attn=req.prop_attn, mode=req.mode)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def build_patched(
    req: ExportRequest, log: Log = stderr_log, export: bool = False,
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, nn.Module, MergePlan, str]:
    spec = spec or resolve(req.model)
    preflight(spec, req, export)
    log(f"[1/5] building {spec.alias} ({spec.source_name}), weights: {req.weights}")
    model, source = build_model(spec, req.weights, req.img_size)
    if spec.family == "timm-vit":
        check_architecture(model, spec.alias, req.img_size, export)
    family_options = {}
    if spec.family == "sd-unet":  # the plan is per latent size
        family_options["latent_size"] = req.img_size or spec.img_size
    settings = dict(tau=req.tau, layers=req.layers, prop_attn=req.prop_attn, mode=req.mode,
                    **family_options)
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


RUNNERS = ("onnxrt", "onnxrt-cuda", "tensorrt")


def check_runner_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        raise UserError(f"unknown runner(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    if not names:
        raise UserError(f"--runners is empty; choose from {', '.join(RUNNERS)}")


def select_runners(reference: nn.Module, io: IOSpec, onnx_path: Path,
                   names: Sequence[str] = RUNNERS, trt_options: Any = None,
                   engines_dir: Path = Path("engines")) -> tuple[TorchRunner, list[Runner]]:
    """The fp32 eager reference and the named candidate runners for one graph."""
    check_runner_names(names)
    ref = TorchRunner(reference, io.input_names, io.output_names, name="torch-eager-fp32")
    cands: list[Runner] = []
    for n in names:
        if n == "onnxrt":
            cands.append(OrtRunner(onnx_path, "cpu"))
        elif n == "onnxrt-cuda":
            cands.append(OrtRunner(onnx_path, "cuda"))
        else:
            from mame_export.trt.runner import TrtGraphRunner

            cands.append(TrtGraphRunner(onnx_path, trt_options, engines_dir))
    return ref, cands


def run_export(req: ExportRequest, log: Log = stderr_log) -> dict[str, Any]:
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
    spec = resolve(req.model)
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
            atomic_write_text(tmp / meta_path.name, _json(meta))
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


def _json(meta: dict[str, Any]) -> str:
    return json.dumps(json_safe(meta), indent=2, default=str, allow_nan=False) + "\n"


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
                          tolerance=tolerance_for(req.precision, bool(plan.merge_layers)))
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
        atomic_write_text(meta_path, _json(meta))


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
    ref = TorchRunner(model, io.input_names, io.output_names, name="torch-eager-fp32")
    batch = req.trt.opt_batch or 2 if req.dynamic_batch else req.batch
    merged = bool(getattr(model, "_mame_plan", None) and model._mame_plan.merge_layers)
    parity = check_parity(ref, [TrtRunner(res.plan)], feeds_maker(io, batch), req.precision,
                          batches=req.parity_batches, seed=req.seed,
                          tolerance=tolerance_for(req.precision, merged))
    log(parity.summary())
    return {"plan": str(res.plan), "sidecar": str(res.sidecar), "reused": res.reused,
            "metadata": res.metadata, "parity": parity.to_dict()}


def metadata(req: ExportRequest, spec: ModelSpec, plan: MergePlan, source: str, result: Any,
             audit_dict: dict[str, Any], parity: ParityReport, io: IOSpec,
             example: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    batch: Any = "dynamic" if req.dynamic_batch else req.batch
    return {
        "ok": bool(audit_dict["passed"] and parity.passed),
        "onnx": str(result.path),
        "onnx_sha256": result.sha256,
        "onnx_bytes": result.bytes,
        "external_data": result.external_data,
        "export_seconds": round(result.seconds, 2),
        "exporter": result.exporter,
        "model": {"name": req.model, "alias": spec.alias, "source": spec.source_name,
                  "family": spec.family},
        "weights": source,
        "settings": {"r": req.r, "tau": req.tau, "layers": plan.merge_layers, "mode": req.mode,
                     "prop_attn": req.prop_attn, "opset": result.opset or req.opset,
                     "precision": req.precision,
                     "batch": batch, "img_size": req.img_size or spec.img_size},
        "inputs": [{"name": n, "shape": [batch, *t.shape[1:]], "dtype": str(t.dtype)}
                   for n, t in zip(io.input_names, example, strict=False)],
        "outputs": list(io.output_names),
        "plan": plan.to_dict(),
        "merge_op": MERGE_OP,
        "audit": audit_dict,
        "parity": parity.to_dict(),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mame-export", *sys.argv[1:]]) if sys.argv else "",
    }


class MetadataError(UserError):
    """A graph's metadata sidecar is missing or does not describe a rebuildable model."""


def _expect(value: Any, types: Any, what: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in
                                        (types if isinstance(types, tuple) else (types,))):
        raise TypeError(f"{what} is {type(value).__name__} {value!r:.40}")
    return value


def request_from_metadata(meta: dict[str, Any]) -> ExportRequest:
    st = _expect(meta["settings"], dict, "settings")
    if meta.get("merge_op") != MERGE_OP:
        versions_ = meta.get("versions")
        made_by = (versions_.get("mame-export", "an earlier version")
                   if isinstance(versions_, dict) else "an earlier version")
        raise MetadataError(
            f"the graph was exported by mame-export {made_by} with another merge op "
            f"({meta.get('merge_op', 'fixed source positions')}); this version computes "
            f"{MERGE_OP!r}: re-export the graph to check its parity"
        )
    source = _expect(meta["weights"], str, "weights")
    weights = source[len("file:"):] if source.startswith("file:") else "random"
    if weights == "random" and not source.startswith("random init"):
        raise MetadataError(
            f"the graph was exported with weights from {source}; pass them again with "
            "--weights PATH to rebuild the eager reference"
        )
    layers = st["layers"]
    if layers is not None:
        _expect(layers, list, "settings.layers")
        for i in layers:
            _expect(i, int, "a settings.layers entry")
    batch = st["batch"]
    if batch != "dynamic":
        _expect(batch, int, "settings.batch")
    tau = st["tau"]
    if tau is not None:
        _expect(tau, (int, float), "settings.tau")
    img = st["img_size"]
    if img is not None:
        _expect(img, int, "settings.img_size")
    return ExportRequest(
        model=_expect(_expect(meta["model"], dict, "model")["name"], str, "model.name"),
        r=_expect(st["r"], (int, float), "settings.r"), tau=tau, layers=layers,
        mode=_expect(st["mode"], str, "settings.mode"),
        prop_attn=_expect(st["prop_attn"], bool, "settings.prop_attn"), img_size=img,
        weights=weights, opset=_expect(st["opset"], int, "settings.opset"),
        precision=_expect(st["precision"], str, "settings.precision"),
        batch=batch if batch != "dynamic" else 1,
        dynamic_batch=batch == "dynamic",
    )


def read_sidecar(graph: Path) -> tuple[dict[str, Any], ExportRequest]:
    """A graph's metadata sidecar and the export request it records, checked: every
    problem is a one-line MetadataError."""
    sidecar = graph.with_suffix(".json")
    problem = path_problem(sidecar)
    if problem == "not found":
        raise MetadataError(f"no metadata sidecar {sidecar}: parity needs it to rebuild the "
                            "eager reference (export with mame-export MODEL)")
    if problem is not None:
        raise MetadataError(f"metadata sidecar {sidecar} {problem}")
    try:
        meta = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: not JSON text "
                            f"({type(e).__name__})") from None
    except OSError as e:
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: {e.strerror or e}") from None
    if not isinstance(meta, dict):
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: not a JSON object")
    try:
        req = request_from_metadata(meta)
    except KeyError as e:
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: no {e} entry") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: {e}") from None
    try:
        req.validate(check_opset=False)
    except UserError as e:
        raise MetadataError(f"metadata sidecar {sidecar} holds impossible settings: "
                            f"{str(e).lstrip('-')}") from None
    return meta, req


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
                        seed=seed, tolerance=tolerance_for(req.precision, bool(plan.merge_layers)))
