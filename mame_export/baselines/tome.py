"""ToMe, bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster",
ICLR 2023), written from the paper's description as the baseline MaMe is compared with.

One step, on the mergeable tokens of a block (after the attention residual):

1. Alternate the tokens into two sets, A (even positions) and B (odd positions).
2. Similarity: cosine of the attention keys averaged over heads, A x B.
3. Each A token's best B match (max over B), then sort A by that score (argsort).
4. The top-r A tokens are merged into their matches: a size-weighted average
   written with ``scatter_reduce``; the other A tokens and all of B stay.
5. Proportional attention adds ``log(size)`` to every key's attention logit.

Protected tokens (class, distillation, registers) are never merged and stay in
front. Merge pairs depend on the data (argsort, gather, scatter), which is the
contrast with MaMe: shapes are static, but the indices are computed.

The patch for timm ``VisionTransformer`` swaps classes (as the MaMe patch does).
State is explicit: each block stores how many tokens it removes, the model
stores a :class:`~mame_export.plan.MergePlan` with family ``"tome"``; a forward
reads them and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.families.swap import swap
from mame_export.families.timm_vit.patch import (
    PATCHER,
    PLAIN_POOLS,
    SizedAttention,
    check_supported,
    head_with_sizes,
    no_extra_args,
)
from mame_export.families.tokens import log_size_bias, merge_unprotected
from mame_export.plan import BlockPlan, BlockSettings, MergePlan, check_ratio

FAMILY = "tome"
_PREFIX = "ToMe"
_EPS = 1e-6


@dataclass(frozen=True)
class Matching:
    """Which A tokens merge into which B tokens; index tensors of shape (B, n, 1).

    ``unmerged`` and ``sources`` index into A (the even positions),
    ``destinations`` into B (the odd positions).
    """

    unmerged: torch.Tensor
    sources: torch.Tensor
    destinations: torch.Tensor

    @property
    def r(self) -> int:
        return int(self.sources.shape[1])


def max_tokens_removed(n: int) -> int:
    """ToMe removes at most half of ``n`` mergeable tokens in one step (every A token
    needs a B partner); the paper's code uses the same bound."""
    return n // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """Match the ``r`` A tokens most similar to some B token (ToMe's step 1-4).

    ``metric`` (B, N, C): merge metric of the mergeable tokens (keys averaged
    over heads). Scores are computed in float32, so fp16 models match as fp32 ones.
    """
    n = metric.shape[1]
    if not 0 <= r <= max_tokens_removed(n):
        raise ValueError(f"ToMe can remove 0..{max_tokens_removed(n)} of {n} tokens; got r={r}")
    k = F.normalize(metric.float(), dim=-1, eps=_EPS)
    a, b = k[:, ::2], k[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
    best_score, best_b = scores.max(dim=-1)  # each A token's best B match
    order = best_score.argsort(dim=-1, descending=True).unsqueeze(-1)  # (B, Na, 1)
    sources = order[:, :r]
    return Matching(
        unmerged=order[:, r:],
        sources=sources,
        destinations=best_b.unsqueeze(-1).gather(dim=1, index=sources),
    )


def _merge_sum(m: Matching, t: torch.Tensor) -> torch.Tensor:
    """Sum each merged A token into its B match; output: unmerged A tokens, then B."""
    a, b = t[:, ::2], t[:, 1::2]
    bsz, _, c = a.shape
    unmerged = a.gather(dim=1, index=m.unmerged.expand(bsz, -1, c))
    src = a.gather(dim=1, index=m.sources.expand(bsz, -1, c))
    b = b.scatter_reduce(1, m.destinations.expand(bsz, -1, c), src, reduce="sum")
    return torch.cat([unmerged, b], dim=1)


def merge_wavg(
    m: Matching, x: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge (ToMe's ``merge_wavg``): returns (x, sizes).

    ``x`` (B, N, C), ``sizes`` (B, N, 1) patches per token; sizes are summed in
    float32 and the total size is preserved.
    """
    s = sizes.float()
    new_sizes = _merge_sum(m, s)
    summed = _merge_sum(m, x * s.to(x.dtype))
    return summed / new_sizes.to(x.dtype), new_sizes


