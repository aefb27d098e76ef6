"""Benchmark (not a test): what MaMe + MaRe saves in one diffusion-transformer block, and
whether the MLP should run on the merged tokens too.

For PixArt-Sigma and SD3-medium at their native 1024 px (64 x 64 patch grid, 4096 image
tokens), builds the model from its embedded config with ONE block (full width, same patch
embedding, text and output layers), exports it unmerged, merged around the attention
only, and merged around the attention and the MLP (the family's default), and times the
three graphs with ONNX Runtime on the CPU in turns. The full models repeat the block 28
(PixArt) and 24 (SD3) times; the embedding and output layers are a small, fixed part.

    python benchmarks/scripts/diffusion_dit_blocks.py --models pixart_sigma_1024   # recorded
    python benchmarks/scripts/diffusion_dit_blocks.py --models sd3_medium --img-size 768 \
        --out benchmarks/results/diffusion_dit_blocks_sd3_cpu.json   # 1024 px passed 8 GiB
    python benchmarks/scripts/diffusion_dit_blocks.py --img-size 256 --seconds 2 --out /tmp/x.json

Writes ``benchmarks/results/diffusion_dit_blocks_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

import mame_export  # noqa: E402
from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.export import export_onnx  # noqa: E402
from mame_export.families import get_family, resolve  # noqa: E402
from mame_export.families.base import with_kwargs  # noqa: E402
from mame_export.patch import merge_plan  # noqa: E402
from mame_export.profile import TimingSettings, measure_interleaved, results_header  # noqa: E402
from mame_export.runners import TimedStep  # noqa: E402

VARIANTS = {"unmerged": None, "mame-attention": False, "mame-attention+mlp": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="pixart_sigma_1024,sd3_medium")
    ap.add_argument("--img-size", type=int, default=1024, help="pixels (latent = /8)")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="budget per variant")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "diffusion_dit_blocks_cpu.json")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    result: dict[str, object] = {**results_header(threads=args.threads), "r": args.r,
                                 "img_size": args.img_size, "batch": 1, "models": {}}
    for alias in args.models.split(","):
        spec = resolve(alias)
        family = get_family(spec.family)
        spec = with_kwargs(spec, alias, config={**spec.kwargs["config"], "num_layers": 1})
        io = None
        steps, plans = {}, {}
        with tempfile.TemporaryDirectory(prefix="dit-block-") as tmp:
            for name, merge_mlp in VARIANTS.items():
                model, _ = family.build(spec, "random", args.img_size)
                io = family.io_spec(spec, model, args.img_size)
                sets = [io.make_inputs(1, torch.Generator().manual_seed(i)) for i in range(2)]
                if merge_mlp is not None:
                    mame_export.apply(model, args.r, merge_mlp=merge_mlp,
                                      **family.patch_options(spec, args.img_size))
                    plans[name] = round(merge_plan(model).flops_ratio, 4)
                path = Path(tmp) / name / "block.onnx"
                export_onnx(model, sets[0], path, input_names=io.input_names,
                            output_names=io.output_names)
                del model
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                feeds = [{n: t.numpy() for n, t in zip(io.input_names, s, strict=True)}
                         for s in sets]
                steps[name] = TimedStep(run=lambda f, s=sess: s.run(None, f), inputs=feeds,
                                        hold=sess)
            times = measure_interleaved(steps, TimingSettings(
                warmup_iters=2, warmup_s=0.0, min_iters=5, max_iters=200,
                budget_s=args.seconds, input_sets=2))
        med = {k: round(float(np.median(t)), 1) for k, t in times.items()}
        result["models"][alias] = {  # type: ignore[index]
            "median_ms": med, "macs_ratio_one_block_model": plans,
            "speedup": {k: round(med["unmerged"] / v, 3) for k, v in med.items()},
            "ms": {k: [round(float(v), 1) for v in t] for k, t in times.items()}}
        print(alias, json.dumps(med), json.dumps(plans), file=sys.stderr)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")  # after each model
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
