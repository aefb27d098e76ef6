"""MaMe + MaRe for diffusers' transformer denoisers (PixArt-alpha/Sigma, SD3): the merge
plan and ``apply``. The forward it installs is in :mod:`mame_export.families.dit.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from mame_export.families.base import Patcher
from mame_export.families.dit.configs import KINDS, VAE_FACTOR
from mame_export.families.dit.forward import (
    FAMILY,
    check_blocks,
    kind_of,
    patch_modules,
    remove,
    tokens_kept,
)
from mame_export.families.dit.model import denoiser_of
from mame_export.plan import BlockPlan, BlockSettings, MergePlan, Size

__all__ = ["PATCHER", "DiTPatcher", "apply", "build_plan", "remove"]

MERGE_MLP = True  # default: the MLP runs on the merged tokens too (measured: docs/diffusion.md)


def _linear_macs(module: Any, tokens: int) -> int:
    if module is None:
        return 0
    return tokens * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _pair(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


class DiTPatcher(Patcher):
    """MaMe + MaRe for PixArtTransformer2DModel and SD3Transformer2DModel (or an export
    wrapper holding one as ``.denoiser``): one plan entry per transformer block; the
    image tokens merge before each block's self-attention (and MLP) and are restored
    after it. ``img_size`` is in pixels: the latent is ``img_size / 8``."""

    family = FAMILY
    restores = True

    def matches(self, model: nn.Module) -> bool:
        return kind_of(denoiser_of(model)) is not None

    def _model(self, model: nn.Module) -> tuple[Any, str]:
        m = denoiser_of(model)
        kind = kind_of(m)
        if kind is None:
            raise TypeError(f"{type(m).__name__} is not a PixArt or SD3 transformer")
        return m, kind

    def grid(self, model: nn.Module, size: Size | None = None) -> tuple[int, int]:
        """The patch grid (h, w) of the image tokens at ``size`` pixels."""
        m, _ = self._model(model)
        p = int(m.config.patch_size)
        h, w = _pair(size) if size is not None else (m.config.sample_size * VAE_FACTOR,) * 2
        return h // VAE_FACTOR // p, w // VAE_FACTOR // p

    def num_patches(self, model: nn.Module, size: Size | None = None) -> int:
        h, w = self.grid(model, size)
        return h * w

    def depth(self, model: nn.Module) -> int:
        m, kind = self._model(model)
        return len(check_blocks(m, kind))

    def protected(self, model: nn.Module) -> int:
        return 0  # text tokens are not in the image sequence: they never merge

    def input_step(self, model: nn.Module) -> int:
        m, _ = self._model(model)
        return VAE_FACTOR * int(m.config.patch_size)

    def default_layers(self, depth: int) -> list[int]:
        return list(range(depth))  # every block: MaRe restores after each

    def keep_counts(self, tokens: Sequence[int], r: float,
                    layers: Sequence[int]) -> tuple[int | None, ...]:
        """Each selected block's attention runs on ``round(n * (1 - r))`` image tokens."""
        chosen = set(layers)
        kept = [tokens_kept(n, r) if i in chosen else n for i, n in enumerate(tokens)]
        return tuple(k if k < n else None for k, n in zip(kept, tokens, strict=True))

    def macs(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, merge_mlp: bool = MERGE_MLP, text_tokens: int | None = None,
             **options: Any) -> int:
        """Every matmul and convolution of one batch-1 forward (what torch's
        FlopCounterMode counts), from the modules' shapes; MaMe/MaRe products included."""
        m, kind = self._model(model)
        n = self.num_patches(model, size)
        t = KINDS[kind].text_tokens if text_tokens is None else text_tokens
        macs = n * m.pos_embed.proj.weight.numel() + _linear_macs(m.proj_out, n)
        if kind == "pixart":
            macs += _linear_macs(m.caption_projection, t) + _linear_macs(m.adaln_single, 1)
        else:
            macs += (_linear_macs(m.context_embedder, t) + _linear_macs(m.time_text_embed, 1)
                     + _linear_macs(m.norm_out, 1))
        for blk, bp in zip(m.transformer_blocks, blocks, strict=True):
            k = bp.tokens_out
            f = k if merge_mlp and bp.merges else n
            macs += _linear_macs(blk.ff, f)
            if kind == "pixart":
                a1, a2 = blk.attn1, blk.attn2
                macs += _linear_macs(a1, k) + 2 * k * k * a1.inner_dim
                macs += (_linear_macs(a2.to_q, n) + _linear_macs(a2.to_out, n)
                         + _linear_macs(a2.to_k, t) + _linear_macs(a2.to_v, t)
                         + 2 * n * t * a2.inner_dim)
                c = blk.norm1.normalized_shape[0]
            else:
                a = blk.attn
                own = [a.to_q, a.to_k, a.to_v, a.to_out]
                text = [a.add_q_proj, a.add_k_proj, a.add_v_proj,
                        getattr(a, "to_add_out", None)]
                macs += sum(_linear_macs(p, k) for p in own)
                macs += sum(_linear_macs(p, t) for p in text)
                macs += 2 * (k + t) * (k + t) * a.inner_dim
                macs += _linear_macs(blk.norm1, 1) + _linear_macs(blk.norm1_context, 1)
                if blk.ff_context is not None:
                    macs += _linear_macs(blk.ff_context, t)
                c = a.inner_dim
            if merge_cost and bp.merges:
                pairs = k * (n - k)
                macs += pairs * (3 * c + 1) + pairs * (2 * c + 1) * merge_mlp
        return macs

    def notes(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
              merge_mlp: bool = MERGE_MLP, text_tokens: int | None = None,
              **options: Any) -> list[str]:
        m, kind = self._model(model)
        h, w = self.grid(model, size)
        t = KINDS[kind].text_tokens if text_tokens is None else text_tokens
        merged = [str(b.index) for b in blocks if b.merges]
        where = (f"blocks {merged[0]}-{merged[-1]}" if merged and len(merged) == int(merged[-1])
                 - int(merged[0]) + 1 else ("blocks " + ",".join(merged) if merged else "none"))
        notes = [
            f"{KINDS[kind].class_name}: image tokens on a {h}x{w} patch grid (latent / "
            f"{m.config.patch_size}); tokens out = what the self-attention"
            f"{' and the MLP' if merge_mlp else ''} run on; MaRe restores every position",
            f"merges: {where} (grid partition; the positional embedding and AdaLN act on "
            "every restored token)",
            f"MACs: from the modules' shapes, batch 1, {t} text tokens",
        ]
        if kind == "sd3":
            notes.append(f"SD3: the {t} text tokens join every joint attention unmerged")
        return notes

    def build_plan(self, model: nn.Module, r: float, tau: float = 1.0,
                   layers: Sequence[int] | None = None, prop_attn: bool = True,
                   mode: str = "static", **options: Any) -> MergePlan:
        """The plan at one input size (``img_size`` pixels, default the config's)."""
        if mode != "static":
            raise ValueError(f"mode={mode!r} is not supported for diffusion transformers: "
                             "MaRe restores positions through a fixed partition, so only "
                             "mode='static' exists")
        return super().build_plan(denoiser_of(model), r, tau, layers, prop_attn, mode,
                                  **options)

    def apply(self, model: nn.Module, r: float, *, tau: float, layers: Sequence[int] | None,
              prop_attn: bool, mode: str, merge_mlp: bool = MERGE_MLP,
              img_size: Size | None = None, text_tokens: int | None = None,
              **options: Any) -> nn.Module:
        """Patch a PixArt or SD3 transformer (or its export wrapper) in place.

        Args:
            r: fraction of each selected block's image tokens merged away before its
                self-attention (no compounding: MaRe restores them right after).
            layers: block indices; default every block.
            merge_mlp: run the MLP on the merged tokens too (default True).
            img_size: the image side in pixels the plan describes (latent = img/8).
            text_tokens: caption tokens the plan's MACs count (default the model's).
        """
        if options:
            raise TypeError(f"diffusion transformers take no options {sorted(options)}")
        m, kind = self._model(model)
        plan = self.build_plan(m, r, tau, layers, prop_attn, mode, img_size=img_size,
                               merge_mlp=merge_mlp, text_tokens=text_tokens)
        chosen = set(plan.schedule_layers)
        settings = [BlockSettings(merges=i in chosen and r > 0, r=float(r), tau=float(tau),
                                  prop_attn=bool(prop_attn), merge_mlp=bool(merge_mlp))
                    for i in range(len(plan.blocks))]
        patch_modules(m, kind, settings)
        m._mame_plan = plan
        model._mame_plan = plan
        return model


PATCHER = DiTPatcher()
apply, build_plan = PATCHER.apply, PATCHER.build_plan
_ = remove  # re-exported for callers: patch.remove undoes apply
