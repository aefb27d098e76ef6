"""Full-size SD 2.1 UNet (random weights) with MaMe+MaRe: export, audit, ORT CPU parity.

    /usr/bin/time -v python benchmarks/scripts/sd21_export_check.py   # r=0.5, latent 96, batch 2

Steps, each timed, with the process's peak resident memory after each:
build the UNet (865 M parameters, fp32) and patch it; run eager PyTorch once
on fixed seeded inputs (the reference); export to ONNX with the dynamo
exporter (opset 18; weights > 2 GB go to an external-data file); audit the
graph (forbidden ops, checker, shape inference); free the PyTorch model; run
ONNX Runtime (CPU) on the same inputs and compare against the reference with
the project's fp32 tolerance. The graph is written under a temporary folder
in /tmp (``--workdir``) and deleted at the end. Results go to
``benchmarks/results/sd21_unet_export_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import mame_export  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

import mame_export
from mame_export.artifacts import atomic_write_text
from mame_export.audit import audit
from mame_export.export import export_onnx
from mame_export.families.sd_unet import patch as diffusers_unet
from mame_export.families.sd_unet.model import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    UNetExportWrapper,
    build_sd21_unet,
    sd21_example_inputs,
)
from mame_export.parity import TOLERANCES, compare_outputs
from mame_export.patch import DEFAULT_TAU
from mame_export.profile import cpu_name
from mame_export.sidecar import versions

RESULTS = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results, beside us
DEFAULT_OUT = RESULTS / "sd21_unet_export_cpu.json"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


class Steps:
    """Times named steps and records the peak memory after each."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        print(f"{name} ...", flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sec = time.perf_counter() - t0
        self.rows[name] = {"seconds": round(sec, 1), "peak_rss_gib_after": peak_rss_gib()}
        print(f"  {sec:.1f} s, peak RSS {self.rows[name]['peak_rss_gib_after']} GiB", flush=True)
        return out


def eager(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.inference_mode():
        return model(*inputs).float().numpy()


def ort_run(path: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)}
    return sess.run(None, feeds)[0], created


def check(args: argparse.Namespace, steps: Steps, workdir: Path) -> dict[str, Any]:
    unet = steps.run("build", build_sd21_unet)
    model = UNetExportWrapper(unet).eval()
    # The family's apply takes the latent size, so the stored plan is for this latent.
    steps.run("patch", diffusers_unet.apply, model, args.r, tau=DEFAULT_TAU["static"], layers=None,
              prop_attn=True, mode="static", latent_size=args.latent)
    plan = mame_export.merge_plan(model)
    inputs = sd21_example_inputs(args.batch, args.latent)
    ref = steps.run("eager_reference", eager, model, inputs)
    path = workdir / f"sd21-unet_r{args.r:g}_{args.latent}_b{args.batch}.onnx"
    result = steps.run("export", export_onnx, model, inputs, path, input_names=INPUT_NAMES,
                       output_names=OUTPUT_NAMES, opset=18)
    report = steps.run("audit", audit, path)
    del model, unet
    gc.collect()
    out, session_s = steps.run("onnxruntime", ort_run, path, inputs)
    stats = compare_outputs(OUTPUT_NAMES[0], ref, out, TOLERANCES["fp32"])
    return {
        "plan": {"flops_ratio": round(plan.flops_ratio, 4), "gmacs": round(plan.macs / 1e9, 1),
                 "gmacs_unpatched": round(plan.macs_unpatched / 1e9, 1),
                 "tokens_per_block": plan.tokens_per_block,
                 "attention_tokens": [b.tokens_out for b in plan.blocks]},
        "export": {"seconds": round(result.seconds, 1), "bytes": result.bytes,
                   "external_data": result.external_data, "exporter": result.exporter,
                   "files": sorted(p.name for p in path.parent.iterdir())},
        "audit": {"passed": report.passed, "nodes": report.nodes,
                  "forbidden_ops": report.forbidden_ops, "checker": report.checker,
                  "shape_inference": report.shape_inference,
                  "tensorrt_preflight": report.tensorrt.get("status"),
                  "findings": [str(f) for f in report.findings]},
        "parity": {"tolerance": TOLERANCES["fp32"].describe(),
                   "passed": stats.passed, "max_abs_diff": stats.max_abs_diff,
                   "max_rel_diff": stats.max_rel_diff, "cosine": stats.cosine,
                   "reference_abs_max": float(np.abs(ref).max()),
                   "onnxruntime_session_create_s": round(session_s, 1)},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--r", type=float, default=0.5)
    p.add_argument("--latent", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the temporary graph folder goes (deleted at the end)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "cpu": {"name": cpu_name(), "cores_visible": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"model": "SD 2.1 UNet, random weights (seed 0)", "r": args.r,
                     "latent": args.latent, "batch": args.batch, "dtype": "fp32", "opset": 18},
    }
    steps = Steps()
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sd21-export-", dir=args.workdir))
    try:
        record.update(check(args, steps, workdir))
        record["ok"] = bool(record["audit"]["passed"] and record["parity"]["passed"])
    except Exception as e:  # noqa: BLE001 - record what happened, then fail
        record["ok"] = False
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record["steps"] = steps.rows
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["peak_rss_gib"] = peak_rss_gib()
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"{'OK' if record['ok'] else 'FAILED'}: wrote {args.out} "
          f"({record['wall_s']:.0f} s, peak RSS {record['peak_rss_gib']} GiB)")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
