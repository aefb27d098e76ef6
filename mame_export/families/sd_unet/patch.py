"""MaMe + MaRe for diffusers' UNet2DConditionModel (SD 1.x/2.x): the merge plan and ``apply``.

The forward it installs (merge before each selected self-attention, restore right
after) is in :mod:`mame_export.families.sd_unet.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from mame_export.families.base import Patcher
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
from mame_export.plan import BlockPlan, BlockSettings, MergePlan, Size

__all__ = ["FAMILY", "PATCHER", "TransformerBlockInfo", "apply", "blocks_up_to_downsample",
           "build_plan", "matches", "remove", "transformer_blocks", "unet_of"]

# Text tokens assumed when the plan counts MACs (CLIP context length in SD 1.x/2.x).
_PLAN_TEXT_TOKENS = 77

Grid = tuple[int, int]
# diffusers' modules below are typed Any: their attributes are read by name.


def _pair(size: Size) -> Grid:
    h, w = (size, size) if isinstance(size, int) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"latent size must be positive; got {size!r}")
    return int(h), int(w)


def _latent(unet: Any, size: Size | None) -> Grid:
    return _pair(size if size is not None else unet.config.sample_size)


def _stages(unet: Any) -> list[tuple[str, Any]]:
    """The UNet's stages in forward order, by name: down blocks, mid block, up blocks."""
    stages = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block))
    return stages + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]


def _conv_grid(conv: Any, grid: Grid) -> Grid:
    """Output (h, w) of a convolution (or pooling) at input ``grid``."""
    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    (kh, kw), (sh, sw), (ph, pw) = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
    return (grid[0] + 2 * ph - kh) // sh + 1, (grid[1] + 2 * pw - kw) // sw + 1


def _conv_macs(conv: Any, grid: Grid) -> int:
    if not isinstance(conv, nn.Conv2d):  # average pooling: no products
        return 0
    h, w = _conv_grid(conv, grid)
    return int(h * w * conv.weight.numel())


def stage_grids(unet: Any, latent: Grid) -> dict[str, tuple[Grid, Grid | None]]:
    """Each stage's (grid it runs at, grid its up-/downsampler writes), followed through
    the UNet as its forward does: down blocks halve the grid, up blocks return to the
    grid of the skip connection they consume next."""
    out: dict[str, tuple[Grid, Grid | None]] = {}
    grid, skips = latent, [latent]
    for name, stage in _stages(unet):
        resampler = (getattr(stage, "downsamplers", None) or getattr(stage, "upsamplers", None)
                     or [None])[0]
        if name.startswith("down_blocks"):
            skips += [grid] * len(stage.resnets)
            after = _conv_grid(resampler.conv, grid) if resampler is not None else None
            if after is not None:
                skips.append(after)
        elif name.startswith("up_blocks"):
            del skips[len(skips) - len(stage.resnets):]
            after = skips[-1] if resampler is not None else None
        else:
            after = None
        out[name] = (grid, after)
        grid = after or grid
    return out


def _linear_macs(module: Any, tokens: int) -> int:
    if module is None:
        return 0
    return tokens * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _block_macs(blk: Any, n: int, bp: BlockPlan, merge_cost: bool, merge_crossattn: bool,
                merge_mlp: bool) -> int:
    """One BasicTransformerBlock over ``n`` tokens: self-attention on ``bp.tokens_out``,
    the cross-attention and feed-forward on those too where asked; MaMe/MaRe products."""
    k = bp.tokens_out
    a1 = blk.attn1
    macs = _linear_macs(a1, k) + 2 * k * k * a1.to_q.out_features
    if blk.attn2 is not None:
        a2, n2 = blk.attn2, k if merge_crossattn else n
        t = _PLAN_TEXT_TOKENS
        macs += (_linear_macs(a2.to_q, n2) + _linear_macs(a2.to_out, n2)
                 + _linear_macs(a2.to_k, t) + _linear_macs(a2.to_v, t)
                 + 2 * n2 * t * a2.to_q.out_features)
    macs += _linear_macs(blk.ff, k if merge_mlp else n)
    if merge_cost and bp.merges:
        # W (targets x sources) from the similarities, the merge (W s, W x), MaRe (W^T y);
        # each extra merged part (cross-attention, feed-forward) merges and restores again.
        pairs, c = k * (n - k), blk.norm1.normalized_shape[0]
        macs += pairs * (3 * c + 1) + pairs * (2 * c + 1) * (merge_crossattn + merge_mlp)
    return macs


def _resnet_macs(res: Any, grid: Grid) -> int:
    """A ResnetBlock2D: its convolutions at ``grid``, its time projection on one vector."""
    convs = sum(_conv_macs(m, grid) for m in res.modules() if isinstance(m, nn.Conv2d))
    return convs + _linear_macs(res, 1)


