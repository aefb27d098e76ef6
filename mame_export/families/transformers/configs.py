"""Embedded configurations of the transformers family's aliases (no hub needed to build).

Each is the vision part of the checkpoint's published ``config.json`` (values as released
on the Hugging Face hub under the id in ``hub_id``), written out so a model builds offline
with random weights and a downloaded or local checkpoint then fits it exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HFModel:
    """One alias: the transformers classes to build, their config, and what the graph returns."""

    hub_id: str
    img_size: int  # the input side the alias runs at
    description: str
    model_class: str  # a class name in ``transformers``
    config_class: str
    config: dict[str, Any]
    output: str  # the field of the model's output the graph returns
    video: bool = False  # input (B, 3, T, H, W), permuted to HF's (B, T, 3, H, W) inside
    resizable: bool = False  # other input sizes build (DINOv2 interpolates; VideoMAE's
    # position table is sinusoidal, not a weight)
    # Its forward interpolates a learned position table to the input size (DINOv2): the
    # build resamples the table once instead, so the graph holds no Resize.
    interpolates_position_table: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides of a tiny test model


# openai/clip-vit-large-patch14-336, config.json "vision_config": the vision tower LLaVA-1.5
# uses (577 tokens = 1 class + 24 x 24 patches).
CLIP_L336 = HFModel(
    hub_id="openai/clip-vit-large-patch14-336",
    img_size=336,
    description="CLIP ViT-L/14@336 vision tower (LLaVA-1.5's), 577 tokens, 304M",
    model_class="CLIPVisionModel",
    config_class="CLIPVisionConfig",
    config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, num_channels=3,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                attention_dropout=0.0),
    output="pooler_output",
    tiny=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16),
)

# MCG-NJU/videomae-large-finetuned-kinetics, config.json: VideoMAE-L fine-tuned on
# Kinetics-400 (16 frames, tubelet 2: 8 x 14 x 14 = 1568 tokens, mean pooling).
VIDEOMAE_L = HFModel(
    hub_id="MCG-NJU/videomae-large-finetuned-kinetics",
    img_size=224,
    description="VideoMAE-L Kinetics-400, 16 x 224 x 224 clips, 1568 tokens, 304M",
    model_class="VideoMAEForVideoClassification",
    config_class="VideoMAEConfig",
    config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=16, num_channels=3,
                num_frames=16, tubelet_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                qkv_bias=True, use_mean_pooling=True, num_labels=400,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    output="logits",
    video=True,
    resizable=True,
    tiny=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=16, patch_size=4, num_frames=4,
              tubelet_size=2, num_labels=5),
)

# google/siglip2-base-patch16-512, config.json "vision_config" (model_type "siglip": the
# fixed-resolution SigLIP2 checkpoints use the SigLIP classes): 32 x 32 = 1024 patches,
# no class token, attention-pool (MAP) head.
SIGLIP2_B_512 = HFModel(
    hub_id="google/siglip2-base-patch16-512",
    img_size=512,
    description="SigLIP2-B/16 @512 vision tower (transformers), 1024 patches, MAP head",
    model_class="SiglipVisionModel",
    config_class="SiglipVisionConfig",
    config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=512, patch_size=16, num_channels=3,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True,
                attention_dropout=0.0),
    output="pooler_output",
    tiny=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=16, patch_size=4),
)

# facebook/dinov2-small, config.json: position table for 518 px (37 x 37), interpolated to
# the input size (224 px: 16 x 16 patches + the class token).
DINOV2_S = HFModel(
    hub_id="facebook/dinov2-small",
    img_size=224,
    description="DINOv2-S/14 (transformers) at 224 px, 1 + 256 tokens, 22M",
    model_class="Dinov2Model",
    config_class="Dinov2Config",
    config=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                image_size=518, patch_size=14, num_channels=3, hidden_act="gelu",
                layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True,
                drop_path_rate=0.0, use_swiglu_ffn=False, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0),
    output="pooler_output",
    resizable=True,
    interpolates_position_table=True,
    # An 18 x 18 position table run at 4 x 4 patches, as the real one is built for another
    # size than it runs at; its 10,368 values are over the exporter's constant-folding limit
    # (8,192), so a resampling left in the forward shows in the tiny graph as in the real one.
    tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=72,
              patch_size=4),
)

MODELS: dict[str, HFModel] = {
    "clip_l336": CLIP_L336,
    "videomae_l": VIDEOMAE_L,
    "siglip2_b_512_hf": SIGLIP2_B_512,
    "dinov2_s": DINOV2_S,
}

TINY_IMG = 16  # input side of every tiny model: 4 x 4 patches of 4 px

# Config fields the exported model never reads, so a folder may differ in them: dropout,
# init-only values, VideoMAE's pretraining decoder, DINOv2's backbone outputs, and CLIP's
# projection (the tower's graph leaves that head out).
_UNREAD_FIELDS = ("dropout", "drop_path", "initializer", "layerscale_value", "decoder_",
                  "norm_pix_loss", "out_features", "out_indices", "stage_names",
                  "apply_layernorm", "reshape_hidden_states", "projection_dim")


def model_fields(config_class: type) -> list[str]:
    """The fields ``config_class`` adds to transformers' PretrainedConfig (its own
    ``__init__`` parameters) that shape the exported model."""
    from transformers import PretrainedConfig

    base = set(inspect.signature(PretrainedConfig.__init__).parameters)
    return [name for name, p in inspect.signature(config_class.__init__).parameters.items()
            if name not in base and name != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and not any(part in name for part in _UNREAD_FIELDS)]


def config_conflict(entry: HFModel, values: Mapping[str, Any],
                    folder: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field in which a ``save_pretrained`` folder's config.json (``folder``,
    parsed JSON) describes another model than ``entry`` built from ``values``: (field,
    the alias's value, the folder's value); None when it describes the same model.

    A full CLIP / SigLIP folder's ``vision_config`` is compared; ``auto_map`` and other
    metadata (versions, dtype, labels) are not read."""
    import transformers

    own_class = getattr(transformers, entry.config_class)
    own = own_class(**values).to_dict()
    kind, section, parent = folder.get("model_type"), folder, None
    if kind is not None and kind != own_class.model_type:
        key = getattr(own_class, "base_config_key", "")
        if isinstance(kind, str) and kind in transformers.CONFIG_MAPPING:
            parent = transformers.CONFIG_MAPPING[kind]
        if parent is None or not key or parent.sub_configs.get(key) is not own_class \
                or not isinstance(folder.get(key), Mapping):
            return "model_type", own_class.model_type, kind
        section = folder[key]
    architectures = folder.get("architectures")
    known = {own_class} if parent is None else {own_class, parent}
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures if isinstance(architectures, list) else []:
        found = getattr(transformers, name, None) if isinstance(name, str) \
            and name.isidentifier() and not name.startswith("_") else None
        if getattr(found, "config_class", None) not in known:
            return "architectures", [entry.model_class], architectures
    for name in model_fields(own_class):
        if name in section and name in own and _as_json(section[name]) != _as_json(own[name]):
            return name, own[name], section[name]
    return None


def _as_json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _as_json(v) for k, v in value.items()}
    return value
