"""Embedded UNet configurations beyond SD 2.1 (which lives in ``model.py``): the published
``unet/config.json`` of SD 1.5 and SDXL base 1.0 ("_" keys dropped), and their miniatures
for tests. No hub access: these dicts are the whole architecture."""

from __future__ import annotations

from typing import Any

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5, unet/config.json (diffusers 0.6.0).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _SD_UP,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers 0.19.0.dev0), the
# keys that differ from diffusers' defaults. Its first level has no attention; text_embeds
# (pooled CLIP-G, 1280) and time_ids (6 numbers) enter through the "text_time" embedding.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# SD 1.5's layout in miniature (convolutional proj_in/proj_out, one head width): 4 blocks.
TINY_SD15_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 16,
}

# SDXL's layout in miniature: a first level without attention, then one with 2 blocks per
# transformer, text_time conditioning (text_embeds 32 wide + 6 time ids x 8): 8 blocks.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2],
}

TEXT_TIME_IDS = 6  # SDXL's time_ids: original (h, w), crop (top, left), target (h, w)


def added_cond_names(config: Any) -> tuple[str, ...]:
    """The extra conditioning inputs a UNet config takes beyond (sample, timestep,
    encoder_hidden_states): SDXL's ``text_embeds`` and ``time_ids``, else none."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return ("text_embeds", "time_ids") if get("addition_embed_type") == "text_time" else ()


def text_embeds_dim(config: Any) -> int:
    """Width of SDXL's pooled text embedding: the added projection's input minus the
    Fourier features of the 6 time ids."""
    return int(config.projection_class_embeddings_input_dim
               - TEXT_TIME_IDS * config.addition_time_embed_dim)
