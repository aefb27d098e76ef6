"""GPU check in one device call: environment, GPU parity, latency, ONNX Runtime CUDA.

Command (from the repository root, no install needed)::

    PYTHONPATH=$PWD python3 tools/gpu_check.py --out $OUT
    PYTHONPATH=$PWD python3 tools/gpu_check.py --out /tmp/gc --dry-run   # CPU, tiny models, < 1 min

Options: ``--parts env,parity,latency,ort`` (default: all four, in that order),
``--budget-s S`` (internal wall-clock budget, default 450 s), ``--seed N``.

Writes, flat in ``--out`` (4 files at most), each rewritten atomically (temporary
file, then a rename) after every part and every latency group, so whatever has
finished is on disk if the call is cut short:

- ``gpu_check.json``: everything, raw numbers (parts -> status, seconds, results);
- ``gpu_check.md``: the same as human tables;
- ``gpu_check.png``: throughput bars per (model, batch), if matplotlib imports;
- ``gpu_check.log``: the progress lines also printed to stderr, with elapsed time.

Parts (a failure in one, e.g. an exception or out of memory, is recorded with its
message and the next part runs):

1. ``env``: GPU, driver, torch / CUDA / cuDNN / timm / onnx / onnxruntime versions,
   ONNX Runtime providers, Python, command line, UTC date.
2. ``parity``: vit_b (random seeded weights) unmerged and MaMe r=0.5 on the GPU in
   fp32 (TF32 off), fp16 and bf16 (``model.to(dtype)``, as the latency rows)
   against the same model in fp32 on the CPU, with ``mame_export.parity`` tolerances.
3. ``latency``: fp16, CUDA events, the variants of one (model, batch, backend) timed
   in turns (``mame_export.profile.measure_interleaved``): vit_b batch 256 and 1
   (unmerged, MaMe and ToMe at r=0.5 and at the r where MACs halve) on eager
   PyTorch and ``torch.compile(dynamic=False)`` (compile time recorded, not timed),
   vit_l batch 128 (unmerged, MaMe and ToMe where MACs halve) eager. Eager groups run
   first; each compile is started only if the budget leaves room for it.
4. ``ort``: ONNX Runtime CUDA (only with ``CUDAExecutionProvider``): the exported
   vit_b unmerged and MaMe r=0.5 graphs, parity against eager fp32 and latency.

Time: the work is planned to end within the budget (default 450 s); what the budget
does not leave room for is skipped with the reason recorded. A watchdog ends the
process (exit status 0, the JSON says why) 20 s after the budget, so a run stays
under 8 minutes of wall time. Exit status: 0 when it ran to the end (parts may have
failed: read the JSON), 2 for bad arguments, 1 for an unwritable ``--out``.

``--dry-run`` runs the same code paths on the CPU with tiny ViTs (img 32, patch 4),
tiny batches and few rounds; one tiny ``torch.compile`` row; the ONNX Runtime CPU
provider stands in for CUDA.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # before the heavy imports: the budget counts from process start

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the parts beside this file

from gpu_check_latency import ort_reason, part_latency, part_ort  # noqa: E402
from gpu_check_parity import part_parity  # noqa: E402
from gpu_check_parts import (  # noqa: E402, F401 - the solver is part of the tool's API
    free_cuda,
    macs_ratio_at,
    part_env,
    solve_r_for_macs,
)
from gpu_check_report import render_markdown  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "parity", "latency", "ort")
DEFAULT_BUDGET_S = 450.0
WATCHDOG_GRACE_S = 20.0
JSON_NAME, MD_NAME, PNG_NAME, LOG_NAME = (
    "gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log")


def elapsed() -> float:
    return time.monotonic() - T0


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LatencyGroup:
    """Variants of one (model, batch, backend), timed in turns."""

    model: str
    batch: int
    backend: str  # "torch" | "torch-compile"
    targets: tuple[str, ...]  # "0.5" (an r) or "half" (the r where MACs halve)
    variants: tuple[str, ...] = ("baseline", "mame", "tome")


@dataclass(frozen=True)
class Config:
    dry_run: bool
    device: str
    precision: str  # latency precision
    parity_model: str
    parity_batch: int
    parity_batches: int
    groups: tuple[LatencyGroup, ...]
    timing: Any  # mame_export.profile.TimingSettings
    ort_provider: str  # "cuda", or "cpu" standing in for it (dry run)
    ort_model: str
    ort_batch: int
    compile_backend: str  # torch.compile backend: "inductor" (real run), "aot_eager" (dry run)
    compile_guess_s: float  # compile time assumed before the first one is measured
    ort_reserve_s: float  # budget kept for the ort part while it can run


def make_config(dry_run: bool) -> Config:
    from mame_export.profile import TimingSettings

    if dry_run:
        groups = (
            LatencyGroup("vit_b", 4, "torch", ("0.5", "half")),
            LatencyGroup("vit_b", 1, "torch", ("0.5", "half")),
            LatencyGroup("vit_l", 2, "torch", ("half",)),
            LatencyGroup("vit_b", 4, "torch-compile", ("0.5",), variants=("mame",)),
        )
        timing = TimingSettings(warmup_iters=1, warmup_s=0.0, min_iters=3, max_iters=5,
                                budget_s=0.02, input_sets=2)
        # Inductor's C++ compile of even a tiny model takes ~50 s on 2 cold CPU cores:
        # the dry run compiles with aot_eager (dynamo + AOTAutograd, no code generation).
        # fp32: PyTorch's fp16 CPU kernels make even tiny models slow.
        return Config(True, "cpu", "fp32", "vit_b", 2, 2, groups, timing, "cpu", "vit_b", 2,
                      compile_backend="aot_eager", compile_guess_s=10.0, ort_reserve_s=15.0)
    both = ("0.5", "half")
    groups = (
        LatencyGroup("vit_b", 256, "torch", both),
        LatencyGroup("vit_b", 1, "torch", both),
        LatencyGroup("vit_l", 128, "torch", ("half",)),
        LatencyGroup("vit_b", 256, "torch-compile", both),
        LatencyGroup("vit_b", 1, "torch-compile", both),
    )
    timing = TimingSettings(warmup_iters=5, warmup_s=0.5, min_iters=20, max_iters=2000,
                            budget_s=1.5, input_sets=3)
    return Config(False, "cuda", "fp16", "vit_b", 8, 3, groups, timing, "cuda", "vit_b", 32,
                  compile_backend="inductor", compile_guess_s=60.0, ort_reserve_s=120.0)


class Check:
    """The run's record (``doc``), its files and its clock."""

    def __init__(self, out: Path, budget_s: float, cfg: Config, parts: list[str],
                 argv: list[str]) -> None:
        self.out, self.budget_s, self.cfg = out, budget_s, cfg
        self.lock = threading.RLock()
        self.models: dict[str, Any] = {}
        self.r_half: dict[str, tuple[float, float, str]] = {}
        self.ort_can_run = False
        self.compile_times: list[float] = []
        self.current = ""
        self.log_file = open(out / LOG_NAME, "w", encoding="utf-8")  # noqa: SIM115
        self.doc: dict[str, Any] = {
            "tool": "tools/gpu_check.py",
            "schema": 1,
            "dry_run": cfg.dry_run,
            "device": cfg.device,
            "command": shlex.join([sys.executable, *sys.argv[:1], *argv]),
            "cwd": os.getcwd(),
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "finished_utc": None,
            "elapsed_s": None,
            "budget_s": budget_s,
            "watchdog_s": budget_s + WATCHDOG_GRACE_S,
            "complete": False,
            "parts_selected": parts,
            "parts": {p: {"status": "pending" if p in parts else "not_selected"} for p in PARTS},
        }

    # clock
    def left(self) -> float:
        return self.budget_s - elapsed()

    def log(self, msg: str) -> None:
        line = f"[gpu_check +{elapsed():6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            self.log_file.write(line + "\n")
            self.log_file.flush()

    # files
    def write(self, plot_too: bool = False) -> None:
        from mame_export.artifacts import atomic_write_bytes

        with self.lock:
            self.doc["elapsed_s"] = round(elapsed(), 2)
            for _ in range(5):  # the watchdog thread may snapshot while the main thread edits
                try:
                    text = json.dumps(self.doc, indent=1, default=_json_default, allow_nan=True)
                    md = render_markdown(self.doc)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            else:  # pragma: no cover - never seen
                return
            atomic_write_bytes(self.out / JSON_NAME, text.encode())
            atomic_write_bytes(self.out / MD_NAME, md.encode())
        if plot_too and importlib.util.find_spec("matplotlib") is not None:
            from mame_export.profile import one_line, plot_throughput

            rows = [r for p in ("latency", "ort") for r in self.doc["parts"][p].get("rows", [])]
            title = (f"gpu_check{' (dry run)' if self.doc['dry_run'] else ''}: speed-up vs "
                     "unmerged over each bar")
            try:
                if plot_throughput(rows, self.out / PNG_NAME, title):
                    self.doc["plot"] = PNG_NAME
            except Exception as e:  # noqa: BLE001 - a plot is optional
                self.doc["plot"] = f"not written: {one_line(e)}"

    def watchdog(self) -> None:
        """Called from a timer thread past the budget: record why, write, end the process."""
        with self.lock:
            part = self.doc["parts"].get(self.current)
            msg = (f"watchdog: {elapsed():.0f} s passed (budget {self.budget_s:g} s + "
                   f"{WATCHDOG_GRACE_S:g} s grace) while in part {self.current or '-'}; "
                   "process ended here")
            if part is not None and part.get("status") in ("running", "pending"):
                part["status"] = "error"
                part["error"] = msg
            self.doc["watchdog"] = msg
            self.doc["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds")
            self.log(msg)
            with contextlib.suppress(Exception):
                self.write()
        os._exit(0)

    # parts
    def run_part(self, name: str, fn: Callable[[dict[str, Any]], None],
                 min_left_s: float) -> None:
        rec = self.doc["parts"][name]
        if rec["status"] == "not_selected":
            return
        self.current = name
        if self.left() < min_left_s:
            rec.update(status="skipped", reason=f"time budget: {self.left():.0f} s left of "
                       f"{self.budget_s:g} s, part needs >= {min_left_s:g} s")
            self.log(f"{name}: skipped ({rec['reason']})")
            self.write()
            return
        t0 = time.monotonic()
        rec.update(status="running", started_at_s=round(elapsed(), 2))
        self.log(f"{name}: start")
        self.write()
        try:
            fn(rec)
            if rec["status"] == "running":
                rec["status"] = "ok"
        except BaseException as e:  # noqa: BLE001 - recorded; the next part runs
            if isinstance(e, KeyboardInterrupt):
                raise
            from mame_export.profile import one_line

            rec.update(status="error", error=one_line(e),
                       traceback=traceback.format_exc(limit=12)[-4000:])
            self.log(f"{name}: ERROR {one_line(e)}")
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 2)
            free_cuda()
            self.log(f"{name}: {rec['status']} in {rec['seconds']:.1f} s")
            self.write(plot_too=name in ("latency", "ort"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="One-call GPU check: environment, parity, latency, ONNX Runtime CUDA; "
        "writes gpu_check.json/.md/.png/.log into --out.")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="same code paths on the CPU with tiny models (under a minute)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget in seconds (default {DEFAULT_BUDGET_S:g}); a "
                   f"watchdog ends the run {WATCHDOG_GRACE_S:g} s after it")
    p.add_argument("--seed", type=int, default=0, help="torch seed for anything not seeded")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts: unknown part(s) {bad or '(none)'}; choose from {', '.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        p.error(f"--budget-s must be a positive number; got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe-")  # noqa: SIM115
        probe.close()
    except OSError as e:
        print(f"gpu_check: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        import mame_export  # noqa: F401
    except ImportError:  # run from a checkout without PYTHONPATH: use this checkout
        sys.path.insert(0, str(REPO))

    import torch

    torch.manual_seed(args.seed)
    cfg = make_config(args.dry_run)
    if cfg.dry_run:  # tiny models: one thread is faster, and fair to a shared machine
        torch.set_num_threads(1)
    chk = Check(out, args.budget_s, cfg, args.parts, argv)
    timer = threading.Timer(max(0.0, args.budget_s + WATCHDOG_GRACE_S - elapsed()),
                            chk.watchdog)
    timer.daemon = True
    timer.start()
    chk.log(f"gpu_check {'DRY RUN ' if cfg.dry_run else ''}-> {out} (budget {args.budget_s:g} s, "
            f"parts {','.join(args.parts)})")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        chk.doc["warning"] = "no CUDA device visible to PyTorch: device parts will fail"
        chk.log(chk.doc["warning"])
    with contextlib.suppress(Exception):
        chk.ort_can_run = "ort" in args.parts and not ort_reason(cfg.ort_provider)
    chk.write()
    chk.run_part("env", lambda rec: part_env(chk, rec), min_left_s=0)
    chk.run_part("parity", lambda rec: part_parity(chk, rec), min_left_s=20)
    chk.run_part("latency", lambda rec: part_latency(chk, rec), min_left_s=20)
    chk.run_part("ort", lambda rec: part_ort(chk, rec), min_left_s=30)
    timer.cancel()
    chk.current = ""
    chk.doc["complete"] = True
    chk.doc["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    chk.write(plot_too=True)
    chk.log(f"done in {elapsed():.1f} s: " + ", ".join(
        f"{p}={chk.doc['parts'][p]['status']}" for p in PARTS))
    chk.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
