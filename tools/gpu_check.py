"""GPU check in one device call: environment, parity, latency, ONNX Runtime CUDA, each
measured by the ``mame-export`` command line (``parity --json``, ``plan --json``,
``profile --json``) in a child process.

Command (from the repository root, no install needed)::

    PYTHONPATH=$PWD python3 tools/gpu_check.py --out $OUT
    PYTHONPATH=$PWD python3 tools/gpu_check.py --out /tmp/gc --dry-run   # CPU, tiny models

Options: ``--parts env,parity,latency,ort`` (default: all four, in that order),
``--budget-s S`` (internal wall-clock budget, default 450 s), ``--seed N``.

Writes, flat in ``--out`` (4 files at most), each rewritten atomically (temporary
file, then a rename) after every command, so whatever has finished is on disk if the
call is cut short:

- ``gpu_check.json``: everything, raw numbers (parts -> status, seconds, results), and
  every command run (``mame-export ...``) with its exit status and wall time;
- ``gpu_check.md``: the same as human tables;
- ``gpu_check.png``: throughput bars per (model, batch), if matplotlib imports;
- ``gpu_check.log``: the progress lines, the commands' own included, with elapsed time.

Parts (a failure in one, e.g. a command that fails or runs out of memory, is recorded
with its message and the next part runs):

1. ``env``: GPU, driver, torch / CUDA / cuDNN / timm / onnx / onnxruntime versions,
   ONNX Runtime providers, Python, command line, UTC date.
2. ``parity``: ``mame-export parity vit_b --r 0.5 --precision P --json`` for fp32,
   fp16 and int8 (a QDQ graph, the merge in fp32): the graph on every graph runner
   (ONNX Runtime CPU and CUDA, TensorRT; those that cannot run here are skipped with the
   reason) against eager fp32 PyTorch.
3. ``latency``: ``mame-export profile`` in fp16 on the GPU, one call per group: vit_b
   batch 256 and 1 (unmerged, MaMe and ToMe at r=0.5 and at the r where MACs halve,
   from ``mame-export plan --target-macs 0.5``) eager; ``clip_l336 --llava`` (LLaVA-1.5's
   encoder) batch 64, unmerged and MaMe r=0.5, eager, then ``torch.compile``; vit_l batch
   128 (unmerged, MaMe and ToMe where MACs halve) eager; vit_b batch 256 unmerged and
   MaMe r=0.5 under ``torch.compile``.
4. ``ort``: ``mame-export profile vit_b --backends onnxrt-cuda`` (unmerged and MaMe
   r=0.5, batch 32, fp32), with the parity part's result for the same runner; skipped
   with the command's reason where ``CUDAExecutionProvider`` cannot run. Then, with
   budget left, the same with ``--precision int8``: both fp32 graphs and their INT8 QDQ
   twins (random calibration, the merge in fp32) timed in turns.

Time: each command gets what is left of the budget (default 450 s), less what the ort
part keeps, and at most its own cap; a command that runs over is stopped (SIGTERM, then
SIGKILL) and recorded as timed out; one that does not fit is skipped with the reason. A
watchdog stops the running command and ends the process (exit status 0, the JSON says
why) 20 s after the budget, so a run stays under 8 minutes of wall time. Exit status: 0
when it ran to the end (parts may have failed: read the JSON), 2 for bad arguments, 1
for an unwritable ``--out``.

``--dry-run`` runs the same commands on the CPU through ``tools/gpu_check_standins.py``:
vit_b, vit_l and clip_l336 are tiny random-weight models of the same classes, fp32,
batches of 1 to 4, few rounds, torch.compile with ``aot_eager``; the ONNX Runtime CPU
provider stands in for CUDA.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # before the heavy imports: the budget counts from process start

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))  # the parts beside this file

from gpu_check_latency import part_latency, part_ort  # noqa: E402
from gpu_check_parity import part_parity  # noqa: E402
from gpu_check_parts import Config, make_config, one_line, ort_can_run, part_env  # noqa: E402
from gpu_check_report import render_markdown  # noqa: E402

REPO = TOOLS.parent
PARTS = ("env", "parity", "latency", "ort")
DEFAULT_BUDGET_S = 450.0
WATCHDOG_GRACE_S = 20.0
STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL: the command removes its temporary files
JSON_NAME, MD_NAME, PNG_NAME, LOG_NAME = (
    "gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log")


def elapsed() -> float:
    return time.monotonic() - T0


@dataclass
class CliCall:
    """One ``mame-export`` command: its JSON (``data``), or why there is none."""

    command: str  # as a user would type it
    exit_code: int | None = None
    seconds: float = 0.0
    data: dict[str, Any] | None = None
    skipped: str | None = None  # not run, and why
    error: str | None = None  # ran, but gave no JSON: why
    stderr_tail: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"command": self.command, "exit_code": self.exit_code,
                               "seconds": round(self.seconds, 2)}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
            out["stderr_tail"] = self.stderr_tail[-12:]
        return out


class Check:
    """The run's record (``doc``), its files, its clock and the command it is running."""

    def __init__(self, out: Path, budget_s: float, cfg: Config, parts: list[str],
                 argv: list[str]) -> None:
        self.out, self.budget_s, self.cfg = out, budget_s, cfg
        self.lock = threading.RLock()
        self.r_half: dict[str, dict[str, Any]] = {}
        self.stand_ins: dict[str, str] = {}
        self.child: subprocess.Popen[str] | None = None
        self.ort_can_run = False  # set in main: whether the ort part will time anything
        self.current = ""
        self.log_file = open(out / LOG_NAME, "w", encoding="utf-8")  # noqa: SIM115
        self.doc: dict[str, Any] = {
            "tool": "tools/gpu_check.py",
            "schema": 2,
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

    def ort_reserve(self) -> float:
        """Seconds kept for the ort part while it is still to run."""
        if self.doc["parts"]["ort"]["status"] != "pending":
            return 0.0
        return self.cfg.ort_reserve_s if self.ort_can_run else self.cfg.ort_skip_s

    def log(self, msg: str) -> None:
        line = f"[gpu_check +{elapsed():6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            self.log_file.write(line + "\n")
            self.log_file.flush()

    # the command line
    def cli(self, args: list[str], min_s: float, cap_s: float, reserve_s: float) -> CliCall:
        """Run ``mame-export ARGS`` (the stand-ins' command line in a dry run) in a child
        process, for at most ``cap_s`` and what the budget leaves after ``reserve_s``."""
        call = CliCall(shlex.join(["mame-export", *args]))
        room = min(cap_s, self.left() - reserve_s)
        if room < min_s:
            call.skipped = (f"time budget: {self.left():.0f} s left of {self.budget_s:g} s"
                            + (f", {reserve_s:.0f} s kept for later parts" if reserve_s else "")
                            + f"; the command needs >= {min_s:g} s")
            self.log(f"$ {call.command}: skipped ({call.skipped})")
            return call
        entry = ([str(TOOLS / "gpu_check_standins.py")] if self.cfg.dry_run
                 else ["-m", "mame_export"])
        t0 = time.monotonic()
        proc = start_child([sys.executable, *entry, *args])
        self.child = proc
        self.log(f"$ {call.command}  (pid {proc.pid}, stopped after {room:.1f} s)")
        stdout, tail, timed_out = wait_child(proc, room, lambda ln: self.log(f"  | {ln}"))
        self.child = None
        call.exit_code, call.seconds = proc.returncode, time.monotonic() - t0
        call.stderr_tail = tail
        if timed_out:
            call.error = f"timed out: stopped after {room:.1f} s"
        else:
            try:
                data = json.loads(stdout) if stdout.strip() else None
            except json.JSONDecodeError as e:
                call.error = f"exit {proc.returncode}: stdout is not JSON ({e.msg})"
            else:
                if isinstance(data, dict):
                    call.data = data
                else:
                    last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
                    call.error = f"exit {proc.returncode}: {last}"
        self.log(f"  exit {proc.returncode} in {call.seconds:.1f} s"
                 + (f": {call.error}" if call.error else ""))
        return call

    # files
    def write(self, plot_too: bool = False) -> None:
        from mame_export.artifacts import atomic_write_bytes

        with self.lock:
            self.doc["elapsed_s"] = round(elapsed(), 2)
            for _ in range(5):  # the watchdog thread may snapshot while the main thread edits
                try:
                    text = json.dumps(self.doc, indent=1, default=str, allow_nan=True)
                    md = render_markdown(self.doc)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            else:  # pragma: no cover - never seen
                return
            atomic_write_bytes(self.out / JSON_NAME, text.encode())
            atomic_write_bytes(self.out / MD_NAME, md.encode())
        if plot_too and importlib.util.find_spec("matplotlib") is not None:
            rows = [r for p in ("latency", "ort") for r in self.doc["parts"][p].get("rows", [])]
            title = (f"gpu_check{' (dry run)' if self.doc['dry_run'] else ''}: speed-up vs "
                     "unmerged over each bar")
            try:
                from mame_export.profile import plot_throughput

                if plot_throughput(rows, self.out / PNG_NAME, title):
                    self.doc["plot"] = PNG_NAME
            except Exception as e:  # noqa: BLE001 - a plot is optional
                self.doc["plot"] = f"not written: {one_line(e)}"

    def watchdog(self) -> None:
        """Called from a timer thread past the budget: stop the command, record why, write,
        end the process."""
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
            if self.child is not None:  # recorded first: the part ends when its command does
                stop_process_group(self.child, grace_s=2.0)
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
            rec.update(status="error", error=one_line(e),
                       traceback=traceback.format_exc(limit=12)[-4000:])
            self.log(f"{name}: ERROR {one_line(e)}")
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 2)
            self.log(f"{name}: {rec['status']} in {rec['seconds']:.1f} s")
            self.write(plot_too=name in ("latency", "ort"))


