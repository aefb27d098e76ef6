"""``eval`` of a diffusion denoiser (a UNet or a diffusion transformer): how close each
variant's noise prediction stays to the unmerged model's, on the same latents, timesteps
and text embeddings.

A fidelity check of one denoising step, not an image-quality score: it says how much
merging perturbs the UNet's computation, not how generated images look. The latents come
from ``--data`` (saved tensors) or, without it, are seeded random N(0, 1) latents; the
timesteps are spread evenly over [0, 999]; the text embeddings are seeded random
N(0, 1) tensors of the model's text shape (one per latent, the same for every variant and
timestep). Further conditioning inputs (SDXL's ``text_embeds`` and ``time_ids``, SD3's
``pooled_projections``) come from the IO spec, seeded per latent batch likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mame_export.evaluate.metrics import cosines
from mame_export.evaluate.variants import TOMESD_MAX_DOWNSAMPLE, Variant, row_of, run_once
from mame_export.families import IOSpec

TIMESTEPS = 10  # evenly spaced in [0, 999]
LAST_TIMESTEP = 999
DEFAULT_LATENTS = 4  # seeded random latents when no --data is given
LATENT_SEED = 0
TEXT_SEED = 1_000_003  # + the latent's index: its text embedding

Log = Callable[[str], None]


def timesteps(n: int = TIMESTEPS) -> list[float]:
    return [float(t) for t in torch.linspace(0, LAST_TIMESTEP, n).round()]


def _shapes(io: IOSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-item shapes of the latents and the text embeddings."""
    sample, _t, context = io.make_inputs(1, torch.Generator().manual_seed(0))[:3]
    return tuple(sample.shape[1:]), tuple(context.shape[1:])


def random_latents(count: int, shape: Sequence[int], batch: int) -> Iterator[torch.Tensor]:
    """``count`` seeded N(0, 1) latents, in batches; the same in every run."""
    gen = torch.Generator().manual_seed(LATENT_SEED)
    for start in range(0, count, batch):
        yield torch.randn(min(batch, count - start), *shape, generator=gen)


def extra_conditioning(io: IOSpec, first: int, count: int) -> tuple[torch.Tensor, ...]:
    """The IO spec's inputs after (sample, timestep, text) for latents ``first`` ..
    ``first + count - 1``, seeded by ``first``: the same for every variant and timestep."""
    gen = torch.Generator().manual_seed(TEXT_SEED + first)
    return tuple(io.make_inputs(count, gen)[3:])


def text_embeddings(first: int, count: int, shape: Sequence[int]) -> torch.Tensor:
    """Seeded N(0, 1) text embeddings for latents ``first`` .. ``first + count - 1``."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(
        TEXT_SEED + i)) for i in range(first, first + count)])


def latent_batches(io: IOSpec, paths: Sequence[Path] | None, count: int,
                   batch: int) -> Iterator[torch.Tensor]:
    """The latents eval runs: from ``paths`` (checked against the UNet's latent shape) or
    ``count`` seeded random ones."""
    shape, _ = _shapes(io)
    if paths is None:
        return random_latents(count, shape, batch)
    from mame_export.evaluate.data import load_latents

    return load_latents(paths, batch, shape)


@dataclass
class UNetResult:
    """The rows, the notes that say what was compared, the timesteps and the latents run."""

    rows: list[dict[str, Any]]
    notes: list[str]
    timesteps: list[float]
    latents: int


def evaluate_unet(variants: Sequence[Variant], io: IOSpec, latents: Iterator[torch.Tensor],
                  seeded: bool, log: Log) -> UNetResult:
    """Noise-prediction fidelity of every variant against the first (the unmerged UNet):
    per variant the mean cosine and the relative L2 error ||out - ref|| / ||ref|| over
    every latent and timestep, and both per timestep (``seeded``: the latents are seeded
    random ones, said in the notes)."""
    steps = timesteps()
    _, text_shape = _shapes(io)
    # [variant][timestep] -> [sum of cosines, sum of squared errors, sum of squared ref]
    sums = [[[0.0, 0.0, 0.0] for _ in steps] for _ in variants]
    done = 0
    for lat in latents:
        n = len(lat)
        text = text_embeddings(done, n, text_shape)
        extra = extra_conditioning(io, done, n)
        for k, t in enumerate(steps):
            inputs = (lat, torch.full((n,), t, dtype=torch.float32), text, *extra)
            what = f"latents {done + 1}-{done + n} at timestep {t:g}"
            ref = None
            for i, v in enumerate(variants):
                out = run_once(v, io, inputs, what)[0][io.output_names[0]].double()
                ref = out if ref is None else ref
                s = sums[i][k]
                s[0] += float(cosines(out, ref).sum())
                s[1] += float((out - ref).square().sum())
                s[2] += float(ref.square().sum())
        done += n
        log(f"  {done} latents x {len(steps)} timesteps, {len(variants)} variants")
    rows = []
    for v, per_t in zip(variants, sums, strict=True):
        err, ref_sq = sum(s[1] for s in per_t), sum(s[2] for s in per_t)
        rows.append(row_of(v, {
            **dict.fromkeys(("cosine_features", "top1_agreement", "top1", "top5")),
            "cosine_outputs": sum(s[0] for s in per_t) / max(done * len(steps), 1),
            "rel_l2": (err / ref_sq) ** 0.5 if ref_sq else None,
            "per_timestep": [{"timestep": t, "cosine": s[0] / max(done, 1),
                              "rel_l2": (s[1] / s[2]) ** 0.5 if s[2] else None}
                             for t, s in zip(steps, per_t, strict=True)],
        }))
    return UNetResult(rows, _notes(variants, done, seeded), steps, done)


def _notes(variants: Sequence[Variant], latents: int, seeded: bool) -> list[str]:
    notes = ["a denoiser's rows are a fidelity check of one denoising step (noise prediction "
             "vs the unmerged model, on the same latents, timesteps and text embeddings), not "
             "an image-quality score"]
    if seeded:
        notes.append(f"no --data: {latents} seeded random N(0, 1) latents")
    notes.append(f"{TIMESTEPS} timesteps evenly spaced in [0, {LAST_TIMESTEP}]; seeded random "
                 "N(0, 1) text embeddings, one per latent")
    if any(v.method == "tomesd" for v in variants):
        notes.append(f"ToMe-SD: tomesd.apply_patch(ratio=r, max_downsample="
                     f"{TOMESD_MAX_DOWNSAMPLE}, use_rand=False); its MACs are not computed")
    return notes
