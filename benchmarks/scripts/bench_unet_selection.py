"""Benchmark (not a test): is data-selected MaMe affordable inside an SD UNet block?

At SD 2.1's first transformer level (96 x 96 latent, 9216 tokens, 320 channels,
batch 2 for classifier-free guidance), the UNet patch merges before
self-attention and restores after it (MaRe). This times, in turns (the
project's interleaved timer), per block:

- ``grid``: the constant 2-D grid partition + best-target weights + merge + MaRe
  (what the UNet patch runs);
- ``selected``: the data-selected step (alternate split, redundancy ranks from an
  (Na, Na) comparison matrix, one-hot selection) + MaRe;
- ``attention``: the self-attention (q, k, v, out projections and SDPA) on the
  merged sequence, for scale: the work the merge exists to cut.

    python benchmarks/scripts/bench_unet_selection.py                 # the recorded run
    python benchmarks/scripts/bench_unet_selection.py --side 32 --seconds 1 --out /tmp/x.json

Writes ``benchmarks/results/unet_selection_cpu.json`` (command, versions, CPU,
raw per-iteration milliseconds, medians).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.ops import (  # noqa: E402
    mame_merge,
    mame_step,
    mame_weights,
    mare_restore,
    mare_restore_partition,
)
from mame_export.ops.grid import grid_partition  # noqa: E402
from mame_export.profile import TimingSettings, measure_interleaved, results_header  # noqa: E402
from mame_export.runners import TimedStep  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=96, help="latent side (default 96: SD 2.1 768px)")
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--r", type=float, default=0.5, help="fraction merged (default 0.5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0, help="budget per variant")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "unet_selection_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, c, b = args.side * args.side, args.channels, args.batch
    n_keep = max(1, round(n * (1 - args.r)))
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, n, c, generator=g) for _ in range(2)]
    ones = torch.ones(b, n, 1)
    qkv = torch.nn.Linear(c, 3 * c)
    proj = torch.nn.Linear(c, c)
    part = grid_partition(args.side, args.side, n_keep)

    def grid(x: torch.Tensor) -> torch.Tensor:
        w = mame_weights(x.index_select(1, part.targets), x.index_select(1, part.sources), 1.0)
        merged, _ = mame_merge(x, ones, w, part)
        return mare_restore_partition(merged, w, part)

    def selected(x: torch.Tensor) -> torch.Tensor:
        merged, _, steps = mame_step(x, x, ones, n_keep)
        return mare_restore(merged, steps)

    def attention(x: torch.Tensor) -> torch.Tensor:
        y = x[:, :n_keep]
        q, k, v = qkv(y).view(b, n_keep, 3, args.heads, c // args.heads).permute(2, 0, 3, 1, 4)
        return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_keep, c))

    steps = {"grid": grid, "selected": selected, "attention": attention}
    settings = TimingSettings(warmup_iters=2, warmup_s=0.0, min_iters=5, max_iters=200,
                              budget_s=args.seconds, input_sets=2)
    with torch.inference_mode():
        timed = {k: TimedStep(run=f, inputs=inputs) for k, f in steps.items()}  # CPU clock
        times = measure_interleaved(timed, settings)
    result: dict[str, object] = {
        **results_header(threads=args.threads),
        "shape": {"batch": b, "tokens": n, "channels": c, "kept": n_keep, "r": args.r},
        "ms": {}, "median_ms": {},
    }
    for k, t in times.items():
        if isinstance(t, Exception):
            result["median_ms"][k] = None  # type: ignore[index]
            result["ms"][k] = f"{type(t).__name__}: {t}"  # type: ignore[index]
        else:
            result["ms"][k] = [round(float(v), 3) for v in t]  # type: ignore[index]
            result["median_ms"][k] = round(float(np.median(t)), 3)  # type: ignore[index]
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_ms"]), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
