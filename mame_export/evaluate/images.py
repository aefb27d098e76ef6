"""``eval`` of image and video models: every variant over the same preprocessed batches
(decoded once, streamed), scored against the first (the unmerged model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from mame_export.evaluate.data import DataError, ImageSet, load_batches
from mame_export.evaluate.metrics import FeatureScorer, Tally, pooled_tokens, probe_split
from mame_export.evaluate.variants import Variant, row_of, run_once
from mame_export.families import IOSpec

Log = Callable[[str], None]
TOKEN_SIZES = "token_sizes"  # an output of token sequences' sizes (the --llava tower)


def head_classes(model: nn.Module) -> int:
    """The classes of ``model``'s classifier head (timm ``num_classes``, transformers
    ``num_labels``); 0 for an encoder."""
    n = getattr(model, "num_classes", None)
    if n is None and isinstance(getattr(getattr(model, "model", None), "classifier", None),
                                nn.Module):
        n = model.model.config.num_labels
    return int(n or 0)


def check_labels(images: ImageSet, model: nn.Module) -> None:
    """Refuse class folders whose indices the classifier head does not have."""
    n_out = head_classes(model)
    if images.labels is None or n_out == 0:
        return
    if images.num_classes > n_out:
        raise DataError(
            f"the data has class index {images.num_classes - 1} ({images.mapping}), but the "
            f"model's head has {n_out} classes; use class folders that fit the head, or a "
            "flat folder for fidelity only"
        )


def readout(named: dict[str, torch.Tensor], prelogits: torch.Tensor | None,
            io: IOSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(outputs, features) of one batch, each (B, K): a token sequence with its sizes is
    pooled to its size-weighted mean token (both); class scores have their pre-logit
    features when read (else None); other outputs are the features."""
    if TOKEN_SIZES in named:
        tokens = next(t for n, t in named.items() if n != TOKEN_SIZES)
        pooled = pooled_tokens(tokens, named[TOKEN_SIZES])
        return pooled, pooled
    out = named[io.output_names[0]].flatten(1)
    if prelogits is not None:
        return out, prelogits.flatten(1)
    return out, None if io.class_scores else out


def evaluate_images(variants: Sequence[Variant], io: IOSpec, items: ImageSet,
                    transform: Callable[[Any], torch.Tensor], batch: int,
                    log: Log) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per variant) and notes: fidelity, and accuracy where labels allow."""
    labelled = items.labels is not None
    encoder = not io.class_scores
    train, why = probe_split(items.labels) if labelled and encoder else (None, None)
    keep = train is not None and why is None
    tallies = [Tally() for _ in variants]
    unit = "clips" if items.kind == "clips" else "images"
    total, done = len(items.paths), 0
    for x in load_batches(items, transform, batch):
        n = len(x)
        labels = torch.tensor(items.labels[done:done + n]) if labelled else None
        what = f"{unit} {done + 1}-{done + n}"
        ref: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for v, tally in zip(variants, tallies, strict=True):
            out, feat = readout(*run_once(v, io, (x,), what), io)
            ref = (out, feat) if ref is None else ref
            tally.add(ref[0], out, ref[1], feat, labels, io.class_scores, keep)
        done += n
        log(f"  {done}/{total} {unit}, {len(variants)} variants")
    rows = [row_of(v, t.metrics(io.class_scores, labelled))
            for v, t in zip(variants, tallies, strict=True)]
    notes = _notes(io, labelled, encoder, why, variants)
    if keep:
        scorer = FeatureScorer(torch.cat(tallies[0].kept), items.labels, train)
        for row, t in zip(rows, tallies, strict=True):
            row.update(scorer.score(torch.cat(t.kept)) if t.kept else
                       dict.fromkeys(("knn_accuracy", "knn_agreement", "probe_accuracy",
                                      "probe_agreement")))
    return rows, notes


def _notes(io: IOSpec, labelled: bool, encoder: bool, why: str | None,
           variants: Sequence[Variant]) -> list[str]:
    notes = []
    if encoder:
        notes.append("the model is an encoder (no class scores): fidelity is the mean cosine "
                     "of its output features to the unmerged model's; top-1/top-5 and "
                     "agreement are not computed")
        if TOKEN_SIZES in io.output_names:
            notes.append("token outputs: each variant's size-weighted mean token (weights: "
                         "token_sizes) is compared with the unmerged model's plain mean "
                         "token; merged tokens are not unmerged (no MaRe)")
        if not labelled:
            notes.append("unlabelled images: 1-NN and probe accuracy are not computed")
        elif why is not None:
            notes.append(f"1-NN and probe accuracy are not computed: {why}")
        else:
            notes.append("1-NN (cosine) and a linear probe (softmax, L-BFGS) are fitted on "
                         "the unmerged model's features of half the images of each class "
                         "(items 0, 2, 4, ... in folder order) and score the other half, "
                         "for every variant")
    elif not labelled:
        notes.append("unlabelled images: top-1/top-5 are not computed")
    if io.class_scores and any(not v.eager for v in variants):
        notes.append("a graph returns class scores only: its pre-logit feature cosine is "
                     "not computed")
    return notes
