"""The transformers family: Hugging Face vision encoders (ViT/DeiT, CLIP and SigLIP vision
towers, DINOv2, VideoMAE) built from embedded configs (:mod:`.configs`) and exported as
``pixels -> logits / pooled output`` (VideoMAE: ``video`` (B, 3, T, H, W) -> logits), or,
for the CLIP tower with ``llava``, as LLaVA-1.5's image features and their token sizes.
Needs the ``transformers`` extra; nothing imports it until this family builds a model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mame_export.checkpoints import (
    RANDOM_SOURCE,
    cached_hub_file,
    hub_reachable,
    load_state,
    read_state_dict,
    seeded,
    warn_random,
)
from mame_export.errors import CheckpointError
from mame_export.families.base import (
    Family,
    IOSpec,
    ModelSpec,
    UnsupportedModelError,
    with_kwargs,
)
from mame_export.families.transformers.configs import MODELS, TINY_IMG, HFModel

NAME = "transformers"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Top-level keys of a full CLIP / SigLIP checkpoint that belong to its other tower.
_OTHER_TOWER = ("text_model", "text_projection", "visual_projection", "logit_scale",
                "logit_bias")
def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError("the transformers family needs the transformers package: "
                                    "pip install 'mame-export[transformers]'") from None
    return transformers


def _entry(spec: ModelSpec) -> HFModel:
    return next(m for m in MODELS.values() if m.hub_id == spec.source_name)


def _hf_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys in this transformers version's layout (its own load-time renames:
    older layouts, a full CLIP's ``vision_model.`` prefix); a full checkpoint's other
    tower is left out."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # a transformers without load-time renames: keys as they are
        return dict(sd)

    transforms = get_model_conversion_mapping(model)
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    own = model.state_dict()
    out = {}
    for key, value in sd.items():
        new = rename_source_key(key, renames, converters, model.base_model_prefix, own)[0]
        if new not in own and new.split(".")[0] in _OTHER_TOWER:
            continue
        out[new] = value
    return out


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    sharded = any(path.glob("*.index.json"))
    raise CheckpointError(f"{path} holds no {' or '.join(_WEIGHT_FILES)}"
                          + (" (sharded checkpoints are not supported: merge the shards "
                             "into one file)" if sharded else " (a save_pretrained folder)"))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors / torch file or a ``save_pretrained`` folder strictly."""
    file = _weights_file(Path(path))
    load_state(model, _hf_keys(model, read_state_dict(file)), file)


