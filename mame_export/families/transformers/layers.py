"""Attention and layer mixins for the transformers vision encoders (MaMe after attention).

Copied from transformers 5.24 with modifications: the ``forward`` of ``ViTLayer``,
``CLIPEncoderLayer``, ``SiglipEncoderLayer``, ``Dinov2Layer`` and ``VideoMAELayer`` (and of
their self-attention modules). Each layer now takes and returns the token sizes, adds
``log(size)`` to its attention logits (proportional attention), and merges the mergeable
tokens after the attention residual when its plan says so. The attention runs through the
model's own attention function (``config._attn_implementation``: eager or sdpa) with the
size bias as its additive mask, so an unmerged layer computes exactly what it did before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn as nn

from mame_export.families.swap import unpatched_class
from mame_export.families.tokens import log_size_bias, merge_tokens
from mame_export.plan import BlockSettings

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def _eager_attention(attn: nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the module's own modeling file (they differ: CLIP
    and SigLIP take the softmax in float32)."""
    return sys.modules[unpatched_class(attn).__module__].eager_attention_forward


def check_attention_implementation(impl: str | None) -> None:
    """One-line ValueError for an attention implementation the size bias cannot pass
    through (flash kernels take no additive mask; flex and others are untested)."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not supported by MaMe "
                         "(supported: eager, sdpa); build the model with "
                         "attn_implementation='sdpa'")


def attention_function(attn: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = attn.config._attn_implementation
    check_attention_implementation(impl)
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, _eager_attention(attn))


class SizedAttention:
    """Mixin for the self-attention of ViT, CLIP, SigLIP, DINOv2 and VideoMAE: takes an
    additive key bias, returns ``(output, keys averaged over heads)``; the metric."""

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "q_proj"):
            q_lin, k_lin, v_lin = self.q_proj, self.k_proj, self.v_proj
        else:  # VideoMAE
            q_lin, k_lin, v_lin = self.query, self.key, self.value
        head_dim = getattr(self, "head_dim", None) or self.attention_head_size
        scaling = self.scaling if hasattr(self, "scaling") else self.scale
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, head_dim)
        q = q_lin(hidden_states).view(shape).transpose(1, 2)
        k = k_lin(hidden_states).view(shape).transpose(1, 2)
        v = v_lin(hidden_states).view(shape).transpose(1, 2)
        p = 0.0
        if self.training:
            p = next(float(getattr(self, a)) for a in ("attention_dropout", "dropout",
                                                       "dropout_prob") if hasattr(self, a))
        out, _ = attention_function(self)(self, q, k, v, bias, dropout=p, scaling=scaling,
                                          is_causal=False)
        out = out.reshape(*input_shape, -1).contiguous()
        proj = getattr(self, "o_proj", None) or getattr(self, "out_proj", None)
        if proj is not None:  # VideoMAE projects in its layer's attention.output
            out = proj(out)
        return out, k.mean(dim=1)


class _SizedLayer:
    """Shared by the layer mixins: the size bias and the merge, from the block's settings."""

    _block_settings: BlockSettings

    def _bias(self, size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return log_size_bias(size, dtype) if self._block_settings.prop_attn else None

    def _merge(
        self, x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor,
        n_keep: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if n_keep is None:
            return x, size
        return merge_tokens(self._block_settings, x, size, metric, n_keep)


Sized = tuple[torch.Tensor, torch.Tensor | None]


class ViTLayerMixin(_SizedLayer):
    """``ViTLayer``: pre-norm attention and MLP with dropout (DeiT checkpoints too)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None,  # type: ignore[override]
                n_keep: int | None) -> Sized:
        h, metric = self.attention(self.layernorm_before(x), self._bias(size, x.dtype))
        x = self.dropout(h) + x
        x, size = self._merge(x, size, metric, n_keep)
        return self.dropout(self.mlp(self.layernorm_after(x))) + x, size


class CLIPLayerMixin(_SizedLayer):
    """``CLIPEncoderLayer`` and ``SiglipEncoderLayer`` (the same layout)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None,  # type: ignore[override]
                n_keep: int | None) -> Sized:
        h, metric = self.self_attn(self.layer_norm1(x), self._bias(size, x.dtype))
        x = x + h
        x, size = self._merge(x, size, metric, n_keep)
        return x + self.mlp(self.layer_norm2(x)), size


class Dinov2LayerMixin(_SizedLayer):
    """``Dinov2Layer``: layer scale and drop path around attention and MLP."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None,  # type: ignore[override]
                n_keep: int | None) -> Sized:
        h, metric = self.attention(self.norm1(x), self._bias(size, x.dtype))
        x = self.drop_path(self.layer_scale1(h)) + x
        x, size = self._merge(x, size, metric, n_keep)
        h = self.layer_scale2(self.mlp(self.norm2(x)))
        return self.drop_path(h) + x, size


class VideoMAELayerMixin(_SizedLayer):
    """``VideoMAELayer``: the attention's output projection and the MLP's residual live
    in ``attention.output`` and ``output``."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None,  # type: ignore[override]
                n_keep: int | None) -> Sized:
        normed = self.layernorm_before(x)
        ctx, metric = self.attention.attention(normed, self._bias(size, x.dtype))
        x = self.attention.output(ctx, normed) + x
        x, size = self._merge(x, size, metric, n_keep)
        h = self.intermediate(self.layernorm_after(x))
        return self.output(h, x), size
