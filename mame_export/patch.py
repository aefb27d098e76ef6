"""The library entry point: ``apply`` MaMe to a model of any registered family, read its
plan, or solve r for a MACs target. Each family's patch is in ``families/<name>/patch.py``."""

from __future__ import annotations

import torch.nn as nn

from mame_export.plan import MergePlan, check_ratio, check_target_macs, check_tau

MODES = ("static", "adaptive")
DEFAULT_TAU = {"static": 1.0, "adaptive": 0.8}  # per mode; see apply's tau
_R_MAX = 0.999


def supported_families() -> list[str]:
    """The names of the model families MaMe patches (see :mod:`mame_export.families`)."""
    from mame_export.families import all_families

    return [f.name for f in all_families()]


def apply(
    model: nn.Module,
    r: float = 0.5,
    *,
    tau: float | None = None,
    layers: list[int] | None = None,
    prop_attn: bool = True,
    mode: str = "static",
    **family_options: object,
) -> nn.Module:
    """Patch ``model`` in place with MaMe and return it.

    Args:
        model: a supported model (see :func:`supported_families`).
        r: fraction of mergeable tokens gone after the last merge block, in [0, 1).
        tau: in [-1, 1]; None takes the mode's default. Static mode (default 1): how
            widely a merged token spreads; 1 sends it to its single most similar
            target, lower values also to targets within ``(1 - tau) / 2`` of the best
            (measured worse, docs/method.md). Adaptive mode (default 0.8): a token
            merges only if its best similarity to a target exceeds tau.
        layers: indices of the blocks that merge; default: the first ``min(8, depth)``.
        prop_attn: add log(token size) to attention logits (proportional attention).
        mode: "static" (fixed shapes, exportable) or "adaptive" (the paper's
            retention of distinctive tokens; eager only, data-dependent count).
        **family_options: options only one family knows, e.g. for diffusers UNets
            ``merge_crossattn``, ``merge_mlp`` and ``latent_size``.

    The merge plan is computed here, once, and stored on the model; read it
    with :func:`merge_plan`.
    """
    check_ratio(r)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    tau = DEFAULT_TAU[mode] if tau is None else tau
    check_tau(tau)
    if getattr(model, "_tome_plan", None) is not None:
        raise ValueError("model is already ToMe-patched; apply MaMe to an unpatched model")
    from mame_export.families import family_for_model

    patch = family_for_model(model).patch()
    return patch.apply(model, r, tau=tau, layers=layers, prop_attn=prop_attn, mode=mode,
                       **family_options)


def solve_r(model: nn.Module, target_macs: float, **apply_kwargs: object) -> float:
    """The smallest r whose plan has a MACs ratio <= ``target_macs``; leaves ``model``
    patched at that r. Raises ValueError if no r in [0, 0.999] reaches the target."""
    check_target_macs(target_macs)

    def ratio(r: float) -> float:
        apply(model, r, **apply_kwargs)  # type: ignore[arg-type]
        return merge_plan(model).flops_ratio

    if ratio(0.0) <= target_macs:
        return 0.0
    best = ratio(_R_MAX)
    if best > target_macs:
        raise ValueError(
            f"MACs ratio {target_macs:g} is out of reach: r={_R_MAX} in these merge layers "
            f"gives {best:.3f}; merge in more blocks (layers) or ask for more MACs"
        )
    lo, hi = 0.0, _R_MAX
    for _ in range(40):  # the ratio is a step function of r: bisect to the step's edge
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ratio(mid) <= target_macs else (mid, hi)
        if hi - lo < 1e-5:
            break
    r = round(hi, 4)
    if ratio(r) > target_macs:
        r = hi
        ratio(r)
    return r


def merge_plan(model: nn.Module) -> MergePlan:
    """The plan stored by :func:`apply` (tokens per block, MACs vs. unpatched)."""
    plan = getattr(model, "_mame_plan", None)
    if plan is None:
        raise ValueError("model is not MaMe-patched: call mame_export.apply(model, r) first")
    return plan


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_mame_plan", None) is not None
