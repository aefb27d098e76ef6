"""Benchmark (not a test): what MaMe + MaRe saves per UNet level (SDXL: where to merge).

SDXL's first level (the full 128 x 128 latent at 1024 px) has no attention. Its
transformer blocks run at two grids: 10 blocks of 640 channels on the 64 x 64 grid (4096
tokens) and 60 blocks of 1280 channels on the 32 x 32 grid (1024 tokens). The full UNet
(2.6 B parameters, 10.3 GB in fp32) does not fit the memory this machine leaves for one
study, so this times one real SDXL transformer block per grid: a diffusers
``Transformer2DModel`` (GroupNorm, proj_in, one ``BasicTransformerBlock``, proj_out) with
SDXL's widths and heads, exported to ONNX, unpatched and patched (the family's own
forward, r as given), run by ONNX Runtime on the CPU in turns. The saving of a whole level
is its block count times the per-block saving.

SD 1.5 (``--model sd15``, latent 64) runs the same study over its four levels (5, 5, 5
and 1 blocks of 320, 640, 1280 and 1280 channels, 8 heads, convolutional proj_in).

    python benchmarks/scripts/diffusion_unet_levels.py                 # SDXL, the recorded run
    python benchmarks/scripts/diffusion_unet_levels.py --model sd15 --latent 64 \
        --out benchmarks/results/diffusion_sd15_levels_cpu.json
    python benchmarks/scripts/diffusion_unet_levels.py --latent 64 --seconds 2 --out /tmp/x.json

Writes ``benchmarks/results/diffusion_sdxl_placement_cpu.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.export import export_onnx  # noqa: E402
from mame_export.families.sd_unet.forward import (  # noqa: E402
    _MaMeBasicTransformerBlock,
    _MaMeTransformer2D,
)
from mame_export.families.swap import swap  # noqa: E402
from mame_export.plan import BlockSettings  # noqa: E402
from mame_export.profile import TimingSettings, measure_interleaved, results_header  # noqa: E402
from mame_export.runners import TimedStep  # noqa: E402

TEXT_TOKENS = 77
# Attention levels: (channels, heads, blocks in the UNet, downsampling of the latent), and
# the UNet's text width and projection kind; level names at the native latent.
MODELS = {
    "sdxl": ({"64x64-level": (640, 10, 10, 2), "32x32-level": (1280, 20, 60, 4)}, 2048, True),
    "sd15": ({"64x64-level": (320, 8, 5, 1), "32x32-level": (640, 8, 5, 2),
              "16x16-level": (1280, 8, 5, 4), "8x8-mid": (1280, 8, 1, 8)}, 768, False),
}


class _Level(nn.Module):
    """One SDXL transformer (one block) as the UNet calls it: returns the hidden states."""

    def __init__(self, channels: int, heads: int, text: int, linear: bool) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.t2d = Transformer2DModel(
            num_attention_heads=heads, attention_head_dim=channels // heads,
            in_channels=channels, num_layers=1, cross_attention_dim=text,
            norm_num_groups=32, use_linear_projection=linear)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.t2d(x, encoder_hidden_states=context, return_dict=False)[0]


def _patched(level: _Level, r: float) -> _Level:
    swap(level.t2d, _MaMeTransformer2D)
    for blk in level.t2d.transformer_blocks:
        swap(blk, _MaMeBasicTransformerBlock, settings=BlockSettings(merges=True, r=r))
    return level


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    ap.add_argument("--latent", type=int, default=128, help="latent side (128: 1024 px)")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="budget per variant")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "diffusion_sdxl_placement_cpu.json")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    levels, text_width, linear = MODELS[args.model]
    result: dict[str, object] = {**results_header(threads=args.threads), "model": args.model,
                                 "r": args.r, "latent": args.latent, "batch": args.batch,
                                 "levels": {}}
    for name, (c, heads, count, down) in levels.items():
        side = args.latent // down
        g = torch.Generator().manual_seed(0)
        sets = [(torch.randn(args.batch, c, side, side, generator=g),
                 torch.randn(args.batch, TEXT_TOKENS, text_width, generator=g)) for _ in range(2)]
        inputs = sets[0]
        feeds = [{"x": x.numpy(), "context": t.numpy()} for x, t in sets]
        steps = {}
        with tempfile.TemporaryDirectory(prefix="sdxl-level-") as tmp:
            for variant in ("unmerged", "mame"):
                torch.manual_seed(0)
                level = _Level(c, heads, text_width, linear).eval()
                if variant == "mame":
                    level = _patched(level, args.r)
                path = Path(tmp) / variant / "level.onnx"
                export_onnx(level, inputs, path, input_names=("x", "context"),
                            output_names=("out",))
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                steps[variant] = TimedStep(run=lambda f, s=sess: s.run(None, f), inputs=feeds,
                                           hold=sess)
            times = measure_interleaved(steps, TimingSettings(
                warmup_iters=2, warmup_s=0.0, min_iters=5, max_iters=200,
                budget_s=args.seconds, input_sets=2))
        med = {k: round(float(np.median(t)), 2) for k, t in times.items()}
        saved = med["unmerged"] - med["mame"]
        result["levels"][name] = {  # type: ignore[index]
            "tokens": side * side, "channels": c, "blocks_in_unet": count,
            "median_ms": med, "ms": {k: [round(float(v), 2) for v in t]
                                     for k, t in times.items()},
            "saved_ms_per_block": round(saved, 2),
            "saved_ms_whole_level": round(saved * count, 1)}
        print(name, json.dumps(result["levels"][name]["median_ms"]),  # type: ignore[index]
              f"saved/block {saved:.1f} ms x {count}", file=sys.stderr)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
