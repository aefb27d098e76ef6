"""The transformers family: Hugging Face vision encoders (ViT/DeiT, CLIP and SigLIP vision
towers, DINOv2, VideoMAE) built from embedded configs (:mod:`.configs`) and exported as
``pixels -> logits / pooled output`` (VideoMAE: ``video`` (B, 3, T, H, W) -> logits), or,
for the CLIP tower with ``llava``, as LLaVA-1.5's image features and their token sizes.
Needs the ``transformers`` extra; nothing imports it until this family builds a model."""

from __future__ import annotations

import json
import os
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
from mame_export.errors import CheckpointError, check_file, one_line
from mame_export.families.base import (
    Family,
    IOSpec,
    ModelSpec,
    UnsupportedModelError,
    with_kwargs,
)
from mame_export.families.transformers.configs import (
    MODELS,
    TINY_IMG,
    HFModel,
    config_conflict,
)
from mame_export.families.transformers.patch import PATCHER

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
    """The weights file of a file or ``save_pretrained`` folder path, checked readable."""
    if not path.is_dir():
        return check_file(path, "checkpoint", CheckpointError)
    for name in _WEIGHT_FILES:
        if os.path.lexists(path / name):  # there, but maybe a FIFO, a folder, a loop ...
            return check_file(path / name, "checkpoint", CheckpointError)
    sharded = any(path.glob("*.index.json"))
    raise CheckpointError(f"{path} holds no {' or '.join(_WEIGHT_FILES)}"
                          + (" (sharded checkpoints are not supported: merge the shards "
                             "into one file)" if sharded else " (a save_pretrained folder)"))


# A config.json is a few kB; a larger one is not a save_pretrained config.
_MAX_CONFIG_BYTES = 16 << 20


def _values(spec: ModelSpec) -> dict[str, Any]:
    """The config values ``spec`` builds with (its entry's, then a test model's overrides)."""
    return {**_entry(spec).config, **spec.kwargs.get("config", {})}


def check_folder_config(spec: ModelSpec, folder: Path) -> None:
    """One-line CheckpointError when a ``save_pretrained`` folder's config.json describes
    another model than ``spec`` builds (read as JSON only: nothing in it runs)."""
    file = folder / "config.json"
    if not os.path.lexists(file):
        return
    check_file(file, "model config", CheckpointError)
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"model config {file} is over {_MAX_CONFIG_BYTES >> 20} MB: "
                              "not a save_pretrained config.json")
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"model config {file} is not JSON text ({type(e).__name__})"
                              ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read model config {file}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"model config {file} is not a JSON object")
    conflict = config_conflict(_entry(spec), _values(spec), raw)
    if conflict is not None:
        name, ours, theirs = conflict
        raise CheckpointError(one_line(
            f"{folder} holds another model than {spec.alias}: its config.json has "
            f"{name} {_shown(theirs)}, {spec.alias} has {_shown(ours)}"))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resample_position_table(model: nn.Module, side: int) -> None:
    """Give a DINOv2 model the position table of ``side``-px inputs, resampled once by its
    own ``interpolate_pos_encoding`` (so its outputs are unchanged): its forward then adds
    the table as it is, and the graph holds no (bicubic) Resize that TensorRT cannot run."""
    emb = model.embeddings
    table = emb.position_embeddings
    ph, pw = emb.patch_embeddings.patch_size
    patches = (side // ph) * (side // pw)
    if table.shape[1] == patches + 1:
        return
    with torch.no_grad():
        tokens = table.new_empty(1, patches + 1, table.shape[-1])  # only its shape is read
        resampled = emb.interpolate_pos_encoding(tokens, side, side)
    emb.position_embeddings = nn.Parameter(resampled.contiguous(),
                                           requires_grad=table.requires_grad)
    emb.patch_embeddings.image_size = (side, side)
    emb.patch_embeddings.num_patches = patches
    model.config.image_size = side


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
    patcher = PATCHER
    capabilities = frozenset({"llava"})

    def entries(self) -> list[ModelSpec]:
        return [ModelSpec(alias, m.hub_id, NAME, m.img_size, m.description)
                for alias, m in MODELS.items()]

    def _config(self, spec: ModelSpec, img_size: int | None) -> Any:
        entry = _entry(spec)
        values = _values(spec)
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
        self.patcher.check_input_size(model, name, img_size)

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        model, source = self._weighted(spec, weights, img_size)
        if _entry(spec).interpolates_position_table:
            resample_position_table(model, img_size or spec.img_size)
        return self._wrap(spec, model), source

    def _weighted(self, spec: ModelSpec, weights: str,
                  img_size: int | None) -> tuple[nn.Module, str]:
        """The bare transformers model with its weights, and where they came from."""
        hub_id = _entry(spec).hub_id

        def random_model() -> nn.Module:
            return seeded(lambda: self._model(spec, img_size))

        if weights == "random":
            return random_model(), RANDOM_SOURCE
        if weights != "auto":
            if Path(weights).is_dir():
                check_folder_config(spec, Path(weights))
            file = _weights_file(Path(weights))  # refused before the model is built
            model = self._model(spec, img_size)
            load_weights(model, file)
            return model, f"file:{Path(weights).resolve()}"
        if spec.kwargs.get("config"):
            warn_random(f"{spec.alias} is a resized test model: no pretrained weights fit it")
            return random_model(), RANDOM_SOURCE
        cached = cached_hub_file(hub_id, _WEIGHT_FILES)
        if cached is None and hub_reachable():
            try:
                cached = _download(hub_id)
            except Exception as e:  # noqa: BLE001 - any hub failure falls back, loudly
                warn_random(f"could not download pretrained weights ({type(e).__name__}: {e})")
                return random_model(), RANDOM_SOURCE
            source = f"hub:{hub_id}"
        elif cached is None:
            warn_random(f"the model hub is unreachable and its cache has no weights for {hub_id}")
            return random_model(), RANDOM_SOURCE
        else:
            source = f"hub cache:{cached}"
        model = self._model(spec, img_size)
        load_weights(model, cached)
        return model, source

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

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """The image processor of the checkpoints of each model type (their
        ``preprocessor_config.json``): mean/std, resize and crop, at the input size."""
        imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        # crop_pct: the crop's share of the resized short side (DINOv2: 224 of 256);
        # "squash": resize to size x size, no crop (SigLIP's and ViT's processors).
        known: dict[str, dict[str, Any]] = {
            "clip_vision_model": {"mean": (0.48145466, 0.4578275, 0.40821073),
                                  "std": (0.26862954, 0.26130258, 0.27577711),
                                  "crop_pct": 1.0, "interpolation": "bicubic",
                                  "crop_mode": "center"},
            "siglip_vision_model": {**half, "crop_pct": 1.0, "interpolation": "bicubic",
                                    "crop_mode": "squash"},
            "dinov2": {**imagenet, "crop_pct": 224 / 256, "interpolation": "bicubic",
                       "crop_mode": "center"},
            "videomae": {**imagenet, "crop_pct": 1.0, "interpolation": "bilinear",
                         "crop_mode": "center"},
            # google/vit-*: ViTImageProcessor's own mean/std; DeiT checkpoints differ.
            "vit": {**half, "crop_pct": 1.0, "interpolation": "bilinear",
                    "crop_mode": "squash"},
        }
        model_type = model.model.config.model_type
        if model_type not in known:
            raise UnsupportedModelError(f"eval has no image preprocessing for {spec.alias} "
                                        f"(model type {model_type})")
        return {**known[model_type], "size": img_size or spec.img_size}


FAMILY = TransformersFamily()
