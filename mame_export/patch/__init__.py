"""One entry point, one patch file per model family."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch.nn as nn

from mame_export.plan import MergePlan, check_ratio, check_tau

# Family modules, tried in order; each exposes FAMILY, matches(model), apply(...).
_FAMILY_MODULES = ("mame_export.patch.timm_vit", "mame_export.patch.diffusers_unet")
MODES = ("static", "adaptive")
DEFAULT_TAU = 0.5


def _families() -> list[ModuleType]:
    found = []
    for name in _FAMILY_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def supported_families() -> list[str]:
    return [m.FAMILY for m in _families()]


def family_of(model: nn.Module) -> ModuleType:
    for fam in _families():
        if fam.matches(model):
            return fam
    raise TypeError(
        f"MaMe does not support {type(model).__module__}.{type(model).__name__}; supported: "
        "timm VisionTransformer models (ViT, DeiT, SigLIP/SigLIP2, register-token ViTs) "
        "and diffusers UNet2DConditionModel (SD 1.x/2.x)"
    )


def apply(
    model: nn.Module,
    r: float = 0.5,
    *,
    tau: float = DEFAULT_TAU,
    layers: list[int] | None = None,
    prop_attn: bool = True,
    mode: str = "static",
    **family_options: object,
) -> nn.Module:
    """Patch ``model`` in place with MaMe and return it.

    Args:
        model: a supported model (see :func:`supported_families`).
        r: fraction of mergeable tokens gone after the last merge block, in [0, 1).
        tau: similarity threshold in [-1, 1]; weaker links are dropped.
        layers: indices of the blocks that merge; default: the first two thirds.
        prop_attn: add log(token size) to attention logits (proportional attention).
        mode: "static" (fixed shapes, exportable) or "adaptive" (the paper's
            retention of distinctive tokens; eager only, data-dependent count).
        **family_options: options only one family knows, e.g. for diffusers UNets
            ``merge_crossattn``, ``merge_mlp`` and ``latent_size``.

    The merge plan is computed here, once, and stored on the model; read it
    with :func:`merge_plan`.
    """
    check_ratio(r)
    check_tau(tau)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if getattr(model, "_tome_plan", None) is not None:
        raise ValueError("model is already ToMe-patched; apply MaMe to an unpatched model")
    fam = family_of(model)
    return fam.apply(model, r, tau=tau, layers=layers, prop_attn=prop_attn, mode=mode,
                     **family_options)


def merge_plan(model: nn.Module) -> MergePlan:
    """The plan stored by :func:`apply` (tokens per block, MACs vs. unpatched)."""
    plan = getattr(model, "_mame_plan", None)
    if plan is None:
        raise ValueError("model is not MaMe-patched: call mame_export.apply(model, r) first")
    return plan


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_mame_plan", None) is not None
