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
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "parity", "latency", "ort")
DEFAULT_BUDGET_S = 450.0
WATCHDOG_GRACE_S = 20.0
JSON_NAME, MD_NAME, PNG_NAME, LOG_NAME = (
    "gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log")
HALF_MACS = 0.5  # target MACs ratio of the "MACs halve" variants
PARITY_R = 0.5


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


# ---------------------------------------------------------------- models


# Dry-run stand-ins for the registry aliases: tiny timm ViTs (img 32, patch 4: 64 patches).
_TINY = {
    "vit_b": {"embed_dim": 32, "depth": 4, "num_heads": 2},
    "vit_l": {"embed_dim": 48, "depth": 6, "num_heads": 3},
}


def build(name: str, dry_run: bool, cache: dict[str, Any]) -> tuple[Any, str]:
    """(model, description): fp32, eval, on the CPU; random weights from a fixed seed.

    The real run uses the project's registry (``mame_export.models``); the dry run a tiny
    timm VisionTransformer of the same class. Cached: callers deep-copy, never modify.
    """
    if name not in cache:
        import torch

        if dry_run:
            from timm.models.vision_transformer import VisionTransformer

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = VisionTransformer(img_size=32, patch_size=4, num_classes=10,
                                          **_TINY[name]).eval()
            desc = f"tiny timm ViT standing in for {name} (img 32, patch 4, {_TINY[name]})"
        else:
            from mame_export.models import build_model, resolve

            spec = resolve(name)
            model, source = build_model(spec, weights="random")
            desc = f"{name} = {spec.source_name}, weights: {source}"
        cache[name] = (model, desc)
    return cache[name]


def img_shape(model: Any) -> tuple[int, int, int]:
    from mame_export.profile import image_shape

    return image_shape(model)


def macs_ratio_at(patched: Any, r: float) -> float:
    import mame_export

    return float(mame_export.merge_plan(mame_export.apply(patched, r=r)).flops_ratio)


def solve_r_for_macs(base: Any, target: float = HALF_MACS) -> tuple[float, float, str]:
    """(r, MACs ratio at r, solver): the smallest r whose MaMe plan has MACs ratio <=
    ``target``, on a copy of ``base``.

    The project's ``mame_export.patch.solve_r`` where it exists, else a bisection over r
    on one patched copy (``apply`` re-patches in place; the plan's ratio falls as r
    grows, in steps where the rounded token counts change), rounded up to 3 decimals.
    """
    patched = copy.deepcopy(base)
    try:
        from mame_export.patch import solve_r
    except ImportError:
        solve_r = None
    if solve_r is not None:
        r = float(solve_r(patched, target))
        return r, macs_ratio_at(patched, r), "mame_export.patch.solve_r"
    r_max = 0.99
    if macs_ratio_at(patched, r_max) > target:
        raise ValueError(f"MACs ratio {target} is not reached below r={r_max}")
    lo, hi = 0.0, r_max
    while hi - lo > 1e-5:
        mid = 0.5 * (lo + hi)
        if macs_ratio_at(patched, mid) <= target:
            hi = mid
        else:
            lo = mid
    r = min(math.ceil(hi * 1000) / 1000, r_max)
    while macs_ratio_at(patched, r) > target and r < r_max:  # pragma: no cover - rounding
        r = round(r + 0.001, 3)
    return r, macs_ratio_at(patched, r), "bisection in tools/gpu_check.py"


