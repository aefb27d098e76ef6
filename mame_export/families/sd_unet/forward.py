"""MaMe + MaRe for diffusers' UNet2DConditionModel (Stable Diffusion 1.x / 2.x layouts).

In every selected ``BasicTransformerBlock`` the self-attention runs on a
shortened sequence: ``norm1 -> MaMe -> attn1 -> MaRe -> residual``. The merge
metric is the normalised hidden states; the partition is a constant 2-D grid
(:func:`mame_export.ops.grid.grid_partition`) fixed by the block's latent
grid ``(h, w)`` and ``r``; MaRe restores every position before the residual
add, so the rest of the UNet sees full-length sequences. Merging around the
cross-attention and the feed-forward (with the same weights) is optional and
off by default, as in ToMe-SD.

The merge plan and ``apply`` are in :mod:`mame_export.families.sd_unet.patch`.
The patch swaps the classes of each ``Transformer2DModel`` and its blocks for
thin subclasses, so weights and ``state_dict`` keys are untouched and
:func:`remove` undoes it. A patched ``Transformer2DModel`` hands its grid
``(h, w)`` to its blocks through ``cross_attention_kwargs`` (a plain tuple of
ints, popped before the attention processors see it): no state is written
during a forward, and a traced graph depends only on the input shape and the
stored settings. Only static mode exists for UNets: MaRe needs a fixed
partition to put every position back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.families.swap import restore, swap
from mame_export.ops import mame_merge, mame_weights, mare_restore_partition
from mame_export.ops.grid import grid_partition
from mame_export.plan import BlockSettings

FAMILY = "diffusers-unet"

# Key under which a patched Transformer2DModel passes its (h, w) to its blocks.
_GRID_KEY = "_mame_grid"


def _is_unet(model: object) -> bool:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return False
    return isinstance(model, UNet2DConditionModel)


def matches(model: nn.Module) -> bool:
    """A UNet2DConditionModel, or a module wrapping one as ``.unet`` (an export wrapper)."""
    return _is_unet(model) or _is_unet(getattr(model, "unet", None))


def unet_of(model: nn.Module) -> nn.Module:
    """The UNet2DConditionModel itself, unwrapping an export wrapper."""
    return model if _is_unet(model) else model.unet


def tokens_kept(n: int, r: float) -> int:
    """Tokens the self-attention sees when ``n`` tokens enter at ratio ``r``."""
    return max(1, min(n, round(n * (1.0 - r))))


# --------------------------------------------------------------------------- forward


class _MaMeTransformer2D:
    """Mixin for ``Transformer2DModel``: passes its latent grid (h, w) to its blocks."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        grid = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
        kwargs = {**(cross_attention_kwargs or {}), _GRID_KEY: grid}
        return super().forward(  # type: ignore[misc]
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            added_cond_kwargs=added_cond_kwargs,
            class_labels=class_labels,
            cross_attention_kwargs=kwargs,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=return_dict,
        )


class _MaMeBasicTransformerBlock:
    """Mixin for ``BasicTransformerBlock``: norm1 -> MaMe -> attn1 -> MaRe -> residual."""

    _block_settings: BlockSettings

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kwargs = dict(cross_attention_kwargs or {})
        grid = kwargs.pop(_GRID_KEY, None)
        cfg = self._block_settings
        n = int(hidden_states.shape[1])  # a plain int under TorchScript tracing too
        n_keep = tokens_kept(n, cfg.r) if cfg.merges else n
        if n_keep == n:
            return super().forward(  # type: ignore[misc]
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                timestep=timestep,
                cross_attention_kwargs=kwargs or None,
                class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs,
            )
        if grid is None or grid[0] * grid[1] != n:
            raise RuntimeError(
                f"MaMe block got {n} tokens but no matching latent grid ({grid}); call it "
                "through its patched Transformer2DModel"
            )
        if attention_mask is not None or "gligen" in kwargs:
            raise NotImplementedError(
                "MaMe-patched UNet blocks take no self-attention mask and no GLIGEN inputs"
            )
        return self._mame_forward(
            hidden_states, grid, n_keep, encoder_hidden_states, encoder_attention_mask, kwargs
        )

    def _mame_forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        n_keep: int,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        cfg = self._block_settings
        part = grid_partition(grid[0], grid[1], n_keep, x.device)
        ones = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)

        norm = self.norm1(x)
        weights = mame_weights(
            norm.index_select(1, part.targets), norm.index_select(1, part.sources), cfg.tau
        )
        merged, sizes = mame_merge(norm, ones, weights, part)
        bias = sizes.log().to(x.dtype).transpose(1, 2)[:, None] if cfg.prop_attn else None
        out = _self_attention(self.attn1, merged, bias)
        x = mare_restore_partition(out, weights, part) + x

        if self.attn2 is not None:
            norm = self.norm2(x)
            if cfg.merge_crossattn:
                norm = mame_merge(norm, ones, weights, part)[0]
            out = self.attn2(
                norm, encoder_hidden_states=context, attention_mask=context_mask, **kwargs
            )
            x = (mare_restore_partition(out, weights, part) if cfg.merge_crossattn else out) + x

        norm = self.norm3(x)
        if cfg.merge_mlp:
            norm = mame_merge(norm, ones, weights, part)[0]
        if self._chunk_size is not None:
            from diffusers.models.attention import _chunked_feed_forward

            out = _chunked_feed_forward(self.ff, norm, self._chunk_dim, self._chunk_size)
        else:
            out = self.ff(norm)
        return (mare_restore_partition(out, weights, part) if cfg.merge_mlp else out) + x


