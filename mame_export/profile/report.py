"""Latency results as data: rows, the run's record, speed-ups, where it ran, and tables
(the published page and results measured in parts: :mod:`.pages`)."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mame_export.profile.timing import summarize, throughput
from mame_export.settings import QUANTIZED_PRECISIONS


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


@dataclass
class Row:
    """One (variant, backend, batch, r) measurement, or the reason it was skipped.

    ``variant`` is baseline, mame, tome, tomesd or the NAME of a ``--graph NAME=PATH``
    (``graph``: its path, ``graph_precision``: its own precision; ``r`` and the MACs
    only where its sidecar records them, else None)."""

    model: str
    variant: str
    backend: str
    batch: int
    r: float | None
    precision: str
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    iterations: int | None = None
    throughput: float | None = None
    flops_ratio: float | None = None
    gmacs: float | None = None
    final_tokens: int | None = None
    speedup: float | None = None
    ideal_speedup: float | None = None
    efficiency: float | None = None
    # a quantized row (int8, fp8): the fp32 baseline's median over this row's
    speedup_vs_fp32: float | None = None
    skipped: str | None = None
    exports: bool | None = None
    forbidden_ops: dict[str, int] | None = None
    graph: str | None = None
    graph_precision: str | None = None

    def record(self, got: np.ndarray | Exception) -> None:
        """Fill the timings from samples (ms), or the skip reason from the error raised."""
        if isinstance(got, Exception):
            self.skipped = f"failed: {one_line(got)}"
            return
        s = summarize(got)
        self.median_ms, self.p90_ms, self.p99_ms = s.median_ms, s.p90_ms, s.p99_ms
        self.mean_ms, self.iterations = s.mean_ms, s.iterations
        self.throughput = throughput(self.batch, s.median_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileReport:
    """Everything one run measured, with the device, threads and versions."""

    device: str
    cpu: str
    threads: int
    versions: dict[str, str]
    settings: dict[str, Any]
    command: str
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "cpu": self.cpu,
            "threads": self.threads,
            "versions": self.versions,
            "settings": self.settings,
            "command": self.command,
            "results": [r.to_dict() for r in self.rows],
        }


def add_speedups(rows: list[Row], reference: str = "baseline") -> None:
    """Speed-up over the ``reference`` variant (the baseline; the first graph of a run that
    times given graphs only) on the same model/backend/batch/precision, and efficiency."""
    base = {
        (r.model, r.backend, r.batch, r.precision): r.median_ms
        for r in rows
        if r.variant == reference and r.median_ms
    }
    # the efficiency (speed-up over the FLOPs-ideal) needs an unmerged reference
    unmerged = reference == "baseline" or any(
        r.variant == reference and r.flops_ratio == 1.0 for r in rows)
    for row in rows:
        if row.flops_ratio:
            row.ideal_speedup = 1.0 / row.flops_ratio
        ref = base.get((row.model, row.backend, row.batch, row.precision))
        fp32 = base.get((row.model, row.backend, row.batch, "fp32"))
        if row.median_ms and fp32 and row.precision in QUANTIZED_PRECISIONS:
            row.speedup_vs_fp32 = fp32 / row.median_ms
        if row.median_ms and ref:
            row.speedup = ref / row.median_ms
            if row.ideal_speedup and unmerged:
                row.efficiency = row.speedup / row.ideal_speedup


# ---------------------------------------------------------------- where it ran


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def versions() -> dict[str, str]:
    """Package versions, torch's CUDA and ONNX Runtime's providers."""
    from mame_export.sidecar import versions as package_versions

    out = package_versions()
    out["torch_cuda"] = str(torch.version.cuda)
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        out["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    return out


def results_header(argv: Sequence[str] | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    """What every recorded benchmark result starts with: the command that reproduces it
    (the script relative to the repository), the CPU, threads, load average, versions."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("-")
    root = Path(__file__).resolve().parents[2]
    shown = script.relative_to(root) if script.is_relative_to(root) else Path(argv[0])
    return {
        "command": shlex.join(["python", str(shown), *argv[1:]]),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "load_avg": os.getloadavg(),
        "versions": versions(),
    }


# ---------------------------------------------------------------- tables


Column = tuple[str, str, str]  # (row key, heading, format spec)

COLUMNS: tuple[Column, ...] = (
    ("model", "model", ""), ("variant", "variant", ""), ("backend", "backend", ""),
    ("batch", "batch", ""), ("r", "r", "g"), ("median_ms", "median ms", ".2f"),
    ("p90_ms", "p90 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"), ("throughput", "img/s", "rate"),
    ("flops_ratio", "MACs ratio", ".3f"), ("speedup", "speed-up", ".2f"),
    ("ideal_speedup", "ideal", ".2f"), ("efficiency", "efficiency", ".0%"),
)
_SUFFIX = {"speedup": "x", "ideal_speedup": "x"}


def cell(v: Any, spec: str = "", suffix: str = "") -> str:
    """One table cell: "-" for None, numbers formatted with ``spec`` ("rate": one decimal,
    or three significant digits below 1, so a denoiser's 0.0187 img/s is not 0.0)."""
    if v is None:
        return "-"
    if spec == "rate":
        spec = ".1f" if not isinstance(v, (int, float)) or abs(v) >= 1 else ".3g"
    return (format(v, spec) if spec and isinstance(v, (int, float)) else str(v)) + suffix


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a GitHub markdown table ("|" in cells becomes "/")."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    return [line(head), "|" + "---|" * len(head)] + [line(r) for r in body]


def _cells(row: dict[str, Any], columns: Sequence[Column]) -> list[str]:
    return [cell(row.get(k), spec, _SUFFIX.get(k, "")) for k, _, spec in columns]


def _note(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    parts = []
    if row.get("graph"):
        parts.append(f"graph {row['graph']} ({row.get('graph_precision')})")
    ops = row.get("forbidden_ops")
    if ops:
        parts.append("graph has " + ", ".join(f"{k} x{v}" for k, v in ops.items()))
    return "; ".join(parts)


QUANTIZED_COLUMNS: tuple[Column, ...] = (("precision", "precision", ""),
                                         ("speedup_vs_fp32", "vs fp32 baseline", ".2f"))
_SUFFIX["speedup_vs_fp32"] = "x"


def columns_for(rows: Sequence[dict[str, Any]]) -> tuple[Column, ...]:
    """COLUMNS, with the precision and the speed-up over the fp32 baseline where the rows
    are of more than one precision (``--precision int8``)."""
    if len({r.get("precision") for r in rows}) < 2:
        return COLUMNS
    return COLUMNS[:5] + QUANTIZED_COLUMNS[:1] + COLUMNS[5:] + QUANTIZED_COLUMNS[1:]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width terminal table of result rows (dicts as in the JSON)."""
    columns = columns_for(rows)
    head = [h for _, h, _ in columns] + ["note"]
    body = [_cells(r, columns) + [_note(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = 0
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths[:-1]] + [""])]
                     + [line(b) for b in body])


def format_markdown(rows: Sequence[dict[str, Any]],
                    columns: Sequence[Column] | None = None) -> str:
    """The result rows as a GitHub markdown table of ``columns`` and a note."""
    columns = columns_for(rows) if columns is None else columns
    head = [h for _, h, _ in columns] + ["note"]
    return "\n".join(markdown_table(head, [_cells(r, columns) + [_note(r)] for r in rows]))
