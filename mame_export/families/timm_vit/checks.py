"""Structure checks of a timm ViT: what MaMe can patch and this tool can export, judged
from the modules alone (they run on a weightless skeleton before anything is built)."""

from __future__ import annotations

import torch.nn as nn

from mame_export.families.base import UnsupportedModelError
from mame_export.families.timm_vit.patch import PATCHER, check_supported


def check_architecture(model: nn.Module, name: str, img_size: int | None = None,
                       export: bool = True) -> None:
    """One-line UnsupportedModelError for a model MaMe cannot patch (not a timm ViT, other
    blocks or pooling), a hybrid ViT (CNN stem) to export, or an input size the patch grid
    does not fit or that is too large to plan. Runs on a skeleton before any work, and on
    the built model."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    cls = type(model)
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is a {cls.__module__}.{cls.__name__}; MaMe supports timm "
            "VisionTransformer models (ViT, DeiT, SigLIP/SigLIP2, register-token ViTs) "
            "and sd21-unet"
        )
    try:
        check_supported(model)
    except ValueError as e:
        raise UnsupportedModelError(f"{name}: {e}") from None
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed):
        if export:
            raise UnsupportedModelError(
                f"{name} is a hybrid ViT (a {type(pe).__name__} CNN stem before the "
                "transformer); its graph cannot be exported: `mame-export plan` and eager use "
                "work, export supports ViTs with a plain patch embedding"
            )
        return
    ph, pw = pe.patch_size
    if img_size is None:
        return
    if img_size < max(ph, pw):
        raise UnsupportedModelError(
            f"--img-size {img_size} is smaller than {name}'s patch size {ph}: there would "
            f"be no patch; use {ph} or more"
        )
    if not getattr(pe, "dynamic_img_pad", False) and (img_size % ph or img_size % pw):
        lo, hi = img_size // ph * ph, (img_size // ph + 1) * ph
        raise UnsupportedModelError(
            f"--img-size {img_size} is not a multiple of {name}'s patch size {ph}: the model "
            f"would crop the input to {lo} px; use {lo} or {hi}"
        )
    PATCHER.check_input_size(model, name, img_size)
