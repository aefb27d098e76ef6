"""The patched forward of transformer denoisers: in every selected block,
``normalise (AdaLN) -> MaMe -> self-attention (and MLP) -> MaRe -> gated residual``.

The image tokens of a block form the latent's patch grid ``(h, w)``; the merge uses the
constant 2-D grid partition (:func:`mame_export.ops.grid.grid_partition`), so the graph
holds no sort, gather or scatter on computed indices. MaRe puts every position back
before the residual add: the positional embedding added at the patch embedding and the
per-block AdaLN(-single) shift, scale and gate act on every token, as unpatched. SD3's
text tokens join the joint attention whole (never merged); the attention's key bias is
``log(size)`` for merged image tokens and 0 for text tokens.

A patched top-level model hands its grid to its blocks through the attention kwargs
(``cross_attention_kwargs`` for PixArt, ``joint_attention_kwargs`` for SD3), popped before
any attention processor sees them; blocks that do not merge run diffusers' own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.families.sd_unet.forward import _self_attention
from mame_export.families.swap import restore, swap
from mame_export.ops import mame_merge, mame_weights, mare_restore_partition
from mame_export.ops.grid import grid_partition
from mame_export.plan import BlockSettings

FAMILY = "dit"
_GRID_KEY = "_mame_grid"


def tokens_kept(n: int, r: float) -> int:
    """Image tokens the attention sees when ``n`` enter at ratio ``r``."""
    return max(1, min(n, round(n * (1.0 - r))))


def _grid_of(model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    p = int(model.config.patch_size)
    return int(hidden_states.shape[-2]) // p, int(hidden_states.shape[-1]) // p


def grid_kwargs(model: nn.Module, grid: tuple[int, int]) -> dict[str, Any] | None:
    """The attention kwargs that carry ``grid`` to a patched model's blocks (None when
    ``model`` is not patched: diffusers' blocks take no such key)."""
    return {_GRID_KEY: grid} if isinstance(model, (_MaMePixArt, _MaMeSD3)) else None


def _with_grid(kwargs: dict[str, Any], key: str, grid: tuple[int, int]) -> dict[str, Any]:
    return {**kwargs, key: {**(kwargs.get(key) or {}), _GRID_KEY: grid}}


class _MaMePixArt:
    """Mixin for ``PixArtTransformer2DModel``: passes the patch grid to its blocks."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs = _with_grid(kwargs, "cross_attention_kwargs", _grid_of(self, hidden_states))
        return super().forward(hidden_states, **kwargs)  # type: ignore[misc]


class _MaMeSD3:
    """Mixin for ``SD3Transformer2DModel``: passes the patch grid to its blocks."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs = _with_grid(kwargs, "joint_attention_kwargs", _grid_of(self, hidden_states))
        return super().forward(hidden_states, **kwargs)  # type: ignore[misc]


def _partition_and_weights(norm: torch.Tensor, grid: Any, n_keep: int,
                           tau: float) -> tuple[Any, torch.Tensor]:
    n = int(norm.shape[1])
    if grid is None or grid[0] * grid[1] != n:
        raise RuntimeError(f"MaMe block got {n} image tokens but no matching patch grid "
                           f"({grid}); call it through its patched model")
    part = grid_partition(grid[0], grid[1], n_keep, norm.device)
    w = mame_weights(norm.index_select(1, part.targets), norm.index_select(1, part.sources),
                     tau)
    return part, w


def _merged_ff(block: nn.Module, norm: torch.Tensor, ones: torch.Tensor, w: torch.Tensor,
               part: Any, merge: bool) -> torch.Tensor:
    """The feed-forward on all tokens, or on the merged ones and restored (``merge``)."""
    if not merge:
        return block.ff(norm)
    return mare_restore_partition(block.ff(mame_merge(norm, ones, w, part)[0]), w, part)


class _MaMePixArtBlock:
    """Mixin for PixArt's ``BasicTransformerBlock`` (AdaLN-single)."""

    _block_settings: BlockSettings

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                class_labels: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = dict(cross_attention_kwargs or {})
        grid = kwargs.pop(_GRID_KEY, None)
        cfg = self._block_settings
        x = hidden_states
        n = int(x.shape[1])
        n_keep = tokens_kept(n, cfg.r) if cfg.merges else n
        if n_keep == n:
            return super().forward(  # type: ignore[misc]
                x, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                cross_attention_kwargs=kwargs or None, class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs)
        if attention_mask is not None:
            raise NotImplementedError("MaMe-patched PixArt blocks take no self-attention mask")
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(b, 6, -1)).chunk(6, dim=1)
        norm = self.norm1(x) * (1 + scale_msa) + shift_msa
        part, w = _partition_and_weights(norm, grid, n_keep, cfg.tau)
        ones = x.new_ones(b, n, 1, dtype=torch.float32)
        merged, sizes = mame_merge(norm, ones, w, part)
        bias = sizes.log().to(x.dtype).transpose(1, 2)[:, None] if cfg.prop_attn else None
        x = gate_msa * mare_restore_partition(_self_attention(self.attn1, merged, bias), w,
                                              part) + x
        if self.attn2 is not None:  # PixArt: the cross-attention reads x itself (no norm)
            x = self.attn2(x, encoder_hidden_states=encoder_hidden_states,
                           attention_mask=encoder_attention_mask, **kwargs) + x
        norm = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * _merged_ff(self, norm, ones, w, part, cfg.merge_mlp) + x


