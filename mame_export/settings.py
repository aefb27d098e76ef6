"""Every user setting's one home: its limits and its check.

The CLI and the Python API check each setting here, once, at the edge (see
:mod:`mame_export.request`); the stages after that trust the resolved job. Each check
raises a one-line :class:`~mame_export.errors.UserError` naming the flag. This module
imports nothing heavy (the command line loads it before torch).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

from mame_export.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")  # graph / engine / timing precisions
MAX_BATCH = 4096  # also the dynamic batch axis's upper bound in the graph
MAX_PARITY_BATCHES = 1000
MAX_SEED = 2**63 - 1
MAX_INPUT_SETS = 64  # random input sets a profile rotates
MAX_ITERS = 1_000_000  # timed iterations per profile row
MAX_SECONDS = 24 * 3600.0  # a profile row's time budget
MAX_LIMIT = 10_000_000  # images an eval reads
# The opsets every export is tested at (tests/test_job.py exports each): the
# dynamo exporter writes 18 and converts up; 17 cannot be written, and at 23 it emits
# the ONNX Attention op, whose mask ONNX Runtime's CPU provider rejects.
OPSETS = (18, 22)


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    # numbers.Real admits numpy scalars; bool is an int but never a ratio.
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_int(flag: str, v: object, lo: int, hi: int) -> int:
    """``v`` as an int in [lo, hi], else a one-line UserError naming ``flag``."""
    if not (is_int(v) and lo <= int(v) <= hi):  # type: ignore[call-overload]
        raise UserError(f"{flag} must be in [{lo}, {hi}]; got {v!r}")
    return int(v)  # type: ignore[call-overload]


def check_real(flag: str, v: object, lo: float, hi: float, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """``v`` as a finite float in the interval, else a one-line UserError (NaN refused)."""
    ok = is_real(v) and math.isfinite(float(v))  # type: ignore[arg-type]
    if ok:
        x = float(v)  # type: ignore[arg-type]
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise UserError(f"{flag} must be in {left}{lo:g}, {hi:g}{right}; got {v!r}")
    return float(v)  # type: ignore[arg-type]


def check_r(v: object, flag: str = "--r") -> float:
    """A merge ratio r in [0, 1)."""
    return check_real(flag, v, 0.0, 1.0, hi_open=True)


def check_rs(values: Sequence[object] | None, flag: str = "--r") -> list[float]:
    """A non-empty list of merge ratios (``--r 0.25,0.5``); an empty list (``--r ,``) is
    refused instead of falling back to a default."""
    if values is None or len(values) == 0:
        raise UserError(f"{flag} needs at least one value, e.g. {flag} 0.5")
    return [check_r(v, flag) for v in values]


def check_target_macs(v: object, flag: str = "--target-macs") -> float:
    return check_real(flag, v, 0.0, 1.0, lo_open=True)


def check_tau(v: object, flag: str = "--tau") -> float:
    return check_real(flag, v, -1.0, 1.0)


def check_batch(v: object, flag: str = "--batch") -> int:
    return check_int(flag, v, 1, MAX_BATCH)


def check_batches(values: Sequence[object] | None, flag: str = "--batch") -> list[int]:
    if not values:
        raise UserError(f"{flag} needs at least one value, e.g. {flag} 1")
    return [check_batch(v, flag) for v in values]


def max_threads() -> int:
    """The most CPU threads a run may ask for: the machine's logical CPUs."""
    return max(1, os.cpu_count() or 1)


def check_threads(v: object | None) -> int | None:
    """``--threads`` in [1, logical CPUs]; None keeps the default (all available)."""
    return None if v is None else check_int("--threads", v, 1, max_threads())


def check_precision(v: object, allowed: Sequence[str] = PRECISIONS) -> str:
    if v not in allowed:
        raise UserError(f"--precision must be one of {', '.join(allowed)}; got {v!r}")
    return str(v)


def check_seed(v: object | None) -> int | None:
    if v is None:
        return None
    if not (is_int(v) and 0 <= int(v) <= MAX_SEED):  # type: ignore[call-overload]
        raise UserError(f"--seed must be in [0, 2**63 - 1]; got {v!r}")
    return int(v)  # type: ignore[call-overload]


def check_parity_batches(v: object) -> int:
    return check_int("--parity-batches", v, 1, MAX_PARITY_BATCHES)


def check_opset(v: object) -> int:
    if not (is_int(v) and OPSETS[0] <= int(v) <= OPSETS[1]):  # type: ignore[call-overload]
        raise UserError(f"--opset must be in [{OPSETS[0]}, {OPSETS[1]}] (the opsets "
                        f"mame-export exports and tests); got {v!r}")
    return int(v)  # type: ignore[call-overload]


def check_positive_size(v: object | None) -> int | None:
    """``--img-size`` before the model is known: a positive integer (the family then checks
    it against the model's patch grid and its upper bound)."""
    if v is None:
        return None
    if not (is_int(v) and int(v) >= 1):  # type: ignore[call-overload]
        raise UserError(f"--img-size must be positive; got {v!r}")
    return int(v)  # type: ignore[call-overload]


# ------------------------------------------------------------------ profile timing


