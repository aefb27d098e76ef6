"""Encoder and task-head mixins for the transformers vision models: the encoder loop with
explicit token sizes, and size-aware pooling.

Copied from transformers 5.24 with modifications: the ``forward`` of ``ViTModel``,
``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``, ``VideoMAEModel`` and of
``ViTForImageClassification``, ``CLIPVisionModelWithProjection`` and
``VideoMAEForVideoClassification``. The loop passes token sizes from layer to layer with
each layer's token count from the stored plan; a mean-pooled head becomes a size-weighted
mean and SigLIP's attention-pool head gets the log-size bias. They return the same output
classes; ``hidden_states`` hold each layer's (merged) tokens. What a merged model cannot
give (attention maps, head masks, masked patches, position interpolation to another size)
is refused in one line.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn

from mame_export.families.tokens import log_size_bias
from mame_export.plan import MergePlan


class Run(NamedTuple):
    """One patched encoder pass: the model's last hidden state (after its final norm where
    it has one), pooled output, token sizes (None while nothing merged), all layers'
    hidden states if asked for, and whether to return a ModelOutput."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor | None
    sizes: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    return_dict: bool


_REFUSED = ("bool_masked_pos", "attention_mask", "head_mask", "output_attentions")


def _options(model: nn.Module, kwargs: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(output_hidden_states, return_dict, interpolate_pos_encoding) from the keywords of
    a forward; one-line errors for anything a merged model cannot do."""
    cfg, kw = model.config, dict(kwargs)

    def flag(key: str, default: bool) -> bool:
        value = kw.pop(key, None)
        return bool(getattr(cfg, key, default) if value is None else value)

    hidden, return_dict = flag("output_hidden_states", False), flag("return_dict", True)
    interpolate = bool(kw.pop("interpolate_pos_encoding", False))
    for key, value in kw.items():
        if value is None or value is False:
            continue
        if key in _REFUSED:
            raise ValueError(f"{key} is not supported on a MaMe-patched model (merged tokens "
                             "are no longer patches); call it on the unpatched model")
        raise TypeError(f"a MaMe-patched {type(model).__name__} takes no argument {key!r}")
    return hidden, return_dict, interpolate


def _check_size(model: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> None:
    size = model.config.image_size
    h, w = pixel_values.shape[-2:]
    if interpolate and (h, w) != (size, size):
        raise ValueError(f"interpolate_pos_encoding to {h}x{w} is not supported on a "
                         f"MaMe-patched model (built for {size} px); build the model with "
                         f"image_size={h}")


class _MaMeEncoder:
    """The encoder loop with token sizes; subclasses embed and finish."""

    layers_path: ClassVar[str]
    protected: ClassVar[int]  # leading tokens that never merge (the class token)
    has_pooler: ClassVar[bool] = True
    _mame_plan: MergePlan

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        raise NotImplementedError

    def _mame_finish(self, x: torch.Tensor, size: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _mame_blocks(self, x: torch.Tensor, upto: int | None = None, keep_hidden: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        layers = attrgetter(self.layers_path)(self)
        keep = self._mame_plan.keep_counts_for(x.shape[1] - self.protected)
        # Layers past the plan's (a LLaVA tower stops one early) never merge.
        schedule = (*keep, *(None,) * (len(layers) - len(keep)))
        size, hidden = None, [x] if keep_hidden else []
        for layer, n_keep in list(zip(layers, schedule, strict=True))[:upto]:
            x, size = layer(x, size, n_keep)
            if keep_hidden:
                hidden.append(x)
        return x, size, hidden

    def _mame_run(self, pixel_values: torch.Tensor, kwargs: dict[str, Any]) -> Run:
        keep_hidden, return_dict, interpolate = _options(self, kwargs)
        x, size, hidden = self._mame_blocks(self._mame_embed(pixel_values, interpolate),
                                            keep_hidden=keep_hidden)
        last, pooled = self._mame_finish(x, size)
        return Run(last, pooled, size, tuple(hidden) if keep_hidden else None, return_dict)

    def mame_hidden(self, pixel_values: torch.Tensor, upto: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after the first ``upto`` layers (all by default; no final norm) and their
        float32 sizes (B, N', 1), protected tokens included."""
        x, size, _ = self._mame_blocks(self._mame_embed(pixel_values, False), upto=upto)
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        return x, size

    def forward(self, pixel_values: torch.Tensor | None = None,  # type: ignore[override]
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

        run = self._mame_run(pixel_values, kwargs)
        if self.has_pooler:
            out = BaseModelOutputWithPooling(last_hidden_state=run.last_hidden_state,
                                             pooler_output=run.pooled,
                                             hidden_states=run.hidden_states)
        else:
            out = BaseModelOutput(last_hidden_state=run.last_hidden_state,
                                  hidden_states=run.hidden_states)
        return out if run.return_dict else out.to_tuple()


class ViTEncoder(_MaMeEncoder):
    layers_path, protected = "layers", 1

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        _check_size(self, pixel_values, interpolate)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        return self.embeddings(pixel_values, interpolate_pos_encoding=interpolate)

    def _mame_finish(self, x, size):  # noqa: ANN001, ANN202
        seq = self.layernorm(x)
        return seq, self.pooler(seq) if self.pooler is not None else None


class CLIPEncoder(_MaMeEncoder):
    layers_path, protected = "encoder.layers", 1

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        _check_size(self, pixel_values, interpolate)
        return self.pre_layrnorm(self.embeddings(pixel_values,
                                                 interpolate_pos_encoding=interpolate))

    def _mame_finish(self, x, size):  # noqa: ANN001, ANN202
        return x, self.post_layernorm(x[:, 0, :])


def attention_pool(head: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """SigLIP's attention-pool head with ``log(size)`` added to its attention logits."""
    if size is None:
        return head(x)
    heads = head.attention.num_heads
    bias = log_size_bias(size, x.dtype)  # (B, 1, 1, N)
    mask = bias.expand(-1, heads, -1, -1).reshape(-1, 1, x.shape[1])  # (B * heads, 1, N)
    probe = head.probe.repeat(x.shape[0], 1, 1)
    h = head.attention(probe, x, x, attn_mask=mask, need_weights=False)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


class SiglipEncoder(_MaMeEncoder):
    layers_path, protected = "encoder.layers", 0

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        _check_size(self, pixel_values, interpolate)
        return self.embeddings(pixel_values, interpolate_pos_encoding=interpolate)

    def _mame_finish(self, x, size):  # noqa: ANN001, ANN202
        last = self.post_layernorm(x)
        if not self.use_head:
            return last, None
        return last, attention_pool(self.head, last, size if self._mame_plan.prop_attn else None)


class Dinov2Encoder(_MaMeEncoder):
    layers_path, protected = "encoder.layer", 1

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        return self.embeddings(pixel_values)  # interpolates its position table to any size

    def _mame_finish(self, x, size):  # noqa: ANN001, ANN202
        seq = self.layernorm(x)
        return seq, seq[:, 0, :]


class VideoMAEEncoder(_MaMeEncoder):
    layers_path, protected, has_pooler = "encoder.layer", 0, False

    def _mame_embed(self, pixel_values: torch.Tensor, interpolate: bool) -> torch.Tensor:
        return self.embeddings(pixel_values, None)

    def _mame_finish(self, x, size):  # noqa: ANN001, ANN202
        return (self.layernorm(x) if self.layernorm is not None else x), None


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, each counted as many times as the patches it stands for."""
    if size is None:
        return x.mean(1)
    s = size.to(x.dtype)
    return (x * s).sum(1) / s.sum(1)


def _task_output(out: Any, run: Run) -> Any:
    return out if run.return_dict else out.to_tuple()


class ViTClassifier:
    """``ViTForImageClassification`` (and DeiT checkpoints): the class token's logits."""

    def forward(self, pixel_values: torch.Tensor | None = None,  # type: ignore[override]
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        run = self.vit._mame_run(pixel_values, kwargs)
        logits = self.classifier(run.last_hidden_state[:, 0, :])
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return _task_output(ImageClassifierOutput(loss=loss, logits=logits,
                                                  hidden_states=run.hidden_states), run)


class CLIPWithProjection:
    """``CLIPVisionModelWithProjection``: the projected pooled output."""

    def forward(self, pixel_values: torch.Tensor | None = None,  # type: ignore[override]
                **kwargs: Any) -> Any:
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        run = self.vision_model._mame_run(pixel_values, kwargs)
        return _task_output(CLIPVisionModelOutput(
            image_embeds=self.visual_projection(run.pooled),
            last_hidden_state=run.last_hidden_state, hidden_states=run.hidden_states), run)


class VideoMAEClassifier:
    """``VideoMAEForVideoClassification``: a size-weighted mean over the merged tokens."""

    def forward(self, pixel_values: torch.Tensor | None = None,  # type: ignore[override]
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        run = self.videomae._mame_run(pixel_values, kwargs)
        seq = run.last_hidden_state
        if self.fc_norm is not None:
            pooled = self.fc_norm(size_weighted_mean(seq, run.sizes))
        else:
            pooled = seq[:, 0]
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return _task_output(ImageClassifierOutput(loss=loss, logits=logits,
                                                  hidden_states=run.hidden_states), run)
