"""MaMe for timm's VisionTransformer family (ViT, DeiT incl. distilled, SigLIP/SigLIP2,
register-token ViTs, no-class-token and average/MAP-pooled variants).

The patch swaps the classes of the model, its blocks and their attention for
thin subclasses, so weights, ``state_dict`` keys and ``isinstance`` checks are
untouched. Token sizes flow between blocks as an explicit argument; the merge
plan lives on the model and is never changed by a forward: each block's token count
comes from the plan's keep schedule.

Copied from timm 1.0 with modifications: the ``forward``, ``forward_features``,
``forward_intermediates`` and ``forward_head`` of ``VisionTransformer`` and the
``forward`` of ``Block`` and ``Attention`` (sizes in, merge after the attention
residual, log-size attention bias, size-weighted pooling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.families.base import Patcher
from mame_export.families.swap import swap
from mame_export.families.tokens import log_size_bias, merge_tokens
from mame_export.ops import step_macs
from mame_export.plan import BlockPlan, BlockSettings, MergePlan, Size

FAMILY = "timm-vit"
SIZE_POOLS = ("avg", "avgmax")  # pools that become size-weighted
PLAIN_POOLS = ("token", "max", "")  # pools merging leaves as they are


def check_supported(model: nn.Module) -> None:
    """ValueError for a ViT the patch cannot run: blocks other than timm's standard Block
    and Attention, an attention pool with a position embedding, another global pool.
    The one structure check of the family (checks.py and the ToMe baseline call it)."""
    from timm.layers import Attention, AttentionPoolLatent
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, Block) or not isinstance(attn, Attention):
            inner = f" with {type(attn).__name__}" if attn is not None else \
                " (no separate attention module)"
            raise ValueError(f"block {i} is {type(blk).__name__}{inner}; MaMe supports timm "
                             "ViTs built from the standard Block and Attention only")
    pool = getattr(model, "global_pool", "")
    ap = model.attn_pool
    if ap is not None and (not isinstance(ap, AttentionPoolLatent) or ap.pos_embed is not None):
        raise ValueError(
            f"attention pool {type(ap).__name__} (global_pool={pool!r}) is not supported; MaMe "
            "supports the MAP head (AttentionPoolLatent without a position embedding)"
        )
    if ap is None and pool not in SIZE_POOLS + PLAIN_POOLS:
        raise ValueError(f"global_pool={pool!r} is not supported (supported: avg, avgmax, "
                         "token, max, map, none)")


class SizedAttention:
    """Mixin for timm ``Attention``: adds a key-size bias and returns the merge metric
    (keys averaged over heads). Shared by MaMe and the ToMe baseline."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        # An explicit copy, not reshape: with a float mask, the export's SDPA decomposition
        # changes the output strides after reshape was traced as a view (torch.export bug).
        out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        out = self.norm(out.view(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), k.mean(dim=1)


def no_extra_args(args: tuple, kwargs: dict, method: str) -> None:
    """Patched ViTs run their own block loop: attention masks and causal flags are refused."""
    if args or any(v is not None and v is not False for v in kwargs.values()):
        raise NotImplementedError(f"{method}-patched ViTs take no attention mask or causal flag")


def pool_with_sizes(
    model: nn.Module, x: torch.Tensor, size: torch.Tensor | None, prop_attn: bool
) -> torch.Tensor:
    """Size-aware pooling: a weighted average for avg/avgmax, the log-size bias for MAP heads."""
    p = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if model.attn_pool is not None:
        bias = log_size_bias(size[:, p:], x.dtype) if size is not None and prop_attn else None
        return model.attn_pool(x[:, p:], attn_mask=bias)
    tokens = x[:, p:]
    if size is None:
        avg = tokens.mean(dim=1)
    else:
        s = size[:, p:].to(x.dtype)
        avg = (tokens * s).sum(dim=1) / s.sum(dim=1)
    if model.global_pool == "avg":
        return avg
    return 0.5 * (tokens.amax(dim=1) + avg)  # avgmax


def head_with_sizes(
    model: nn.Module, x: torch.Tensor, size: torch.Tensor | None, prop_attn: bool,
    pre_logits: bool,
) -> torch.Tensor:
    """timm's forward_head with :func:`pool_with_sizes` in place of its pooling."""
    x = model.head_drop(model.fc_norm(pool_with_sizes(model, x, size, prop_attn)))
    return x if pre_logits else model.head(x)


class _MaMeBlock:
    """Mixin for timm ``Block``: attention, then (maybe) MaMe, then the MLP."""

    _block_settings: BlockSettings

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None, n_keep: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = log_size_bias(size, x.dtype) if self._block_settings.prop_attn else None
        attn_out, metric = self.attn(self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(attn_out))
        if n_keep is not None:
            x, size = self._merge(x, size, metric, n_keep)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size

    def _merge(
        self, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, n_keep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return merge_tokens(self._block_settings, x, size, metric, n_keep)


class _MaMeVisionTransformer:
    """Mixin for timm ``VisionTransformer``: explicit token sizes through blocks and pooling."""

    _mame_plan: MergePlan

    def _mame_schedule(self, num_patches: int) -> tuple[int | None, ...]:
        # The plan's stored schedule at its own patch count: a tuple of ints, so under
        # torch.compile the float r is never traced (a symbolic r would make every token
        # count a symbolic shape). Other counts (dynamic image sizes) follow the plan.
        return self._mame_plan.keep_counts_for(num_patches)

    def _mame_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = None
        schedule = self._mame_schedule(x.shape[1] - self.num_prefix_tokens)
        for blk, n_keep in zip(self.blocks, schedule, strict=True):
            x, size = blk(x, size, n_keep)
        return self.norm(x), size

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        no_extra_args(args, kwargs, "MaMe")
        return self._mame_features(x)[0]

    def forward_intermediates(  # type: ignore[override]
        self, x: torch.Tensor, indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
        return_token_sizes: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` (timm 1.0) over merged tokens, same arguments and
        results, with ``output_fmt='NLC'`` only: merged tokens form no grid. With
        ``return_token_sizes`` the patch tokens' float32 sizes (B, N', 1) per intermediate
        come too: ``image_intermediates_sizes`` in a dict, else a last returned element."""
        from timm.models._features import feature_take_indices

        no_extra_args((), {"attn_mask": attn_mask, "is_causal": is_causal}, "MaMe")
        if output_fmt != "NLC":
            raise ValueError(f"output_fmt={output_fmt!r} is impossible on a MaMe-patched model "
                             "(merged tokens form no grid); pass output_fmt='NLC'")
        take, last = feature_take_indices(len(self.blocks), indices)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        p, size, found = self.num_prefix_tokens, None, []
        blocks = zip(self.blocks, self._mame_schedule(x.shape[1] - p), strict=True)
        for i, (blk, n_keep) in enumerate(list(blocks)[: last + 1] if stop_early else blocks):
            x, size = blk(x, size, n_keep)
            if i in take:
                found.append((self.norm(x) if norm else x, _patch_sizes(x, size, p)))
        return _intermediates(self, x, found, p, return_prefix_tokens, intermediates_only,
                              output_dict, return_token_sizes)

    def forward_head(  # type: ignore[override]
        self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.attn_pool is None and self.global_pool in PLAIN_POOLS:
            return super().forward_head(x, pre_logits=pre_logits)  # type: ignore[misc]
        return head_with_sizes(self, x, size, self._mame_plan.prop_attn, pre_logits)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        no_extra_args(args, kwargs, "MaMe")
        x, size = self._mame_features(x)
        return self.forward_head(x, size=size)


def _patch_sizes(x: torch.Tensor, size: torch.Tensor | None, p: int) -> torch.Tensor:
    if size is None:
        return x.new_ones(x.shape[0], x.shape[1] - p, 1, dtype=torch.float32)
    return size[:, p:]


def _intermediates(model: nn.Module, x: torch.Tensor, found: list, p: int, prefix: bool,
                   only: bool, as_dict: bool, sizes: bool) -> Any:
    """forward_intermediates' results, arranged as timm arranges them."""
    inter = [y[:, p:] for y, _ in found]
    prefixes = [y[:, :p] for y, _ in found] if p else None
    extra = {"image_intermediates_sizes": [s for _, s in found]} if sizes else {}
    if as_dict:
        out: dict[str, Any] = {"image_intermediates": inter, **extra}
        if prefix and prefixes is not None:
            out["image_intermediates_prefix"] = prefixes
        if not only:
            out["image_features"] = model.norm(x)
        return out
    if prefix and prefixes is not None:
        inter = list(zip(inter, prefixes, strict=True))
    if only:
        return (inter, *extra.values()) if extra else inter
    return (model.norm(x), inter, *extra.values())


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every Linear in ``module``."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


class TimmViTPatcher(Patcher):
    """MaMe for timm ``VisionTransformer`` models built from the standard Block and
    Attention; the plan's hooks read the modules' shapes (no forward)."""

    family = FAMILY
    schedules = True

    def matches(self, model: nn.Module) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # pragma: no cover - timm is a dependency
            return False
        return isinstance(model, VisionTransformer)

    def num_patches(self, model: nn.Module, size: Size | None = None) -> int:
        if size is None:
            return int(model.patch_embed.num_patches)
        h, w = (size, size) if isinstance(size, int) else size
        ph, pw = model.patch_embed.patch_size
        return (h // ph) * (w // pw)

    def depth(self, model: nn.Module) -> int:
        return len(model.blocks)

    def protected(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def input_step(self, model: nn.Module) -> int:
        return math.lcm(*model.patch_embed.patch_size)

    def macs(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, **options: Any) -> int:
        """Analytic MACs of matrix products (linear layers, attention, merge) at batch 1."""
        p = model.num_prefix_tokens
        n_patches = blocks[0].tokens_in - p
        macs = model.patch_embed.proj.weight.numel() * n_patches
        for blk, bp in zip(model.blocks, blocks, strict=True):
            attn, n = blk.attn, bp.tokens_in
            macs += _linear_macs(attn) * n + 2 * n * n * attn.attn_dim
            macs += _linear_macs(blk.mlp) * bp.tokens_out
            if merge_cost and bp.merges:
                macs += step_macs(n - p, bp.tokens_out - p, model.embed_dim, attn.head_dim)
        n_final = blocks[-1].tokens_out
        if model.attn_pool is not None:
            ap = model.attn_pool
            n_pool = n_final if model.pool_include_prefix else n_final - p
            macs += ap.kv.weight.numel() * n_pool + _linear_macs(ap.q) * ap.latent_len
            macs += 2 * ap.latent_len * n_pool * ap.kv.weight.shape[0] // 2
            head_mlp = _linear_macs(ap.mlp) if ap.mlp is not None else 0
            macs += (_linear_macs(ap.proj) + head_mlp) * ap.latent_len
        macs += _linear_macs(model.head) + sum(
            _linear_macs(m) for name, m in model.named_children() if name == "head_dist"
        )
        return int(macs)

    def apply(self, model: nn.Module, r: float, *, tau: float, layers: Sequence[int] | None,
              prop_attn: bool, mode: str, **options: Any) -> nn.Module:
        """Patch a timm VisionTransformer in place (idempotent: re-applying replaces the
        plan). The plan is for the model's own input size. ``schedule`` (explicit keep
        counts per block) and ``similarity`` come from a plan file (``mame-export tune``)."""
        plan_options = {k: options.pop(k) for k in ("schedule", "similarity") if k in options}
        if options:
            raise TypeError(f"timm ViTs take no options {sorted(options)}")
        check_supported(model)
        plan = self.build_plan(model, r, tau, layers, prop_attn, mode, **plan_options)
        p = plan.num_protected
        for blk, bp in zip(model.blocks, plan.blocks, strict=True):
            keep = (bp.tokens_out - p) / (bp.tokens_in - p)
            swap(blk, _MaMeBlock, settings=BlockSettings(
                merges=bp.merges, tau=float(tau), prop_attn=prop_attn, mode=mode,
                protected=p, keep_ratio=keep, similarity=plan.similarity))
            swap(blk.attn, SizedAttention)
        swap(model, _MaMeVisionTransformer)
        model._mame_plan = plan
        return model


PATCHER = TimmViTPatcher()
# The module's functions, as tools and tests call them.
matches, apply, build_plan = PATCHER.matches, PATCHER.apply, PATCHER.build_plan
