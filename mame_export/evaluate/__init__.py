"""Accuracy and fidelity of MaMe and ToMe against the unmerged model, on a user's images.

``mame-export eval MODEL --data DIR`` runs the unmerged model, MaMe at each r and
ToMe with the same tokens per block over the same preprocessed images, and
reports per variant: top-1/top-5 (when the folder is labelled and the model has
a classifier head), agreement with the unmerged model's top-1, the mean cosine
of the outputs and of the pre-logit features to the unmerged model's, and the
MACs ratio of the plan.

Data: an ImageFolder (one sub-folder per class) or a flat folder of unlabelled
images. Class sub-folders map to class indices by name: if every name is a
non-negative integer (``243/``, ``0007/``) that integer is the index (for a
folder laid out in the model's own label order, e.g. ImageNet indices);
otherwise the sorted names get 0, 1, 2, ... (torchvision's ImageFolder rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.errors import UserError
from mame_export.evaluate.data import (  # noqa: F401 - re-exported
    IMAGE_SUFFIXES,
    DataError,
    ImageSet,
    find_images,
    load_batches,
    transform_for,
)

Log = Callable[[str], None]


@dataclass
class Outputs:
    """A variant's outputs over the whole set: final outputs and pre-logit features."""

    outputs: torch.Tensor
    features: torch.Tensor
    seconds: float = 0.0


