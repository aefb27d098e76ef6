"""The library entry point: ``apply`` MaMe to a model of any registered family, read its
plan, or solve r for a MACs target. Each family's patch is in ``families/<name>/patch.py``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from mame_export.errors import warn
from mame_export.plan import MergePlan, check_ratio, check_target_macs, check_tau

if TYPE_CHECKING:
    from mame_export.planfile import PlanFile

MODES = ("static", "adaptive")
DEFAULT_TAU = {"static": 1.0, "adaptive": 0.8}  # per mode; see apply's tau
R_TOP = math.nextafter(1.0, 0.0)  # the largest r below 1: the fewest tokens a plan can keep
_warned: set[str] = set()  # warnings this process has shown (each once)


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
    plan: PlanFile | str | Path | None = None,
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
        plan: a plan file (``mame-export tune``; a path or a read
            :class:`~mame_export.planfile.PlanFile`): its tokens per block, similarity,
            proportional attention and tau replace ``r``, ``layers``, ``prop_attn`` and
            ``tau``. Refused (PlanFileError) unless made for this model's family,
            structure, input size and weights.
        **family_options: options only one family knows, e.g. for diffusers UNets
            ``merge_crossattn``, ``merge_mlp`` and ``latent_size``; for ViT-like
            encoders ``schedule`` (explicit keep counts per block) and ``similarity``.

    The merge plan is computed here, once, and stored on the model; read it
    with :func:`merge_plan`.
    """
    if plan is not None:
        from mame_export.planfile import as_plan_file, check_plan_for_model

        plan = as_plan_file(plan)
        check_plan_for_model(plan, model)
        settings = plan.apply_kwargs()
        tau, prop_attn, layers, r = settings.pop("tau"), settings.pop("prop_attn"), None, 0.0
        family_options = {**family_options, **settings}
    check_ratio(r)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    tau = DEFAULT_TAU[mode] if tau is None else tau
    check_tau(tau)
    if getattr(model, "_tome_plan", None) is not None:
        raise ValueError("model is already ToMe-patched; apply MaMe to an unpatched model")
    from mame_export.families import family_for_model

    model = family_for_model(model).patcher.apply(
        model, r, tau=tau, layers=layers, prop_attn=prop_attn, mode=mode, **family_options)
    _warn_if_costlier(merge_plan(model))
    return model


def _warn_if_costlier(plan: MergePlan) -> None:
    """A warning, once per plan, when merging costs more MACs than it saves."""
    if plan.flops_ratio <= 1.0:
        return
    msg = (f"merging costs more than it saves: the {plan.family} plan at r={plan.r:g} "
           f"({plan.num_patches} patches) has a MACs ratio of {plan.flops_ratio:.3f} > 1 "
           "(the merge's own products outgrow what fewer tokens save); use fewer merge "
           "layers, a smaller r or a smaller input")
    if msg not in _warned:
        _warned.add(msg)
        warn(msg)


def solve_r(model: nn.Module, target_macs: float, **apply_kwargs: object) -> float:
    """The smallest r whose plan has a MACs ratio <= ``target_macs``; leaves ``model``
    patched at that r. Raises ValueError if no r in [0, 1) reaches the target.

    Plans are built without patching (the family's ``build_plan``); token counts are a step
    function of r, so the search runs over ``log(1 - r)`` (steps crowd towards r = 1) up
    to :data:`R_TOP`, where every merge block keeps the fewest tokens it can."""
    from mame_export.families import family_for_model

    check_target_macs(target_macs)
    settings = dict(apply_kwargs)
    mode = str(settings.get("mode", "static"))
    if settings.get("tau") is None:
        settings["tau"] = DEFAULT_TAU.get(mode, 1.0)
    patcher = family_for_model(model).patcher

    def plan(r: float) -> MergePlan:
        return patcher.build_plan(model, r, **settings)  # type: ignore[arg-type]

    def reaches(r: float) -> bool:
        return plan(r).flops_ratio <= target_macs

    if reaches(0.0):
        return _apply_solved(model, 0.0, apply_kwargs)
    best = plan(R_TOP)
    if best.flops_ratio > target_macs:
        r_best = _shortest(_step_start(plan, R_TOP), plan)
        raise ValueError(
            f"MACs ratio {target_macs:g} is out of reach: in these merge layers the best is "
            f"{best.flops_ratio:.3f}, at r={r_best!r} and above (every merge block keeps the "
            "fewest tokens it can); merge in more blocks (layers) or ask for more MACs"
        )
    r = _bisect(lambda x: not reaches(x), 0.0, R_TOP)
    return _apply_solved(model, _shortest(r, plan), apply_kwargs)


PlanAt = Callable[[float], MergePlan]


def _apply_solved(model: nn.Module, r: float, apply_kwargs: dict[str, object]) -> float:
    apply(model, r, **apply_kwargs)  # type: ignore[arg-type]
    return r


def _counts(plan: MergePlan) -> tuple[tuple[int, int], ...]:
    return tuple((b.tokens_in, b.tokens_out) for b in plan.blocks)


def _bisect(before: Callable[[float], bool], lo: float, hi: float) -> float:
    """The r in (lo, hi] where ``before`` turns False (True at lo, False at hi), to the
    float: bisection over ``-log(1 - r)``, which spreads the steps crowding near 1."""
    u_lo, u_hi = -math.log1p(-lo), -math.log1p(-hi)
    while True:
        u_mid = 0.5 * (u_lo + u_hi)
        mid = -math.expm1(-u_mid)
        if not lo < mid < hi:
            return hi
        if before(mid):
            lo, u_lo = mid, u_mid
        else:
            hi, u_hi = mid, u_mid


def _step_start(plan: PlanAt, r: float) -> float:
    """The smallest r whose plan has the same token counts as the plan at ``r``."""
    counts = _counts(plan(r))
    if _counts(plan(0.0)) == counts:
        return 0.0
    return _bisect(lambda x: _counts(plan(x)) != counts, 0.0, r)


def _shortest(r: float, plan: PlanAt) -> float:
    """The shortest decimal (4 places or more) below 1 with the same plan as ``r``."""
    counts = _counts(plan(r))
    for places in range(4, 18):
        short = round(r, places)
        if short < 1.0 and _counts(plan(short)) == counts:
            return short
    return r


def merge_plan(model: nn.Module) -> MergePlan:
    """The plan stored by :func:`apply` (tokens per block, MACs vs. unpatched)."""
    plan = getattr(model, "_mame_plan", None)
    if plan is None:
        raise ValueError("model is not MaMe-patched: call mame_export.apply(model, r) first")
    return plan


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_mame_plan", None) is not None