def _joint_attention(attn: nn.Module, x: torch.Tensor, c: torch.Tensor,
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0) over the merged image
    tokens ``x`` and the whole text ``c``, with an additive key bias (B, 1, 1, Nx + Nc)."""
    b, nx, _ = x.shape

    def heads(t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        t = t.view(b, t.shape[1], attn.heads, -1).transpose(1, 2)
        return norm(t) if norm is not None else t

    q = torch.cat([heads(attn.to_q(x), attn.norm_q), heads(attn.add_q_proj(c), attn.norm_added_q)],
                  dim=2)
    k = torch.cat([heads(attn.to_k(x), attn.norm_k), heads(attn.add_k_proj(c), attn.norm_added_k)],
                  dim=2)
    v = torch.cat([heads(attn.to_v(x), None), heads(attn.add_v_proj(c), None)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = out.transpose(1, 2)
    if torch.compiler.is_exporting():
        # As in the UNet patch: a real copy keeps the reshape valid for the exporter's
        # decomposition of SDPA with a mask.
        out = out.clone(memory_format=torch.contiguous_format)
    out = out.reshape(b, out.shape[1], -1)
    img, txt = out[:, :nx], out[:, nx:]
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return attn.to_out[1](attn.to_out[0](img)), txt


class _MaMeJointBlock:
    """Mixin for SD3's ``JointTransformerBlock``: only the image tokens merge."""

    _block_settings: BlockSettings

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, joint_attention_kwargs: dict[str, Any] | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        kwargs = dict(joint_attention_kwargs or {})
        grid = kwargs.pop(_GRID_KEY, None)
        cfg = self._block_settings
        x, c = hidden_states, encoder_hidden_states
        n = int(x.shape[1])
        n_keep = tokens_kept(n, cfg.r) if cfg.merges else n
        if n_keep == n:
            return super().forward(x, c, temb, kwargs or None)  # type: ignore[misc]
        if kwargs:
            raise NotImplementedError(f"MaMe-patched SD3 blocks take no attention kwargs "
                                      f"{sorted(kwargs)}")
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(c, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                c, emb=temb)
        part, w = _partition_and_weights(norm, grid, n_keep, cfg.tau)
        ones = x.new_ones(x.shape[0], n, 1, dtype=torch.float32)
        merged, sizes = mame_merge(norm, ones, w, part)
        bias = None
        if cfg.prop_attn:  # merged image tokens weigh by their size; text tokens by 1
            text = sizes.new_ones(sizes.shape[0], c.shape[1], 1)
            bias = torch.cat([sizes, text], dim=1).log().to(x.dtype).transpose(1, 2)[:, None]
        attn_img, attn_txt = _joint_attention(self.attn, merged, norm_c, bias)
        x = x + gate_msa.unsqueeze(1) * mare_restore_partition(attn_img, w, part)
        norm = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * _merged_ff(self, norm, ones, w, part, cfg.merge_mlp)
        if self.context_pre_only:
            return None, x
        c = c + c_gate_msa.unsqueeze(1) * attn_txt
        norm_c = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return c + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_c), x


# --------------------------------------------------------------------------- structure


def kind_of(model: nn.Module) -> str | None:
    """"pixart" or "sd3" for a model this family patches, else None."""
    try:
        from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
    except ImportError:
        return None
    if isinstance(model, PixArtTransformer2DModel):
        return "pixart"
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    return None


def _plain_attention(a: nn.Module) -> bool:
    return (a.spatial_norm is None and a.group_norm is None and not a.residual_connection
            and a.rescale_output_factor == 1.0)


def check_blocks(model: nn.Module, kind: str) -> list[nn.Module]:
    """The transformer blocks of ``model``; ValueError naming the first one MaMe does not
    support (the layouts of PixArt-alpha/Sigma and SD3-medium are)."""
    blocks = list(model.transformer_blocks)
    for i, blk in enumerate(blocks):
        name = f"transformer_blocks.{i}"
        if kind == "pixart":
            ok = (blk.norm_type == "ada_norm_single" and blk.pos_embed is None
                  and not blk.only_cross_attention and _plain_attention(blk.attn1)
                  and blk.attn1.norm_q is None and blk.attn1.norm_k is None)
        else:
            ok = not blk.use_dual_attention and _plain_attention(blk.attn)
        if not ok:
            raise ValueError(f"{name} is not a PixArt-alpha/Sigma or SD3-medium block (norm, "
                             "dual attention or attention options MaMe does not support)")
    if not blocks:
        raise ValueError("this transformer has no blocks: nothing for MaMe to patch")
    return blocks


def patch_modules(model: nn.Module, kind: str, settings: list[BlockSettings]) -> None:
    swap(model, _MaMePixArt if kind == "pixart" else _MaMeSD3)
    mixin = _MaMePixArtBlock if kind == "pixart" else _MaMeJointBlock
    for blk, s in zip(check_blocks(model, kind), settings, strict=True):
        swap(blk, mixin, settings=s)


def remove(model: nn.Module) -> nn.Module:
    """Undo the patch in place (no-op on an unpatched model) and return it."""
    return restore(model, "_mame_plan")
