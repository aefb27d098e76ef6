"""Benchmark (not a test): full-size models with random weights, through the command
line, then ONNX Runtime CPU latency of the merged graph against the unmerged one, timed
in turns.

    python benchmarks/scripts/hf_fullsize_check.py     # clip_l336 --llava and videomae_l
    python benchmarks/scripts/hf_fullsize_check.py --models sd15-unet,pixart_sigma_1024 \
        --img-size pixart_sigma_1024=512 --iters 3 \
        --out benchmarks/results/diffusion_fullsize_cpu.json

The denoisers run at batch 1 (one denoiser call, no CFG pair); ``--img-size ALIAS=S``
sets one model's ``--img-size`` (the latent side for UNets, pixels for the ``dit`` family).

For each model: ``mame-export MODEL --r R`` and ``--r 0`` (the unmerged graph of the
same encoder) with ``--json``: wall time, peak memory of the child, graph size and
node count, the audit and the parity report. Then both graphs are timed in turns with
the project's interleaved timer (few iterations: a VideoMAE-L clip takes seconds on a
CPU). Graphs go to a temporary folder that is deleted; results to
``benchmarks/results/hf_fullsize_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.graph import graph_inputs, load_graph  # noqa: E402
from mame_export.profile import (  # noqa: E402
    TimingSettings,
    measure_interleaved,
    results_header,
    summarize,
)
from mame_export.runners.factory import make_runner  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"clip_l336": ["--llava"], "videomae_l": []}  # the default --models
EXTRA = {**MODELS, "sd15-unet": ["--batch", "1"], "sd21-unet": ["--batch", "1"],
         "sdxl-unet": ["--batch", "1"], "pixart_sigma_1024": ["--batch", "1"],
         "sd3_medium": ["--batch", "1"]}


def export(model: str, r: float, extra: list[str], out: Path) -> dict[str, Any]:
    """One ``mame-export`` run in a child process: its --json object, wall time, peak RSS."""
    cmd = [sys.executable, "-m", "mame_export", model, "--r", f"{r:g}", *extra,
           "--weights", "random", "--parity-batches", "2",
           "--seed", "0", "--out", str(out), "--json"]
    print("$ mame-export " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = {"command": "mame-export " + " ".join(cmd[3:-3] + ["--out", "DIR", "--json"]),
           "exit_code": proc.returncode, "wall_s": round(wall, 1),
           "child_peak_rss_gib": round(max(peak, before) / 2**20, 2)}
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        # recorded, not raised: e.g. exit -9 when the kernel's OOM killer stops the child
        print(f"mame-export {model} --r {r:g} failed with exit {proc.returncode}",
              file=sys.stderr, flush=True)
        return {**run, "ok": False,
                "error": "killed by SIGKILL (out of memory)" if proc.returncode == -9
                else f"exit {proc.returncode}"}
    meta = json.loads(proc.stdout)
    parity = meta["parity"]
    return {
        **run, "ok": meta["ok"],
        "export_s": meta["export_seconds"], "onnx_bytes": meta["onnx_bytes"],
        "external_data": meta["external_data"], "nodes": meta["audit"]["nodes"],
        "audit_passed": meta["audit"]["passed"],
        "forbidden_ops": meta["audit"]["forbidden_ops"],
        "tensorrt_preflight": meta["audit"]["tensorrt"].get("passed"),
        "parity_passed": parity["passed"], "parity_max_abs": parity.get("max_abs_diff"),
        "tolerance": parity.get("tolerance"),
        "inputs": meta["inputs"], "outputs": meta["outputs"],
        "tokens_in": meta["plan"]["blocks"][0]["tokens_in"],
        "tokens_out": meta["plan"]["blocks"][-1]["tokens_out"],
        "macs_ratio": round(meta["plan"]["macs"] / meta["plan"]["macs_unpatched"], 4),
        "gmacs": round(meta["plan"]["macs"] / 1e9, 1),
        "notes": meta["plan"]["notes"], "onnx": meta["onnx"],
    }


def latency(graphs: dict[str, str], threads: int, iters: int) -> dict[str, Any]:
    """The graphs timed in turns on ONNX Runtime CPU (fresh random inputs, rotated)."""
    first = load_graph(next(iter(graphs.values())))
    rng = np.random.default_rng(0)
    feeds = [{t.name: rng.standard_normal([int(d) for d in t.shape], dtype=np.float32)
              for t in graph_inputs(first)} for _ in range(2)]
    runners = {k: make_runner("onnxrt", onnx_path=Path(p), threads=threads, spinning=False)
               for k, p in graphs.items()}
    try:
        steps = {k: r.prepare_timing(feeds) for k, r in runners.items()}
        settings = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=iters,
                                  max_iters=iters, budget_s=0.0, input_sets=2)
        times = measure_interleaved(steps, settings)
    finally:
        for r in runners.values():
            r.deactivate()
    out: dict[str, Any] = {"iterations": iters, "threads": threads}
    for k, v in times.items():
        if isinstance(v, Exception):
            out[k] = {"error": str(v)}
            continue
        st = summarize(v)
        out[k] = {"median_ms": round(st.median_ms, 1), "p90_ms": round(st.p90_ms, 1),
                  "ms": [round(float(t), 1) for t in v]}
    if all("median_ms" in out.get(k, {}) for k in ("unmerged", "mame")):
        out["speedup"] = round(out["unmerged"]["median_ms"] / out["mame"]["median_ms"], 3)
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Full-size models on the CPU (random weights)", "",
             f"`{doc['command']}` on {doc['cpu']}, {doc['threads']} threads; "
             f"versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}.", "",
             "| model | size | r | tokens | MACs ratio | wall s | export s | graph MB | nodes | "
             "audit | parity max abs | ORT median ms | speed-up | FLOPs-ideal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in doc["models"].items():
        lat = m["latency"]
        for key, r in (("unmerged", 0.0), ("mame", doc["r"])):
            e = m[key]
            if "error" in e:
                lines.append(f"| {name} | {m.get('img_size') or 'native'} | {r:g} | "
                             f"{e['error']} after {e['wall_s']} s |" + " |" * 10)
                continue
            med = lat.get(key, {}).get("median_ms", "n/a")
            sp = f"{lat['speedup']:.2f}x" if key == "mame" and "speedup" in lat else ""
            ideal = f"{1 / e['macs_ratio']:.2f}x" if key == "mame" else ""
            lines.append(
                f"| {name} | {m.get('img_size') or 'native'} | {r:g} | "
                f"{e['tokens_in']} -> {e['tokens_out']} | "
                f"{e['macs_ratio']:.3f} | {e['wall_s']} | {e['export_s']} | "
                f"{e['onnx_bytes'] / 1e6:.0f} | {e['nodes']} | "
                f"{'passed' if e['audit_passed'] else 'FAILED'} | "
                f"{e['parity_max_abs']:.2e} ({'passed' if e['parity_passed'] else 'FAILED'}) | "
                f"{med} | {sp} | {ideal} |")
    lines += ["", "Latency: ONNX Runtime CPU, batch 1, the two graphs of a model timed in "
              "turns (one call each per round), "
              f"{doc['iterations']} timed calls each after one warm-up. Tokens: the first "
              "block's in -> the last block's out (a denoiser's MaRe restores every position "
              "after each block; its plan's per-block counts are in the JSON's notes). Peak "
              "memory: the export child's (`child_peak_rss_gib`, the largest so far) and "
              "this process's while timing (`timing_peak_rss_gib`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated aliases")
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per graph")
    ap.add_argument("--img-size", action="append", default=[], metavar="ALIAS=S",
                    help="--img-size for one model (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "hf_fullsize_cpu.json")
    args = ap.parse_args(argv)
    sizes = dict(item.split("=", 1) for item in args.img_size)
    doc: dict[str, Any] = {**results_header(threads=args.threads), "r": args.r,
                           "iterations": args.iters, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="hf-fullsize-"))
    try:
        for name in args.models.split(","):
            extra = EXTRA.get(name, []) + (["--img-size", sizes[name]] if name in sizes else [])
            rec: dict[str, Any] = {"img_size": sizes.get(name),
                                   "unmerged": export(name, 0.0, extra, work),
                   "mame": export(name, args.r, extra, work)}
            if any("error" in rec[key] for key in ("unmerged", "mame")):
                rec["latency"] = {"skipped": "an export failed"}
            else:
                print(f"timing {name} on ONNX Runtime CPU ...", file=sys.stderr, flush=True)
                rec["latency"] = latency({"unmerged": rec["unmerged"]["onnx"],
                                          "mame": rec["mame"]["onnx"]}, args.threads,
                                         args.iters)
                rec["timing_peak_rss_gib"] = round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            for key in ("unmerged", "mame"):
                if "onnx" in rec[key]:
                    rec[key]["onnx"] = Path(rec[key]["onnx"]).name
            doc["models"][name] = rec
            atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")  # after each model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(args.out.with_suffix(".md"), markdown(doc))
    print(markdown(doc), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