# ---------------------------------------------------------------- the record and its files


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


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
            _atomic_write(self.out / JSON_NAME, text.encode())
            _atomic_write(self.out / MD_NAME, md.encode())
        if plot_too:
            rows = [r for p in ("latency", "ort") for r in self.doc["parts"][p].get("rows", [])]
            try:
                if write_plot(rows, self.out / PNG_NAME, self.doc):
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
            rec.update(status="error", error=one_line(e),
                       traceback=traceback.format_exc(limit=12)[-4000:])
            self.log(f"{name}: ERROR {one_line(e)}")
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 2)
            _free_cuda()
            self.log(f"{name}: {rec['status']} in {rec['seconds']:.1f} s")
            self.write(plot_too=name in ("latency", "ort"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _free_cuda() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- part 1: environment


def _run_cmd(cmd: list[str], timeout: float = 15.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def part_env(chk: Check, rec: dict[str, Any]) -> None:
    import torch

    from mame_export.job import versions
    from mame_export.profile import cpu_name, default_threads

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": default_threads(),
        "utc_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": chk.doc["command"],
        "packages": versions(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    git = _run_cmd(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if git:
        dirty = _run_cmd(["git", "-C", str(REPO), "status", "--porcelain"])
        env["git"] = {"commit": git, "dirty_files": len(dirty.splitlines()) if dirty else 0}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count,
        }
    smi = _run_cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                    "--format=csv,noheader"])
    if smi:
        env["nvidia_smi"] = smi.splitlines()
        env["driver_version"] = smi.splitlines()[0].split(",")[1].strip()
        env["driver_source"] = "nvidia-smi"
    elif torch.cuda.is_available():
        with contextlib.suppress(Exception):
            v = int(torch._C._cuda_getDriverVersion())
            env["driver_version"] = f"CUDA driver API {v // 1000}.{(v % 1000) // 10}"
            env["driver_source"] = "torch (nvidia-smi not found)"
    env.setdefault("driver_version", None)
    try:
        import onnxruntime as ort

        preload = "absent"
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
                preload = "ok"
            except Exception as e:  # noqa: BLE001 - recorded
                preload = f"failed: {one_line(e)}"
        env["onnxruntime"] = {"version": ort.__version__, "device": ort.get_device(),
                              "providers": ort.get_available_providers(),
                              "preload_dlls": preload}
    except ImportError as e:
        env["onnxruntime"] = {"error": one_line(e)}
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        env["matplotlib"] = None
    rec["data"] = env
    gpu = env.get("gpu", {}).get("name", "no GPU")
    chk.log(f"env: {gpu}, driver {env['driver_version']}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), ORT providers "
            f"{env['onnxruntime'].get('providers')}")


# ---------------------------------------------------------------- part 2: parity


@contextlib.contextmanager
def strict_fp32() -> Iterator[dict[str, Any]]:
    """TF32 off and no cuDNN autotuning for the fp32 comparison; restored afterwards."""
    import warnings

    import torch

    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the allow_tf32 flags are deprecated in newer torch
        bench = cudnn.benchmark
        try:
            legacy, before = True, (mm.allow_tf32, cudnn.allow_tf32)
            mm.allow_tf32 = cudnn.allow_tf32 = False
        except Exception:  # noqa: BLE001 - a torch that only has the fp32_precision API
            legacy, before = False, (mm.fp32_precision, cudnn.fp32_precision)
            mm.fp32_precision = cudnn.fp32_precision = "ieee"
        cudnn.benchmark = False
        state: dict[str, Any] = {"api": "allow_tf32" if legacy else "fp32_precision",
                                 "cudnn.benchmark": False}
        for key, obj, attr in (("matmul.allow_tf32", mm, "allow_tf32"),
                               ("cudnn.allow_tf32", cudnn, "allow_tf32"),
                               ("matmul.fp32_precision", mm, "fp32_precision")):
            with contextlib.suppress(Exception):
                state[key] = getattr(obj, attr)
    try:
        yield state
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                mm.allow_tf32, cudnn.allow_tf32 = before
            else:
                mm.fp32_precision, cudnn.fp32_precision = before
            cudnn.benchmark = bench


def per_sample_cosine(ref: Any, out: Any) -> list[float]:
    import numpy as np

    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)
    return [float(c) for c in cos]


def top1_flips(ref: Any, out: Any) -> list[dict[str, Any]]:
    """Samples whose top-1 class differs: the reference's margin between the two classes
    and the sample's largest |difference|. With random weights the margins are small; a
    flip with margin <= 2 x max |diff| is explained by the numerical error alone."""
    import numpy as np

    a, b = ref.argmax(1), out.argmax(1)
    found = []
    for i in np.nonzero(a != b)[0]:
        margin = float(ref[i, a[i]] - ref[i, b[i]])
        err = float(np.abs(ref[i].astype(np.float64) - out[i]).max())
        found.append({"sample": int(i), "ref_class": int(a[i]), "class": int(b[i]),
                      "ref_margin": margin, "max_abs_diff": err,
                      "within_error": bool(margin <= 2 * err)})
    return found


def part_parity(chk: Check, rec: dict[str, Any]) -> None:
    import numpy as np

    import mame_export
    from mame_export.export import PRECISIONS
    from mame_export.parity import TOLERANCES, compare_outputs, tolerance_for
    from mame_export.runners import TorchRunner

    cfg = chk.cfg
    base, desc = build(cfg.parity_model, cfg.dry_run, chk.models)
    mame = mame_export.apply(copy.deepcopy(base), r=PARITY_R)
    plan = mame_export.merge_plan(mame)
    c, h, w = img_shape(base)
    rng = np.random.default_rng(1234)
    feeds = [{"pixels": rng.standard_normal((cfg.parity_batch, c, h, w)).astype(np.float32)}
             for _ in range(cfg.parity_batches)]
    rec.update(
        model=cfg.parity_model, model_desc=desc, r=PARITY_R, flops_ratio=plan.flops_ratio,
        device=cfg.device, samples=cfg.parity_batch * cfg.parity_batches,
        reference="eager PyTorch fp32 on the CPU, same weights",
        note=("random weights: logits are small and close (see ref_top1_margin_median_std, "
              "the median top-2 gap in logit std units), so top-1 can flip on numerical "
              "noise alone; top1_flips lists each flip with its margin and error"),
        method=("candidate: eager PyTorch on the device; fp32 with TF32 off; fp16/bf16 by "
                "model.to(dtype) with inputs cast to it (the latency rows' precision), "
                "outputs compared in float64; verdict by mame_export.parity.compare_outputs "
                "per batch (all batches must pass), cosine per sample, top-1 over all samples"),
        tolerances={p: {**vars(t), "text": t.describe()} for p, t in TOLERANCES.items()},
        results=[])
    passed = True
    for label, model in (("mame", mame), ("unmerged", base)):
        ref_runner = TorchRunner(copy.deepcopy(model), ["pixels"], ["logits"], device="cpu")
        t0 = time.monotonic()
        refs = [ref_runner.infer(f)["logits"] for f in feeds]
        ref_s = time.monotonic() - t0
        del ref_runner
        ref_all = np.concatenate(refs)
        top2 = np.sort(ref_all, axis=1)[:, -2:]
        margin = float(np.median((top2[:, 1] - top2[:, 0]) / (ref_all.std(axis=1) + 1e-12)))
        for precision in ("fp32", "fp16", "bf16"):
            if chk.left() < 5:
                rec["results"].append({"variant": label, "precision": precision,
                                       "status": "skipped", "reason": "time budget"})
                continue
            # The merged model selects tokens by data: fp32 allows selection flips.
            tol = tolerance_for(precision, merged=label == "mame")
            item: dict[str, Any] = {"variant": label, "r": PARITY_R if label == "mame" else 0.0,
                                    "precision": precision, "tolerance": tol.describe(),
                                    "ref_seconds": round(ref_s, 2),
                                    "ref_top1_margin_median_std": margin}
            try:
                dtype = None if precision == "fp32" else PRECISIONS[precision]
                cand = TorchRunner(copy.deepcopy(model), ["pixels"], ["logits"],
                                   device=cfg.device, dtype=dtype)
                with strict_fp32() as settings:
                    cand.activate()
                    outs = [cand.infer(f)["logits"] for f in feeds]
                item["cuda_settings"] = settings
                del cand
                stats = [compare_outputs("logits", r, o, tol)
                         for r, o in zip(refs, outs, strict=True)]
                out_all = np.concatenate(outs)
                cos = per_sample_cosine(ref_all, out_all)
                top1 = float((ref_all.argmax(1) == out_all.argmax(1)).mean())
                flips = top1_flips(ref_all, out_all)
                ok = all(s.passed for s in stats)
                item.update(
                    status="passed" if ok else "failed",
                    max_abs_diff=max(s.max_abs_diff for s in stats),
                    max_rel_diff=max(s.max_rel_diff for s in stats),
                    bound_ok=bool(all(
                        np.all(np.abs(r.astype(np.float64) - o) <= tol.max_abs
                               + (tol.max_rel or 0.0) * np.abs(r.astype(np.float64)))
                        for r, o in zip(refs, outs, strict=True))),
                    cosine_min=min(cos), cosine_mean=float(np.mean(cos)), cosine_per_sample=cos,
                    cosine_ok=None if tol.min_cosine is None else min(cos) >= tol.min_cosine,
                    top1_agreement=top1,
                    top1_decisive=[st.top1_decisive for st in stats],
                    selection_flips=sum(st.selection_flips or 0 for st in stats),
                    top1_ok=None if tol.min_top1 is None else top1 >= tol.min_top1,
                    top1_flips=flips,
                    top1_flips_within_error=sum(f["within_error"] for f in flips),
                    finite=bool(np.isfinite(out_all).all()),
                )
                passed &= ok
            except Exception as e:  # noqa: BLE001 - one precision failing is one row
                item.update(status="error", error=one_line(e))
                passed = False
            finally:
                _free_cuda()
            rec["results"].append(item)
            chk.log(f"parity: {label} {precision}: {item['status']}"
                    + (f" max_abs={item['max_abs_diff']:.3g} cos_min={item['cosine_min']:.6f} "
                       f"top1={item['top1_agreement']:.3f} ({len(item['top1_flips'])} flips, "
                       f"{item['top1_flips_within_error']} within error)"
                       if "max_abs_diff" in item else
                       f" ({item.get('error') or item.get('reason')})"))
            chk.write()
    rec["passed"] = passed
    if not passed:
        rec["status"] = "failed"


# ---------------------------------------------------------------- part 3: latency


@contextlib.contextmanager
def compile_room(n: int) -> Iterator[None]:
    """Room for one compiled graph per variant (patched copies share one forward)."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    before = getattr(dcfg, name)
    setattr(dcfg, name, max(before, 2 * n + 8))
    try:
        yield
    finally:
        setattr(dcfg, name, before)


def prepare_compiled(model: Any, arrays: list[Any], device: str, dtype: Any,
                     backend: str) -> Any:
    """``mame_export.profile.prepare_torch(..., compile_=True)`` with another compile
    backend (the dry run's aot_eager)."""
    import torch

    from mame_export.profile import INPUT_NAME, OUTPUT_NAME, Prepared
    from mame_export.runners import TorchRunner

    runner = TorchRunner(model, [INPUT_NAME], [OUTPUT_NAME], device=device, dtype=dtype)
    runner.activate()
    fn = torch.compile(runner.model, dynamic=False, backend=backend)
    tensors = [torch.from_numpy(a).to(device=device, dtype=dtype) for a in arrays]

    def step(x: Any) -> object:
        with torch.inference_mode():
            return fn(x)

    return Prepared(step, tensors, sync=runner.sync,
                    cuda_events=torch.device(device).type == "cuda")


def resolve_r(chk: Check, model_name: str, target: str) -> float:
    if target == "half":
        if model_name not in chk.r_half:
            base, _ = build(model_name, chk.cfg.dry_run, chk.models)
            t0 = time.monotonic()
            chk.r_half[model_name] = solve_r_for_macs(base)
            r, ratio, how = chk.r_half[model_name]
            chk.log(f"latency: {model_name}: MACs halve at r={r:g} (ratio {ratio:.4f}, "
                    f"solved by {how} in {time.monotonic() - t0:.1f} s)")
        return chk.r_half[model_name][0]
    return float(target)


def _variants_for(chk: Check, g: LatencyGroup, built: dict[tuple, Any]) -> list[tuple]:
    """The group's (variant, r, target) keys, building each patched copy once per model."""
    from mame_export.profile import build_variant, unpatched_macs

    base, _ = build(g.model, chk.cfg.dry_run, chk.models)
    macs_key = (g.model, "macs0")
    if macs_key not in built:
        built[macs_key] = unpatched_macs(base)
    keys = []
    specs = [("baseline", 0.0, "-")] if "baseline" in g.variants else []
    for target in g.targets:
        r = resolve_r(chk, g.model, target)
        specs += [(v, r, target) for v in ("mame", "tome") if v in g.variants]
    for v, r, target in specs:
        key = (g.model, v, r)
        if key not in built:
            built[key] = build_variant(base, v, r, built[macs_key])
        keys.append((key, target))
    return keys


def time_group(chk: Check, g: LatencyGroup, built: dict[tuple, Any],
               reserve_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prepare (and compile) each variant of the group, then time them in turns."""
    import torch

    from mame_export.export import PRECISIONS
    from mame_export.profile import (
        Row,
        add_speedups,
        measure_interleaved,
        prepare_torch,
        random_input_sets,
        summarize,
        throughput,
    )

    cfg = chk.cfg
    dtype = PRECISIONS[cfg.precision]
    gi: dict[str, Any] = {"model": g.model, "batch": g.batch, "backend": g.backend,
                          "precision": cfg.precision}
    t_group = time.monotonic()
    keys = _variants_for(chk, g, built)
    base, _ = build(g.model, cfg.dry_run, chk.models)
    shape = img_shape(base)
    arrays = random_input_sets(g.batch, shape, cfg.timing.input_sets, seed=g.batch)
    rows: list[Any] = []
    extra: list[dict[str, Any]] = []
    ready: dict[int, Any] = {}
    compiled = g.backend == "torch-compile"
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        torch._dynamo.reset()  # no compiled graph of an earlier group is reused
    with compile_room(len(keys)):
        for key, target in keys:
            var = built[key]
            row = Row(g.model, var.name, g.backend, g.batch, var.r, cfg.precision,
                      flops_ratio=var.flops_ratio, gmacs=var.gmacs,
                      final_tokens=var.final_tokens)
            ex: dict[str, Any] = {"r_target": "unmerged" if var.name == "baseline" else
                                  ("MACs/2" if target == "half" else f"r={target}")}
            rows.append(row)
            extra.append(ex)
            if var.error:
                row.skipped = var.error
                continue
            if compiled:
                # the last compile is the best guess of the next (the first one also pays
                # for starting inductor's workers)
                guess = (chk.compile_times[-1] if chk.compile_times else cfg.compile_guess_s) * 1.3
                if chk.left() - reserve_s < guess + 10:
                    row.skipped = (f"time budget: {chk.left():.0f} s left, a compile is "
                                   f"estimated at {guess:.0f} s (+{reserve_s:.0f} s kept for "
                                   "later parts)")
                    chk.log(f"latency: {g.model} b{g.batch} {g.backend} {var.name} "
                            f"r={var.r:g}: skipped ({row.skipped})")
                    continue
            try:
                if compiled and cfg.compile_backend != "inductor":
                    p = prepare_compiled(var.model, arrays, cfg.device, dtype,
                                         cfg.compile_backend)
                else:  # the profiler's own step (torch.compile's default backend: inductor)
                    p = prepare_torch(var.model, arrays, cfg.device, dtype, compiled)
                t0 = time.perf_counter()
                p.step(p.inputs[0])  # the first call: compiles under torch.compile
                if p.sync:
                    p.sync()
                first = time.perf_counter() - t0
                ex["first_call_s"] = round(first, 3)
                if compiled:
                    ex["compile_s"] = round(first, 2)
                    ex["compile_backend"] = cfg.compile_backend
                    chk.compile_times.append(first)
                    chk.log(f"latency: compiled {g.model} b{g.batch} {var.name} r={var.r:g} "
                            f"in {first:.1f} s")
                ready[len(rows) - 1] = p
            except Exception as e:  # noqa: BLE001 - a variant that fails is a row that says why
                row.skipped = f"failed: {one_line(e)}"
                _free_cuda()
        if ready:
            chk.log(f"latency: timing {len(ready)} variant(s) in turns: {g.model} b{g.batch} "
                    f"{g.backend} ...")
            try:
                timed = measure_interleaved(ready, cfg.timing)
            finally:
                ready.clear()
            for i, got in timed.items():
                if isinstance(got, Exception):
                    rows[i].skipped = f"failed: {one_line(got)}"
                    continue
                st = summarize(got)
                rw = rows[i]
                rw.median_ms, rw.p90_ms, rw.p99_ms = st.median_ms, st.p90_ms, st.p99_ms
                rw.mean_ms, rw.iterations = st.mean_ms, st.iterations
                rw.throughput = throughput(rw.batch, st.median_ms)
    add_speedups(rows)
    if compiled:
        torch._dynamo.reset()
    if on_gpu:
        gi["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    gi["seconds"] = round(time.monotonic() - t_group, 2)
    out = []
    for rw, ex in zip(rows, extra, strict=True):
        d = rw.to_dict()
        d["p50_ms"] = d["median_ms"]
        d.update(ex)
        out.append(d)
    return out, gi


def part_latency(chk: Check, rec: dict[str, Any]) -> None:
    cfg = chk.cfg
    rec.update(
        precision=cfg.precision, device=cfg.device,
        timing=vars(cfg.timing),
        method=("variants of one (model, batch, backend) timed in turns, one call each per "
                "round with a rotating start (mame_export.profile.measure_interleaved), after "
                "warm-up; CUDA events on the GPU (perf_counter + sync on the CPU); "
                f"{cfg.timing.input_sets} standard-normal input sets on the device, rotated; "
                f"torch.inference_mode; model.to({cfg.precision}); torch.compile(dynamic=False, "
                f"backend={cfg.compile_backend}), its first call (compile) recorded as "
                "compile_s and not timed; speed-up = "
                "baseline p50 / variant p50 in the same group; ideal = 1 / MACs ratio; "
                "efficiency = speed-up / ideal"),
        r_half_macs={}, groups=[], rows=[])
    built: dict[tuple, Any] = {}
    reserve = cfg.ort_reserve_s if chk.ort_can_run else 0.0
    any_skipped = False
    current_model = None
    for g in cfg.groups:
        if current_model is not None and g.model != current_model:
            # variants of the previous model are not needed again if no later group uses them
            if all(h.model != current_model for h in cfg.groups[cfg.groups.index(g):]):
                for k in [k for k in built if k[0] == current_model]:
                    del built[k]
                _free_cuda()
        current_model = g.model
        label = f"{g.model} b{g.batch} {g.backend}"
        if chk.left() - reserve < 15:
            rec["groups"].append({"model": g.model, "batch": g.batch, "backend": g.backend,
                                  "skipped": f"time budget: {chk.left():.0f} s left"})
            chk.log(f"latency: {label}: skipped (time budget)")
            any_skipped = True
            chk.write()
            continue
        try:
            rows, gi = time_group(chk, g, built, reserve)
        except Exception as e:  # noqa: BLE001 - a group that fails is recorded, the rest runs
            gi = {"model": g.model, "batch": g.batch, "backend": g.backend,
                  "error": one_line(e), "traceback": traceback.format_exc(limit=8)[-3000:]}
            rows = []
            chk.log(f"latency: {label}: ERROR {one_line(e)}")
            _free_cuda()
        rec["groups"].append(gi)
        rec["rows"].extend(rows)
        rec["r_half_macs"] = {m: {"r": r, "flops_ratio": q, "solver": how}
                              for m, (r, q, how) in chk.r_half.items()}
        any_skipped |= "error" in gi or any(r["skipped"] for r in rows)
        for r in rows:
            chk.log(f"latency: {label} {r['variant']:<8} r={r['r']:<6g} "
                    + (f"skipped ({r['skipped']})" if r["skipped"] else
                       f"p50 {r['median_ms']:.3f} ms p90 {r['p90_ms']:.3f} "
                       f"{r['throughput']:.0f} img/s speed-up {_f(r['speedup'], '.2f')} "
                       f"ideal {_f(r['ideal_speedup'], '.2f')}"))
        chk.write(plot_too=True)
    built.clear()
    if any_skipped:
        rec["status"] = "partial"


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ---------------------------------------------------------------- part 4: ONNX Runtime CUDA


def ort_reason(provider: str) -> str:
    """Why ONNX Runtime cannot run with ``provider`` here, or ""."""
    from mame_export.runners import OrtRunner

    ok, reason = OrtRunner("unused.onnx", provider).availability()
    if ok:
        return ""
    if provider == "cuda":
        try:
            import onnxruntime as ort

            provs = ort.get_available_providers()
        except ImportError:
            return "onnxruntime is not installed"
        if "CUDAExecutionProvider" not in provs:
            from mame_export.job import versions

            gpu_pkg = versions().get("onnxruntime-gpu")
            why = ("onnxruntime-gpu not installed" if gpu_pkg is None else
                   f"onnxruntime-gpu {gpu_pkg} is installed but its CUDA libraries did not load")
            return f"CUDAExecutionProvider not available: {why} (providers: {', '.join(provs)})"
    return reason


def part_ort(chk: Check, rec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from mame_export.parity import check_parity
    from mame_export.profile import (
        Row,
        add_speedups,
        build_variant,
        default_threads,
        export_variant,
        measure_interleaved,
        prepare_ort,
        random_input_sets,
        summarize,
        throughput,
        unpatched_macs,
    )
    from mame_export.runners import OrtRunner, TorchRunner

    cfg = chk.cfg
    provider = cfg.ort_provider
    backend = "onnxrt-cuda" if provider == "cuda" else "onnxrt"
    rec.update(provider=provider, backend=backend, model=cfg.ort_model, batch=cfg.ort_batch,
               precision="fp32")
    if cfg.dry_run:
        rec["stand_in"] = "dry run: the CPU execution provider stands in for CUDA"
    reason = ort_reason(provider)
    if reason:
        rec.update(status="skipped", reason=reason)
        chk.log(f"ort: skipped ({reason})")
        return
    base, desc = build(cfg.ort_model, cfg.dry_run, chk.models)
    shape = img_shape(base)
    macs0 = unpatched_macs(base)
    rec.update(model_desc=desc, exports=[], parity=[], rows=[])
    threads = torch.get_num_threads() if cfg.dry_run else default_threads()
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as wd:
        graphs: list[tuple[Any, Path]] = []
        for name, r in (("baseline", 0.0), ("mame", PARITY_R)):
            var = build_variant(base, name, r, macs0)  # fresh fp32 copies on the CPU
            t0 = time.monotonic()
            info = export_variant(var, cfg.ort_batch, shape, torch.float32, Path(wd))
            ex = {"variant": name, "r": r, "seconds": round(time.monotonic() - t0, 2),
                  "error": info.error, "forbidden_ops": info.forbidden}
            if info.path is not None:
                ex["bytes"] = info.path.stat().st_size
                graphs.append((var, info.path))
            rec["exports"].append(ex)
            chk.log(f"ort: exported {name} r={r:g} b{cfg.ort_batch} in {ex['seconds']:.1f} s"
                    + (f" ({info.error})" if info.error else ""))
            chk.write()

        def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {"pixels": rng.standard_normal((cfg.ort_batch, *shape)).astype(np.float32)}

        ok_all = True
        for var, path in graphs:
            ref = TorchRunner(copy.deepcopy(var.model), ["pixels"], ["logits"], device="cpu",
                              name="torch-cpu-fp32")
            cand = OrtRunner(path, provider, threads=threads)
            rep = check_parity(ref, [cand], feeds, precision="fp32", batches=2, seed=0)
            d = rep.to_dict()
            d["variant"], d["r"] = var.name, var.r
            rec["parity"].append(d)
            ok_all &= rep.passed
            chk.log(f"ort: parity {var.name}: {'passed' if rep.passed else 'FAILED'} "
                    f"(max_abs {_f(rep.max_abs_diff, '.3g')})")
            chk.write()
            del cand
        arrays = random_input_sets(cfg.ort_batch, shape, cfg.timing.input_sets, seed=7)
        rows: list[Any] = []
        ready: dict[int, Any] = {}
        for var, path in graphs:
            row = Row(cfg.ort_model, var.name, backend, cfg.ort_batch, var.r, "fp32",
                      flops_ratio=var.flops_ratio, gmacs=var.gmacs,
                      final_tokens=var.final_tokens, exports=True)
            rows.append(row)
            try:
                ready[len(rows) - 1] = prepare_ort(path, arrays, provider, threads)
            except Exception as e:  # noqa: BLE001 - recorded per row
                row.skipped = f"failed: {one_line(e)}"
        if ready:
            chk.log(f"ort: timing {len(ready)} graph(s) in turns on {backend} ...")
            timed = measure_interleaved(ready, cfg.timing)
            ready.clear()
            for i, got in timed.items():
                if isinstance(got, Exception):
                    rows[i].skipped = f"failed: {one_line(got)}"
                    continue
                st = summarize(got)
                rw = rows[i]
                rw.median_ms, rw.p90_ms, rw.p99_ms = st.median_ms, st.p90_ms, st.p99_ms
                rw.mean_ms, rw.iterations = st.mean_ms, st.iterations
                rw.throughput = throughput(rw.batch, st.median_ms)
        add_speedups(rows)
        for rw in rows:
            d = rw.to_dict()
            d["p50_ms"] = d["median_ms"]
            d["r_target"] = "unmerged" if rw.variant == "baseline" else f"r={rw.r:g}"
            rec["rows"].append(d)
            chk.log(f"ort: {rw.variant} r={rw.r:g}: "
                    + (f"skipped ({rw.skipped})" if rw.skipped else
                       f"p50 {rw.median_ms:.3f} ms, {rw.throughput:.0f} img/s"))
    rec["parity_passed"] = ok_all
    if not ok_all or len(graphs) < 2:
        rec["status"] = "failed"


# ---------------------------------------------------------------- markdown and plot


def _cell(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v).replace("|", "\\|")


_LAT_COLS = (
    ("backend", "backend", ""), ("model", "model", ""), ("batch", "batch", ""),
    ("variant", "variant", ""), ("r_target", "target", ""), ("r", "r", ".3f"),
    ("flops_ratio", "MACs ratio", ".3f"), ("p50_ms", "p50 ms", ".3f"),
    ("p90_ms", "p90 ms", ".3f"), ("throughput", "img/s", ".1f"),
    ("speedup", "speed-up", ".2f"), ("ideal_speedup", "ideal", ".2f"),
    ("efficiency", "efficiency", ".0%"), ("compile_s", "compile s", ".1f"),
    ("iterations", "n", ""),
)


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in body])


def latency_table(rows: list[dict[str, Any]]) -> list[str]:
    head = [h for _, h, _ in _LAT_COLS] + ["note"]
    body = [[_cell(r.get(k), s) for k, _, s in _LAT_COLS] + [_cell(r.get("skipped") or "")]
            for r in rows]
    return _table(head, body)


def render_markdown(doc: dict[str, Any]) -> str:
    parts = doc["parts"]
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny models)' if doc['dry_run'] else ''}", "",
             f"- command: `{doc['command']}`",
             f"- started {doc['started_utc']}, elapsed {doc['elapsed_s']} s of a "
             f"{doc['budget_s']:g} s budget; complete: {doc['complete']}"]
    if doc.get("watchdog"):
        lines.append(f"- **{doc['watchdog']}**")
    lines += ["", "## Parts", ""]
    lines += _table(["part", "status", "seconds", "reason / error"], [
        [p, parts[p]["status"], _cell(parts[p].get("seconds")),
         _cell(parts[p].get("reason") or parts[p].get("error") or "")] for p in PARTS])
    env = parts["env"].get("data")
    if env:
        ort = env.get("onnxruntime", {})
        gpu = env.get("gpu", {})
        pk = env.get("packages", {})
        lines += ["", "## Environment", ""]
        lines += _table(["what", "value"], [
            ["device", _cell(gpu.get("name", f"CPU: {env.get('cpu')}"))],
            ["GPU memory GiB / capability",
             f"{_cell(gpu.get('memory_gib'))} / {_cell(gpu.get('capability'))}"],
            ["driver", f"{_cell(env.get('driver_version'))} ({_cell(env.get('driver_source'))})"],
            ["torch / CUDA / cuDNN",
             f"{env.get('torch')} / {_cell(env.get('torch_cuda'))} / {_cell(env.get('cudnn'))}"],
            ["timm / onnx / onnxscript",
             f"{_cell(pk.get('timm'))} / {_cell(pk.get('onnx'))} / {_cell(pk.get('onnxscript'))}"],
            ["onnxruntime / providers",
             f"{_cell(ort.get('version'))} / {', '.join(ort.get('providers') or []) or '-'}"],
            ["python", _cell(env.get("python"))],
            ["CPU / threads", f"{_cell(env.get('cpu'))} / {_cell(env.get('cpu_threads'))}"],
            ["UTC date", _cell(env.get("utc_date"))],
        ])
    par = parts["parity"]
    if par.get("results"):
        lines += ["", "## Parity on the device vs CPU fp32", "",
                  f"{par.get('model_desc')}; MaMe r={par.get('r')} "
                  f"(MACs ratio {_cell(par.get('flops_ratio'), '.3f')}); "
                  f"{par.get('samples')} samples. {par.get('method')}. Note: {par.get('note')}",
                  ""]
        lines += _table(["variant", "precision", "status", "max abs", "max rel", "cos min",
                         "cos mean", "top-1", "flips (within error)", "tolerance"], [
            [i["variant"], i["precision"], i["status"], _cell(i.get("max_abs_diff"), ".3g"),
             _cell(i.get("max_rel_diff"), ".3g"), _cell(i.get("cosine_min"), ".6f"),
             _cell(i.get("cosine_mean"), ".6f"), _cell(i.get("top1_agreement"), ".3f"),
             f"{len(i['top1_flips'])} ({i['top1_flips_within_error']})"
             if "top1_flips" in i else "-",
             _cell(i.get("error") or i.get("reason") or i.get("tolerance"))]
            for i in par["results"]])
    lat = parts["latency"]
    if lat.get("rows") or lat.get("groups"):
        lines += ["", "## Latency", "", _cell(lat.get("method")), ""]
        for m, v in lat.get("r_half_macs", {}).items():
            lines.append(f"- {m}: MACs halve at r={v['r']:g} (ratio {v['flops_ratio']:.4f})")
        for gi in lat.get("groups", []):
            note = gi.get("skipped") or gi.get("error")
            if note:
                lines.append(f"- group {gi['model']} b{gi['batch']} {gi['backend']}: {note}")
        lines += [""] + latency_table(lat.get("rows", []))
    ort = parts["ort"]
    if ort.get("status") not in ("pending", "not_selected"):
        lines += ["", "## ONNX Runtime", ""]
        if ort.get("reason"):
            lines.append(f"skipped: {ort['reason']}")
        if ort.get("stand_in"):
            lines.append(ort["stand_in"])
        for p in ort.get("parity", []):
            run = p["runners"][0] if p.get("runners") else {}
            lines.append(f"- parity {p['variant']} r={p['r']:g} vs {p['reference']}: "
                         f"{'passed' if p['passed'] else run.get('status', 'failed')}, "
                         f"max_abs {_cell(p.get('max_abs_diff'), '.3g')} "
                         f"({p['tolerance']['text']}) {run.get('reason', '')}".rstrip())
        if ort.get("rows"):
            lines += [""] + latency_table(ort["rows"])
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict[str, Any]], path: Path, doc: dict[str, Any]) -> bool:
    """Throughput bars per (model, batch), one bar per (backend, variant); False if no
    matplotlib or nothing timed. Written atomically."""
    timed = [r for r in rows if r.get("throughput")]
    if not timed:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["batch"]) for r in timed))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        sel = [r for r in timed if r["model"] == model and r["batch"] == batch]
        labels = [f"{r['backend']}\n{r['variant']} {r.get('r_target', '')}" for r in sel]
        bars = ax.bar(range(len(sel)), [r["throughput"] for r in sel],
                      color=[colors[r["backend"]] for r in sel])
        for b, r in zip(bars, sel, strict=True):
            sp, ideal = r.get("speedup"), r.get("ideal_speedup")
            if sp:
                ax.annotate(f"{sp:.2f}x\n(ideal {ideal:.2f}x)" if ideal else f"{sp:.2f}x",
                            (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(sel)), labels, rotation=90, fontsize=6)
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.set_ylabel("throughput (img/s, at p50)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"gpu_check{' (dry run)' if doc['dry_run'] else ''}: speed-up vs unmerged "
                 "over each bar", fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


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