def check_profile_iters(min_iters: object | None, max_iters: object | None,
                        default_min: int, default_max: int) -> tuple[int, int]:
    """``--min-iters`` / ``--max-iters`` (each in [1, MAX_ITERS], None: the default) as
    (min, max). An explicit --max-iters below the default minimum lowers the minimum; both
    given and contradictory is an error."""
    lo = None if min_iters is None else check_int("--min-iters", min_iters, 1, MAX_ITERS)
    hi = None if max_iters is None else check_int("--max-iters", max_iters, 1, MAX_ITERS)
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"--min-iters {lo} is above --max-iters {hi}; give --min-iters <= "
                        "--max-iters")
    if lo is None:
        lo = default_min if hi is None else min(default_min, hi)
    return lo, max(default_max, lo) if hi is None else hi


def check_profile_seconds(v: object) -> float:
    """``--seconds``: a row's time budget, finite and > 0 (NaN refused)."""
    return check_real("--seconds", v, 0.0, MAX_SECONDS, lo_open=True)


def check_warmup(v: object) -> int:
    return check_int("--warmup", v, 0, MAX_ITERS)


def check_input_sets(v: object) -> int:
    """``--input-sets``: at least 2 (the inputs are rotated), at most MAX_INPUT_SETS."""
    return check_int("--input-sets", v, 2, MAX_INPUT_SETS)


def check_target_macs_list(values: Sequence[object], flag: str = "--target-macs") -> list[float]:
    """A non-empty list of MACs ratios (``eval --target-macs 0.5,0.7``); an empty list
    (``--target-macs ,``) is refused, like an empty ``--r``."""
    if len(values) == 0:
        raise UserError(f"{flag} needs at least one value, e.g. {flag} 0.5")
    return [check_target_macs(v, flag) for v in values]


# ------------------------------------------------------------------ merge plans (tune)

SIMILARITIES = ("size", "cosine")
"""How a MaMe step compares tokens: "size" (size-aware, Ward's linkage: the default) or
"cosine" (the keys' cosine alone, as ToMe). A plan file may choose either."""
TUNE_METRICS = ("feature-cosine", "top1-agreement")
MAX_TUNE_CANDIDATES = 10_000
DEFAULT_TUNE_CANDIDATES = 40  # schedules scored per MACs budget (minutes for ViT-S, 64 images)


def check_similarity(v: object, flag: str = "--similarity") -> str:
    if v not in SIMILARITIES:
        raise UserError(f"{flag} must be one of {', '.join(SIMILARITIES)}; got {v!r}")
    return str(v)


def check_tune_metric(v: object) -> str:
    if v not in TUNE_METRICS:
        raise UserError(f"--metric must be one of {', '.join(TUNE_METRICS)}; got {v!r}")
    return str(v)


def check_tune_candidates(v: object) -> int:
    """``--max-candidates``: the plans scored per MACs target (the search's bound)."""
    return check_int("--max-candidates", v, 4, MAX_TUNE_CANDIDATES)


# ------------------------------------------------------------------ quantized graphs

# Precisions made by quantizing an fp32 export (QDQ graphs, mame_export.quant); export and
# parity take them, besides PRECISIONS. fp8 (E4M3) is for TensorRT on Hopper and newer.
QUANTIZED_PRECISIONS = ("int8", "fp8")
GRAPH_PRECISIONS = PRECISIONS + QUANTIZED_PRECISIONS
CALIB_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's calibrators
# Calibration images read (the first N, in a fixed order): ONNX Runtime's calibrators hold
# every calibrated tensor of every image in memory until the end.
MAX_CALIB_IMAGES = 256


def check_graph_precision(v: object) -> str:
    """``--precision`` of a graph: fp32, fp16, bf16, or a quantized one (int8, fp8)."""
    return check_precision(v, GRAPH_PRECISIONS)


def check_calib_method(v: object) -> str:
    if v not in CALIB_METHODS:
        raise UserError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}; got {v!r}")
    return str(v)


def check_calib_options(precision: str, calib: object | None, method: str) -> None:
    """``--calib`` / ``--calib-method`` belong to a quantized precision only."""
    check_calib_method(method)
    if precision not in QUANTIZED_PRECISIONS and (calib is not None or method != "minmax"):
        raise UserError(f"--calib and --calib-method calibrate a quantized graph; add "
                        f"--precision {' or '.join(QUANTIZED_PRECISIONS)} (got {precision})")
    if precision == "fp8" and method != "minmax":
        raise UserError("--precision fp8 calibrates with ONNX Runtime's distribution "
                        "calibrator only; drop --calib-method")


def check_quant_keep(precision: str, patterns: object) -> tuple[str, ...]:
    """``--quant-keep``: module-path patterns (``blocks.*.mlp.fc2``) of a quantized graph's
    layers to keep in high precision; whether each matches a layer is checked on the graph."""
    if not isinstance(patterns, (tuple, list)) or not all(
            isinstance(p, str) and p.strip() and "," not in p for p in patterns):
        raise UserError(f"--quant-keep takes module-path patterns separated by commas, e.g. "
                        f"'blocks.*.mlp.fc2'; got {patterns!r}")
    if patterns and precision not in QUANTIZED_PRECISIONS:
        raise UserError(f"--quant-keep keeps layers of a quantized graph in high precision; "
                        f"add --precision {' or '.join(QUANTIZED_PRECISIONS)} (got {precision})")
    return tuple(p.strip() for p in patterns)
