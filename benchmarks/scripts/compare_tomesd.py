"""MaMe+MaRe vs ToMe-SD (tomesd 0.1.3) on the SD 2.1 UNet, same ratio r, CPU.

    python benchmarks/scripts/compare_tomesd.py      # latent 32, batch 1, 2-4 min on 2 cores
    python benchmarks/scripts/compare_tomesd.py --latent 96 --reps 5   # on a quiet machine
    python benchmarks/scripts/compare_tomesd.py --device cuda --dtype fp16 --latent 96 --batch 2 \
        --compile --reps 20 --skip-export               # per-step GPU latency (untested here)

Three questions, answered on fixed seeded inputs with random weights:

1. Export: does each method trace to ONNX (torch.onnx dynamo exporter, then the
   legacy TorchScript exporter), which forbidden (data-dependent) ops the graph
   holds, and does ONNX Runtime reproduce eager PyTorch? ToMe-SD is tried with its
   default ``use_rand=True`` and with ``use_rand=False``. The graph structure does
   not depend on the UNet's width, so this runs on the miniature SD 2.x layout
   (``--export-model sd21`` uses the full UNet; minutes more).
2. Output drift: relative L2 of the UNet output against the unpatched UNet, for
   each r, merging in every UNet level (``max_downsample=8``) and, at r=0.5,
   in the highest-resolution level only (ToMe-SD's default ``max_downsample=1``).
   ToMe-SD runs with ``use_rand=False`` so that the numbers are reproducible.
3. Latency of one UNet call (one sampling step): baseline vs MaMe+MaRe vs ToMe-SD
   at r=0.5, every level; eager, and torch.compile with ``--compile``; median of
   ``--reps`` timed calls after one warm call (synchronised on CUDA).

Writes ``benchmarks/results/sd_unet_tomesd_cpu.json`` (``..._gpu.json`` with
``--device cuda``) with the command, versions and CPU.
Random weights: the drift numbers say how much each method perturbs the UNet's
computation, not how images look (see benchmarks/scripts/sd_generate_compare.py for that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import mame_export  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_generate_compare import patched  # noqa: E402

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.audit import forbidden_ops, op_census  # noqa: E402
from mame_export.families.sd_unet.model import (  # noqa: E402
    INPUT_NAMES,
    OUTPUT_NAMES,
    TINY_UNET_CONFIG,
    UNetExportWrapper,
    build_sd21_unet,
    build_tiny_unet,
    sd21_example_inputs,
    unet_example_inputs,
)
from mame_export.profile import cpu_name  # noqa: E402
from mame_export.sidecar import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results, beside us
DEFAULT_OUT = RESULTS / "sd_unet_tomesd_cpu.json"


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole batch."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    for marker in ("Exception summary",):  # the dynamo exporter puts the cause there
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}"[:400]


def export_and_census(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], dynamo: bool, workdir: Path
) -> dict[str, Any]:
    """Export ``module`` once; census of forbidden ops and ORT parity, or the error."""
    path = workdir / f"graph_{'dynamo' if dynamo else 'legacy'}.onnx"
    with torch.no_grad():  # also sets ToMe-SD's latent size (a forward pre-hook)
        want = module(*inputs).numpy()
    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {"dynamo": dynamo, "opset_version": 18}
        torch.onnx.export(module, inputs, str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), **kw)
    except Exception as e:  # noqa: BLE001 - a failed export is a result here
        return {"exported": False, "error": first_line(e),
                "seconds": round(time.perf_counter() - t0, 1)}
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    found = forbidden_ops(model)
    record: dict[str, Any] = {
        "exported": True,
        "seconds": round(time.perf_counter() - t0, 1),
        "nodes": sum(op_census(model).values()),
        "forbidden_ops": dict(Counter(f.op_type for f in found)),
        "non_constant_gather": sum(1 for f in found if f.op_type == "Gather"),
    }
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)}
        got = sess.run(None, feeds)[0]
        record["onnxruntime_max_abs_diff"] = float(np.abs(got - want).max())
    except Exception as e:  # noqa: BLE001
        record["onnxruntime_error"] = first_line(e)
    return record


def export_checks(model_name: str) -> dict[str, Any]:
    """Question 1 on the miniature (default) or the full UNet, batch 2, r=0.5."""
    if model_name == "tiny":
        unet, inputs = build_tiny_unet(), unet_example_inputs(TINY_UNET_CONFIG, 2, 16)
    else:
        unet, inputs = build_sd21_unet(), sd21_example_inputs(2, 32)
    wrapper = UNetExportWrapper(unet).eval()
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("tomesd use_rand=True (default)", "tomesd", {"use_rand": True}),
        ("tomesd use_rand=False", "tomesd", {"use_rand": False}),
        ("mame", "mame", {}),
    ]
    out: dict[str, Any] = {"model": model_name, "latent": list(inputs[0].shape[-2:]),
                           "batch": 2, "r": 0.5, "max_downsample": 8, "opset": 18}
    for label, method, tome_kw in cases:
        with tempfile.TemporaryDirectory(prefix="sd-compare-") as tmp, \
                patched(unet, method, 0.5, max_downsample=8, tome_kwargs=tome_kw):
            out[label] = {
                exporter: export_and_census(wrapper, inputs, exporter == "dynamo", Path(tmp))
                for exporter in ("dynamo", "legacy")
            }
        print(f"  export {label}: " + "; ".join(
            f"{k}: {'ok ' + str(v['forbidden_ops']) if v['exported'] else v['error'][:80]}"
            for k, v in out[label].items()), flush=True)
    return out


def timed_call(module: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, float]:
    cuda = inputs[0].device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = module(*inputs)
    if cuda:
        torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def compiled_times(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...], reps: int) -> list[float]:
    """torch.compile of the current (patched) wrapper: one untimed compiling call, then reps."""
    torch._dynamo.reset()
    fn = torch.compile(wrapper)
    timed_call(fn, inputs)
    return [timed_call(fn, inputs)[1] for _ in range(reps)]


def drift_and_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Questions 2 and 3 on the full SD 2.1 UNet (random weights)."""
    t0 = time.perf_counter()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    unet = build_sd21_unet(dtype=dtype).to(args.device)
    wrapper = UNetExportWrapper(unet).eval()
    inputs = tuple(t.to(args.device) for t in sd21_example_inputs(args.batch, args.latent, dtype))
    print(f"  built SD 2.1 UNet in {time.perf_counter() - t0:.0f} s", flush=True)
    ref, first = timed_call(wrapper, inputs)
    times: dict[str, list[float]] = {"baseline": []}
    drift: list[dict[str, Any]] = []

    def run(method: str, r: float, max_downsample: int) -> torch.Tensor:
        tome_kw = {"use_rand": False} if method == "tomesd" else None
        with patched(unet, method, r, max_downsample=max_downsample, tome_kwargs=tome_kw):
            y, sec = timed_call(wrapper, inputs)
            key = f"{method} r={r:g}"
            if r == 0.5 and max_downsample == 8:
                times[key] = [sec]  # first call: warm-up, not kept
                for _ in range(args.reps):
                    times[key].append(timed_call(wrapper, inputs)[1])
                if args.compile:
                    times[f"{key} compiled"] = compiled_times(wrapper, inputs, args.reps)
        return y

    for r in args.ratios:
        for md in (8, 1) if r == 0.5 else (8,):
            for method in ("tomesd", "mame"):
                y = run(method, r, md)
                row = {"method": method, "r": r, "max_downsample": md,
                       "rel_l2": rel_l2(y, ref), "finite": bool(torch.isfinite(y).all())}
                drift.append(row)
                print(f"  drift {method:>6} r={r:g} max_downsample={md}: "
                      f"rel L2 {row['rel_l2']:.4f}", flush=True)
    for _ in range(args.reps):
        times["baseline"].append(timed_call(wrapper, inputs)[1])
    if args.compile:
        times["baseline compiled"] = compiled_times(wrapper, inputs, args.reps)
    latency = {}
    for key, values in times.items():
        kept = values[1:] if key.endswith("r=0.5") else values
        latency[key] = {"median_s": statistics.median(kept), "runs_s": [round(v, 3) for v in kept]}
    base = latency["baseline"]["median_s"]
    for key, row in latency.items():
        row["vs_baseline"] = round(row["median_s"] / base, 3)
        print(f"  latency {key:>12}: {row['median_s']:.2f} s ({row['vs_baseline']:.3f}x)",
              flush=True)
    from mame_export.families.sd_unet.patch import blocks_up_to_downsample, build_plan

    plans = {
        f"r={r:g} max_downsample={md}": round(
            build_plan(unet, r, 0.5, blocks_up_to_downsample(unet, md), True, "static",
                       args.latent).flops_ratio, 4)
        for r in args.ratios for md in (8, 1)
    }
    return {
        "model": "SD 2.1 UNet, random weights (seed 0)",
        "latent": args.latent,
        "batch": args.batch,
        "timestep": float(inputs[1][0]),
        "drift_vs_unpatched": drift,
        "latency": latency,
        "mame_macs_ratio": plans,
        "first_baseline_call_s": round(first, 2),
    }


def tomesd_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tomesd")
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (image = 8x)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--reps", type=int, default=2, help="timed calls per method")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the latency part")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--export-model", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help=f"default {DEFAULT_OUT} (cpu) or sd_unet_tomesd_gpu.json (cuda)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.device == "cpu" else DEFAULT_OUT.with_name(
            "sd_unet_tomesd_gpu.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if 0.5 not in args.ratios:
        args.ratios.append(0.5)  # the latency row is at r=0.5
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions() | {"tomesd": tomesd_version()},
        "cpu": {"name": cpu_name(), "cores_visible": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "device": torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu",
        "dtype": args.dtype,
        "settings": {"tau": 0.5, "prop_attn": True, "tomesd": "sx=sy=2, use_rand=False "
                     "except where said", "mame": "static, grid partition"},
    }
    if not args.skip_export:
        print("export checks ...", flush=True)
        record["export"] = export_checks(args.export_model)
    print("drift and latency ...", flush=True)
    record.update(drift_and_latency(args))
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
