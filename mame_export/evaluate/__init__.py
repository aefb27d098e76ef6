"""Accuracy and fidelity of MaMe and ToMe against the unmerged model, on a user's data.

``mame-export eval MODEL --data DIR`` runs the unmerged model, MaMe at each r, the
family's ToMe baseline with the same tokens per block (ToMe-SD on a UNet, when tomesd is
installed) and, with ``--graph PATH``, an exported graph through ONNX Runtime, over the
same inputs, preprocessed the way the model's family says (:meth:`Family.
eval_preprocessing`). Per variant, by the kind of model:

- classifiers (class scores): top-1/top-5 on labelled folders, agreement with the
  unmerged model's top-1, the mean cosine of the outputs and of the pre-logit features;
- encoders (CLIP, SigLIP, DINOv2, timm models without a head, ``--llava`` tokens): the
  mean cosine of the features (token outputs: of the size-weighted mean token), and on a
  labelled folder 1-NN and linear-probe accuracy, both fitted on the unmerged model's
  features of a fixed half of each class and scored on the other half;
- video classifiers (VideoMAE): as classifiers, on clips (folders of frames);
- UNets: noise-prediction cosine and relative L2 error over a spread of timesteps, on
  ``--data`` latents or seeded random ones (a fidelity check, not image quality);

and the MACs ratio of each plan. NaN or infinite outputs fail the run (exit 1).

Data: see :mod:`mame_export.evaluate.data` (class folders map to indices by their
integer names, else in sorted order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from mame_export.evaluate.data import (  # noqa: F401 - re-exported
    IMAGE_SUFFIXES,
    DataError,
    ImageSet,
    find_images,
    load_batches,
    transform_for,
)
from mame_export.evaluate.images import check_labels, evaluate_images, head_classes  # noqa: F401
from mame_export.evaluate.metrics import FeatureScorer, Tally, probe_split  # noqa: F401
from mame_export.evaluate.report import plot, table  # noqa: F401
from mame_export.evaluate.run import EvalSettings, run_eval  # noqa: F401
from mame_export.evaluate.variants import (  # noqa: F401
    NonFiniteOutputError,
    Variant,
    build_variants,
    copy_of,
)

Log = Callable[[str], None]


@dataclass
class Outputs:
    """A timm model's outputs over a set of batches: final outputs and pre-logit features."""

    outputs: torch.Tensor
    features: torch.Tensor
    seconds: float = 0.0


@torch.inference_mode()
def run_variant(model: nn.Module, batches: Sequence[torch.Tensor], log: Log | None = None,
                name: str = "") -> Outputs:
    """Outputs and pre-logit features (the ``head``'s input, read with a hook) of a timm
    model over ``batches`` held in memory (the benchmark tools' entry point)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `head` module to read pre-logits from")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float()))
    outs: list[torch.Tensor] = []
    start = time.perf_counter()
    done, total = 0, sum(len(b) for b in batches)
    try:
        for b in batches:
            outs.append(model(b).float())
            done += len(b)
            if log is not None:
                log(f"  {name}: {done}/{total} images")
    finally:
        hook.remove()
    return Outputs(torch.cat(outs), torch.cat(seen), time.perf_counter() - start)
