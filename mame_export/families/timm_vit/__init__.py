"""The timm ViT family: timm ``VisionTransformer`` models built from the standard Block
and Attention (ViT, DeiT incl. distilled, SigLIP/SigLIP2 with the MAP head, CLIP and
DINOv2 towers, register-token ViTs), exported as ``pixels -> logits``."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import (
    RANDOM_SOURCE,
    cached_hub_file,
    error_detail,
    hub_reachable,
    load_checkpoint,
    read_state_dict,
    seeded,
    warn_random,
)
from mame_export.errors import CheckpointError
from mame_export.families.base import (
    Family,
    IOSpec,
    ModelSpec,
    UnknownModelError,
    UnsupportedModelError,
    with_kwargs,
)
from mame_export.families.timm_vit.checks import check_architecture
from mame_export.families.timm_vit.patch import PATCHER

NAME = "timm-vit"


def _vit(alias: str, name: str, img: int, desc: str) -> ModelSpec:
    return ModelSpec(alias, name, NAME, img, desc)


ENTRIES = [
    _vit("vit_t", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", 224, "ViT-Ti/16, 5.7M"),
    _vit("vit_s", "vit_small_patch16_224.augreg_in21k_ft_in1k", 224, "ViT-S/16, 22M"),
    _vit("vit_b", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, "ViT-B/16, 86M"),
    _vit("vit_l", "vit_large_patch16_224.augreg_in21k_ft_in1k", 224, "ViT-L/16, 304M"),
    _vit("vit_h", "vit_huge_patch14_clip_224.laion2b_ft_in12k_in1k", 224,
         "ViT-H/14 (CLIP), 632M; > 2 GB in fp32"),
    _vit("deit_s", "deit_small_patch16_224.fb_in1k", 224, "DeiT-S/16, 22M"),
    _vit("deit_b", "deit_base_patch16_224.fb_in1k", 224, "DeiT-B/16, 86M (the paper's ViT-B)"),
    _vit("deit_b_distilled", "deit_base_distilled_patch16_224.fb_in1k", 224,
         "DeiT-B/16 with distillation token"),
    _vit("siglip2_b_512", "vit_base_patch16_siglip_512.v2_webli", 512,
         "SigLIP2-B/16 image tower @512 (1024 patches, MAP head)"),
]


def _cached_hub_file(source_name: str) -> str | None:
    """A locally cached weights file for a timm pretrained tag, if there is one."""
    import timm

    cfg = timm.models.get_pretrained_cfg(source_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    return cached_hub_file(hub_id, ("model.safetensors", "pytorch_model.bin",
                                    "open_clip_pytorch_model.bin"))


def _from_hub_cache(source_name: str, cached: str, kw: dict[str, Any]) -> nn.Module:
    """The model with a hub-cache weights file, read and checked as a --weights file is
    (one-line errors naming the file), then adapted by timm's own pretrained loading (its
    checkpoint filter: other layouts, position tables resampled to the input size)."""
    import timm

    state = read_state_dict(cached)
    try:
        model = timm.create_model(source_name, pretrained=True,
                                  pretrained_cfg_overlay={"state_dict": state}, **kw)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:  # built fine without them
        raise CheckpointError(f"hub cache file {cached} does not fit {source_name}: "
                              f"{error_detail(e)}") from None
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps a copy of the weights there
    return model


class TimmViTFamily(Family):
    name = NAME
    summary = ("timm VisionTransformer models (ViT, DeiT, SigLIP/SigLIP2, register-token "
               "ViTs)")
    patcher = PATCHER
    capabilities = frozenset({"tome"})

    def entries(self) -> list[ModelSpec]:
        return list(ENTRIES)

    def resolve(self, name: str) -> ModelSpec | None:
        """Any timm model name, tagged or not; an untagged name builds at its default
        tag's input size (vit_*_dinov2: 518)."""
        import timm

        base, _, tag = name.partition(".")
        if not timm.is_model(base):
            return None
        try:
            cfg = timm.models.get_pretrained_cfg(name if tag else base)
        except RuntimeError:  # an unknown pretrained tag
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(base)
                    if "." in t and t.split(".", 1)[0] == base]
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.3)
            known = ", ".join(close or tags[:6]) or "none"
            raise UnknownModelError(f"{base} has no pretrained tag {tag!r} (tags: {known}); "
                                    "or give the name without a tag") from None
        img = 224
        if cfg is not None and getattr(cfg, "input_size", None):
            img = int(cfg.input_size[-1])
        return ModelSpec(name, name, NAME, img, f"timm model {name}")

    def known_names(self) -> list[str]:
        import timm

        return list(timm.list_models())

    def _kwargs(self, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = dict(spec.kwargs)
        if img_size is not None:
            # Built at the requested size before any checkpoint loads, so a checkpoint saved
            # at that size fits (timm resamples position embeddings only for hub weights).
            kw["img_size"] = img_size
        return kw

    def skeleton(self, spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
        import timm

        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return timm.create_model(spec.source_name, pretrained=False,
                                         **self._kwargs(spec, img_size))
        except Exception:  # noqa: BLE001 - the full build runs the same checks after
            return None

    def check(self, model: nn.Module, name: str, img_size: int | None, export: bool) -> None:
        check_architecture(model, name, img_size, export)

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        import timm

        kw = self._kwargs(spec, img_size)

        def random_model() -> nn.Module:
            return seeded(lambda: timm.create_model(spec.source_name, pretrained=False, **kw))

        if weights == "random":
            return random_model().eval(), RANDOM_SOURCE
        if weights != "auto":
            model = timm.create_model(spec.source_name, pretrained=False, **kw).eval()
            load_checkpoint(model, weights)
            return model, f"file:{Path(weights).resolve()}"
        cached = _cached_hub_file(spec.source_name)
        if cached is not None:
            return _from_hub_cache(spec.source_name, cached, kw).eval(), f"hub cache:{cached}"
        if hub_reachable():
            try:
                model = timm.create_model(spec.source_name, pretrained=True, **kw)
                return model.eval(), f"hub:{spec.source_name}"
            except Exception as e:  # noqa: BLE001 - any hub failure falls back, loudly
                warn_random(f"could not download pretrained weights ({type(e).__name__}: {e})")
                return random_model().eval(), RANDOM_SOURCE
        warn_random("the model hub is unreachable and its cache has no weights for "
                    f"{spec.source_name}")
        return random_model().eval(), RANDOM_SOURCE

    def io_spec(self, spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
        h, w = model.patch_embed.img_size
        chans = model.patch_embed.proj.in_channels

        def make(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.randn(batch, chans, h, w, generator=gen),)

        return IOSpec(("pixels",), ("logits",), make,
                      class_scores=getattr(model, "num_classes", 0) > 0)

    def tiny(self, spec: ModelSpec) -> ModelSpec:
        skel = self.skeleton(spec)
        if skel is None:
            raise UnsupportedModelError(f"{spec.alias}: timm cannot build it")
        patch = skel.patch_embed.patch_size[0]
        tiny = with_kwargs(spec, f"tiny-{spec.alias}", depth=2, embed_dim=32, num_heads=2,
                           img_size=patch * 4)
        return replace(tiny, img_size=patch * 4)

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """timm's data config of the model (mean/std, crop, interpolation) at the size it
        was built, not its hub default's."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        h, w = model.patch_embed.img_size
        return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                "size": h if h == w else (h, w), "crop_pct": float(cfg["crop_pct"]),
                "interpolation": cfg["interpolation"],
                "crop_mode": cfg.get("crop_mode", "center")}


FAMILY = TimmViTFamily()
