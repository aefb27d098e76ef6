"""The models ``eval`` compares, and how one runs on a batch: the unmerged model, MaMe at
each r, ToMe with the same tokens per block (ToMe-SD on a UNet) and an exported graph
through ONNX Runtime; each gives its outputs by the family's IO names."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.families import Family, IOSpec

Batch = tuple[torch.Tensor, ...]


class NonFiniteOutputError(UserError):
    """A variant gave NaN or infinite outputs: a failed check (exit 1), never numbers."""

    exit_code = 1


@dataclass
class Variant:
    """One model to evaluate: the unmerged model, MaMe, ToMe or ToMe-SD at an r, or a
    graph (``model`` is then the graph's runner, a callable on tensors)."""

    name: str
    method: str  # "unmerged", "mame", "mame-plan", "tome", "tomesd", "graph"
    r: float | None
    model: Any
    plan: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def eager(self) -> bool:
        return isinstance(self.model, nn.Module)


def row_of(v: Variant, metrics: dict[str, Any]) -> dict[str, Any]:
    """One report row: the variant, its plan's MACs ratio and tokens, time, metrics."""
    return {"name": v.name, "method": v.method, "r": v.r,
            "macs_ratio": 1.0 if v.method.startswith("unmerged") else v.plan.get("flops_ratio"),
            "final_patches": v.plan.get("final_patches"), "seconds": round(v.seconds, 3),
            **metrics}


def copy_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to patch: its modules are new, its weights the same tensors (a
    patch swaps module classes and never writes weights), so variants cost no memory."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, shared)


def prelogits_module(model: nn.Module, io: IOSpec) -> nn.Module | None:
    """The classifier layer whose input is the pre-logit features (timm ``head``, a
    transformers ``classifier``), or None when the outputs are the features."""
    if not io.class_scores:
        return None
    for owner in (model, getattr(model, "model", None)):
        for name in ("head", "classifier"):
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module):
                return module
    return None


@contextlib.contextmanager
def reading_prelogits(model: Any, io: IOSpec) -> Iterator[list[torch.Tensor]]:
    """A list that receives the pre-logit features of each call of ``model`` (empty for
    a graph, or a model whose outputs are the features)."""
    seen: list[torch.Tensor] = []
    head = prelogits_module(model, io) if isinstance(model, nn.Module) else None
    if head is None:
        yield seen
        return
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float()))
    try:
        yield seen
    finally:
        hook.remove()


@torch.inference_mode()
def run_once(variant: Variant, io: IOSpec, inputs: Batch,
             what: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``variant``'s outputs on one batch, by the IO spec's output names, and its pre-logit
    features when it has a classifier head; NaN or inf in them fails the run."""
    import time

    start = time.perf_counter()
    with reading_prelogits(variant.model, io) as seen:
        out = variant.model(*inputs)
    variant.seconds += time.perf_counter() - start
    outs = out if isinstance(out, (tuple, list)) else (out,)
    named = {n: o.float() for n, o in zip(io.output_names, outs, strict=True)}
    prelogits = seen[-1] if seen else None
    for t in (*named.values(), *([prelogits] if prelogits is not None else [])):
        if not bool(torch.isfinite(t).all()):
            who = "the unmerged model" if variant.method == "unmerged" else variant.name
            raise NonFiniteOutputError(
                f"{who} gives NaN or infinite outputs on {what}: no accuracy or fidelity can "
                "be reported (check the weights, e.g. a checkpoint holding NaN)")
    return named, prelogits


def _mame(model: nn.Module, r: float, settings: dict[str, Any]) -> Variant:
    from mame_export.patch import apply, merge_plan

    m = apply(copy_of(model), r, **settings)
    return Variant(f"MaMe r={r:g}", "mame", r, m, merge_plan(m).to_dict())


def plan_variant(model: nn.Module, plan_file: Any, settings: dict[str, Any]) -> Variant:
    """MaMe with a plan file's schedule (``mame-export tune``): ``settings`` are ``apply``'s
    keyword arguments for it (``Job.plan_variant_settings``)."""
    from mame_export.patch import apply, merge_plan

    try:
        m = apply(copy_of(model), 0.0, **settings)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    plan = merge_plan(m)
    return Variant(f"MaMe plan {plan_file.target_macs:g}", "mame-plan", plan.r, m,
                   plan.to_dict())


def _tome(model: nn.Module, r: float, layers: list[int] | None, prop_attn: bool) -> Variant:
    from mame_export.baselines.tome import apply_tome, tome_plan

    t = apply_tome(copy_of(model), r, layers=layers, prop_attn=prop_attn)
    return Variant(f"ToMe r={r:g}", "tome", r, t, tome_plan(t).to_dict())


TOMESD_MAX_DOWNSAMPLE = 8  # every UNet level, as MaMe's default layers (all blocks)


def tomesd_available() -> bool:
    return importlib.util.find_spec("tomesd") is not None


def _tomesd(model: nn.Module, r: float) -> Variant:
    """ToMe-SD (tomesd) at ratio r in every UNet level, deterministic (``use_rand=False``)."""
    import tomesd

    m = copy_of(model)
    tomesd.apply_patch(m.unet, ratio=r, max_downsample=TOMESD_MAX_DOWNSAMPLE, use_rand=False)
    return Variant(f"ToMe-SD r={r:g}", "tomesd", r, m)


def build_variants(
    model: nn.Module, rs: Sequence[float], *, tau: float | None, layers: list[int] | None,
    prop_attn: bool, tome: bool = True, family: Family | None = None,
    patch_options: dict[str, Any] | None = None, notes: list[str] | None = None,
) -> list[Variant]:
    """The unmerged model, then MaMe at each r and (``tome``) the family's ToMe baseline:
    ToMe with the same tokens per block where the family has the "tome" capability (timm
    when ``family`` is None), ToMe-SD on a UNet when tomesd is installed. Each variant
    patches its own copy of ``model``; what is left out is said in ``notes``."""
    settings = dict(tau=tau, layers=layers, prop_attn=prop_attn, **(patch_options or {}))
    capabilities = family.capabilities if family is not None else frozenset({"tome"})
    unet = "tomesd" in capabilities or (family is None and hasattr(model, "unet"))
    tomesd = tome and unet and tomesd_available() and layers is None
    if tome and notes is not None:
        if unet and not tomesd:
            notes.append("ToMe-SD is left out: " + (
                "it merges by UNet level, not by block (drop --layers to compare it)"
                if tomesd_available() else "tomesd is not installed (pip install tomesd)"))
        elif not unet and "tome" not in capabilities and family is not None:
            notes.append(f"ToMe is left out: the {family.name} family has no ToMe baseline")
    out = [Variant("unmerged", "unmerged", 0.0, model)]
    try:
        for r in rs:
            out.append(_mame(model, r, settings))
            if tome and "tome" in capabilities:
                out.append(_tome(model, r, layers, prop_attn))
            elif tomesd:
                out.append(_tomesd(model, r))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    return out
