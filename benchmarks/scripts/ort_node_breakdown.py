"""Where one call of a whole ONNX graph spends its time on ONNX Runtime CPU, by module.

Whole-model timings of a large denoiser vary by about 10% from call to call, more than the
saving of merging one level, and a block timed alone is not the block inside the whole
graph. Here ONNX Runtime's own profiler times every node of each graph over whole calls,
and each node's time is charged to the PyTorch module it was exported from (the dynamo
exporter's ``pkg.torch.onnx.name_scopes`` metadata). The same group of modules can then be
compared between an unmerged and a merged graph inside the whole model.

Each graph is loaded alone (one session at a time), runs ``--warmup`` untimed calls and
``--calls`` profiled ones; the graphs alternate every round, with a rotating start. Groups
are module paths (after a ``--strip`` prefix) with the indices of repeated containers
(attentions, transformer_blocks, resnets, blocks) written ``*``, cut after the deepest
such index, or to ``--depth`` parts where there is none. Nodes that ONNX Runtime made
itself (layout reorders, fusions it renamed beyond recognition) are their own groups.
Inputs: fresh random tensors of each graph's declared shapes per round, shared by the
graphs of that round (as ``ort_alternate_sessions.py``).

    python benchmarks/scripts/ort_node_breakdown.py unmerged=A.onnx mame=B.onnx \\
        --rounds 2 --threads 2 --out RESULT.json [--markdown RESULT.md]
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_alternate_sessions import (  # noqa: E402 - the sibling script's inputs and header
    check_graph_args,
    inputs_for,
    run_header,
)

REPEATED = ("attentions", "transformer_blocks", "resnets", "blocks", "single_transformer_blocks")
LAYOUT = re.compile(r"^(Reorder(Input|Output)|Transpose_token)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("graphs", nargs="+", help="NAME=PATH.onnx, the first is the reference")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=1, help="profiled calls per load (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per load (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=3,
                   help="module path parts kept outside repeated containers (default 3)")
    p.add_argument("--strip", default="unet.", help="module path prefix dropped (default unet.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--markdown", default=None, help="also write this table")
    args = p.parse_args(argv)
    check_graph_args(p, args.graphs)
    if min(args.rounds, args.calls, args.depth) < 1 or args.warmup < 0:
        p.error("--rounds, --calls and --depth must be at least 1, --warmup at least 0")
    return args


def group_of(path: str, depth: int, strip: str) -> str:
    """A module path cut after its deepest index of a repeated container (written ``*``),
    or to ``depth`` parts where it has none:
    'unet.down_blocks.1.attentions.0.transformer_blocks.3.attn1' ->
    'down_blocks.1.attentions.*.transformer_blocks.*';
    'unet.down_blocks.1.attentions.0.proj_in' -> 'down_blocks.1.attentions.*'."""
    parts = path.removeprefix(strip).split(".")
    out = [("*" if i > 0 and parts[i - 1] in REPEATED and p.isdigit() else p)
           for i, p in enumerate(parts)]
    last = max((i for i, p in enumerate(out) if p == "*"), default=None)
    return ".".join(out[:depth] if last is None else out[:last + 1]) or "(top level)"


def node_groups(path: str, depth: int, strip: str) -> dict[str, str]:
    """Graph node name -> module group, from the exporter's name-scope metadata."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    out = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        try:
            names = ast.literal_eval(scopes) if scopes else []
        except (ValueError, SyntaxError):
            names = []
        modules = [s for s in names[:-1] if s]  # the last is the fx node's own name
        out[node.name] = group_of(modules[-1], depth, strip) if modules else "(top level)"
    return out


def charge(event_name: str, groups: dict[str, str]) -> str:
    """The group of one profiled kernel, by its node name as ONNX Runtime reports it."""
    name = event_name.removesuffix("_kernel_time")
    base = name.split("/")[0]  # a fusion keeps the first fused node's name before '/'
    for cand in (name, base, "node_" + base.removesuffix("_nchwc")):
        if cand in groups:
            return groups[cand]
    if LAYOUT.match(name):
        return "(layout changes ONNX Runtime inserted)"
    return "(other nodes ONNX Runtime made)"