def _self_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers ``Attention`` (self, SD 1.x/2.x settings) with an additive key bias (B,1,1,N)."""
    B, N, _ = x.shape
    q, k, v = (proj(x).view(B, N, attn.heads, -1).transpose(1, 2)
               for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = out.transpose(1, 2)
    if torch.compiler.is_exporting():
        # The traced SDPA-with-mask output layout differs from its decomposition's
        # (run by the ONNX exporter); a real copy keeps the reshape valid for both.
        out = out.clone(memory_format=torch.contiguous_format)
    out = out.reshape(B, N, -1)
    return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class TransformerBlockInfo:
    """One BasicTransformerBlock of a UNet, in forward order."""

    index: int
    name: str
    parent_name: str
    module: nn.Module
    parent: nn.Module


def transformer_blocks(unet: nn.Module) -> list[TransformerBlockInfo]:
    """The UNet's transformer blocks in forward order (down, mid, up); checks support."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    stages: list[tuple[str, nn.Module]] = [
        (f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)
    ]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block))
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]

    found: list[TransformerBlockInfo] = []
    for stage_name, stage in stages:
        for j, t2d in enumerate(getattr(stage, "attentions", None) or []):
            parent_name = f"{stage_name}.attentions.{j}"
            if not isinstance(t2d, Transformer2DModel) or not t2d.is_input_continuous:
                raise ValueError(
                    f"{parent_name} is {type(t2d).__name__}; MaMe supports UNets whose "
                    "attentions are continuous-input Transformer2DModel (SD 1.x/2.x)"
                )
            for k, blk in enumerate(t2d.transformer_blocks):
                name = f"{parent_name}.transformer_blocks.{k}"
                _check_block(name, blk, BasicTransformerBlock)
                found.append(TransformerBlockInfo(len(found), name, parent_name, blk, t2d))
    if not found:
        raise ValueError("this UNet has no transformer blocks: nothing for MaMe to patch")
    return found


def _check_block(name: str, blk: nn.Module, base: type) -> None:
    if not isinstance(blk, base):
        raise ValueError(f"{name} is {type(blk).__name__}; MaMe supports BasicTransformerBlock")
    if blk.norm_type != "layer_norm" or blk.pos_embed is not None:
        raise ValueError(
            f"{name}: norm_type={blk.norm_type!r}, positional embeddings="
            f"{blk.positional_embeddings!r}; MaMe supports the SD 1.x/2.x block (layer_norm, none)"
        )
    if blk.only_cross_attention or hasattr(blk, "fuser"):
        raise ValueError(f"{name}: only-cross-attention and GLIGEN blocks are not supported")
    a = blk.attn1
    plain = (
        not a.is_cross_attention
        and a.spatial_norm is None
        and a.group_norm is None
        and a.norm_q is None
        and a.norm_k is None
        and not a.residual_connection
        and a.rescale_output_factor == 1.0
    )
    if not plain:
        raise ValueError(
            f"{name}.attn1 uses norms, a residual or rescaling inside the attention; MaMe "
            "supports the plain SD 1.x/2.x self-attention"
        )


def _patch_modules(infos: list[TransformerBlockInfo], settings: list[BlockSettings]) -> None:
    for info, s in zip(infos, settings, strict=True):
        swap(info.parent, _MaMeTransformer2D)
        swap(info.module, _MaMeBasicTransformerBlock, settings=s)


def remove(unet: nn.Module) -> nn.Module:
    """Undo :func:`apply` in place (no-op on an unpatched UNet) and return it."""
    return restore(unet, "_mame_plan")
