"""MaMe for Hugging Face transformers vision encoders: ``ViTModel`` /
``ViTForImageClassification`` (DeiT checkpoints too), ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, ``Dinov2Model`` and
``VideoMAEModel`` / ``VideoMAEForVideoClassification``, bare or inside this family's
export wrappers (:mod:`mame_export.families.transformers.wrappers`).

As for timm, the patch swaps classes (:mod:`mame_export.families.swap`): the model's
encoder loop (:mod:`.encoders`), each layer and its self-attention (:mod:`.layers`).
Weights and ``state_dict`` keys are untouched; the plan is fixed here, before any trace.
Written against transformers 5.24. Nothing here imports transformers at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch.nn as nn

from mame_export.families.base import Patcher
from mame_export.families.swap import swap, unpatched_class
from mame_export.families.transformers import encoders
from mame_export.families.transformers import layers as hf_layers
from mame_export.ops import step_macs
from mame_export.plan import BlockPlan, BlockSettings, Size

FAMILY = "transformers"


@dataclass(frozen=True)
class Arch:
    """Where a supported encoder keeps its self-attention, and the mixins it gets."""

    attention: str  # the self-attention, from a layer
    layer_mixin: type
    encoder_mixin: type

    @property
    def layers(self) -> str:  # the layer list, from the encoder model
        return self.encoder_mixin.layers_path

    @property
    def protected(self) -> int:  # leading tokens that never merge (the class token)
        return self.encoder_mixin.protected


ARCHS: dict[str, Arch] = {
    "ViTModel": Arch("attention", hf_layers.ViTLayerMixin, encoders.ViTEncoder),
    "CLIPVisionModel": Arch("self_attn", hf_layers.CLIPLayerMixin, encoders.CLIPEncoder),
    "SiglipVisionModel": Arch("self_attn", hf_layers.CLIPLayerMixin, encoders.SiglipEncoder),
    "Dinov2Model": Arch("attention", hf_layers.Dinov2LayerMixin, encoders.Dinov2Encoder),
    "VideoMAEModel": Arch("attention.attention", hf_layers.VideoMAELayerMixin,
                          encoders.VideoMAEEncoder),
}
# Task models: the attribute holding the encoder, and the mixin of their head.
HEADS: dict[str, tuple[str, type]] = {
    "ViTForImageClassification": ("vit", encoders.ViTClassifier),
    "CLIPVisionModelWithProjection": ("vision_model", encoders.CLIPWithProjection),
    "VideoMAEForVideoClassification": ("videomae", encoders.VideoMAEClassifier),
}
SUPPORTED = (*ARCHS, *HEADS)


def _hf_name(module: object) -> str | None:
    """The transformers class name of ``module`` (before any patch), else None."""
    if not isinstance(module, nn.Module):
        return None
    cls = unpatched_class(module)
    return cls.__name__ if cls.__module__.startswith("transformers.models.") else None


def task_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, unwrapping this family's export wrappers."""
    if getattr(type(model), "wraps_hf_vision", False):
        return model.model
    return model


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder model (one of :data:`ARCHS`) of ``model``; TypeError naming the
    supported classes otherwise."""
    inner = task_model(model)
    name = _hf_name(inner)
    if name in HEADS:
        inner = getattr(inner, HEADS[name][0])
        name = _hf_name(inner)
    if name not in ARCHS:
        cls = type(inner)
        raise TypeError(f"MaMe does not support {cls.__module__}.{cls.__name__}; the "
                        f"transformers family supports {', '.join(SUPPORTED)}")
    return inner


def arch_of(encoder: nn.Module) -> Arch:
    return ARCHS[_hf_name(encoder)]  # type: ignore[index]


def layer_list(encoder: nn.Module) -> nn.ModuleList:
    return attrgetter(arch_of(encoder).layers)(encoder)


def layers_run(model: nn.Module) -> int:
    """Layers a forward of ``model`` runs (a LLaVA tower stops one before the last)."""
    depth = len(layer_list(encoder_of(model)))
    return int(getattr(model, "mame_layers_run", depth))


def check_supported(model: nn.Module) -> None:
    """One-line ValueError for what the patch cannot do (beyond the class: see encoder_of)."""
    hf_layers.check_attention_implementation(encoder_of(model).config._attn_implementation)


def patch_conv(encoder: nn.Module) -> nn.Module:
    return next(m for m in encoder.embeddings.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))


def _linear_macs(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _head_macs(model: nn.Module, encoder: nn.Module, n_final: int) -> int:
    """Linear layers outside the embeddings and the layers (one token each: pooler,
    classifier, projection), and SigLIP's attention pool over ``n_final`` tokens."""
    inside = {id(m) for m in layer_list(encoder).modules()}
    inside |= {id(m) for m in encoder.embeddings.modules()}
    macs = 0
    for m in task_model(model).modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.Linear):
            macs += m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention):  # q of one probe, k and v of every token
            c = m.embed_dim
            macs += c * c + 2 * c * c * n_final + 2 * n_final * c
    return macs


