"""Stable Diffusion 2.1 UNet: embedded configuration, weight loading, export inputs.

No hub access: the published ``unet/config.json`` of
stabilityai/stable-diffusion-2-1 is embedded below. Weights are random
(seeded) or read from a local diffusers folder, a diffusers ``.safetensors``
file, or an original single-file SD checkpoint (``.safetensors``/``.ckpt``,
keys ``model.diffusion_model.*``, converted with diffusers' own converter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import load_state, read_state_dict, seeded
from mame_export.errors import CheckpointError
from mame_export.families.base import IOSpec

# stabilityai/stable-diffusion-2-1, unet/config.json (diffusers 0.10.0.dev0), "_" keys dropped.
SD21_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "upcast_attention": True,
    "use_linear_projection": True,
}

# Same layout in miniature (one cross-attention level + mid block) for tests: 4 transformer blocks.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD21_UNET_CONFIG,
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 16,
}

SD21_TEXT_TOKENS = 77
INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAMES = ("out_sample",)

_DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_LDM_UNET = "diffusion_model."


def build_unet(
    config: dict[str, Any],
    weights: str | Path = "random",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A UNet2DConditionModel of ``config``, random (seeded) or loaded from ``weights``."""
    from diffusers import UNet2DConditionModel

    if str(weights) == "random":
        unet = seeded(lambda: UNet2DConditionModel.from_config(config), seed)
    else:
        state = read_unet_state_dict(weights, config)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        load_state(unet, state, weights, assign=True)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def build_sd21_unet(
    weights: str | Path = "random", *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The SD 2.1 UNet (865 M parameters) from the embedded config.

    ``weights``: ``"random"`` (seeded init), a diffusers folder (the pipeline
    root with ``unet/`` or the ``unet`` folder itself), a diffusers
    ``.safetensors``/``.bin`` file, or an original SD 2.1 single-file
    checkpoint (``.safetensors`` or ``.ckpt``).
    """
    return build_unet(SD21_UNET_CONFIG, weights, seed=seed, dtype=dtype)


def build_tiny_unet(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random miniature of the SD 2.x layout (~0.3 M parameters) for tests."""
    return build_unet(TINY_UNET_CONFIG, "random", seed=seed, dtype=dtype)


def unet_weight_file(weights: str | Path) -> Path:
    """The file to read for ``weights`` (a folder is searched for diffusers weight files)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_file():
        return path
    for folder in (path / "unet", path):
        for name in _DIFFUSERS_WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    raise CheckpointError(
        f"{path} holds no UNet weights: expected unet/diffusion_pytorch_model.safetensors "
        "(a diffusers pipeline folder) or diffusion_pytorch_model.safetensors"
    )


def read_unet_state_dict(weights: str | Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers-keyed UNet state dict from ``weights``; original SD checkpoints are converted."""
    file = unet_weight_file(weights)
    state = read_state_dict(file)
    if any(k.startswith(_LDM_UNET) for k in state):  # UNet-only extract, "model." stripped
        state = {f"model.{k}": v for k, v in state.items()}
    if any(k.startswith("model." + _LDM_UNET) for k in state):
        try:
            from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        except ImportError:
            raise CheckpointError(
                f"{file} is an original SD checkpoint and this diffusers cannot convert it; "
                "convert it to a diffusers folder first"
            ) from None
        state = convert_ldm_unet_checkpoint(state, dict(config))
    return state


class UNetExportWrapper(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states[, text_embeds, time_ids])`` returning
    the plain noise tensor.

    What gets exported and compared: positional inputs in :data:`INPUT_NAMES` order, then
    SDXL's added conditioning (``text_embeds``, ``time_ids``) where the config has it; one
    output (:data:`OUTPUT_NAMES`). ``mame_export.apply`` accepts the wrapper and patches the
    UNet inside it.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds,
                                                  "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


def unet_example_inputs(
    config: dict[str, Any],
    batch: int = 2,
    latent: int | tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    text_tokens: int = SD21_TEXT_TOKENS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (seeded) ``(sample, timestep, encoder_hidden_states)`` for a UNet config.

    Shapes: (B, C_in, H, W), (B,) float32 timesteps, (B, text_tokens, cross_attention_dim).
    """
    size = config["sample_size"] if latent is None else latent
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], h, w, generator=g).to(dtype)
    timestep = torch.full((batch,), 999.0, dtype=torch.float32)
    context = torch.randn(batch, text_tokens, config["cross_attention_dim"], generator=g).to(dtype)
    return sample, timestep, context


def sd21_example_inputs(
    batch: int = 2,
    latent: int | tuple[int, int] = 96,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD 2.1 UNet inputs: (B,4,H,W) latents, (B,) timesteps, (B,77,1024) text states.

    Batch 2 is one classifier-free-guidance step (unconditional + conditional).
    """
    return unet_example_inputs(SD21_UNET_CONFIG, batch, latent, dtype, SD21_TEXT_TOKENS, seed)


def sd_unet_io_spec(model: nn.Module, latent: int | tuple[int, int] | None = None) -> IOSpec:
    """The export spec of a UNet or its wrapper (noise predictions: no class scores).

    Fresh random float32 inputs per call: N(0,1) latents, timesteps uniform in
    [0, 1000), N(0,1) text states with 77 tokens; for SDXL also N(0,1) pooled text embeds
    and the time ids of an uncropped image of the latent's size in pixels (x8).
    """
    from mame_export.families.sd_unet.configs import added_cond_names, text_embeds_dim

    unet = model.unet if isinstance(model, UNetExportWrapper) else model
    cfg = unet.config
    size = cfg.sample_size if latent is None else latent
    h, w = (size, size) if isinstance(size, int) else size
    added = added_cond_names(cfg)

    def make(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        sample = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
        timestep = torch.rand(batch, generator=gen) * 1000.0
        context = torch.randn(batch, SD21_TEXT_TOKENS, cfg.cross_attention_dim, generator=gen)
        if not added:
            return sample, timestep, context
        pooled = torch.randn(batch, text_embeds_dim(cfg), generator=gen)
        px = (8.0 * h, 8.0 * w)  # the VAE's factor: the image the latent decodes to
        time_ids = torch.tensor([*px, 0.0, 0.0, *px]).expand(batch, -1).contiguous()
        return sample, timestep, context, pooled, time_ids

    return IOSpec(INPUT_NAMES + added, OUTPUT_NAMES, make, class_scores=False)
