"""One registry of model aliases and one way to build a model and load its weights."""

from __future__ import annotations

import difflib
import os
import pickle
import socket
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import CheckpointError, UserError, check_file, one_line


class UnknownModelError(UserError):
    """The model name is neither an alias nor a timm model."""


class UnsupportedModelError(UserError):
    """A model MaMe cannot patch, or this tool cannot export, at these settings."""


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
        try:
            cfg = timm.models.get_pretrained_cfg(name if "." in name else base)
        except RuntimeError:  # an unknown pretrained tag
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(base) if "." in t
                    and t.split(".", 1)[0] == base]
            close = difflib.get_close_matches(name.split(".", 1)[1], tags, n=3, cutoff=0.3)
            known = ", ".join(close or tags[:6]) or "none"
            raise UnknownModelError(f"{base} has no pretrained tag {name.split('.', 1)[1]!r} "
                                    f"(tags: {known}); or give the name without a tag") from None
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


def skeleton(spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
    """The model's modules with no weights (on the meta device): what it is made of,
    known in a moment, before anything is built or downloaded. None for the UNet, or
    when timm cannot build the model without memory."""
    if spec.family != "timm-vit":
        return None
    import timm

    kw: dict[str, Any] = dict(spec.kwargs)
    if img_size is not None:
        kw["img_size"] = img_size
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(spec.source_name, pretrained=False, **kw)
    except Exception:  # noqa: BLE001 - the full build runs the same checks after
        return None


def check_architecture(model: nn.Module, name: str, img_size: int | None = None,
                       export: bool = True) -> None:
    """One-line UnsupportedModelError for a model MaMe cannot patch (not a timm ViT, other
    blocks), a hybrid ViT (CNN stem) to export, or an input size the patch grid does not
    fit. Runs on a :func:`skeleton` before any work, and on the built model."""
    from timm.layers import Attention, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    cls = type(model)
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is a {cls.__module__}.{cls.__name__}; MaMe supports timm "
            "VisionTransformer models (ViT, DeiT, SigLIP/SigLIP2, register-token ViTs) "
            "and sd21-unet"
        )
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, Block) or not isinstance(attn, Attention):
            inner = f" with {type(attn).__name__}" if attn is not None else \
                " (no separate attention module)"
            raise UnsupportedModelError(
                f"{name}: block {i} is {type(blk).__name__}{inner}; MaMe supports timm ViTs "
                "built from the standard Block and Attention only"
            )
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


def _checkpoint_format(p: Path) -> str:
    """'safetensors' or 'torch' from the file's first bytes (not its name)."""
    with open(p, "rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    if head[8:9] == b"{" and 2 <= n <= p.stat().st_size - 8:  # header length, then JSON
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip / legacy pickle
        return "torch"
    if p.suffix.lower() == ".safetensors":
        return "safetensors"
    return "torch"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a torch state dict (weights_only), unwrapping common wrappers."""
    p = check_file(path, "checkpoint", CheckpointError)
    try:
        fmt = _checkpoint_format(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "safetensors":
                from safetensors.torch import load_file

                obj: Any = load_file(str(p), device="cpu")
            else:
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(
                f"refused to load checkpoint {p}: it holds Python objects besides tensors, "
                "and loading those could run code; re-save it as a plain state dict or as "
                "safetensors"
            ) from None
        text = one_line(str(e))
        detail = f"{type(e).__name__}: {text}" if len(text) < 20 else text
        if len(detail) > 200:
            detail = detail[:197].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(f"cannot read checkpoint {p} (not a readable safetensors or "
                              f"torch file): {detail}") from None
    for key in ("state_dict", "model", "model_ema", "module", "params"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors")
    no_data = [k for k, v in obj.items() if v.is_meta]
    if no_data:
        raise CheckpointError(f"checkpoint {p} holds {len(no_data)} meta tensor(s) without "
                              f"values (e.g. {no_data[0]}); save it from a model with real weights")
    odd = [k for k, v in obj.items() if v.layout != torch.strided]
    if odd:
        raise CheckpointError(f"checkpoint {p} holds {len(odd)} sparse or other non-dense "
                              f"tensor(s) (e.g. {odd[0]}); save dense tensors")
    prefixes = ("module.", "model.")
    for pre in prefixes:
        if obj and all(k.startswith(pre) for k in obj):
            obj = {k[len(pre):]: v for k, v in obj.items()}
    return dict(obj)


def _dtype_kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "bool" if t.dtype == torch.bool else "integer"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint strictly; mismatches name a few of the offending keys."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        kinds = [(k, sd[k].dtype, _dtype_kind(v)) for k, v in own.items()
                 if _dtype_kind(sd[k]) != _dtype_kind(v)]
        if kinds:
            k, got, want = kinds[0]
            raise CheckpointError(
                f"checkpoint {path} holds {len(kinds)} tensor(s) of the wrong dtype for "
                f"{type(model).__name__} (e.g. {k} is {str(got).replace('torch.', '')}; "
                f"the model needs a {want} tensor)"
            )
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
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warn(f"checkpoint {path} holds NaN or infinite values in {len(bad)} tensor(s) "
             f"(e.g. {bad[0]}): the model's outputs will not be finite")
    model.load_state_dict(sd, strict=True)