class TransformersPatcher(Patcher):
    """MaMe for the transformers encoders of :data:`ARCHS` (and the task models of
    :data:`HEADS`); the plan's hooks read the config and the modules' shapes."""

    family = FAMILY
    schedules = True

    def matches(self, model: nn.Module) -> bool:
        try:
            encoder_of(model)
        except TypeError:
            return False
        return True

    def num_patches(self, model: nn.Module, size: Size | None = None) -> int:
        """Patch tokens (video: tubelets) at ``size`` (default: the config's image size)."""
        encoder = encoder_of(model)
        cfg = encoder.config
        side = cfg.image_size if size is None else size
        h, w = (side, side) if isinstance(side, int) else side
        kernel = patch_conv(encoder).kernel_size
        n = (h // kernel[-2]) * (w // kernel[-1])
        return n * (cfg.num_frames // kernel[0]) if len(kernel) == 3 else n

    def depth(self, model: nn.Module) -> int:
        return layers_run(model)

    def protected(self, model: nn.Module) -> int:
        return arch_of(encoder_of(model)).protected

    def input_step(self, model: nn.Module) -> int:
        return int(patch_conv(encoder_of(model)).kernel_size[-1])

    def macs(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, **options: Any) -> int:
        """Analytic MACs of the matrix products (linear layers, attention, merge) at
        batch 1."""
        encoder = encoder_of(model)
        arch = arch_of(encoder)
        p = arch.protected
        macs = patch_conv(encoder).weight.numel() * (blocks[0].tokens_in - p)
        for layer, bp in zip(layer_list(encoder), blocks, strict=False):
            attn_part = attrgetter(arch.attention.split(".")[0])(layer)  # VideoMAE: + output
            attn = attrgetter(arch.attention)(layer)
            q_lin = attn.q_proj if hasattr(attn, "q_proj") else attn.query
            n = bp.tokens_in
            macs += _linear_macs(attn_part) * n + 2 * n * n * q_lin.out_features
            macs += (_linear_macs(layer) - _linear_macs(attn_part)) * bp.tokens_out
            if merge_cost and bp.merges:
                head_dim = q_lin.out_features // encoder.config.num_attention_heads
                macs += step_macs(n - p, bp.tokens_out - p, encoder.config.hidden_size,
                                  head_dim)
        if layers_run(model) == len(layer_list(encoder)):
            macs += _head_macs(model, encoder, blocks[-1].tokens_out - p)
        return int(macs)

    def notes(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
              **options: Any) -> list[str]:
        encoder = encoder_of(model)
        p, n0 = arch_of(encoder).protected, blocks[0].tokens_in - arch_of(encoder).protected
        notes = []
        kernel = patch_conv(encoder).kernel_size
        if len(kernel) == 3:  # video: the tokens are tubelets of the clip
            frames = encoder.config.num_frames
            notes.append(f"video: {n0} clip tokens = {frames // kernel[0]} tubelets in time "
                         f"({frames} frames / {kernel[0]}) x {n0 * kernel[0] // frames} "
                         f"patches per frame -> {blocks[-1].tokens_out} after merging")
        depth = len(layer_list(encoder))
        if layers_run(model) < depth:
            notes.append(f"LLaVA encoder: runs layers 0-{layers_run(model) - 1} of {depth} "
                         "and returns the second-to-last layer's patch tokens: "
                         f"{n0} -> {blocks[-1].tokens_out - p} image tokens for the language "
                         "model")
        return notes

    def apply(self, model: nn.Module, r: float, *, tau: float, layers: Sequence[int] | None,
              prop_attn: bool, mode: str, img_size: Size | None = None,
              **options: Any) -> nn.Module:
        """Patch a supported transformers model (or this family's wrapper of one) in place;
        re-applying replaces the plan. ``img_size``: the input size the plan is for (other
        sizes DINOv2 interpolates to still run; the forward follows the plan's r there)."""
        plan_options = {k: options.pop(k) for k in ("schedule", "similarity") if k in options}
        if options:
            raise TypeError(f"transformers encoders take no options {sorted(options)}")
        encoder = encoder_of(model)
        check_supported(model)
        plan = self.build_plan(model, r, tau, layers, prop_attn, mode, img_size=img_size,
                               **plan_options)
        arch = arch_of(encoder)
        p = arch.protected
        for i, layer in enumerate(layer_list(encoder)):
            bp = plan.blocks[i] if i < len(plan.blocks) else None
            merges = bp is not None and bp.merges
            keep = (bp.tokens_out - p) / (bp.tokens_in - p) if bp is not None else 1.0
            swap(layer, arch.layer_mixin, settings=BlockSettings(
                merges=merges, tau=float(tau), prop_attn=prop_attn, mode=mode, protected=p,
                keep_ratio=keep, similarity=plan.similarity))
            swap(attrgetter(arch.attention)(layer), hf_layers.SizedAttention)
        swap(encoder, arch.encoder_mixin)
        encoder._mame_plan = plan
        inner = task_model(model)
        if inner is not encoder:
            swap(inner, HEADS[_hf_name(inner)][1])  # type: ignore[index]
            inner._mame_plan = plan
        model._mame_plan = plan
        return model


PATCHER = TransformersPatcher()
# The module's functions, as tools and tests call them.
matches, num_patches = PATCHER.matches, PATCHER.num_patches
apply, build_plan = PATCHER.apply, PATCHER.build_plan
