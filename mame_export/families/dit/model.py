"""Transformer denoisers (PixArt, SD3): build from an embedded config, load local weights,
the export wrapper and its inputs.

Weights are random (seeded) or read from a local diffusers folder (the pipeline root with
``transformer/``, or that folder itself: ``config.json`` and
``diffusion_pytorch_model*.safetensors``, sharded or not) or one diffusers-keyed
``.safetensors`` file. A folder whose ``config.json`` names another class, or a file whose
keys do not fit, is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import load_state, read_state_dict, seeded
from mame_export.errors import CheckpointError
from mame_export.families.base import IOSpec
from mame_export.families.dit.configs import KINDS, DenoiserKind

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAMES = ("out_sample",)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin")
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def model_class(kind: str) -> type:
    import diffusers

    return getattr(diffusers, KINDS[kind].class_name)


def _folder(path: Path) -> Path | None:
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    return None


def _check_class(folder: Path, kind: DenoiserKind) -> None:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from None
    if name is not None and name != kind.class_name:
        rope = " (rotary-position models such as Flux are not supported)" \
            if "flux" in str(name).lower() else ""
        raise CheckpointError(f"{folder} holds a {name} checkpoint; this model is a "
                              f"{kind.class_name}{rope}")


def read_state(weights: str | Path, kind: DenoiserKind) -> dict[str, torch.Tensor]:
    """The diffusers-keyed state dict of ``weights`` (folder, sharded folder or file)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_file():
        return read_state_dict(path)
    folder = _folder(path)
    if folder is None:
        raise CheckpointError(f"{path} holds no transformer: expected transformer/config.json "
                              "(a diffusers pipeline folder) or config.json beside the weights")
    _check_class(folder, kind)
    if (folder / _INDEX).is_file():
        shards = sorted(set(json.loads((folder / _INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(folder / shard))
        return state
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise CheckpointError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors)")


def build_denoiser(kind: str, config: dict[str, Any], weights: str | Path = "random",
                   *, seed: int = 0) -> nn.Module:
    """A diffusers transformer of ``config``, random (seeded) or loaded from ``weights``."""
    cls = model_class(kind)
    if str(weights) == "random":
        return seeded(lambda: cls.from_config(config), seed).eval()
    state = read_state(weights, KINDS[kind])
    with torch.device("meta"):
        model = cls.from_config(config)
    load_state(model, state, weights, assign=True)
    return model.eval()


class DenoiserExportWrapper(nn.Module):
    """``model(sample, timestep, encoder_hidden_states[, pooled_projections])`` returning
    the plain noise (or velocity) tensor; ``mame_export.apply`` patches the model inside."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor | None = None) -> torch.Tensor:
        if pooled_projections is None:
            return pixart_forward(self.denoiser, sample, timestep, encoder_hidden_states)
        return self.denoiser(sample, encoder_hidden_states=encoder_hidden_states,
                             timestep=timestep, pooled_projections=pooled_projections,
                             return_dict=False)[0]


def pixart_forward(m: Any, sample: torch.Tensor, timestep: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
    """diffusers' ``PixArtTransformer2DModel.forward`` without masks or size conditions,
    minus its ``squeeze(1)`` of a (B, N, C) tensor: a no-op in PyTorch that the ONNX
    exporter writes as a Squeeze of an axis that is not 1 (an invalid graph). Passes the
    patch grid to the blocks as the patched model's forward does."""
    from mame_export.families.dit.forward import grid_kwargs

    b, p, out_c = sample.shape[0], int(m.config.patch_size), int(m.out_channels)
    h, w = sample.shape[-2] // p, sample.shape[-1] // p
    x = m.pos_embed(sample)
    t, emb = m.adaln_single(timestep, {"resolution": None, "aspect_ratio": None},
                            batch_size=b, hidden_dtype=x.dtype)
    text = m.caption_projection(text).view(b, -1, x.shape[-1])
    for block in m.transformer_blocks:
        x = block(x, encoder_hidden_states=text, timestep=t,
                  cross_attention_kwargs=grid_kwargs(m, (h, w)))
    shift, scale = (m.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
    x = m.proj_out(m.norm_out(x) * (1 + scale) + shift)
    x = x.reshape(-1, h, w, p, p, out_c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, out_c, h * p, w * p)


def denoiser_of(model: nn.Module) -> nn.Module:
    return model.denoiser if isinstance(model, DenoiserExportWrapper) else model


def dit_io_spec(model: nn.Module, kind: str, latent: int, text_tokens: int) -> IOSpec:
    """Fresh random float32 inputs per call: N(0,1) latents of ``latent`` x ``latent``,
    timesteps uniform in [0, 1000), N(0,1) captions (and pooled text for SD3)."""
    cfg, k = denoiser_of(model).config, KINDS[kind]

    def make(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=gen)
        timestep = torch.rand(batch, generator=gen) * 1000.0
        text = torch.randn(batch, text_tokens, cfg[k.text_width], generator=gen)
        if k.pooled_width is None:
            return sample, timestep, text
        return sample, timestep, text, torch.randn(batch, cfg[k.pooled_width], generator=gen)

    names = INPUT_NAMES + (("pooled_projections",) if k.pooled_width else ())
    return IOSpec(names, OUTPUT_NAMES, make, class_scores=False)
