"""The main job: model alias -> patched model -> ONNX graph -> audit -> parity -> metadata.

The CLI only parses arguments and prints; everything it does happens here.
"""

from __future__ import annotations

import datetime as _dt
import json
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
from mame_export.errors import UserError
from mame_export.export import (
    PRECISIONS,
    IOSpec,
    atomic_write_text,
    ensure_writable_dir,
    export_onnx,
    reduced_precision_copy,
)
from mame_export.models import ModelSpec, build_model, resolve, state_dict_sha256
from mame_export.parity import ParityReport, check_parity
from mame_export.patch import apply, merge_plan, solve_r
from mame_export.plan import MergePlan, check_ratio, check_target_macs, check_tau
from mame_export.runners import OrtRunner, Runner, TorchRunner

Log = Callable[[str], None]


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

    def validate(self, export: bool = True) -> None:
        """One-line UserErrors for bad settings; ``export=False`` allows adaptive mode
        (a plan or an eager run, not a graph)."""
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
        if self.batch is not None and self.batch < 1:
            raise UserError(f"--batch must be >= 1; got {self.batch}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if not 17 <= self.opset <= 23:
            raise UserError(f"--opset must be in [17, 23]; got {self.opset}")
        if self.img_size is not None and self.img_size < 1:
            raise UserError(f"--img-size must be positive; got {self.img_size}")
        if self.trt is not None:
            self.trt.validate()
            if self.trt.precision != self.precision:
                raise UserError("engine and graph precision must match (strongly typed engines)")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mame-export": mame_export.__version__}
    for pkg in ("torch", "timm", "numpy", "onnx", "onnxscript", "onnxruntime",
                "onnxruntime-gpu", "diffusers", "tensorrt", "polygraphy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def graph_stem(spec: ModelSpec, req: ExportRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.alias)
    batch = "bdyn" if req.dynamic_batch else f"b{req.batch}"
    img = f"_{req.img_size}px" if req.img_size and req.img_size != spec.img_size else ""
    return f"{name}_r{req.r:g}{img}_{batch}_{req.precision}"


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


def build_patched(
    req: ExportRequest, log: Log = stderr_log
) -> tuple[ModelSpec, nn.Module, MergePlan, str]:
    spec = resolve(req.model)
    log(f"[1/5] building {spec.alias} ({spec.source_name}), weights: {req.weights}")
    model, source = build_model(spec, req.weights, req.img_size)
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
    except ValueError as e:  # layers out of range, an unreachable MACs target
        raise UserError(str(e)) from None
    return spec, model, merge_plan(model), source


RUNNERS = ("onnxrt", "onnxrt-cuda", "tensorrt")


def select_runners(reference: nn.Module, io: IOSpec, onnx_path: Path,
                   names: Sequence[str] = RUNNERS, trt_options: Any = None,
                   engines_dir: Path = Path("engines")) -> tuple[TorchRunner, list[Runner]]:
    """The fp32 eager reference and the named candidate runners for one graph."""
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        raise UserError(f"unknown runner(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
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
    """
    req.validate()
    ensure_writable_dir(req.out_dir)
    spec, model, plan, source = build_patched(req, log)
    if req.batch is None:
        req.batch = spec.default_batch
    log(plan.table())
    io = io_spec(spec, model, req.img_size)
    dtype = PRECISIONS[req.precision]
    stem = graph_stem(spec, req)
    onnx_path = req.out_dir / f"{stem}.onnx"

    export_model = model if dtype == torch.float32 else reduced_precision_copy(model, dtype)
    example = tuple(t.to(dtype) if t.is_floating_point() else t
                    for t in io.make_inputs(req.batch, torch.Generator().manual_seed(0)))
    log(f"[2/5] exporting to ONNX (opset {req.opset}, {req.precision}, "
        f"batch {'dynamic' if req.dynamic_batch else req.batch}) ...")
    result = export_onnx(export_model, example, onnx_path, input_names=io.input_names,
                         output_names=io.output_names, dynamic_batch=req.dynamic_batch,
                         opset=req.opset)
    del export_model
    log(f"      wrote {onnx_path} ({result.bytes / 1e6:.1f} MB"
        f"{', external data' if result.external_data else ''}) in {result.seconds:.1f} s")

    log("[3/5] auditing the graph ...")
    report = audit(onnx_path)
    log(report.summary())

    log(f"[4/5] parity vs eager PyTorch (fp32) on {req.parity_batches} fresh random batches ...")
    ref, cands = select_runners(model, io, onnx_path, req.runners, req.trt, req.engines_dir)
    parity_batch = 2 if req.dynamic_batch else req.batch
    parity = check_parity(ref, cands, feeds_maker(io, parity_batch), req.precision,
                          batches=req.parity_batches, seed=req.seed)
    log(parity.summary())

    meta = metadata(req, spec, plan, source, result, report.to_dict(), parity, io, example)
    meta["weights_sha256"] = state_dict_sha256(model)
    meta_path = req.out_dir / f"{stem}.json"
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    meta["metadata_path"] = str(meta_path)
    log(f"[5/5] wrote {meta_path}")
    if req.trt is not None and meta["ok"]:
        meta["engine"] = build_and_check_engine(req, model, io, onnx_path, log)
        meta["ok"] = meta["engine"]["parity"]["passed"]
        atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


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
    parity = check_parity(ref, [TrtRunner(res.plan)], feeds_maker(io, batch), req.precision,
                          batches=req.parity_batches, seed=req.seed)
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
                     "prop_attn": req.prop_attn, "opset": req.opset, "precision": req.precision,
                     "batch": batch, "img_size": req.img_size or spec.img_size},
        "inputs": [{"name": n, "shape": [batch, *t.shape[1:]], "dtype": str(t.dtype)}
                   for n, t in zip(io.input_names, example, strict=False)],
        "outputs": list(io.output_names),
        "plan": plan.to_dict(),
        "audit": audit_dict,
        "parity": parity.to_dict(),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mame-export", *sys.argv[1:]]) if sys.argv else "",
    }


class MetadataError(UserError):
    """A graph's metadata sidecar is missing or does not describe a rebuildable model."""


def request_from_metadata(meta: dict[str, Any]) -> ExportRequest:
    st = meta["settings"]
    weights = meta["weights"]
    weights = weights[len("file:"):] if weights.startswith("file:") else "random"
    if weights == "random" and not meta["weights"].startswith("random init"):
        raise MetadataError(
            f"the graph was exported with weights from {meta['weights']}; pass them again with "
            "--weights PATH to rebuild the eager reference"
        )
    return ExportRequest(
        model=meta["model"]["name"], r=st["r"], tau=st["tau"], layers=st["layers"],
        mode=st["mode"], prop_attn=st["prop_attn"], img_size=st["img_size"], weights=weights,
        opset=st["opset"], precision=st["precision"],
        batch=st["batch"] if st["batch"] != "dynamic" else 1,
        dynamic_batch=st["batch"] == "dynamic",
    )


def parity_for_graph(graph: Path, runners: list[str], batches: int, seed: int | None,
                     weights: str | None = None, log: Log = stderr_log) -> ParityReport:
    """Rebuild the eager reference from a graph's sidecar and compare the chosen runners."""
    sidecar = graph.with_suffix(".json")
    if not graph.is_file():
        raise MetadataError(f"graph not found: {graph}")
    try:
        meta = json.loads(sidecar.read_text())
        req = request_from_metadata(meta)
    except FileNotFoundError:
        raise MetadataError(f"no metadata sidecar {sidecar}: parity needs it to rebuild the "
                            "eager reference (export with mame-export MODEL)") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise MetadataError(f"unreadable metadata sidecar {sidecar}: {e}") from None
    if weights is not None:
        req.weights = weights
    spec, model, _, _ = build_patched(req, log)
    if meta.get("weights_sha256") and state_dict_sha256(model) != meta["weights_sha256"]:
        raise MetadataError(
            "rebuilt weights differ from the exported ones (other torch/timm version or "
            "checkpoint); pass the original checkpoint with --weights PATH"
        )
    io = io_spec(spec, model, req.img_size)
    ref, cands = select_runners(model, io, graph, runners)
    batch = 2 if req.dynamic_batch else req.batch
    return check_parity(ref, cands, feeds_maker(io, batch), req.precision, batches=batches,
                        seed=seed)
