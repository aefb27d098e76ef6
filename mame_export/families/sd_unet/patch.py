"""MaMe + MaRe for diffusers' UNet2DConditionModel (SD 1.x/2.x): the merge plan and ``apply``.

The forward it installs (merge before each selected self-attention, restore right
after) is in :mod:`mame_export.families.sd_unet.forward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mame_export.families.sd_unet.forward import (
    FAMILY,
    TransformerBlockInfo,
    _patch_modules,
    matches,
    remove,
    tokens_kept,
    transformer_blocks,
    unet_of,
)
from mame_export.plan import BlockPlan, BlockSettings, MergePlan, check_ratio, check_tau

__all__ = ["FAMILY", "TransformerBlockInfo", "apply", "blocks_up_to_downsample", "build_plan",
           "matches", "remove", "transformer_blocks", "unet_of"]

# Text tokens assumed when the plan counts MACs (CLIP context length in SD 1.x/2.x).
_PLAN_TEXT_TOKENS = 77


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"latent size must be positive; got {size!r}")
    return int(h), int(w)


def _meta_copy(unet: nn.Module) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet.config).eval()


def _count(
    unet: nn.Module, latent: tuple[int, int], names: list[str]
) -> tuple[int, dict[str, tuple[int, int]]]:
    """MACs of one batch-1 forward (every matmul and conv) and each named module's grid."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    grids: dict[str, tuple[int, int]] = {}
    modules = dict(unet.named_modules())

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            grids.setdefault(name, (int(x.shape[-2]), int(x.shape[-1])))

        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in names]
    sample = torch.zeros(1, cfg.in_channels, *latent, device="meta")
    context = torch.zeros(1, _PLAN_TEXT_TOKENS, cfg.cross_attention_dim, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            unet(sample, torch.zeros((), device="meta"), context)
    finally:
        for h in hooks:
            h.remove()
    return counter.get_total_flops() // 2, grids


def build_plan(
    unet: nn.Module,
    r: float,
    tau: float,
    layers: list[int] | None,
    prop_attn: bool,
    mode: str,
    latent_size: int | tuple[int, int] | None = None,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
) -> MergePlan:
    """The plan for ``unet`` at one latent size (default: the config's ``sample_size``).

    One BlockPlan per transformer block, in forward order: ``tokens_in`` is the
    block's sequence (h*w of its latent grid), ``tokens_out`` the length its
    self-attention runs on (MaRe restores ``tokens_in`` right after). MACs are
    counted with ``torch.utils.flop_counter`` on a meta-device copy (no memory,
    no compute): every matmul and convolution of one batch-1 forward with 77
    text tokens, MaMe/MaRe overhead included.
    """
    check_ratio(r)
    check_tau(tau)
    if mode != "static":
        raise ValueError(
            f"mode={mode!r} is not supported for UNets: MaRe restores positions through a "
            "fixed partition, so only mode='static' exists"
        )
    unet = unet_of(unet)
    infos = transformer_blocks(unet)
    selected = _check_layers(layers, len(infos))
    latent = _pair(latent_size if latent_size is not None else unet.config.sample_size)
    settings = _settings(len(infos), selected, r, tau, prop_attn, merge_crossattn, merge_mlp)

    meta = _meta_copy(unet)
    meta_infos = transformer_blocks(meta)
    macs_unpatched, grids = _count(meta, latent, [i.parent_name for i in meta_infos])
    _patch_modules(meta_infos, settings)
    macs, _ = _count(meta, latent, [])

    blocks, by_grid = [], {}
    for info, s in zip(infos, settings, strict=True):
        h, w = grids[info.parent_name]
        n = h * w
        n_attn = tokens_kept(n, r) if s.merges else n
        blocks.append(BlockPlan(info.index, n, n_attn, n_attn < n))
        by_grid.setdefault(f"{h}x{w}", []).append(str(info.index))
    notes = [
        "UNet: tokens out = self-attention length; MaRe restores every position after it",
        "blocks by latent grid: " + "; ".join(f"{g}: {','.join(i)}" for g, i in by_grid.items()),
        f"MACs: FlopCounterMode on a meta copy, batch 1, {_PLAN_TEXT_TOKENS} text tokens, "
        "all matmuls and convolutions",
    ]
    if merge_crossattn or merge_mlp:
        notes.append(f"also merged: cross-attention={merge_crossattn}, feed-forward={merge_mlp}")
    return MergePlan(
        family=FAMILY,
        r=float(r),
        tau=float(tau),
        mode=mode,
        prop_attn=prop_attn,
        num_patches=latent[0] * latent[1],
        num_protected=0,
        blocks=tuple(blocks),
        macs=int(macs),
        macs_unpatched=int(macs_unpatched),
        notes=tuple(notes),
    )


def _check_layers(layers: list[int] | None, depth: int) -> set[int]:
    if layers is None:
        return set(range(depth))
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a UNet with {depth} transformer blocks")
    return set(layers)


def _settings(
    depth: int,
    selected: set[int],
    r: float,
    tau: float,
    prop_attn: bool,
    merge_crossattn: bool,
    merge_mlp: bool,
) -> list[BlockSettings]:
    return [
        BlockSettings(
            merges=i in selected and r > 0,
            r=float(r),
            tau=float(tau),
            prop_attn=bool(prop_attn),
            merge_crossattn=bool(merge_crossattn),
            merge_mlp=bool(merge_mlp),
        )
        for i in range(depth)
    ]


def blocks_up_to_downsample(unet: nn.Module, max_downsample: int) -> list[int]:
    """Indices of the transformer blocks at most ``max_downsample`` x below the latent.

    The ToMe-SD knob: 1 selects the highest-resolution blocks only, 8 all of
    them in SD 1.x/2.x. Read from the UNet's layout (down block i runs at 2**i).
    """
    unet = unet_of(unet)
    levels = {f"down_blocks.{i}": 2**i for i in range(len(unet.down_blocks))}
    last = 2 ** (len(unet.down_blocks) - 1)
    levels["mid_block"] = last
    levels.update({f"up_blocks.{i}": last // 2**i for i in range(len(unet.up_blocks))})
    out = []
    for info in transformer_blocks(unet):
        stage = info.name.split(".attentions.")[0]
        if levels[stage] <= max_downsample:
            out.append(info.index)
    return out


def apply(
    model: nn.Module,
    r: float,
    *,
    tau: float,
    layers: list[int] | None,
    prop_attn: bool,
    mode: str,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    latent_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """Patch a UNet2DConditionModel (or a wrapper holding it as ``.unet``) in place.

    Re-applying replaces the settings and the plan; :func:`remove` undoes it.

    Args:
        r: fraction of each selected block's tokens merged away before its
            self-attention (the same in every block; no compounding, since
            MaRe restores them right after).
        layers: transformer-block indices in forward order (see
            :func:`transformer_blocks`, :func:`blocks_up_to_downsample`); default all.
        prop_attn: add log(token size) to the self-attention logits.
        merge_crossattn, merge_mlp: also run the cross-attention / feed-forward
            on the merged tokens (same weights, then MaRe); off by default.
        latent_size: latent (h, w) or side the plan is computed for; default the
            config's ``sample_size``. Other sizes still run (the partition is
            made per latent grid); only the stored plan is for this one.
    """
    unet = unet_of(model)
    plan = build_plan(
        unet, r, tau, layers, prop_attn, mode, latent_size, merge_crossattn, merge_mlp
    )
    infos = transformer_blocks(unet)
    selected = _check_layers(layers, len(infos))
    _patch_modules(
        infos, _settings(len(infos), selected, r, tau, prop_attn, merge_crossattn, merge_mlp)
    )
    unet._mame_plan = plan
    model._mame_plan = plan
    return model

