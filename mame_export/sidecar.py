"""A graph's metadata sidecar: what is recorded beside every graph, and reading it back
into the export request that made it (so ``parity GRAPH`` can rebuild the reference)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mame_export
from mame_export.errors import UserError, path_problem
from mame_export.families import IOSpec, ModelSpec
from mame_export.jsonsafe import json_safe
from mame_export.ops.mame import MERGE_OP
from mame_export.plan import MergePlan
from mame_export.request import ExportRequest, Job

if TYPE_CHECKING:
    import torch


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mame-export": mame_export.__version__}
    for pkg in ("torch", "timm", "numpy", "onnx", "onnxscript", "onnxruntime",
                "onnxruntime-gpu", "diffusers", "transformers", "tensorrt", "polygraphy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def metadata(req: Job | ExportRequest, spec: ModelSpec, plan: MergePlan, source: str, result: Any,
             audit_dict: dict[str, Any], parity: Any, io: IOSpec,
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
        "settings": {"r": req.r, "tau": req.tau,
                     # the layers asked for (None: the default): the schedule depends on
                     # them, and a block of them may end up merging nothing
                     "layers": None if req.layers is None else list(req.layers), "mode": req.mode,
                     "prop_attn": req.prop_attn, "llava": req.llava,
                     "opset": result.opset or req.opset, "precision": req.precision,
                     "batch": batch, "img_size": req.img_size or spec.img_size},
        "inputs": [{"name": n, "shape": [batch, *t.shape[1:]], "dtype": str(t.dtype)}
                   for n, t in zip(io.input_names, example, strict=False)],
        "outputs": list(io.output_names),
        "plan": plan.to_dict(),
        # the tuned schedule the graph runs (mame-export tune), so parity can rebuild it
        "plan_file": _plan_file(req),
        "merge_op": MERGE_OP,
        "audit": audit_dict,
        "parity": parity.to_dict(),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["mame-export", *sys.argv[1:]]) if sys.argv else "",
    }


def _plan_file(req: Job | ExportRequest) -> dict[str, Any] | None:
    if isinstance(req, Job):
        return req.plan_file.to_dict() if req.tuned and req.plan_file is not None else None
    if req.plan is None:
        return None
    from mame_export.planfile import as_plan_file

    return as_plan_file(req.plan).to_dict()


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
    plan_file = meta.get("plan_file")
    if plan_file is not None:
        from mame_export.planfile import from_dict

        plan_file = from_dict(plan_file, "the sidecar's plan_file")
        tau, layers = None, None  # the plan file's own (export refuses both with a plan)
    return ExportRequest(
        plan=plan_file,
        model=_expect(_expect(meta["model"], dict, "model")["name"], str, "model.name"),
        r=_expect(st["r"], (int, float), "settings.r"), tau=tau, layers=layers,
        mode=_expect(st["mode"], str, "settings.mode"),
        prop_attn=_expect(st["prop_attn"], bool, "settings.prop_attn"), img_size=img,
        llava=_expect(st.get("llava", False), bool, "settings.llava"),
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


def sidecar_json(meta: dict[str, Any]) -> str:
    return json.dumps(json_safe(meta), indent=2, default=str, allow_nan=False) + "\n"