@torch.inference_mode()
def run_variant(model: nn.Module, batches: Sequence[torch.Tensor], log: Log | None = None,
                name: str = "") -> Outputs:
    """Outputs and pre-logit features (the head's input, read with a hook) of ``model``."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise UserError(f"{type(model).__name__} has no `head` module to read pre-logits from")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float()))
    outs: list[torch.Tensor] = []
    start = time.perf_counter()
    done, total = 0, sum(len(b) for b in batches)
    try:
        for b in batches:
            outs.append(model(b).float())
            done += len(b)
            if log is not None:
                log(f"  {name}: {done}/{total} images")
    finally:
        hook.remove()
    return Outputs(torch.cat(outs), torch.cat(seen), time.perf_counter() - start)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12).mean())


def compare(ref: Outputs, out: Outputs, labels: Sequence[int] | None,
            has_head: bool) -> dict[str, float | None]:
    """Fidelity to the unmerged model and, when labelled, accuracy."""
    res: dict[str, float | None] = {
        "cosine_outputs": _mean_cosine(out.outputs, ref.outputs),
        "cosine_features": _mean_cosine(out.features, ref.features),
        "top1_agreement": None, "top1": None, "top5": None,
    }
    if not has_head:
        return res
    pred = out.outputs.argmax(dim=1)
    res["top1_agreement"] = float((pred == ref.outputs.argmax(dim=1)).float().mean())
    if labels is not None:
        y = torch.tensor(labels)
        res["top1"] = float((pred == y).float().mean())
        k = min(5, out.outputs.shape[1])
        res["top5"] = float((out.outputs.topk(k, dim=1).indices == y[:, None]).any(1)
                            .float().mean())
    return res


@dataclass
class Variant:
    """One model to evaluate: unmerged, MaMe or ToMe at an r."""

    name: str
    method: str  # "unmerged", "mame", "tome"
    r: float
    model: nn.Module
    plan: dict[str, Any] = field(default_factory=dict)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def build_variants(
    model: nn.Module, rs: Sequence[float], *, tau: float | None, layers: list[int] | None,
    prop_attn: bool, tome: bool = True,
) -> list[Variant]:
    """The unmerged model, then MaMe at each r and (``tome``) ToMe with the same tokens per
    block; each variant patches its own copy of ``model``."""
    from mame_export.baselines.tome import apply_tome, tome_plan
    from mame_export.patch import apply, merge_plan

    out = [Variant("unmerged", "unmerged", 0.0, model)]
    try:
        for r in rs:
            m = apply(copy_of(model), r, tau=tau, layers=layers, prop_attn=prop_attn)
            out.append(Variant(f"MaMe r={r:g}", "mame", r, m, merge_plan(m).to_dict()))
            if tome:
                t = apply_tome(copy_of(model), r, layers=layers, prop_attn=prop_attn)
                out.append(Variant(f"ToMe r={r:g}", "tome", r, t, tome_plan(t).to_dict()))
    except ValueError as e:
        raise UserError(str(e)) from None
    return out


def num_outputs(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


def check_labels(images: ImageSet, model: nn.Module) -> None:
    n_out = num_outputs(model)
    if images.labels is None or n_out == 0:
        return
    if images.num_classes > n_out:
        raise DataError(
            f"the data has class index {images.num_classes - 1} ({images.mapping}), but the "
            f"model's head has {n_out} classes; use class folders that fit the head, or a "
            "flat folder for fidelity only"
        )


def evaluate(
    variants: Sequence[Variant], images: ImageSet, transform: Callable[[Any], torch.Tensor],
    batch: int, log: Log,
) -> dict[str, Any]:
    """Run every variant over the same batches; the first variant is the reference."""
    if batch < 1:
        raise UserError(f"--batch must be >= 1; got {batch}")
    log(f"loading {len(images.paths)} images")
    batches = list(load_batches(images, transform, batch))
    ref_model = variants[0].model
    has_head = num_outputs(ref_model) > 0
    rows, ref = [], None
    for i, v in enumerate(variants):
        log(f"[{i + 1}/{len(variants)}] {v.name}")
        out = run_variant(v.model, batches, log, v.name)
        ref = out if ref is None else ref
        metrics = compare(ref, out, images.labels, has_head)
        rows.append({"name": v.name, "method": v.method, "r": v.r,
                     "macs_ratio": v.plan.get("flops_ratio", 1.0),
                     "final_patches": v.plan.get("final_patches"),
                     "seconds": round(out.seconds, 3), **metrics})
    notes = []
    if not has_head:
        notes.append("the model has no classifier head: top-1/top-5 and agreement are not "
                     "computed; the cosines measure fidelity")
    elif images.labels is None:
        notes.append("unlabelled images: top-1/top-5 are not computed")
    return {
        "images": len(images.paths),
        "labelled": images.labels is not None,
        "class_mapping": images.mapping if images.labels is not None else None,
        "classes": len(images.class_names),
        "variants": rows,
        "notes": notes,
    }


def table(report: dict[str, Any]) -> str:
    """A fixed-width table of the variants."""
    def f(v: Any, digits: int = 4) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    lines = [f"{'variant':<14} {'MACs':>6} {'top1':>7} {'top5':>7} {'agree':>7} "
             f"{'cos(out)':>9} {'cos(feat)':>9}"]
    for r in report["variants"]:
        lines.append(f"{r['name']:<14} {f(r['macs_ratio'], 3):>6} {f(r['top1']):>7} "
                     f"{f(r['top5']):>7} {f(r['top1_agreement']):>7} "
                     f"{f(r['cosine_outputs']):>9} {f(r['cosine_features']):>9}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG: accuracy (or feature cosine) and top-1 agreement against the MACs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mame_export.artifacts import atomic_write_bytes

    rows = report["variants"]
    labelled = any(r["top1"] is not None for r in rows)
    panels = [("top1", "top-1 accuracy")] if labelled else []
    panels.append(("top1_agreement", "top-1 agreement with unmerged")
                  if any(r["top1_agreement"] is not None for r in rows)
                  else ("cosine_features", "feature cosine to unmerged"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for method, style in (("mame", "o-"), ("tome", "x--")):
            pts = sorted((r["macs_ratio"], r[key]) for r in rows
                         if r["method"] == method and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label="MaMe" if method == "mame"
                        else "ToMe")
        base = [r[key] for r in rows if r["method"] == "unmerged" and r[key] is not None]
        if base:
            ax.axhline(base[0], color="gray", lw=0.8, label="unmerged")
        ax.set_xlabel("MACs ratio (merged / unmerged)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
