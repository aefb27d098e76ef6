"""tools/gpu_check.py, parts 1 and 2 (environment, parity) and the models every part uses.

Imported by ``tools/gpu_check.py`` only; nothing heavy (torch, mame_export) is imported
at module level, so the tool's clock starts before the heavy imports.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import math
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HALF_MACS = 0.5  # target MACs ratio of the "MACs halve" variants
PARITY_R = 0.5

# Dry-run stand-ins for the registry aliases: tiny timm ViTs (img 32, patch 4: 64 patches).
_TINY = {
    "vit_b": {"embed_dim": 32, "depth": 4, "num_heads": 2},
    "vit_l": {"embed_dim": 48, "depth": 6, "num_heads": 3},
}


def build(name: str, dry_run: bool, cache: dict[str, Any]) -> tuple[Any, str]:
    """(model, description): fp32, eval, on the CPU; random weights from a fixed seed.

    The real run uses the project's registry (``mame_export.families``); the dry run a tiny
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
            from mame_export.families import build_model, resolve

            spec = resolve(name)
            model, source = build_model(spec, weights="random")
            desc = f"{name} = {spec.source_name}, weights: {source}"
        cache[name] = (model, desc)
    return cache[name]


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


def free_cuda() -> None:
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


def part_env(chk: Any, rec: dict[str, Any]) -> None:
    import torch

    from mame_export.profile import cpu_name, default_threads, one_line
    from mame_export.sidecar import versions

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