def start_child(cmd: list[str]) -> subprocess.Popen[str]:
    """``cmd`` from the repository root, this checkout first on the path, in a process
    group of its own (stopped as one), its stdout and stderr piped."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env, start_new_session=True)


def wait_child(proc: subprocess.Popen[str], timeout_s: float,
               on_line: Callable[[str], None]) -> tuple[str, list[str], bool]:
    """Wait for ``proc`` at most ``timeout_s`` (then stop it), passing each stderr line to
    ``on_line`` as it comes; (stdout, the last stderr lines, whether it was stopped)."""
    stdout: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def read_stdout() -> None:
        assert proc.stdout is not None
        stdout.append(proc.stdout.read())

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            on_line(line.rstrip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, pump_stderr)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process_group(proc)
    for t in readers:
        t.join(timeout=5)
    return "".join(stdout), list(tail), timed_out


def stop_process_group(proc: subprocess.Popen[str], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the command and its children (the command cleans up and exits 143), then
    SIGKILL to what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="One-call GPU check over the mame-export command line: environment, "
        "parity, latency, ONNX Runtime CUDA; writes gpu_check.json/.md/.png/.log into --out.")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same commands on the CPU with tiny stand-in models")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget in seconds (default {DEFAULT_BUDGET_S:g}); a "
                   f"watchdog ends the run {WATCHDOG_GRACE_S:g} s after it")
    p.add_argument("--seed", type=int, default=0,
                   help="recorded; the commands seed their own inputs (--seed 0)")
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

    cfg = make_config(args.dry_run)
    chk = Check(out, args.budget_s, cfg, args.parts, argv)
    chk.doc["seed"] = args.seed
    if cfg.dry_run:
        from gpu_check_standins import stand_in_names

        chk.stand_ins = stand_in_names()
        chk.doc["stand_ins"] = chk.stand_ins
    timer = threading.Timer(max(0.0, args.budget_s + WATCHDOG_GRACE_S - elapsed()),
                            chk.watchdog)
    timer.daemon = True
    timer.start()
    chk.log(f"gpu_check {'DRY RUN ' if cfg.dry_run else ''}-> {out} (budget {args.budget_s:g} s, "
            f"parts {','.join(args.parts)})")
    with contextlib.suppress(Exception):  # an onnxruntime that fails to load cannot run
        chk.ort_can_run = ort_can_run(cfg.ort_backend)
    chk.write()
    chk.run_part("env", lambda rec: part_env(chk, rec), min_left_s=0)
    env = chk.doc["parts"]["env"].get("data", {})
    if cfg.device.startswith("cuda") and env and not env.get("cuda_available"):
        chk.doc["warning"] = "no CUDA device visible to PyTorch: device parts will fail"
        chk.log(chk.doc["warning"])
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