class SdUNetPatcher(Patcher):
    """MaMe + MaRe for diffusers' UNet2DConditionModel (or a wrapper holding it as
    ``.unet``): one plan entry per transformer block, restored after each."""

    family = FAMILY
    restores = True
    size_option = "latent_size"

    def matches(self, model: nn.Module) -> bool:
        return matches(model)

    def num_patches(self, model: nn.Module, size: Size | None = None) -> int:
        h, w = _latent(unet_of(model), size)
        return h * w

    def depth(self, model: nn.Module) -> int:
        return len(transformer_blocks(unet_of(model)))

    def protected(self, model: nn.Module) -> int:
        return 0

    def block_grids(self, model: nn.Module, size: Size | None = None) -> list[Grid]:
        """The latent grid (h, w) each transformer block runs at, in forward order."""
        unet = unet_of(model)
        grids = stage_grids(unet, _latent(unet, size))
        return [grids[info.name.split(".attentions.")[0]][0]
                for info in transformer_blocks(unet)]

    def block_tokens(self, model: nn.Module, size: Size | None = None) -> list[int]:
        return [h * w for h, w in self.block_grids(model, size)]

    def default_layers(self, depth: int) -> list[int]:
        return list(range(depth))  # every transformer block

    def keep_counts(self, tokens: Sequence[int], r: float,
                    layers: Sequence[int]) -> tuple[int | None, ...]:
        """Each selected block's self-attention runs on ``round(n * (1 - r))`` of its n
        tokens (no compounding: MaRe restores them right after)."""
        chosen = set(layers)
        kept = [tokens_kept(n, r) if i in chosen else n for i, n in enumerate(tokens)]
        return tuple(k if k < n else None for k, n in zip(kept, tokens, strict=True))

    def macs(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, merge_crossattn: bool = False, merge_mlp: bool = False,
             **options: Any) -> int:
        """Every matmul and convolution of one batch-1 forward with 77 text tokens, from
        the modules' shapes (what torch's FlopCounterMode counts, without running it),
        MaMe/MaRe products included."""
        unet = unet_of(model)
        latent = _latent(unet, size)
        grids = stage_grids(unet, latent)
        plans = iter(blocks)
        macs = _conv_macs(unet.conv_in, latent) + _conv_macs(unet.conv_out, latent)
        macs += _linear_macs(unet.time_embedding, 1)
        for name, stage in _stages(unet):
            grid, after = grids[name]
            macs += sum(_resnet_macs(res, grid) for res in stage.resnets)
            for t2d in getattr(stage, "attentions", None) or []:
                n = grid[0] * grid[1]
                macs += _linear_macs(t2d.proj_in, n) + _linear_macs(t2d.proj_out, n)
                macs += sum(_conv_macs(m, grid) for m in (t2d.proj_in, t2d.proj_out))
                for blk in t2d.transformer_blocks:
                    macs += _block_macs(blk, n, next(plans), merge_cost, merge_crossattn,
                                        merge_mlp)
            for down in getattr(stage, "downsamplers", None) or []:
                macs += _conv_macs(down.conv, grid)
            for up in getattr(stage, "upsamplers", None) or []:
                macs += _conv_macs(up.conv, after or grid)
        return macs

    def notes(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
              merge_crossattn: bool = False, merge_mlp: bool = False,
              **options: Any) -> list[str]:
        by_grid: dict[str, list[str]] = {}
        for bp, (h, w) in zip(blocks, self.block_grids(model, size), strict=True):
            by_grid.setdefault(f"{h}x{w}", []).append(str(bp.index))
        notes = [
            "UNet: tokens out = self-attention length; MaRe restores every position after it",
            "blocks by latent grid: "
            + "; ".join(f"{g}: {','.join(i)}" for g, i in by_grid.items()),
            f"MACs: from the modules' shapes, batch 1, {_PLAN_TEXT_TOKENS} text tokens, all "
            "matmuls and convolutions (as torch's FlopCounterMode counts them)",
        ]
        merging = {f"{h}x{w}" for bp, (h, w) in zip(blocks, self.block_grids(model, size),
                                                    strict=True) if bp.merges}
        notes.append(f"merges: {sum(b.merges for b in blocks)} of {len(blocks)} blocks, at "
                     f"{', '.join(g for g in by_grid if g in merging) or 'no grid'} (default: "
                     "every block; on SDXL both attention levels measured faster merged, "
                     "alone and inside the whole UNet at 1024 px, docs/diffusion.md)")
        if merge_crossattn or merge_mlp:
            notes.append(f"also merged: cross-attention={merge_crossattn}, "
                         f"feed-forward={merge_mlp}")
        return notes

    def build_plan(self, model: nn.Module, r: float, tau: float = 1.0,
                   layers: Sequence[int] | None = None, prop_attn: bool = True,
                   mode: str = "static", **options: Any) -> MergePlan:
        """The plan for a UNet at one latent size (``latent_size``, default the config's
        ``sample_size``): one BlockPlan per transformer block, in forward order;
        ``tokens_in`` is the block's sequence (h*w of its latent grid), ``tokens_out`` the
        length its self-attention runs on (MaRe restores ``tokens_in`` right after)."""
        if mode != "static":
            raise ValueError(
                f"mode={mode!r} is not supported for UNets: MaRe restores positions through "
                "a fixed partition, so only mode='static' exists"
            )
        return super().build_plan(unet_of(model), r, tau, layers, prop_attn, mode, **options)

    def apply(self, model: nn.Module, r: float, *, tau: float, layers: Sequence[int] | None,
              prop_attn: bool, mode: str, merge_crossattn: bool = False,
              merge_mlp: bool = False, latent_size: Size | None = None,
              **options: Any) -> nn.Module:
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
        if options:
            raise TypeError(f"UNets take no options {sorted(options)}")
        unet = unet_of(model)
        plan = self.build_plan(unet, r, tau, layers, prop_attn, mode, latent_size=latent_size,
                               merge_crossattn=merge_crossattn, merge_mlp=merge_mlp)
        infos = transformer_blocks(unet)
        _patch_modules(infos, _settings(len(infos), set(plan.schedule_layers), r, tau,
                                        prop_attn, merge_crossattn, merge_mlp))
        unet._mame_plan = plan
        model._mame_plan = plan
        return model


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


PATCHER = SdUNetPatcher()
# The module's functions, as tools and tests call them.
apply, build_plan = PATCHER.apply, PATCHER.build_plan
