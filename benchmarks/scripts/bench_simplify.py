"""Does graph simplification pay? Export one MaMe model with and without the exporter's
optimizer (constant folding, dead-node removal, common-subexpression elimination) and
compare node counts, file size and ONNX Runtime CPU latency, interleaved in one run.

    python benchmarks/scripts/bench_simplify.py --model vit_s --r 0.5 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export import apply  # noqa: E402
from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.audit import op_census  # noqa: E402
from mame_export.families import build_model, resolve  # noqa: E402
from mame_export.profile import TimingSettings, measure_interleaved, results_header  # noqa: E402
from mame_export.runners.factory import make_runner  # noqa: E402


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, optimize: bool) -> None:
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, optimize=optimize,
                             input_names=["pixels"], output_names=["logits"], verbose=False)
    prog.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_s")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, 
                    default=ROOT / "benchmarks" / "results" / "simplify_cpu.json")
    args = ap.parse_args()

    spec = resolve(args.model)
    model, _ = build_model(spec, "random")
    apply(model, args.r)
    x = torch.randn(args.batch, 3, spec.img_size, spec.img_size)
    rows = {}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimize in (False, True):
            path = Path(tmp) / f"opt{int(optimize)}.onnx"
            export(model, x, path, optimize)
            census = op_census(onnx.load(str(path)))
            rows[optimize] = {"nodes": sum(census.values()), "bytes": path.stat().st_size,
                              "census": census, "times_ms": []}
            # the two sessions take turns on the same cores: idle ones must not spin
            runners[optimize] = make_runner("onnxrt", onnx_path=path, spinning=False,
                                            threads=torch.get_num_threads())
        rng = np.random.default_rng(0)
        feeds = [{"pixels": rng.standard_normal(x.shape, dtype=np.float32)} for _ in range(4)]
        settings = TimingSettings(warmup_iters=len(feeds), warmup_s=0.0, min_iters=args.rounds,
                                  max_iters=args.rounds, budget_s=0.0, input_sets=len(feeds))
        times = measure_interleaved({k: r.prepare_timing(feeds) for k, r in runners.items()},
                                    settings)  # in turns, so machine noise hits both alike
        for optimize, r in runners.items():
            r.deactivate()
            got = times[optimize]
            if isinstance(got, Exception):
                raise got
            rows[optimize]["times_ms"] = [float(t) for t in got]
    name = {False: "plain", True: "optimized"}
    result = {
        **results_header(),
        "raw": {name[k]: v for k, v in rows.items()},
        "median_ms": {name[k]: statistics.median(v["times_ms"]) for k, v in rows.items()},
    }
    result["nodes"] = {k: v["nodes"] for k, v in result["raw"].items()}
    result["latency_ratio_optimized_over_plain"] = (
        result["median_ms"]["optimized"] / result["median_ms"]["plain"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("nodes", "median_ms",
                                             "latency_ratio_optimized_over_plain")}, indent=2))


if __name__ == "__main__":
    main()
