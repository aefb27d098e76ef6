"""Baseline vs. MaMe vs. ToMe through ONNX Runtime CPU, timed round-robin.

`tools/profile_tables.py` times rows one after another, so slow drifts of a shared
machine land on whole rows. Here the three graphs of one (model, r, batch) are timed in
turns, one call each per round, so drift hits all three alike and their ratios are fair.

    python tools/interleaved_ort.py --models vit_b,vit_s --r 0.5 --batches 1,8 --rounds 40
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mame_export import apply, merge_plan
from mame_export.baselines.tome import apply_tome, tome_plan
from mame_export.export import export_onnx
from mame_export.job import versions
from mame_export.models import build_model, resolve


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_b,vit_s")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/interleaved_ort_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        spec = resolve(name)
        base, _ = build_model(spec, "random")
        variants = {"baseline": (base, 1.0),
                    "mame": (apply(copy.deepcopy(base), args.r), None),
                    "tome": (apply_tome(copy.deepcopy(base), args.r), None)}
        ratios = {"baseline": 1.0, "mame": merge_plan(variants["mame"][0]).flops_ratio,
                  "tome": tome_plan(variants["tome"][0]).flops_ratio}
        for batch in (int(b) for b in args.batches.split(",")):
            rng = np.random.default_rng(0)
            shape = (batch, 3, spec.img_size, spec.img_size)
            inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
            with tempfile.TemporaryDirectory() as tmp:
                sessions = {}
                for v, (model, _) in variants.items():
                    path = Path(tmp) / f"{v}.onnx"
                    export_onnx(model, (torch.from_numpy(inputs[0]),), path)
                    sessions[v] = session(path, args.threads)
                times: dict[str, list[float]] = {v: [] for v in sessions}
                for s in sessions.values():  # warm-up
                    for x in inputs:
                        s.run(None, {"pixels": x})
                for i in range(args.rounds):
                    for v, s in sessions.items():
                        t0 = time.perf_counter()
                        s.run(None, {"pixels": inputs[i % len(inputs)]})
                        times[v].append((time.perf_counter() - t0) * 1e3)
            med = {v: statistics.median(t) for v, t in times.items()}
            for v in sessions:
                rows.append({"model": name, "batch": batch, "r": args.r, "variant": v,
                             "median_ms": med[v], "flops_ratio": ratios[v],
                             "speedup": med["baseline"] / med[v],
                             "ideal": 1 / ratios[v], "times_ms": times[v]})
                print(f"{name} b{batch} {v:8s} median {med[v]:8.2f} ms  speed-up "
                      f"{med['baseline'] / med[v]:.2f}x  ideal {1 / ratios[v]:.2f}x", flush=True)
    report = {"command": "python tools/interleaved_ort.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
              "versions": versions(), "threads": args.threads, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
