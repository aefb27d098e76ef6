"""Does graph simplification pay? Export one MaMe model with and without the exporter's
optimizer (constant folding, dead-node removal, common-subexpression elimination) and
compare node counts, file size and ONNX Runtime CPU latency, interleaved in one run.

    python tools/bench_simplify.py --model vit_s --r 0.5 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mame_export import apply
from mame_export.audit import op_census
from mame_export.job import versions
from mame_export.models import build_model, resolve


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, optimize: bool) -> None:
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, optimize=optimize,
                             input_names=["pixels"], output_names=["logits"], verbose=False)
    prog.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_s")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/simplify_cpu.json")
    args = ap.parse_args()

    spec = resolve(args.model)
    model, _ = build_model(spec, "random")
    apply(model, args.r)
    x = torch.randn(args.batch, 3, spec.img_size, spec.img_size)
    rows = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimize in (False, True):
            path = Path(tmp) / f"opt{int(optimize)}.onnx"
            export(model, x, path, optimize)
            g = onnx.load(str(path))
            census = op_census(g)
            rows[optimize] = {"nodes": sum(census.values()), "bytes": path.stat().st_size,
                              "census": census, "times_ms": []}
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sessions[optimize] = ort.InferenceSession(str(path), opts,
                                                      providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(x.shape, dtype=np.float32) for _ in range(4)]
        for s in sessions.values():
            for inp in inputs:
                s.run(None, {"pixels": inp})
        for i in range(args.rounds):  # interleaved, so machine noise hits both alike
            for optimize, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"pixels": inputs[i % len(inputs)]})
                rows[optimize]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    result = {
        "command": "python tools/bench_simplify.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "raw": {("optimized" if k else "plain"): v for k, v in rows.items()},
        "median_ms": {("optimized" if k else "plain"): statistics.median(v["times_ms"])
                      for k, v in rows.items()},
    }
    result["nodes"] = {k: v["nodes"] for k, v in result["raw"].items()}
    result["latency_ratio_optimized_over_plain"] = (
        result["median_ms"]["optimized"] / result["median_ms"]["plain"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("nodes", "median_ms",
                                             "latency_ratio_optimized_over_plain")}, indent=2))


if __name__ == "__main__":
    main()
