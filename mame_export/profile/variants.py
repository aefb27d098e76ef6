"""The models a profile compares: the unpatched baseline, MaMe and ToMe at each r, and
their static-batch ONNX exports (with the forbidden-op census of each graph)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.export import export_onnx

VARIANTS = ("baseline", "mame", "tome")
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


@dataclass
class Variant:
    name: str
    r: float
    model: nn.Module | None
    flops_ratio: float | None
    gmacs: float | None
    final_tokens: int | None
    error: str | None = None


def build_variant(base: nn.Module, name: str, r: float, macs_unpatched: int | None) -> Variant:
    """A patched deep copy of ``base`` (unchanged), or a Variant with the reason it failed."""
    from mame_export.baselines import apply_tome, tome_plan
    from mame_export.patch import apply, merge_plan

    model = copy.deepcopy(base).eval()
    if name == "baseline":
        gmacs = macs_unpatched / 1e9 if macs_unpatched else None
        n = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return Variant(name, 0.0, model, 1.0, gmacs, n)
    try:
        if name == "mame":
            plan = merge_plan(apply(model, r))
        elif name == "tome":
            plan = tome_plan(apply_tome(model, r))
        else:
            raise ValueError(f"unknown variant {name!r}")
    except (TypeError, ValueError) as e:
        return Variant(name, r, None, None, None, None, error=f"{name} does not apply: {e}")
    return Variant(name, r, model, plan.flops_ratio, plan.macs / 1e9, plan.final_patches)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the pixels a patch-embedding image model takes."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "img_size") or not hasattr(pe, "proj"):
        raise UserError(f"profile supports image models with a patch embedding (timm ViTs); "
                        f"got {type(model).__name__}")
    h, w = pe.img_size
    return int(pe.proj.in_channels), int(h), int(w)


def unpatched_macs(base: nn.Module) -> int | None:
    """MACs of the unpatched model, from the MaMe plan at r=0 (None if MaMe does not apply)."""
    from mame_export.patch import apply, merge_plan

    try:
        return merge_plan(apply(copy.deepcopy(base), 0.0)).macs_unpatched
    except (TypeError, ValueError):
        return None


@dataclass
class ExportInfo:
    path: Path | None
    error: str | None
    forbidden: dict[str, int]


def forbidden_census(path: Path) -> dict[str, int]:
    """Forbidden (data-dependent) ops in the graph at ``path``: op -> count.

    A Gather whose indices are computed at run time is counted as
    ``Gather(computed indices)``.
    """
    from mame_export.audit import forbidden_ops
    from mame_export.graph import load_graph

    counts: dict[str, int] = {}
    for f in forbidden_ops(load_graph(path)):
        key = f.op_type if f.op_type != "Gather" else "Gather(computed indices)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def export_variant(
    variant: Variant, batch: int, img_shape: Sequence[int], dtype: torch.dtype, out_dir: Path
) -> ExportInfo:
    """Export a variant at a static batch; failures become ``ExportInfo.error``."""
    assert variant.model is not None
    path = out_dir / f"{variant.name}_r{variant.r:g}_b{batch}.onnx"
    model = copy.deepcopy(variant.model).to("cpu", dtype)
    example = (torch.randn(batch, *img_shape, generator=torch.Generator().manual_seed(1))
               .to(dtype),)
    try:
        export_onnx(model, example, path, input_names=(INPUT_NAME,),
                    output_names=(OUTPUT_NAME,), dynamic_batch=False)
    except UserError as e:
        return ExportInfo(None, f"does not export: {e}", {})
    return ExportInfo(path, None, forbidden_census(path))
