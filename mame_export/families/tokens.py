"""Token bookkeeping shared by the ViT-like families (timm, transformers) and the ToMe
baseline: the log-size attention bias, merging behind protected tokens, one MaMe step
from a block's settings."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mame_export.ops import mame_step, mame_step_adaptive
from mame_export.plan import BlockSettings

Merge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def log_size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, N, 1) sizes -> (B, 1, 1, N) additive attention bias, or None."""
    if size is None:
        return None
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def merge_unprotected(
    x: torch.Tensor,
    size: torch.Tensor | None,
    metric: torch.Tensor,
    protected: int,
    merge: Merge,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``merge(x_m, metric_m, size_m) -> (merged, sizes)`` to the mergeable tokens;
    the ``protected`` leading tokens (class, distillation, registers) stay in front."""
    p = protected
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
    merged, s_new = merge(x[:, p:], metric[:, p:], size[:, p:])
    if p == 0:
        return merged, s_new
    return torch.cat([x[:, :p], merged], dim=1), torch.cat([size[:, :p], s_new], dim=1)


def merge_tokens(
    s: BlockSettings, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor,
    n_keep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaMe step of a block with settings ``s`` over its unprotected tokens: the
    static count ``n_keep``, or in adaptive mode the tokens similar enough (at most as
    many merged as the static plan)."""

    def step(x_m: torch.Tensor, k_m: torch.Tensor, s_m: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if s.mode == "adaptive":
            keep = max(1, round(x_m.shape[1] * s.keep_ratio))
            return mame_step_adaptive(x_m, k_m, s_m, keep, s.tau)
        merged, s_new, _ = mame_step(x_m, k_m, s_m, n_keep, s.tau, s.similarity)
        return merged, s_new

    return merge_unprotected(x, size, metric, s.protected, step)
