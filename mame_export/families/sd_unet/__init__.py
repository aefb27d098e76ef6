"""The Stable Diffusion UNet family: diffusers' UNet2DConditionModel (SD 1.5, SD 2.1 and
SDXL layouts), built from an embedded configuration and exported as ``(sample, timestep,
encoder_hidden_states[, text_embeds, time_ids]) -> noise``. Needs the ``diffusion`` extra
(diffusers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import RANDOM_INIT_SEED, RANDOM_SOURCE
from mame_export.errors import warn
from mame_export.families.base import Family, IOSpec, ModelSpec, with_kwargs
from mame_export.families.sd_unet.patch import PATCHER


class SdUNetFamily(Family):
    name = "sd-unet"
    aliases = ("diffusers-unet",)  # the name its merge plans carry
    summary = "diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL)"
    capabilities = frozenset({"tomesd"})
    patcher = PATCHER

    def entries(self) -> list[ModelSpec]:
        from mame_export.families.sd_unet.configs import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

        # Batch 2: classifier-free guidance runs two samples per step.
        return [
            ModelSpec("sd21-unet", "stabilityai/stable-diffusion-2-1 unet", self.name, 96,
                      "Stable Diffusion 2.1 UNet (embedded config), latent 96x96 = 768 px",
                      default_batch=2),
            ModelSpec("sd15-unet", "runwayml/stable-diffusion-v1-5 unet", self.name, 64,
                      "Stable Diffusion 1.5 UNet (embedded config), latent 64x64 = 512 px",
                      {"config": SD15_UNET_CONFIG}, default_batch=2),
            ModelSpec("sdxl-unet", "stabilityai/stable-diffusion-xl-base-1.0 unet", self.name,
                      128, "SDXL base 1.0 UNet (embedded config; text_embeds and time_ids "
                      "inputs), latent 128x128 = 1024 px", {"config": SDXL_UNET_CONFIG},
                      default_batch=2),
        ]

    def _config(self, spec: ModelSpec) -> dict[str, Any]:
        from mame_export.families.sd_unet.model import SD21_UNET_CONFIG

        return dict(spec.kwargs.get("config", SD21_UNET_CONFIG))

    def skeleton(self, spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
        """The wrapped UNet on the meta device: plans and checks without 3-10 GB of
        weights (SDXL's are 10.3 GB in fp32)."""
        from diffusers import UNet2DConditionModel

        from mame_export.families.sd_unet.model import UNetExportWrapper

        with torch.device("meta"):
            return UNetExportWrapper(UNet2DConditionModel.from_config(self._config(spec)))

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        from mame_export.families.sd_unet.model import UNetExportWrapper, build_unet

        if weights in ("auto", "random"):
            if weights == "auto":
                warn(f"{spec.alias} has no hub download here: using RANDOM weights (seeded); "
                     f"pass --weights DIR_OR_FILE for a local {spec.source_name} checkpoint")
            unet, source = build_unet(self._config(spec), "random", seed=RANDOM_INIT_SEED), \
                RANDOM_SOURCE
        else:
            unet, source = build_unet(self._config(spec), weights), \
                f"file:{Path(weights).resolve()}"
        return UNetExportWrapper(unet).eval(), source

    def io_spec(self, spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
        from mame_export.families.sd_unet.model import sd_unet_io_spec

        return sd_unet_io_spec(model, latent=img_size or spec.img_size)

    def patch_options(self, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
        return {"latent_size": img_size or spec.img_size}  # the plan is per latent size

    def tiny(self, spec: ModelSpec) -> ModelSpec:
        from mame_export.families.sd_unet.configs import (
            SD15_UNET_CONFIG,
            SDXL_UNET_CONFIG,
            TINY_SD15_UNET_CONFIG,
            TINY_SDXL_UNET_CONFIG,
        )
        from mame_export.families.sd_unet.model import TINY_UNET_CONFIG

        config = spec.kwargs.get("config")
        tiny = (TINY_SDXL_UNET_CONFIG if config is SDXL_UNET_CONFIG
                else TINY_SD15_UNET_CONFIG if config is SD15_UNET_CONFIG else TINY_UNET_CONFIG)
        return replace(with_kwargs(spec, f"tiny-{spec.alias}", config=tiny),
                       img_size=tiny["sample_size"])

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """None: a UNet is evaluated on latents (``eval --data`` latents or seeded random
        ones), never on images."""
        return None


FAMILY = SdUNetFamily()
