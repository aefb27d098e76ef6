"""Benchmark (not a test): ONNX Runtime CPU latency of several graphs, timed in turns.

Exports the unpatched model, MaMe and ToMe at ``--r`` with the current code (the
profiler's own export), adds any ``--graph NAME=PATH`` (e.g. a graph exported by an
earlier version of the code), and times them all in turns with the profiler's
interleaved timer (one call each per round, rotating start; ONNX Runtime threads
do not spin), so their ratios come from the same conditions.

    python tools/compare_graphs_ort.py --model vit_b --r 0.5 \\
        --graph "MaMe (previous op)=/tmp/old/vit_b_r0.5_b1_fp32.onnx"

With ``--no-export`` only the ``--graph`` graphs are timed (any family: the inputs are
random tensors of the first graph's input shapes), against the one named ``baseline``:

    python tools/compare_graphs_ort.py --no-export --graph baseline=graphs/x_r0_....onnx \\
        --graph mame=graphs/x_r0.5_....onnx --out benchmarks/results/x_ort_cpu.json

Writes ``benchmarks/results/ort_graphs_cpu.json``: command, versions, CPU, the raw
per-call milliseconds, medians, and each graph's speed-up over the unpatched one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.families import build_model, resolve  # noqa: E402
from mame_export.graph import graph_inputs, load_graph  # noqa: E402
from mame_export.profile import (  # noqa: E402
    TimingSettings,
    build_variant,
    export_variant,
    forbidden_census,
    image_shape,
    measure_interleaved,
    results_header,
    summarize,
    unpatched_macs,
)
from mame_export.runners.factory import make_runner  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--graph", action="append", default=[], metavar="NAME=PATH",
                    help="an extra graph to time (same input shape)")
    ap.add_argument("--no-export", action="store_true",
                    help="time only the --graph graphs (one of them named baseline)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="budget per graph")
    ap.add_argument("--min-iters", type=int, default=40)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "ort_graphs_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    graphs: dict[str, Path] = {}
    info: dict[str, dict] = {}
    model = "graphs"
    if not args.no_export:
        spec = resolve(args.model)
        model = spec.alias
        base, _ = build_model(spec, "random")
        shape = image_shape(base)
        macs0 = unpatched_macs(base)
        tmp = Path(tempfile.mkdtemp(prefix="ort-graphs-"))
        for name in ("baseline", "mame", "tome"):
            var = build_variant(base, name, args.r, macs0)
            exp = export_variant(var, args.batch, shape, torch.float32, tmp)
            if exp.path is None:
                print(f"{name}: {exp.error}", file=sys.stderr)
                continue
            graphs[name] = exp.path
            info[name] = {"macs_ratio": var.flops_ratio, "forbidden_ops": exp.forbidden}
            print(f"exported {name}", file=sys.stderr)
    for item in args.graph:
        name, _, path = item.partition("=")
        graphs[name] = Path(path)
        info[name] = {"path": path, "forbidden_ops": forbidden_census(Path(path))}
    if not graphs:
        ap.error("no graph to time: give --graph NAME=PATH (with --no-export)")
    first = load_graph(next(iter(graphs.values())))
    rng = np.random.default_rng(0)
    feeds = [{t.name: rng.standard_normal([int(d) for d in t.shape], dtype=np.float32)
              for t in graph_inputs(first)} for _ in range(4)]
    # The sessions take turns on the same cores: idle ones must not spin.
    runners = {name: make_runner("onnxrt", onnx_path=p, threads=args.threads, spinning=False)
               for name, p in graphs.items()}
    steps = {name: r.prepare_timing(feeds) for name, r in runners.items()}
    settings = TimingSettings(warmup_iters=5, min_iters=args.min_iters, budget_s=args.seconds)
    times = measure_interleaved(steps, settings)
    for r in runners.values():
        r.deactivate()
    stats = {k: summarize(v) for k, v in times.items() if not isinstance(v, Exception)}
    medians = {k: s.median_ms for k, s in stats.items()}
    result = {
        **results_header(threads=args.threads),
        "model": model, "r": None if args.no_export else args.r,
        "batch": next(iter(feeds[0].values())).shape[0],
        "graphs": info,
        "median_ms": {k: round(v, 3) for k, v in medians.items()},
        "p90_ms": {k: round(s.p90_ms, 3) for k, s in stats.items()},
        "speedup_vs_baseline": {k: round(medians["baseline"] / v, 4)
                                for k, v in medians.items()} if "baseline" in medians else {},
        "errors": {k: str(v) for k, v in times.items() if isinstance(v, Exception)},
        "ms": {k: [round(float(t), 3) for t in v] for k, v in times.items()
               if not isinstance(v, Exception)},
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_ms": result["median_ms"],
                      "speedup": result["speedup_vs_baseline"]}, indent=1), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
