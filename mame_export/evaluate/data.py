"""Data for ``eval``: find the images (or video clips, or UNet latents) in a folder, map
class folders to indices, and stream preprocessed batches. See :mod:`mame_export.evaluate`.

Layouts read (names starting with ``.`` are skipped everywhere):

- images, unlabelled: ``DATA/<image>``;
- images, labelled (torchvision's ImageFolder): ``DATA/<class>/<image>``;
- clips, unlabelled: ``DATA/<clip>/<frame>``; labelled: ``DATA/<class>/<clip>/<frame>``;
- latents (UNet): ``DATA/<latent>.npy`` or ``.safetensors`` (:mod:`.latents`).

Class folders map to indices by name: if every name is ASCII digits (``243/``,
``0007/``) that integer is the index; otherwise sorted names get 0, 1, 2, ...
Every class folder must hold images (or clips) directly: an empty one would shift the
indices of the classes after it, so it is refused, as torchvision's ImageFolder does.
How folders are listed and images decoded (permissions, special files, decompression
bombs, 16-bit images) is in :mod:`.files`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from mame_export.evaluate.files import (  # noqa: F401 - re-exported
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    VIDEO_SUFFIXES,
    DataError,
    check_folder,
    read_rgb,
    scan,
    with_suffix_in,
)
from mame_export.evaluate.latents import LATENT_SUFFIXES, find_latents, load_latents  # noqa: F401
from mame_export.settings import is_int, is_real

_ASCII_INTEGER = re.compile(r"[0-9]+")  # not str.isdigit/isdecimal: they accept "²", "٣"
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes
T = TypeVar("T")


@dataclass(frozen=True)
class ImageSet:
    """What ``eval`` reads, in order: image files (``kind="images"``) or clip folders
    (``kind="clips"``, each with the frames read from it in ``frames``), their class
    indices (None: unlabelled) and how the indices were chosen."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] = ()
    mapping: str = "unlabelled (flat folder)"
    kind: str = "images"
    frames: tuple[tuple[Path, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("images", "clips"):
            raise ValueError(f"ImageSet kind must be 'images' or 'clips'; got {self.kind!r}")
        if self.kind == "clips" and len(self.frames) != len(self.paths):
            raise ValueError("an ImageSet of clips needs the frames of every clip")

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1 if self.labels else 0


def find_images(root: str | Path, limit: int | None = None) -> ImageSet:
    """An ImageFolder (class sub-folders) or a flat folder of images; ``limit`` keeps the
    first N in a fixed order (spread over classes: round-robin by class).

    Refused, each in one line: a missing or unreadable folder, no images, a folder that
    holds both images and class folders, a class folder without images directly in it."""
    root = Path(root)
    _check_limit(limit)
    check_folder(root)
    dirs, files = scan(root)
    root_images = with_suffix_in(files, IMAGE_SUFFIXES)
    classes = []
    for d in dirs:
        sub, inside = scan(d)
        classes.append((d, with_suffix_in(inside, IMAGE_SUFFIXES), sub))
    if not any(images for _, images, _ in classes):
        if not root_images:
            raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} "
                            "files in it and in its sub-folders: eval reads DATA/<image> or "
                            f"DATA/<class>/<image>){_video_hint(files)}")
        return ImageSet(tuple(root_images[:limit]), None)
    if root_images:
        raise DataError(f"{root} holds both images ({root_images[0].name}, ...) and class "
                        "folders; move the images into class folders, or use a folder of "
                        "images only")
    for d, images, sub in classes:
        if not images:
            raise DataError(_empty_class(d, sub))
    index, mapping = _class_indices([d.name for d, _, _ in classes])
    order = _round_robin([(index[d.name], images) for d, images, _ in classes], limit)
    return ImageSet(tuple(p for p, _ in order), tuple(c for _, c in order),
                    tuple(d.name for d, _, _ in classes), mapping)