def _download(hub_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(hub_id, _WEIGHT_FILES[0])
    except Exception:  # noqa: BLE001 - older repos hold only the torch file
        return hf_hub_download(hub_id, _WEIGHT_FILES[1])


class TransformersFamily(Family):
    name = NAME
    summary = ("transformers vision encoders (ViTModel/ViTForImageClassification incl. DeiT, "
               "CLIPVisionModel[WithProjection], SiglipVisionModel, Dinov2Model, "
               "VideoMAEModel/VideoMAEForVideoClassification)")
    patch_module = "mame_export.families.transformers.patch"
    capabilities = frozenset({"llava"})

    def entries(self) -> list[ModelSpec]:
        return [ModelSpec(alias, m.hub_id, NAME, m.img_size, m.description)
                for alias, m in MODELS.items()]

    def _config(self, spec: ModelSpec, img_size: int | None) -> Any:
        entry = _entry(spec)
        values = {**entry.config, **spec.kwargs.get("config", {})}
        if img_size is not None and img_size != spec.img_size:
            if not entry.resizable:
                raise UnsupportedModelError(
                    f"{spec.alias} runs at {spec.img_size} px only (its position embedding "
                    f"is for that size); drop --img-size")
            if entry.video:  # a sinusoidal table, made for the configured size
                values["image_size"] = img_size
        cfg = getattr(_transformers(), entry.config_class)(**values)
        cfg._attn_implementation = spec.kwargs.get("attn_implementation", "sdpa")
        return cfg

    def _wrap(self, spec: ModelSpec, model: nn.Module) -> nn.Module:
        from mame_export.families.transformers.wrappers import HFExport, LlavaVisionTower

        entry = _entry(spec)
        if spec.kwargs.get("llava"):
            if entry.model_class != "CLIPVisionModel":
                raise UnsupportedModelError(f"--llava needs a CLIP vision tower (clip_l336); "
                                            f"{spec.alias} is a {entry.model_class}")
            return LlavaVisionTower(model).eval()
        return HFExport(model, entry.output, entry.video).eval()

    def _model(self, spec: ModelSpec, img_size: int | None) -> nn.Module:
        return getattr(_transformers(), _entry(spec).model_class)(self._config(spec, img_size))

    def skeleton(self, spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
        try:
            with torch.device("meta"):
                return self._wrap(spec, self._model(spec, img_size))
        except UnsupportedModelError:
            raise
        except Exception:  # noqa: BLE001 - the full build runs the same checks after
            return None

    def check(self, model: nn.Module, name: str, img_size: int | None, export: bool) -> None:
        from mame_export.families.transformers.patch import (
            check_supported,
            encoder_of,
            patch_conv,
        )

        try:
            encoder = encoder_of(model)
            check_supported(model)
        except (TypeError, ValueError) as e:
            raise UnsupportedModelError(f"{name}: {e}") from None
        if img_size is None:
            return
        patch = patch_conv(encoder).kernel_size[-1]
        if img_size < patch or img_size % patch:
            raise UnsupportedModelError(f"--img-size {img_size} is not a multiple of {name}'s "
                                        f"patch size {patch}")

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        hub_id = _entry(spec).hub_id

        def random_model() -> nn.Module:
            return seeded(lambda: self._model(spec, img_size))

        if weights == "random":
            return self._wrap(spec, random_model()), RANDOM_SOURCE
        if weights != "auto":
            model = self._model(spec, img_size)
            load_weights(model, weights)
            return self._wrap(spec, model), f"file:{Path(weights).resolve()}"
        if spec.kwargs.get("config"):
            warn_random(f"{spec.alias} is a resized test model: no pretrained weights fit it")
            return self._wrap(spec, random_model()), RANDOM_SOURCE
        cached = cached_hub_file(hub_id, _WEIGHT_FILES)
        if cached is None and hub_reachable():
            try:
                cached = _download(hub_id)
            except Exception as e:  # noqa: BLE001 - any hub failure falls back, loudly
                warn_random(f"could not download pretrained weights ({type(e).__name__}: {e})")
                return self._wrap(spec, random_model()), RANDOM_SOURCE
            source = f"hub:{hub_id}"
        elif cached is None:
            warn_random(f"the model hub is unreachable and its cache has no weights for {hub_id}")
            return self._wrap(spec, random_model()), RANDOM_SOURCE
        else:
            source = f"hub cache:{cached}"
        model = self._model(spec, img_size)
        load_weights(model, cached)
        return self._wrap(spec, model), source

    def io_spec(self, spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
        side = img_size or spec.img_size
        inner = model.model
        chans = inner.config.num_channels
        video = bool(getattr(model, "video", False))
        shape = (chans, inner.config.num_frames, side, side) if video else (chans, side, side)

        def make(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
            return (torch.randn(batch, *shape, generator=gen),)

        inputs = ("video",) if video else ("pixels",)
        if not hasattr(model, "output"):  # the LLaVA tower
            return IOSpec(inputs, ("image_features", "token_sizes"), make, class_scores=False)
        return IOSpec(inputs, (model.output,), make, class_scores=model.output == "logits")

    def patch_options(self, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
        return {"img_size": img_size or spec.img_size}  # the plan is per input size

    def tiny(self, spec: ModelSpec) -> ModelSpec:
        tiny = with_kwargs(spec, f"tiny-{spec.alias}", config=dict(_entry(spec).tiny))
        return replace(tiny, img_size=TINY_IMG)


FAMILY = TransformersFamily()