class _ToMeBlock:
    """Mixin for timm ``Block``: attention, then ToMe (if this block merges), then the MLP."""

    _block_settings: BlockSettings  # .remove: tokens this block merges away

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = log_size_bias(size, x.dtype) if self._block_settings.prop_attn else None
        attn_out, metric = self.attn(self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(attn_out))
        if self._block_settings.remove > 0:
            x, size = self._merge(x, size, metric)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size

    def _merge(
        self, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def step(
            x_m: torch.Tensor, k_m: torch.Tensor, s_m: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return merge_wavg(bipartite_soft_matching(k_m, s.remove), x_m, s_m)

        s = self._block_settings
        return merge_unprotected(x, size, metric, s.protected, step)


class _ToMeVisionTransformer:
    """Mixin for timm ``VisionTransformer``: token sizes flow through blocks and pooling."""

    _tome_plan: MergePlan

    def _tome_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = None
        for blk in self.blocks:
            x, size = blk(x, size)
        return self.norm(x), size

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        no_extra_args(args, kwargs, "ToMe")
        return self._tome_features(x)[0]

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("forward_intermediates is not supported on a ToMe-patched model")

    def forward_head(  # type: ignore[override]
        self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.attn_pool is None and self.global_pool in PLAIN_POOLS:
            return super().forward_head(x, pre_logits=pre_logits)  # type: ignore[misc]
        return head_with_sizes(self, x, size, self._tome_plan.prop_attn, pre_logits)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        no_extra_args(args, kwargs, "ToMe")
        x, size = self._tome_features(x)
        return self.forward_head(x, size=size)


def _removal_schedule(
    model: nn.Module,
    r: float | None,
    r_tokens: int | Sequence[int] | None,
    layers: list[int] | None,
) -> list[BlockPlan]:
    """Tokens in/out per block: from MaMe's schedule at ``r``, or ToMe's own ``r_tokens``."""
    depth, p = len(model.blocks), model.num_prefix_tokens
    if (r is None) == (r_tokens is None):
        raise ValueError("give exactly one of r (fraction, MaMe's schedule) or r_tokens")
    if r is not None:
        check_ratio(r)
        mame = PATCHER.build_plan(model, r, 0.0, layers, True, "static")
        for b in mame.blocks:
            n_in, removed = b.tokens_in - p, b.tokens_in - b.tokens_out
            if removed > max_tokens_removed(n_in):
                raise ValueError(
                    f"ToMe removes at most half of the tokens in one block; the MaMe plan at "
                    f"r={r:g} removes {removed} of {n_in} in block {b.index} "
                    "(use more merge layers or a smaller r)"
                )
        return list(mame.blocks)
    if isinstance(r_tokens, int):
        merge_set = set(range(depth) if layers is None else layers)
        per_block = [r_tokens if i in merge_set else 0 for i in range(depth)]
    else:
        if layers is not None:
            raise ValueError("layers cannot be combined with a per-block r_tokens list")
        per_block = [int(v) for v in r_tokens]
        if len(per_block) != depth:
            raise ValueError(f"r_tokens has {len(per_block)} entries; the model has {depth} blocks")
    if any(v < 0 for v in per_block):
        raise ValueError(f"r_tokens must be >= 0; got {per_block}")
    plans, n = [], PATCHER.num_patches(model)
    for i, v in enumerate(per_block):
        removed = min(v, max_tokens_removed(n))  # ToMe clamps the same way
        plans.append(BlockPlan(i, n + p, n - removed + p, removed > 0))
        n -= removed
    return plans


def _tome_macs(model: nn.Module, blocks: list[BlockPlan]) -> int:
    """Analytic MACs: the model's matrix products plus ToMe's A x B similarity."""
    macs = PATCHER.macs(model, None, blocks, merge_cost=False)
    p = model.num_prefix_tokens
    for blk, b in zip(model.blocks, blocks, strict=True):
        if b.merges:
            n = b.tokens_in - p
            macs += ((n + 1) // 2) * (n // 2) * blk.attn.head_dim
    return int(macs)


def apply_tome(
    model: nn.Module,
    r: float | None = None,
    *,
    r_tokens: int | Sequence[int] | None = None,
    layers: list[int] | None = None,
    prop_attn: bool = True,
) -> nn.Module:
    """Patch a timm VisionTransformer in place with ToMe and return it.

    Args:
        model: a timm ``VisionTransformer`` built from the standard Block/Attention.
        r: fraction of mergeable tokens gone after the last merge block, in [0, 1):
            the same tokens per block as ``mame_export.apply(model, r, layers=layers)``.
        r_tokens: ToMe's own knob instead of ``r``: tokens removed per block, an int
            for every block in ``layers`` (default: all blocks, as in the paper) or
            one entry per block. Clamped to half the tokens, as ToMe does.
        layers: blocks that merge (with ``r``: default the first ``min(8, depth)``, as MaMe).
        prop_attn: add log(token size) to attention logits.

    The plan (tokens per block, MACs) is stored on the model: :func:`tome_plan`.
    """
    if not PATCHER.matches(model):
        raise TypeError(
            f"ToMe baseline supports timm VisionTransformer; got {type(model).__name__}"
        )
    if getattr(model, "_mame_plan", None) is not None:
        raise ValueError("model is MaMe-patched; apply ToMe to an unpatched model")
    check_supported(model)
    blocks = _removal_schedule(model, r, r_tokens, layers)
    n0, p = blocks[0].tokens_in, model.num_prefix_tokens
    unpatched = [BlockPlan(b.index, n0, n0, False) for b in blocks]
    plan = MergePlan(
        family=FAMILY,
        r=float(r) if r is not None else 1.0 - (blocks[-1].tokens_out - p) / (n0 - p),
        tau=0.0,
        mode="static",
        prop_attn=prop_attn,
        num_patches=n0 - p,
        num_protected=p,
        blocks=tuple(blocks),
        macs=_tome_macs(model, blocks),
        macs_unpatched=PATCHER.macs(model, None, unpatched, merge_cost=False),
        notes=("ToMe bipartite soft matching: token counts are static, merge pairs are "
               "data-dependent (argsort, gather, scatter_reduce); tau is unused",),
    )
    for blk, bp in zip(model.blocks, plan.blocks, strict=True):
        swap(blk, _ToMeBlock, _PREFIX, BlockSettings(
            merges=bp.merges, prop_attn=prop_attn, protected=model.num_prefix_tokens,
            remove=bp.tokens_in - bp.tokens_out))
        swap(blk.attn, SizedAttention, _PREFIX)
    swap(model, _ToMeVisionTransformer, _PREFIX)
    model._tome_plan = plan
    return model


def tome_plan(model: nn.Module) -> MergePlan:
    """The plan stored by :func:`apply_tome` (tokens per block, MACs vs. unpatched)."""
    plan = getattr(model, "_tome_plan", None)
    if plan is None:
        raise ValueError("model is not ToMe-patched: call apply_tome(model, r) first")
    return plan


def is_tome_patched(model: nn.Module) -> bool:
    return getattr(model, "_tome_plan", None) is not None
