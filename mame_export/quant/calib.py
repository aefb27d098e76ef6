"""Calibration inputs for a quantized graph: images from ``--calib DIR`` read with the model
family's own eval preprocessing (:meth:`Family.eval_preprocessing`, the same transform as
``eval``), or, without ``--calib``, seeded random inputs and a warning that the accuracy of
the graph is then unknown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader

from mame_export import settings
from mame_export.errors import UserError, warn
from mame_export.evaluate import data as eval_data
from mame_export.evaluate.files import read_rgb
from mame_export.families import Family, IOSpec, ModelSpec

RANDOM_CALIB_BATCHES = 8  # random input sets calibrated on when no --calib is given


class CalibError(UserError):
    """The calibration folder cannot calibrate this graph (missing, empty, unreadable,
    too few images for the graph's batch, or a model whose inputs are not one image)."""


class Feeds(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of input dicts (re-readable)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def head(self, n: int) -> Feeds:
        """A reader over the first ``n`` input sets."""
        return Feeds(self.feeds[:n])

    def rebatched(self, batch: int) -> Feeds:
        """The same samples in input sets of ``batch`` (for a static-batch graph; the
        samples are repeated in order when there are fewer than one batch, and a last
        partial set is left out)."""
        if not self.feeds:
            return self
        names = list(self.feeds[0])
        stacked = {n: np.concatenate([f[n] for f in self.feeds]) for n in names}
        total = len(stacked[names[0]])
        if total < batch:
            picks = np.arange(batch) % total
            stacked = {n: a[picks] for n, a in stacked.items()}
            total = batch
        return Feeds([{n: np.ascontiguousarray(a[i:i + batch]) for n, a in stacked.items()}
                      for i in range(0, total - batch + 1, batch)])


def find_calib_images(folder: Path, batch: int) -> eval_data.ImageSet:
    """The calibration images of ``folder`` (flat, or class sub-folders; the first
    MAX_CALIB_IMAGES in a fixed order): refused in one line if the folder is missing,
    unreadable or empty, or holds fewer images than one batch of the graph."""
    try:
        found = eval_data.find_images(folder, limit=settings.MAX_CALIB_IMAGES)
    except UserError as e:
        raise CalibError(f"--calib {folder}: {e}") from None
    if len(found.paths) < batch:
        raise CalibError(f"--calib {folder} holds {len(found.paths)} image(s), fewer than one "
                         f"batch of the graph ({batch}); give at least {batch}")
    try:  # every image decodes: a broken one is refused before the model is built
        for path in found.paths:
            read_rgb(path)
    except UserError as e:
        raise CalibError(f"--calib {folder}: {e}") from None
    return found


def calibration_feeds(family: Family, spec: ModelSpec, model: nn.Module, io: IOSpec,
                      img_size: int | None, batch: int, calib: Path | None,
                      seed: int = 0) -> Feeds:
    """The inputs the quantizer calibrates on, at the graph's batch ``batch`` (a last
    partial batch is left out: a static graph takes whole batches only)."""
    if calib is None:
        warn("no --calib folder: calibrating on random inputs, so the int8 graph's accuracy "
             "on real data is unknown; pass --calib DIR with images like the deployment's")
        gen = torch.Generator().manual_seed(seed)
        return Feeds([{n: a.numpy() for n, a in zip(io.input_names, io.make_inputs(batch, gen),
                                                   strict=True)}
                      for _ in range(RANDOM_CALIB_BATCHES)])
    if len(io.input_names) != 1:
        raise CalibError(f"--calib reads images, but {spec.alias} takes "
                         f"{len(io.input_names)} inputs ({', '.join(io.input_names)}); "
                         "calibrate it without --calib (random inputs)")
    found = find_calib_images(calib, batch)
    prep: dict[str, Any] | None = family.eval_preprocessing(spec, model, img_size)
    if prep is None:
        raise CalibError(f"{spec.alias} has no image preprocessing to read --calib with")
    transform = eval_data.transform_from(**prep)
    feeds = []
    try:
        for x in eval_data.load_batches(found, transform, batch):
            if x.shape[0] == batch:
                feeds.append({io.input_names[0]: x.float().numpy()})
    except UserError as e:
        raise CalibError(f"--calib {calib}: {e}") from None
    return Feeds(feeds)
