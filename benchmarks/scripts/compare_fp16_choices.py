"""Which reduced-precision export is closer to fp32 eager PyTorch? Export one MaMe model in
fp16 twice (LayerNorms in fp16, LayerNorms kept in fp32) and compare both through ONNX
Runtime CPU on the same fresh random inputs.

    python benchmarks/scripts/compare_fp16_choices.py --model vit_s --r 0.5 --batch 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export import apply  # noqa: E402
from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.export import export_onnx, reduced_precision_copy  # noqa: E402
from mame_export.families import build_model, resolve  # noqa: E402
from mame_export.parity import TOLERANCES, compare_outputs  # noqa: E402
from mame_export.profile import results_header  # noqa: E402
from mame_export.runners.factory import make_runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_s")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, 
                    default=ROOT / "benchmarks" / "results" / "fp16_choices_cpu.json")
    args = ap.parse_args()
    spec = resolve(args.model)
    model, source = build_model(spec, "random")
    apply(model, args.r)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(args.batch, 3, spec.img_size, spec.img_size, generator=gen)
    with torch.no_grad():
        ref = model(x).numpy()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fp32_norms in (False, True):
            half = reduced_precision_copy(model, torch.float16, fp32_norms=fp32_norms)
            path = Path(tmp) / f"norms{int(fp32_norms)}.onnx"
            export_onnx(half, (x.half(),), path)
            with make_runner("onnxrt", onnx_path=path) as runner:
                out = runner.infer({"pixels": x.numpy()})["logits"]
            stats = compare_outputs("logits", ref, out, TOLERANCES["fp16"])
            results["layernorm_fp32" if fp32_norms else "layernorm_fp16"] = vars(stats)
    report = {**results_header(), "weights": source, "results": results}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
