"""Where the time of a merged ViT goes on a GPU: eager vs CUDA-graph replay, with and
without proportional attention, and the kernels that take the time.

The GPU check (tools/gpu_check.py) found MaMe r=0.5 no faster than the unmerged vit_b in
eager fp16 at batch 256 on an H200, and 3.7x slower at batch 1. This script separates
the possible causes in one short device call:

- launch overhead: each variant is timed eager and as a replayed CUDA graph (the same
  kernels, no Python or launch cost); a capture that fails is recorded with its reason;
- the attention kernel: MaMe and ToMe with proportional attention (a float mask, so
  SDPA cannot use its flash kernel) and without it (``--no-prop-attn``);
- the kernels themselves: ``torch.profiler`` per variant at the largest batch, the top
  kernels by GPU time, and the share of attention, GEMM and the rest.

Command (repository root; GPU)::

    PYTHONPATH=$PWD python3 benchmarks/scripts/gpu_merge_breakdown.py --out DIR
    PYTHONPATH=$PWD python3 benchmarks/scripts/gpu_merge_breakdown.py --out DIR --dry-run

``--dry-run``: the CPU, a tiny ViT of the same class, fp32, few iterations (no CUDA
graphs); it checks the script, not the numbers. Writes ``DIR/gpu_merge_breakdown.json``
and ``.md`` (rewritten after each measurement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mame_export.profile.variants import MergeSettings, build_variant

VARIANTS = (  # (label, variant, prop_attn, which r: --r or --r-half)
    ("baseline", "baseline", True, "r"),
    ("mame", "mame", True, "r"),
    ("mame no-prop", "mame", False, "r"),
    ("tome", "tome", True, "r"),
    ("tome no-prop", "tome", False, "r"),
    ("mame MACs/2 no-prop", "mame", False, "r_half"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON and Markdown results")
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm model name")
    p.add_argument("--r", type=float, default=0.5, help="MaMe / ToMe r (default 0.5)")
    p.add_argument("--r-half", type=float, default=0.67602,
                   help="the r where vit_b's MACs halve (mame-export plan --target-macs 0.5)")
    p.add_argument("--batch", default="256,1", help="batches, the first is profiled")
    p.add_argument("--iters", type=int, default=50, help="timed calls per variant")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few iterations")
    return p.parse_args(argv)


def write(out: Path, doc: dict[str, Any]) -> None:
    for name, text in (("gpu_merge_breakdown.json", json.dumps(doc, indent=1)),
                       ("gpu_merge_breakdown.md", markdown(doc))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Where a merged ViT's GPU time goes", "",
             f"- command: `{doc['command']}`", f"- device: {doc['device']}",
             f"- versions: {doc['versions']}", f"- date: {doc['date']}", "",
             "## Latency (median ms; speed-up over the baseline of the same mode)", "",
             "| batch | variant | MACs ratio | eager ms | eager x | graph ms | graph x | "
             "eager - graph ms |", "|---|---|---|---|---|---|---|---|"]
    for row in doc["timing"]:
        lines.append("| {batch} | {label} | {macs} | {e} | {ex} | {g} | {gx} | {gap} |".format(
            batch=row["batch"], label=row["label"], macs=fmt(row.get("flops_ratio"), ".3f"),
            e=fmt(row.get("eager_ms"), ".3f"), ex=fmt(row.get("eager_speedup"), ".2f"),
            g=fmt(row.get("graph_ms"), ".3f") if row.get("graph_ms") else
            (row.get("graph_error") or "-")[:80],
            gx=fmt(row.get("graph_speedup"), ".2f"),
            gap=fmt(row["eager_ms"] - row["graph_ms"], ".3f")
            if row.get("graph_ms") and row.get("eager_ms") else "-"))
    for prof in doc["profiles"]:
        lines += ["", f"## Kernels: {prof['label']}, batch {prof['batch']} "
                  f"({prof['kernels_per_call']:.0f} kernels per call, "
                  f"{prof['gpu_ms_per_call']:.3f} GPU ms per call)", "",
                  "| share | GPU ms per call |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in prof["by_class"].items()]
        lines += ["", "| operator (self GPU time) | calls per call | GPU ms per call |",
                  "|---|---|---|"]
        lines += [f"| `{o['op'][:60]}` | {o['count']:.0f} | {o['ms']:.3f} |"
                  for o in prof.get("ops", [])]
        lines += ["", "| kernel | calls per call | GPU ms per call |", "|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['count']:.0f} | {k['ms']:.3f} |"
                  for k in prof["top"]]
    if doc.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "efficient_attention", "softmax")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "sm90_xmma", "ampere_", "sm80_", "gemv",
                            "cublas", "matmul")):
        return "gemm"
    if "fprop" in n or "nchwtonhwc" in n or "nhwctonchw" in n:
        return "patch embedding (convolution)"
    if "catarray" in n:
        return "cat"
    if "memcpy" in n or "memset" in n:
        return "copies, memsets"
    if "norm" in n:
        return "layernorm"
    return "other (element-wise, reductions)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import timm

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.float16
    batches = [int(b) for b in args.batch.split(",")]
    iters = 3 if dry else args.iters
    if dry:
        batches = [2, 1]
        base = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64,
                                 depth=4, embed_dim=64, num_heads=2, num_classes=10)
    else:
        base = timm.create_model(args.model, pretrained=False)
    base.eval()
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "cuda": torch.version.cuda},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model if not dry else "tiny vit (dry run)", "r": args.r,
        "r_half": args.r_half,
        "dtype": str(dtype), "iters": iters, "timing": [], "profiles": [], "errors": [],
    }
    models = {}
    for label, name, prop, which in VARIANTS:
        var = build_variant(base, name, 0.0 if name == "baseline" else getattr(args, which),
                            merge=MergeSettings(prop_attn=prop))
        if var.model is None:
            doc["errors"].append(f"{label}: {var.error}")
            continue
        models[label] = (var.model.to(device=device, dtype=dtype), var.flops_ratio)
    img = 64 if dry else base.default_cfg["input_size"][-1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch in batches:
        inputs = [torch.randn(batch, 3, img, img, generator=gen).to(device, dtype)
                  for _ in range(3)]
        base_eager = base_graph = None
        for label, (model, ratio) in models.items():
            row: dict[str, Any] = {"batch": batch, "label": label, "flops_ratio": ratio}
            with torch.inference_mode():
                row["eager_ms"] = time_eager(model, inputs, iters, device)
                try:
                    row["graph_ms"] = None if dry else time_graph(model, inputs, iters)
                except Exception as e:  # noqa: BLE001 - recorded, the next one runs
                    row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if label == "baseline":
                base_eager, base_graph = row["eager_ms"], row.get("graph_ms")
            row["eager_speedup"] = base_eager / row["eager_ms"] if base_eager else None
            row["graph_speedup"] = (base_graph / row["graph_ms"]
                                    if base_graph and row.get("graph_ms") else None)
            doc["timing"].append(row)
            print(f"b{batch} {label:14s} eager {row['eager_ms']:.3f} ms "
                  f"graph {row.get('graph_ms') or row.get('graph_error')}", flush=True)
            write(out, doc)
    for label, (model, _) in models.items():
        try:
            doc["profiles"].append(kernel_profile(model, label, batches[0], img, device,
                                                  dtype))
        except Exception as e:  # noqa: BLE001
            doc["errors"].append(f"profile {label}: {traceback.format_exc(limit=2)[-300:]}")
            print(f"profile {label} failed: {e}", flush=True)
        write(out, doc)
    print(markdown(doc))
    return 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_eager(model: torch.nn.Module, inputs: list[torch.Tensor], iters: int,
               device: str) -> float:
    for x in inputs * 2:  # warm-up
        model(x)
    sync(device)
    times = []
    for i in range(iters):
        x = inputs[i % len(inputs)]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_graph(model: torch.nn.Module, inputs: list[torch.Tensor], iters: int) -> float:
    """Median ms of replaying one captured call; the static input is refilled (a copy,
    timed outside) from the rotating inputs."""
    static = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(static)
    times = []
    for i in range(iters):
        static.copy_(inputs[i % len(inputs)])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_profile(model: torch.nn.Module, label: str, batch: int, img: int, device: str,
                   dtype: torch.dtype, calls: int = 5) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, img, img).to(device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        model(x)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                model(x)
            sync(device)
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        is_kernel = (evt.device_type == torch.autograd.DeviceType.CUDA) if device == "cuda" \
            else (evt.cpu_parent is None)  # dry run: top-level CPU ops stand in
        if not is_kernel:
            continue
        us = evt.device_time if device == "cuda" else evt.cpu_time
        kernels.setdefault(evt.name, []).append(us)
    by_class: dict[str, float] = {}
    for name, us in kernels.items():
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + sum(us) / 1e3 / calls
    ops = []
    for avg in prof.key_averages():
        us = avg.self_device_time_total if device == "cuda" else avg.self_cpu_time_total
        if us > 0:
            ops.append({"op": avg.key, "count": avg.count / calls, "ms": us / 1e3 / calls})
    ops = sorted(ops, key=lambda o: -o["ms"])[:20]
    top = sorted(({"name": n, "count": len(us) / calls, "ms": sum(us) / 1e3 / calls}
                  for n, us in kernels.items()), key=lambda k: -k["ms"])[:15]
    return {"label": label, "batch": batch, "calls": calls,
            "kernels_per_call": sum(len(us) for us in kernels.values()) / calls,
            "gpu_ms_per_call": sum(by_class.values()),
            "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])), "top": top,
            "ops": ops}


if __name__ == "__main__":
    sys.exit(main())
