"""One registry of model aliases and one way to build a model and load its weights."""

from __future__ import annotations

import difflib
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import CheckpointError, UserError


class UnknownModelError(UserError):
    """The model name is neither an alias nor a timm model."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: alias -> timm name (with pretrained tag), family, input size."""

    alias: str
    source_name: str
    family: str
    img_size: int
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    default_batch: int = 1


def _vit(alias: str, name: str, img: int, desc: str) -> ModelSpec:
    return ModelSpec(alias, name, "timm-vit", img, desc)


REGISTRY: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
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
        ModelSpec("sd21-unet", "stabilityai/stable-diffusion-2-1 unet", "sd-unet", 96,
                  "Stable Diffusion 2.1 UNet (embedded config), latent 96x96 = 768 px",
                  default_batch=2),  # classifier-free guidance runs two samples per step
    ]
}


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def resolve(name: str) -> ModelSpec:
    """An alias or any timm model name -> ModelSpec; unknown names name the closest ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    base = name.split(".", 1)[0]
    if timm.is_model(base):
        # An untagged name builds at its default tag's size (vit_*_dinov2: 518).
        cfg = timm.models.get_pretrained_cfg(name if "." in name else base)
        img = 224
        if cfg is not None and getattr(cfg, "input_size", None):
            img = int(cfg.input_size[-1])
        return ModelSpec(name, name, "timm-vit", img, f"timm model {name}")
    candidates = list(REGISTRY) + _timm_names()
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (aliases: {', '.join(REGISTRY)})")


# ---------------------------------------------------------------- weights

def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(source_name: str) -> str | None:
    """A locally cached weights file for a timm pretrained tag, if there is one."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = timm.models.get_pretrained_cfg(source_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, fname)
        if isinstance(path, str):
            return path
    return None


# Random weights are drawn from a fixed seed so a graph's eager reference can be rebuilt.
RANDOM_INIT_SEED = 0


def _random_timm(spec: ModelSpec, kw: dict[str, Any]) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(spec.source_name, pretrained=False, **kw).eval()


def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights (names, dtypes, shapes and values)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def build_model(
    spec: ModelSpec, weights: str = "auto", img_size: int | None = None
) -> tuple[nn.Module, str]:
    """Build the model in eval mode; return it and a description of the weights' source.

    ``weights``: "auto" (pretrained from the hub or its local cache, else random
    with a warning), "random", or a checkpoint path.
    """
    if spec.family == "sd-unet":
        from mame_export.models_sd import UNetExportWrapper, build_sd21_unet

        if weights in ("auto", "random"):
            if weights == "auto":
                warn("sd21-unet has no hub download here: using RANDOM weights (seeded); "
                     "pass --weights DIR_OR_FILE for a local SD 2.1 checkpoint")
            unet, source = build_sd21_unet("random", seed=RANDOM_INIT_SEED), \
                f"random init (seed {RANDOM_INIT_SEED})"
        else:
            unet, source = build_sd21_unet(weights), f"file:{Path(weights).resolve()}"
        return UNetExportWrapper(unet).eval(), source
    import timm

    kw: dict[str, Any] = dict(spec.kwargs)
    if img_size is not None:
        # Built at the requested size before any checkpoint loads, so a checkpoint saved
        # at that size fits (timm resamples position embeddings only for hub weights).
        kw["img_size"] = img_size
    random_src = f"random init (seed {RANDOM_INIT_SEED})"
    if weights == "random":
        return _random_timm(spec, kw), random_src
    if weights == "auto":
        cached = _cached_hub_file(spec.source_name)
        if cached is not None:
            model = timm.create_model(
                spec.source_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kw
            )
            return model.eval(), f"hub cache:{cached}"
        if _hub_reachable():
            try:
                model = timm.create_model(spec.source_name, pretrained=True, **kw)
                return model.eval(), f"hub:{spec.source_name}"
            except Exception as e:  # noqa: BLE001 - any hub failure falls back, loudly
                warn(f"could not download pretrained weights ({type(e).__name__}: {e})")
        else:
            warn("the model hub is unreachable and its cache has no weights for "
                 f"{spec.source_name}")
        warn("using RANDOM weights: parity and latency are valid, predictions are not "
             "(pass --weights PATH to use a local checkpoint)")
        return _random_timm(spec, kw), random_src
    model = timm.create_model(spec.source_name, pretrained=False, **kw).eval()
    load_checkpoint(model, weights)
    return model, f"file:{Path(weights).resolve()}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a torch state dict (weights_only), unwrapping common wrappers."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {p}: {first[:200]}") from None
    for key in ("state_dict", "model", "model_ema", "module", "params"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors")
    prefixes = ("module.", "model.")
    for pre in prefixes:
        if obj and all(k.startswith(pre) for k in obj):
            obj = {k[len(pre):]: v for k, v in obj.items()}
    return dict(obj)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint strictly; mismatches name a few of the offending keys."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: " + ", ".join(parts)
        )
    model.load_state_dict(sd, strict=True)