def find_clips(root: str | Path, num_frames: int, limit: int | None = None) -> ImageSet:
    """Video clips as folders of frames: ``DATA/<clip>/<frame>`` (unlabelled) or
    ``DATA/<class>/<clip>/<frame>`` (labelled; classes map to indices as for images).

    A clip's frames are its image files sorted by name. A clip with more than
    ``num_frames`` frames gives ``num_frames`` evenly spaced ones (the middle frame of
    each of ``num_frames`` equal segments); one with fewer is refused, naming the clip
    and both counts. Video files (.mp4, ...) are not decoded (no video decoder is a
    dependency): a folder holding them is refused with how to extract frames.
    ``limit`` keeps the first N clips (round-robin by class)."""
    root = Path(root)
    _check_limit(limit)
    if not (is_int(num_frames) and num_frames >= 1):
        raise DataError(f"frames per clip must be an integer >= 1; got {num_frames!r}")
    check_folder(root, "clips (folders of frames)")
    dirs, files = scan(root)
    _refuse_videos(root, files)
    if with_suffix_in(files, IMAGE_SUFFIXES):
        raise DataError(f"{root} holds images directly; a video model reads clips, one "
                        "folder of frames each: DATA/<clip>/<frame> or "
                        "DATA/<class>/<clip>/<frame>")
    if not dirs:
        raise DataError(f"no clips in {root}: a video model reads one folder of frames per "
                        "clip, DATA/<clip>/<frame> or DATA/<class>/<clip>/<frame>")
    listed = [(d, *scan(d)) for d in dirs]
    for d, sub, inside in listed:
        _refuse_videos(d, inside)
        if sub and with_suffix_in(inside, IMAGE_SUFFIXES):
            raise DataError(f"{d} holds both frames and sub-folders: a folder is either a "
                            "clip (frames) or a class (clip folders)")
    clips = [d for d, sub, inside in listed if with_suffix_in(inside, IMAGE_SUFFIXES)]
    classes = [(d, sub) for d, sub, _ in listed if sub]
    if clips and classes:
        raise DataError(f"{root} mixes clips ({clips[0].name}/ holds frames) and classes "
                        f"({classes[0][0].name}/ holds clip folders); use one layout")
    if not classes:  # unlabelled: every sub-folder is a clip
        kept = dirs[:limit]
        return ImageSet(tuple(kept), None, (), "unlabelled (folder of clips)", "clips",
                        tuple(_frames_of(c, num_frames) for c in kept))
    for d, sub, _ in listed:
        if not sub:
            raise DataError(f"class folder {d} holds no clips (folders of frames); every "
                            "class needs at least one: add some or remove the folder")
    index, mapping = _class_indices([d.name for d, _ in classes])
    order = _round_robin([(index[d.name], sub) for d, sub in classes], limit)
    return ImageSet(tuple(p for p, _ in order), tuple(c for _, c in order),
                    tuple(d.name for d, _ in classes), mapping, "clips",
                    tuple(_frames_of(p, num_frames) for p, _ in order))


