"""Latency results as data and as pages: rows, the run's record, speed-ups, tables,
the published summary, and the merge of results measured in parts."""

from __future__ import annotations

import contextlib
import json
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


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


@dataclass
class Row:
    """One (variant, backend, batch, r) measurement, or the reason it was skipped."""

    model: str
    variant: str
    backend: str
    batch: int
    r: float
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
    skipped: str | None = None
    exports: bool | None = None
    forbidden_ops: dict[str, int] | None = None

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


def add_speedups(rows: list[Row]) -> None:
    """Speed-up over the baseline on the same model/backend/batch/precision, and efficiency."""
    base = {
        (r.model, r.backend, r.batch, r.precision): r.median_ms
        for r in rows
        if r.variant == "baseline" and r.median_ms
    }
    for row in rows:
        if row.flops_ratio:
            row.ideal_speedup = 1.0 / row.flops_ratio
        ref = base.get((row.model, row.backend, row.batch, row.precision))
        if row.median_ms and ref:
            row.speedup = ref / row.median_ms
            if row.ideal_speedup:
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
    ("p90_ms", "p90 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"), ("throughput", "img/s", ".1f"),
    ("flops_ratio", "MACs ratio", ".3f"), ("speedup", "speed-up", ".2f"),
    ("ideal_speedup", "ideal", ".2f"), ("efficiency", "efficiency", ".0%"),
)
_SUFFIX = {"speedup": "x", "ideal_speedup": "x"}


def cell(v: Any, spec: str = "", suffix: str = "") -> str:
    """One table cell: "-" for None, numbers formatted with ``spec``."""
    if v is None:
        return "-"
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
    ops = row.get("forbidden_ops")
    if ops:
        return "graph has " + ", ".join(f"{k} x{v}" for k, v in ops.items())
    return ""


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width terminal table of result rows (dicts as in the JSON)."""
    head = [h for _, h, _ in COLUMNS] + ["note"]
    body = [_cells(r, COLUMNS) + [_note(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = 0
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths[:-1]] + [""])]
                     + [line(b) for b in body])


def format_markdown(rows: Sequence[dict[str, Any]],
                    columns: Sequence[Column] = COLUMNS) -> str:
    """The result rows as a GitHub markdown table of ``columns`` and a note."""
    head = [h for _, h, _ in columns] + ["note"]
    return "\n".join(markdown_table(head, [_cells(r, columns) + [_note(r)] for r in rows]))


# ---------------------------------------------------------------- the published page


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, backend, batch, r): MaMe and ToMe speed-ups, FLOPs-ideal, MaMe / ToMe."""
    out = []
    index = {(r["model"], r["backend"], r["batch"], r["variant"], r["r"]): r for r in rows}
    for r in rows:
        if r["variant"] != "mame":
            continue
        tome = index.get((r["model"], r["backend"], r["batch"], "tome", r["r"]), {})
        mame_ms, tome_ms = r.get("median_ms"), tome.get("median_ms")
        out.append({
            "model": r["model"], "backend": r["backend"], "batch": r["batch"], "r": r["r"],
            "mame_speedup": r.get("speedup"), "mame_ideal": r.get("ideal_speedup"),
            "mame_efficiency": r.get("efficiency"), "tome_speedup": tome.get("speedup"),
            "tome_ideal": tome.get("ideal_speedup"),
            "mame_over_tome": tome_ms / mame_ms if mame_ms and tome_ms else None,
            "note": r.get("skipped") or tome.get("skipped") or "",
        })
    return out


_SUMMARY: tuple[Column, ...] = (
    ("model", "model", ""), ("backend", "backend", ""), ("batch", "batch", ""), ("r", "r", "g"),
    ("mame_speedup", "MaMe speed-up", ".2f"), ("mame_ideal", "FLOPs-ideal", ".2f"),
    ("mame_efficiency", "MaMe efficiency", ".0%"), ("tome_speedup", "ToMe speed-up", ".2f"),
    ("tome_ideal", "ToMe ideal", ".2f"), ("mame_over_tome", "MaMe vs ToMe", ".2f"),
    ("note", "note", ""),
)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    head = [h for _, h, _ in _SUMMARY]
    body = [[cell(s[k], spec) for k, _, spec in _SUMMARY] for s in summary_rows(rows)]
    return "\n".join(markdown_table(head, body))


def markdown_page(result: dict[str, Any]) -> str:
    """The published page: command(s), device, versions, timing, summary, every row."""
    v = result["versions"]
    exports = sorted({
        (r["model"], r["variant"], json.dumps(r["forbidden_ops"], sort_keys=True))
        for r in result["results"] if r.get("exports") and r["variant"] != "baseline"
    })
    commands = result.get("commands") or [result["command"]]
    lines = [
        f"# Latency: baseline vs MaMe vs ToMe ({result['preset']})",
        "",
        *(f"- command: `{c}`" for c in commands),
        f"- device: {result['device']}; CPU: {result['cpu']}; threads: {result['threads']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- timing: {json.dumps(result['timing'])}",
        "- weights: random (latency does not depend on weight values)",
        "",
        "Speed-ups are against the unpatched model on the same backend and batch, in the same "
        "run. FLOPs-ideal = 1 / MACs ratio; efficiency = speed-up / FLOPs-ideal; "
        "MaMe vs ToMe = ToMe latency / MaMe latency (> 1: MaMe is faster).",
        "",
        "## Summary",
        "",
        summary_markdown(result["results"]),
        "",
    ]
    if exports:
        lines += ["## Forbidden ops in the exported graphs", ""]
        lines += [f"- {m} {var}: {ops if ops != '{}' else 'none (static graph)'}"
                  for m, var, ops in exports] + [""]
    lines += ["## All rows", "", format_markdown(result["results"]), ""]
    return "\n".join(lines)


def group_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows of one group are timed in turns, in one run: ratios stay inside a group."""
    return row["model"], row["backend"], row["batch"], row.get("precision")


def check_appendable(old: dict[str, Any], preset: str, device: str) -> None:
    """ValueError unless ``old`` holds results of the same preset on the same device."""
    for key, want in (("preset", preset), ("device", device)):
        if old.get(key) != want:
            raise ValueError(f"the existing results are for {key} {old.get(key)!r}, this run "
                             f"for {want!r}; use another --out")


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows of ``old`` whose (model, backend, batch, precision) group
    ``new`` does not measure; refuses results from another preset or device."""
    check_appendable(old, new["preset"], new["device"])
    measured = {group_key(r) for r in new["results"]}
    kept = [r for r in old["results"] if group_key(r) not in measured]
    merged = dict(new)
    merged["commands"] = [c for c in old.get("commands") or [old["command"]]
                          if c != new["command"]] + [new["command"]]
    merged["runs"] = list(old.get("runs", [])) + list(new.get("runs", []))
    merged["results"] = kept + new["results"]
    return merged
