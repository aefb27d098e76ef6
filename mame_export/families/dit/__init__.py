"""The diffusion-transformer family: diffusers' PixArtTransformer2DModel (PixArt-alpha/
Sigma) and SD3Transformer2DModel (SD3's MMDiT), built from an embedded configuration and
exported as ``(sample, timestep, encoder_hidden_states[, pooled_projections]) -> noise``.
``--img-size`` is the image side in pixels; the latent is a VAE factor (8) smaller and
must lie on the patch grid. Needs the ``diffusion`` extra (diffusers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import RANDOM_INIT_SEED, RANDOM_SOURCE
from mame_export.errors import warn
from mame_export.families.base import (
    Family,
    IOSpec,
    ModelSpec,
    UnsupportedModelError,
    with_kwargs,
)
from mame_export.families.dit.configs import (
    KINDS,
    PIXART_SIGMA_1024_CONFIG,
    SD3_MEDIUM_CONFIG,
    TINY_CONFIGS,
    TINY_TEXT_TOKENS,
    VAE_FACTOR,
)
from mame_export.families.dit.patch import PATCHER


class DiTFamily(Family):
    name = "dit"
    aliases = ("diffusion-transformer",)
    summary = "diffusers PixArtTransformer2DModel / SD3Transformer2DModel (diffusion transformers)"
    patcher = PATCHER

    def entries(self) -> list[ModelSpec]:
        return [
            ModelSpec("pixart_sigma_1024", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer",
                      self.name, 1024, "PixArt-Sigma XL/2 (embedded config), 1024 px = 64x64 "
                      "patches, 300 T5 tokens", {"kind": "pixart",
                                                 "config": PIXART_SIGMA_1024_CONFIG},
                      default_batch=2),
            ModelSpec("sd3_medium", "stabilityai/stable-diffusion-3-medium transformer",
                      self.name, 1024, "SD3-medium MMDiT (embedded config), 1024 px = 64x64 "
                      "patches, 333 text tokens", {"kind": "sd3", "config": SD3_MEDIUM_CONFIG},
                      default_batch=2),
        ]

    def _config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(spec.kwargs["config"])

    def _text_tokens(self, spec: ModelSpec) -> int:
        return int(spec.kwargs.get("text_tokens", KINDS[spec.kwargs["kind"]].text_tokens))

    def skeleton(self, spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
        from mame_export.families.dit.model import model_class

        with torch.device("meta"):
            return model_class(spec.kwargs["kind"]).from_config(self._config(spec))

    def check(self, model: nn.Module, name: str, img_size: int | None, export: bool) -> None:
        """--img-size off the VAE factor, a latent off the patch grid, or past SD3's
        position table: one line each."""
        if img_size is not None:
            m = getattr(model, "denoiser", model)
            p = int(m.config.patch_size)
            if img_size % VAE_FACTOR:
                raise UnsupportedModelError(
                    f"--img-size {img_size} is not a multiple of the VAE factor {VAE_FACTOR} "
                    f"for {name} (pixels; the latent is img/{VAE_FACTOR}): use "
                    f"{img_size - img_size % (VAE_FACTOR * p) or VAE_FACTOR * p}")
            latent = img_size // VAE_FACTOR
            if latent % p:
                raise UnsupportedModelError(
                    f"the latent {latent}x{latent} of --img-size {img_size} is off the patch "
                    f"grid of {name} (patch {p}): use a multiple of {VAE_FACTOR * p} pixels")
            most = getattr(m.config, "pos_embed_max_size", None)
            if most is not None and latent // p > most:
                raise UnsupportedModelError(
                    f"--img-size {img_size} is past {name}'s position table ({most}x{most} "
                    f"patches): use --img-size {most * p * VAE_FACTOR} or less")
        super().check(model, name, img_size, export)

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        from mame_export.families.dit.model import DenoiserExportWrapper, build_denoiser

        kind = spec.kwargs["kind"]
        if weights in ("auto", "random"):
            if weights == "auto":
                warn(f"{spec.alias} has no hub download here: using RANDOM weights (seeded); "
                     f"pass --weights DIR_OR_FILE for a local {spec.source_name}")
            model = build_denoiser(kind, self._config(spec), "random", seed=RANDOM_INIT_SEED)
            source = RANDOM_SOURCE
        else:
            model = build_denoiser(kind, self._config(spec), weights)
            source = f"file:{Path(weights).resolve()}"
        return DenoiserExportWrapper(model).eval(), source

    def io_spec(self, spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
        from mame_export.families.dit.model import dit_io_spec

        latent = (img_size or spec.img_size) // VAE_FACTOR
        return dit_io_spec(model, spec.kwargs["kind"], latent, self._text_tokens(spec))

    def patch_options(self, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
        return {"img_size": img_size or spec.img_size, "text_tokens": self._text_tokens(spec)}

    def tiny(self, spec: ModelSpec) -> ModelSpec:
        config = TINY_CONFIGS[spec.kwargs["kind"]]
        return replace(with_kwargs(spec, f"tiny-{spec.alias}", config=config,
                                   text_tokens=TINY_TEXT_TOKENS),
                       img_size=config["sample_size"] * VAE_FACTOR)

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """None: a denoiser is evaluated on latents (``eval --data`` or seeded random)."""
        return None


FAMILY = DiTFamily()
