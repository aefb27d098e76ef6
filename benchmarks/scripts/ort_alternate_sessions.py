"""Time ONNX graphs in turns when two sessions do not fit in memory together.

`mame-export profile --graph` and `hf_fullsize_check.py` keep every graph's ONNX Runtime
session open and time them in turns; for SD3-medium at 1024 px two sessions (2 x 8.3 GB of
weights plus 4429-token attention) outgrow a 24 GiB machine. Here each round loads one
graph, runs one warm-up call and ``--calls`` timed calls, and frees the session before the
next graph loads: still in turns (the graphs alternate every round, with a rotating
start), one session in memory at a time. Inputs are fresh random tensors of each graph's
declared static shapes, drawn per round and shared by the graphs of that round
(N(0, 1) floats; an input named ``timestep`` uniform in [0, 1000); integers zero).

    python benchmarks/scripts/ort_alternate_sessions.py unmerged=A.onnx mame=B.onnx \\
        --rounds 3 --threads 2 --out RESULT.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("graphs", nargs="+", help="NAME=PATH.onnx, the first is the baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=1, help="timed calls per load (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)
    check_graph_args(p, args.graphs)
    if args.rounds < 1 or args.calls < 1:
        p.error("--rounds and --calls must be at least 1")
    return args


def check_graph_args(p: argparse.ArgumentParser, graphs: list[str]) -> None:
    """Each NAME=PATH names an existing file (else the parser's error, exit 2)."""
    for g in graphs:
        name, sep, path = g.partition("=")
        if not sep or not name or not Path(path).is_file():
            p.error(f"expected NAME=PATH to an existing .onnx file; got {g!r}")


def run_header(args: argparse.Namespace, ort: object) -> dict:
    """What every result of these scripts starts with: command, CPU, threads, load, versions."""
    return {
        "command": " ".join(["python", *sys.argv]), "cpu": platform.processor() or "",
        "threads": args.threads, "load_avg": list(os.getloadavg()),
        "versions": {"onnxruntime": getattr(ort, "__version__", "?"),
                     "numpy": np.__version__, "python": platform.python_version()},
    }


def inputs_for(session, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i in session.get_inputs():
        if any(not isinstance(d, int) for d in i.shape):
            raise SystemExit(f"{i.name} has a symbolic shape {i.shape}: static graphs only")
        if "float" in i.type:
            x = (rng.random(i.shape) * 1000.0 if i.name == "timestep"
                 else rng.standard_normal(i.shape)).astype(np.float32)
        else:
            x = np.zeros(i.shape, dtype=np.int64)
        out[i.name] = x
    return out


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    graphs = [tuple(g.split("=", 1)) for g in args.graphs]
    rng = np.random.default_rng(args.seed)
    record: dict = {
        **run_header(args, ort), "rounds": args.rounds, "calls_per_load": args.calls,
        "graphs": {name: {"path": path, "load_s": [], "warmup_ms": [], "ms": []}
                   for name, path in graphs},
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    for rnd in range(args.rounds):
        feeds = None
        order = graphs[rnd % len(graphs):] + graphs[:rnd % len(graphs)]
        for name, path in order:
            t = time.perf_counter()
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            rec = record["graphs"][name]
            rec["load_s"].append(round(time.perf_counter() - t, 2))
            feeds = feeds or inputs_for(sess, rng)
            t = time.perf_counter()
            sess.run(None, feeds)
            rec["warmup_ms"].append(round((time.perf_counter() - t) * 1e3, 1))
            for _ in range(args.calls):
                t = time.perf_counter()
                sess.run(None, feeds)
                rec["ms"].append(round((time.perf_counter() - t) * 1e3, 1))
            del sess
            gc.collect()
            print(f"round {rnd + 1}/{args.rounds} {name}: {rec['ms'][-args.calls:]} ms "
                  f"(load {rec['load_s'][-1]} s, warm-up {rec['warmup_ms'][-1]} ms)",
                  flush=True)
    base = graphs[0][0]
    base_ms = statistics.median(record["graphs"][base]["ms"])
    for rec in record["graphs"].values():
        rec["median_ms"] = statistics.median(rec["ms"])
        rec["speedup"] = round(base_ms / rec["median_ms"], 3)
    record["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({n: {"median_ms": r["median_ms"], "speedup": r["speedup"]}
                      for n, r in record["graphs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
