"""tools/gpu_check.py: what it runs (the real run's and the dry run's settings) and part 1,
the environment.

Imported by ``tools/gpu_check.py`` only; nothing heavy (torch, mame_export) is imported
at module level, so the tool's clock starts before the heavy imports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HALF_MACS = 0.5  # target MACs ratio of the "MACs halve" variants
PARITY_R = 0.5


@dataclass(frozen=True)
class LatencyGroup:
    """One ``mame-export profile`` call: its variants timed in turns per (backend, batch)."""

    model: str
    batches: tuple[int, ...]
    backends: tuple[str, ...]  # "torch", "torch-compile"
    targets: tuple[str, ...]  # "0.5" (an r) or "half" (the r where MACs halve)
    variants: tuple[str, ...] = ("baseline", "mame", "tome")
    flags: tuple[str, ...] = ()  # e.g. ("--llava",)
    min_s: float = 40.0  # skipped when less time than this is left
    cap_s: float = 120.0  # stopped when it runs longer

    @property
    def label(self) -> str:
        return " ".join([self.model, *self.flags, "b" + ",".join(map(str, self.batches)),
                         ",".join(self.backends)])


# The parity part's precisions: int8 is the QDQ graph (random calibration: the parity
# inputs are random too), on every graph runner, TensorRT and ONNX Runtime CUDA included.
PARITY_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Config:
    dry_run: bool
    device: str
    precision: str  # latency precision
    parity_model: str
    parity_batch: int
    parity_batches: int
    parity_precisions: tuple[str, ...]
    groups: tuple[LatencyGroup, ...]
    timing: dict[str, float]  # the profile command's timing flags
    ort_backend: str  # "onnxrt-cuda", or "onnxrt" standing in for it (dry run)
    ort_model: str
    ort_batch: int
    threads: int | None  # --threads of the profile command (None: all)
    compile_backend: str  # what torch.compile compiles with
    cap_s: float  # stop a parity, plan or ort call after this long
    ort_reserve_s: float  # budget kept for the ort part while it can run
    ort_skip_s: float = 20.0  # kept instead where it cannot: the command only says why

    def timing_flags(self) -> list[str]:
        flags = [f"--{k.replace('_', '-')}={v:g}" for k, v in self.timing.items()]
        return flags + ([] if self.threads is None else [f"--threads={self.threads}"])


def make_config(dry_run: bool) -> Config:
    if dry_run:
        llava = ("--llava",)
        small = {"min_s": 20.0, "cap_s": 240.0}  # a shared CPU can be slow: generous caps
        groups = (
            LatencyGroup("vit_b", (4, 1), ("torch",), ("0.5", "half"), **small),
            LatencyGroup("clip_l336", (2,), ("torch",), ("0.5",), ("baseline", "mame"), llava,
                         **small),
            LatencyGroup("clip_l336", (2,), ("torch-compile",), ("0.5",), ("baseline", "mame"),
                         llava, **small),
            LatencyGroup("vit_l", (2,), ("torch",), ("half",), **small),
        )
        timing = {"warmup": 1, "min_iters": 3, "max_iters": 5, "seconds": 0.05,
                  "input_sets": 2}
        # fp32: PyTorch's fp16 CPU kernels make even tiny models slow.
        return Config(True, "cpu", "fp32", "vit_b", 2, 2, PARITY_PRECISIONS, groups, timing,
                      "onnxrt", "vit_b", 2, threads=1, compile_backend="aot_eager",
                      cap_s=240.0, ort_reserve_s=30.0)
    llava = ("--llava",)
    groups = (
        LatencyGroup("vit_b", (256, 1), ("torch",), ("0.5", "half")),
        # issue 23: LLaVA-1.5's encoder at batch 64; eager first, so a compile that runs
        # past its cap loses no eager row
        LatencyGroup("clip_l336", (64,), ("torch",), ("0.5",), ("baseline", "mame"), llava),
        LatencyGroup("clip_l336", (64,), ("torch-compile",), ("0.5",), ("baseline", "mame"),
                     llava, min_s=90, cap_s=240),
        LatencyGroup("vit_l", (128,), ("torch",), ("half",), cap_s=90),
        LatencyGroup("vit_b", (256,), ("torch-compile",), ("0.5",), ("baseline", "mame"),
                     min_s=60, cap_s=150),
    )
    timing = {"warmup": 5, "min_iters": 20, "max_iters": 2000, "seconds": 1.5, "input_sets": 3}
    return Config(False, "cuda", "fp16", "vit_b", 8, 3, PARITY_PRECISIONS, groups, timing,
                  "onnxrt-cuda", "vit_b", 32, threads=None, compile_backend="inductor",
                  cap_s=120.0, ort_reserve_s=60.0)


def one_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, BaseException):
        return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__
    return text[:240]


# ---------------------------------------------------------------- part 1: environment


def _run_cmd(cmd: list[str], timeout: float = 15.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def part_env(chk: Any, rec: dict[str, Any]) -> None:
    import torch

    from mame_export.sidecar import versions

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": _cpu_threads(),
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

        env["onnxruntime"] = {"version": ort.__version__, "device": ort.get_device(),
                              "providers": ort.get_available_providers()}
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


def ort_can_run(backend: str) -> bool:
    """Whether ONNX Runtime has the provider ``backend`` needs, asked without mame_export."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return backend != "onnxrt-cuda" or "CUDAExecutionProvider" in ort.get_available_providers()
