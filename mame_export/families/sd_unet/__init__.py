"""The Stable Diffusion UNet family: diffusers' UNet2DConditionModel (SD 1.x/2.x layouts),
built from an embedded configuration and exported as ``(sample, timestep,
encoder_hidden_states) -> noise``. Needs the ``diffusion`` extra (diffusers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.nn as nn

from mame_export.checkpoints import RANDOM_INIT_SEED, RANDOM_SOURCE
from mame_export.errors import warn
from mame_export.families.base import Family, IOSpec, ModelSpec, with_kwargs
from mame_export.families.sd_unet.patch import PATCHER


class SdUNetFamily(Family):
    name = "sd-unet"
    aliases = ("diffusers-unet",)  # the name its merge plans carry
    summary = "diffusers UNet2DConditionModel (SD 1.x/2.x)"
    capabilities = frozenset({"tomesd"})
    patcher = PATCHER

    def entries(self) -> list[ModelSpec]:
        return [ModelSpec(
            "sd21-unet", "stabilityai/stable-diffusion-2-1 unet", self.name, 96,
            "Stable Diffusion 2.1 UNet (embedded config), latent 96x96 = 768 px",
            default_batch=2,  # classifier-free guidance runs two samples per step
        )]

    def _config(self, spec: ModelSpec) -> dict[str, Any]:
        from mame_export.families.sd_unet.model import SD21_UNET_CONFIG

        return dict(spec.kwargs.get("config", SD21_UNET_CONFIG))

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        from mame_export.families.sd_unet.model import UNetExportWrapper, build_unet

        if weights in ("auto", "random"):
            if weights == "auto":
                warn(f"{spec.alias} has no hub download here: using RANDOM weights (seeded); "
                     "pass --weights DIR_OR_FILE for a local SD 2.1 checkpoint")
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
        from mame_export.families.sd_unet.model import TINY_UNET_CONFIG

        return replace(with_kwargs(spec, f"tiny-{spec.alias}", config=TINY_UNET_CONFIG),
                       img_size=TINY_UNET_CONFIG["sample_size"])

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """None: a UNet is evaluated on latents (``eval --data`` latents or seeded random
        ones), never on images."""
        return None


FAMILY = SdUNetFamily()