def _frames_of(clip: Path, num_frames: int) -> tuple[Path, ...]:
    sub, files = scan(clip)
    _refuse_videos(clip, files)
    frames = with_suffix_in(files, IMAGE_SUFFIXES)
    n = len(frames)
    if n < num_frames:
        where = f" (it holds sub-folders: {sub[0].name}/, ...)" if sub and not n else ""
        raise DataError(f"clip {clip} has {n} frame{'s' * (n != 1)}{where}; the model takes "
                        f"{num_frames} per clip: add frames or remove the clip")
    # The middle frame of each of num_frames equal segments (all frames when n == T).
    return tuple(frames[(2 * i + 1) * n // (2 * num_frames)] for i in range(num_frames))


def _refuse_videos(folder: Path, files: list[Path]) -> None:
    videos = with_suffix_in(files, VIDEO_SUFFIXES)
    if videos:
        v = videos[0]
        raise DataError(f"{v} is a video file; eval does not decode video: extract each "
                        f"clip's frames into a folder, e.g. ffmpeg -i {v} "
                        f"{folder / v.stem}/%05d.png, and remove the video files")


def _video_hint(files: list[Path]) -> str:
    videos = with_suffix_in(files, VIDEO_SUFFIXES)
    return (f"; it holds video files ({videos[0].name}, ...): a video model reads clips as "
            "folders of frames" if videos else "")


def _empty_class(folder: Path, sub: list[Path]) -> str:
    if sub:
        return (f"class folder {folder} holds no images directly, only sub-folders "
                f"({sub[0].name}/, ...); eval reads DATA/<class>/<image>: move the images up "
                "or remove the folder")
    return (f"class folder {folder} holds no images; an empty class would shift the "
            "indices of the classes after it: add images or remove the folder")


def _class_indices(names: Sequence[str]) -> tuple[dict[str, int], str]:
    if all(_ASCII_INTEGER.fullmatch(n) for n in names):
        index = {n: int(n) for n in names}
        by_index: dict[int, str] = {}
        for n, i in index.items():
            if i in by_index:
                raise DataError(f"class folders {by_index[i]}/ and {n}/ both name class {i}")
            by_index[i] = n
        return index, "class index = the sub-folder's integer name"
    return ({n: i for i, n in enumerate(sorted(names))},
            "class index = position of the sub-folder's name in sorted order")


def _round_robin(per_class: Sequence[tuple[int, Sequence[T]]],
                 limit: int | None) -> list[tuple[T, int]]:
    # Round-robin over classes so a limit keeps every class represented.
    order: list[tuple[T, int]] = []
    for depth in range(max(len(items) for _, items in per_class)):
        order += [(items[depth], c) for c, items in per_class if depth < len(items)]
        if limit is not None and len(order) >= limit:
            break
    return order[:limit]


def _check_limit(limit: object) -> None:
    if limit is not None and not (is_int(limit) and limit >= 1):  # type: ignore[operator]
        raise DataError(f"--limit must be an integer >= 1; got {limit!r}")


def transform_for(model: nn.Module, img_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The model's own eval preprocessing (timm data config: resize, crop, mean/std)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size: int | tuple[int, int] = img_size
    elif built is not None:  # the size the model was built at, not its hub default's
        size = tuple(built)  # type: ignore[assignment]
    else:
        size = tuple(cfg["input_size"][1:])  # type: ignore[assignment]
    return transform_from(cfg["mean"], cfg["std"], size, crop_pct=cfg["crop_pct"],
                          interpolation=cfg["interpolation"],
                          crop_mode=cfg.get("crop_mode") or "center")


def transform_from(
    mean: Sequence[float], std: Sequence[float], size: int | Sequence[int], *,
    crop_pct: float = 0.875, interpolation: str = "bicubic", crop_mode: str = "center",
) -> Callable[[Any], torch.Tensor]:
    """Eval preprocessing from explicit values, for a family without a timm data config
    (timm's eval transform, built from them): resize the shorter side to
    ``size / crop_pct`` (``crop_mode="squash"``: both sides, aspect not kept), center-crop
    ``size`` (an int or (height, width)), to a tensor in [0, 1], normalize by ``mean`` /
    ``std`` (RGB)."""
    from timm.data import create_transform

    hw = (size, size) if is_int(size) else tuple(size)  # type: ignore[arg-type]
    if len(hw) != 2 or not all(is_int(s) and s >= 1 for s in hw):
        raise ValueError(f"size must be an int or (height, width) >= 1; got {size!r}")
    if len(mean) != 3 or len(std) != 3 or not all(is_real(s) and s > 0 for s in std):
        raise ValueError(f"mean and std need 3 values (RGB), std > 0; got {mean!r}, {std!r}")
    if not (is_real(crop_pct) and 0 < crop_pct <= 1):
        raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {interpolation!r}")
    if crop_mode not in _CROP_MODES:
        raise ValueError(f"crop_mode must be one of {_CROP_MODES}; got {crop_mode!r}")
    return create_transform(input_size=(3, *hw), mean=tuple(mean), std=tuple(std),
                            crop_pct=crop_pct, interpolation=interpolation,
                            crop_mode=crop_mode, is_training=False)


def load_batches(
    items: ImageSet, transform: Callable[[Any], torch.Tensor], batch: int
) -> Iterator[torch.Tensor]:
    """Preprocessed batches in order, as a stream: at most one batch is held here at a
    time. Images give (B, 3, H, W); clips give (B, 3, T, H, W), ``transform`` applied to
    each frame. An unreadable, oversized or out-of-range image is one DataError."""
    if not (is_int(batch) and batch >= 1):
        raise DataError(f"--batch must be an integer >= 1; got {batch!r}")
    return _batches(items, transform, batch)


def _batches(items: ImageSet, transform: Callable[[Any], torch.Tensor],
             batch: int) -> Iterator[torch.Tensor]:
    buf: list[torch.Tensor] = []
    for i, path in enumerate(items.paths):
        if items.kind == "clips":
            buf.append(torch.stack([transform(read_rgb(f)) for f in items.frames[i]], dim=1))
        else:
            buf.append(transform(read_rgb(path)))
        if len(buf) == batch:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)
