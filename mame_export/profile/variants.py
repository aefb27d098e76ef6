"""The models a profile compares: the unpatched baseline, MaMe at each r, the baseline
method of the family at the same r (ToMe for timm ViTs, ToMe-SD for UNets), and their
static-batch ONNX exports (with the forbidden-op census of each graph)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.export import export_onnx, reduced_precision_copy
from mame_export.families import Family, IOSpec
from mame_export.plan import MergePlan

VARIANTS = ("baseline", "mame", "tome", "tomesd", "mame-plan")  # mame-plan: --plan FILE
# ToMe-SD picks its blocks by UNet level: 8 reaches every level of SD 1.x/2.x, the blocks
# MaMe merges in by default. Its random partition (use_rand) does not export; off.
TOMESD_OPTIONS = {"max_downsample": 8, "use_rand": False}


@dataclass(frozen=True)
class MergeSettings:
    """How MaMe is applied (and ToMe, with the same layers): ``options`` are the family's
    own keyword arguments (``Family.patch_options``: a UNet's latent size, ...)."""

    tau: float | None = None
    layers: list[int] | None = None
    prop_attn: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    # ``apply``'s keyword arguments of a plan file (the "mame-plan" variant), and its r
    plan: dict[str, Any] | None = None
    plan_r: float = 0.0


@dataclass
class Variant:
    name: str
    r: float
    model: nn.Module | None
    flops_ratio: float | None
    gmacs: float | None
    final_tokens: int | None
    error: str | None = None
    plan: MergePlan | None = None


def family_variants(family: Family) -> tuple[str, ...]:
    """The variants that apply to ``family``'s models: the baseline and MaMe always, ToMe
    where the family has the ``tome`` capability, ToMe-SD where it has ``tomesd``."""
    out = ["baseline", "mame"]
    if "tome" in family.capabilities:
        out.append("tome")
    if "tomesd" in family.capabilities:
        out.append("tomesd")
    return tuple(out)


def build_variant(base: nn.Module, name: str, r: float, macs_unpatched: int | None = None,
                  *, merge: MergeSettings | None = None, tokens: int | None = None,
                  copy_base: bool = True) -> Variant:
    """A patched deep copy of ``base`` (unchanged), or a Variant with the reason it failed.

    ``macs_unpatched`` and ``tokens`` describe the baseline (its GMACs and patch tokens);
    ``copy_base=False`` lets the baseline be ``base`` itself (for runs that change it in
    no way: fp32 on the CPU)."""
    merge = merge or MergeSettings()
    if name == "baseline":
        model = copy.deepcopy(base).eval() if copy_base else base.eval()
        gmacs = macs_unpatched / 1e9 if macs_unpatched else None
        return Variant(name, 0.0, model, 1.0, gmacs, tokens)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}")
    try:
        patch = _patcher(name, r, merge)
    except ImportError:  # ToMe-SD is an optional package
        return Variant(name, r, None, None, None, None, error=f"{name} is not installed: "
                       "pip install 'mame-export[compare]'")
    except ValueError as e:
        return Variant(name, r, None, None, None, None, error=str(e))
    model = copy.deepcopy(base).eval()
    try:
        plan = patch(model)
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:  # ToMe-SD: Runtime
        return Variant(name, r, None, None, None, None, error=f"{name} does not apply: {e}")
    if plan is None:  # ToMe-SD: no analytic plan
        return Variant(name, r, model, None, None, None)
    return Variant(name, r, model, plan.flops_ratio, plan.macs / 1e9, plan.final_patches,
                   plan=plan)


def _patcher(name: str, r: float, merge: MergeSettings) -> Any:
    """model -> its plan (None for ToMe-SD), patching it in place."""
    if name == "mame":
        from mame_export.patch import apply, merge_plan

        return lambda m: merge_plan(apply(m, r, tau=merge.tau, layers=merge.layers,
                                          prop_attn=merge.prop_attn, **merge.options))
    if name == "mame-plan":
        from mame_export.patch import apply, merge_plan

        if merge.plan is None:
            raise ValueError("the mame-plan variant needs a plan file (--plan FILE)")
        settings = merge.plan
        return lambda m: merge_plan(apply(m, 0.0, **settings))
    if name == "tome":
        from mame_export.baselines import apply_tome, tome_plan

        return lambda m: tome_plan(apply_tome(m, r, layers=merge.layers,
                                              prop_attn=merge.prop_attn))
    import tomesd

    if merge.layers is not None:
        raise ValueError("tomesd does not apply: ToMe-SD picks its blocks by UNet level, not "
                         "by --layers")

    def apply_tomesd(m: nn.Module) -> None:
        tomesd.apply_patch(getattr(m, "unet", m), ratio=r, **TOMESD_OPTIONS)

    return apply_tomesd


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


def export_variant(variant: Variant, batch: int, io: IOSpec, dtype: torch.dtype,
                   out_dir: Path) -> ExportInfo:
    """Export a variant at a static batch with the inputs and outputs of its family's
    ``io``; failures become ``ExportInfo.error``."""
    assert variant.model is not None
    path = out_dir / f"{variant.name}_r{variant.r:g}_b{batch}.onnx"
    # fp32 exports read the model as it is; reduced precision casts a copy (as export does)
    model = variant.model if dtype == torch.float32 else reduced_precision_copy(
        variant.model, dtype)
    example = tuple(t.to(dtype) if t.is_floating_point() else t
                    for t in io.make_inputs(batch, torch.Generator().manual_seed(1)))
    try:
        export_onnx(model, example, path, input_names=io.input_names,
                    output_names=io.output_names, dynamic_batch=False)
    except UserError as e:
        return ExportInfo(None, f"does not export: {e}", {})
    return ExportInfo(path, None, forbidden_census(path))