def profiled_calls(events: list[dict], groups: dict[str, str], skip: int
                   ) -> list[tuple[float, dict[str, float], dict[str, float]]]:
    """Per profiled call after the first ``skip``: (wall ms, ms per group, ms per op)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"], e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    out = []
    for start, end, dur in runs[skip:]:
        by_group: dict[str, float] = defaultdict(float)
        by_op: dict[str, float] = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                    and start <= e["ts"] <= end:
                g = charge(e["name"], groups)
                by_group[g] += e["dur"] / 1e3
                by_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e3
        out.append((dur / 1e3, dict(by_group), dict(by_op)))
    return out


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    graphs = [tuple(g.split("=", 1)) for g in args.graphs]
    rng = np.random.default_rng(args.seed)
    record: dict = {
        **run_header(args, ort), "rounds": args.rounds, "calls_per_load": args.calls,
        "warmup_per_load": args.warmup,
        "depth": args.depth, "strip": args.strip, "graphs": {},
    }
    groups = {name: node_groups(path, args.depth, args.strip) for name, path in graphs}
    calls: dict[str, list] = {name: [] for name, _ in graphs}
    with tempfile.TemporaryDirectory(prefix="ort-node-breakdown-") as tmp:
        for rnd in range(args.rounds):
            shift = rnd % len(graphs)
            feeds = None
            for name, path in graphs[shift:] + graphs[:shift]:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(tmp) / f"{name}_{rnd}")
                t0 = time.perf_counter()
                session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                load_s = time.perf_counter() - t0
                feeds = feeds or inputs_for(session, rng)
                for _ in range(args.warmup + args.calls):
                    session.run(None, feeds)
                events = json.loads(Path(session.end_profiling()).read_text())
                del session
                gc.collect()
                got = profiled_calls(events, groups[name], args.warmup)
                calls[name] += got
                print(f"round {rnd + 1}/{args.rounds} {name}: load {load_s:.1f} s, calls "
                      + ", ".join(f"{w:.0f} ms" for w, _, _ in got), flush=True)
    ref = graphs[0][0]
    for name, _ in graphs:
        walls = [w for w, _, _ in calls[name]]
        keys = {k for _, g, _ in calls[name] for k in g}
        ops = {k for _, _, o in calls[name] for k in o}
        record["graphs"][name] = {
            "path": dict(graphs)[name], "wall_ms": walls, "median_wall_ms": float(np.median(walls)),
            "groups_ms": {k: float(np.median([g.get(k, 0.0) for _, g, _ in calls[name]]))
                          for k in sorted(keys)},
            "ops_ms": {k: float(np.median([o.get(k, 0.0) for _, _, o in calls[name]]))
                       for k in sorted(ops)},
        }
    record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(record, ref)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


def markdown(record: dict, ref: str) -> str:
    """Groups as rows, graphs as columns (median ms per call of summed kernel time), with
    each graph's difference from the reference; biggest reference groups first."""
    names = list(record["graphs"])
    base = record["graphs"][ref]["groups_ms"]
    keys = sorted({k for g in record["graphs"].values() for k in g["groups_ms"]},
                  key=lambda k: -max(g["groups_ms"].get(k, 0.0)
                                     for g in record["graphs"].values()))
    head = ["group", *(f"{n} ms" for n in names), *(f"{n} - {ref}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = {n: sum(record["graphs"][n]["groups_ms"].values()) for n in names}
    for k in keys:
        vals = [record["graphs"][n]["groups_ms"].get(k, 0.0) for n in names]
        lines.append("| " + " | ".join([f"`{k}`", *(f"{v:.0f}" for v in vals),
                                        *(f"{v - base.get(k, 0.0):+.0f}" for v in vals[1:])])
                     + " |")
    lines.append("| **kernels, sum** | " + " | ".join(
        [*(f"{total[n]:.0f}" for n in names),
         *(f"{total[n] - total[ref]:+.0f}" for n in names[1:])]) + " |")
    lines.append("| **call, wall** | " + " | ".join(
        [*(f"{record['graphs'][n]['median_wall_ms']:.0f}" for n in names),
         *(f"{record['graphs'][n]['median_wall_ms'] - record['graphs'][ref]['median_wall_ms']:+.0f}"
           for n in names[1:])]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
