"""Embedded transformer-denoiser configurations (the published ``transformer/config.json``,
"_" keys dropped; no hub access) and their miniatures for tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VAE_FACTOR = 8  # an SD / PixArt / SD3 VAE maps 8 x 8 pixels to one latent position

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json: 28 blocks of 1152
# channels, T5-XXL captions (300 tokens), AdaLN-single conditioning, no extra size inputs.
# (Its double_self_attention, only_cross_attention and use_linear_projection keys, which
# this class ignores, are left out.)
PIXART_SIGMA_1024_CONFIG: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json: 24 MMDiT blocks
# of 1536 channels; text: 77 CLIP + 256 T5 tokens (4096 wide), pooled CLIP-L+G (2048).
SD3_MEDIUM_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

TINY_PIXART_CONFIG: dict[str, Any] = {
    **PIXART_SIGMA_1024_CONFIG, "attention_head_dim": 8, "num_attention_heads": 2,
    "cross_attention_dim": 16, "caption_channels": 24, "num_layers": 2, "sample_size": 8,
}
TINY_SD3_CONFIG: dict[str, Any] = {
    **SD3_MEDIUM_CONFIG, "attention_head_dim": 8, "num_attention_heads": 2,
    "caption_projection_dim": 16, "joint_attention_dim": 24, "pooled_projection_dim": 12,
    "num_layers": 2, "sample_size": 8, "pos_embed_max_size": 16,
}


@dataclass(frozen=True)
class DenoiserKind:
    """What the family knows of one diffusers transformer class."""

    class_name: str
    text_tokens: int  # caption tokens the export inputs carry
    text_width: str  # the config key of their width
    pooled_width: str | None = None  # the config key of a pooled text vector input, if any


KINDS = {
    "pixart": DenoiserKind("PixArtTransformer2DModel", 300, "caption_channels"),
    "sd3": DenoiserKind("SD3Transformer2DModel", 333, "joint_attention_dim",
                        "pooled_projection_dim"),
}

TINY_CONFIGS = {"pixart": TINY_PIXART_CONFIG, "sd3": TINY_SD3_CONFIG}
TINY_TEXT_TOKENS = 5  # caption tokens of the miniatures' inputs
