"""The published latency page and its results file: a summary against the FLOPs-ideal and
ToMe, every row, and results measured in parts (``mame-export profile --markdown PAGE.md
--append``) merged into one file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mame_export.profile.report import (
    Column,
    ProfileReport,
    cell,
    format_markdown,
    markdown_table,
)

# The variant each family's ToMe column reads: ToMe for ViTs, ToMe-SD for the UNet.
_TOME_VARIANTS = ("tome", "tomesd")


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, backend, batch, r): MaMe and ToMe (or ToMe-SD) speed-ups, FLOPs-ideal,
    MaMe / ToMe."""
    out = []
    index = {(r["model"], r["backend"], r["batch"], r["variant"], r["r"],
              r.get("precision")): r for r in rows}
    for r in rows:
        if r["variant"] != "mame":
            continue
        tome = next((index[k] for v in _TOME_VARIANTS
                     if (k := (r["model"], r["backend"], r["batch"], v, r["r"],
                               r.get("precision"))) in index), {})
        mame_ms, tome_ms = r.get("median_ms"), tome.get("median_ms")
        out.append({
            "model": r["model"], "backend": r["backend"], "batch": r["batch"], "r": r["r"],
            "precision": r.get("precision"), "vs_fp32": r.get("speedup_vs_fp32"),
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
    cols = list(_SUMMARY)
    if len({r.get("precision") for r in rows}) > 1:  # e.g. int8 rows beside their fp32 twins
        cols[4:4] = [("precision", "precision", "")]
        cols[-1:-1] = [("vs_fp32", "vs fp32 baseline", ".2f")]
    head = [h for _, h, _ in cols]
    body = [[cell(s[k], spec) for k, _, spec in cols] for s in summary_rows(rows)]
    return "\n".join(markdown_table(head, body))


def results_record(reports: Sequence[ProfileReport]) -> dict[str, Any]:
    """The results file of one or more runs on one device: what :func:`markdown_page`
    lays out and ``--append`` merges into."""
    first = reports[0]
    commands = list(dict.fromkeys(r.command for r in reports))
    return {
        "command": commands[-1],
        "commands": commands,
        "device": first.device,
        "cpu": first.cpu,
        "threads": first.threads,
        "versions": first.versions,
        "timing": first.settings["timing"],
        "runs": [r.settings for r in reports],
        "results": [row for r in reports for row in r.to_dict()["results"]],
    }


def markdown_page(result: dict[str, Any]) -> str:
    """The published page: command(s), device, versions, timing, summary, every row."""
    v = result["versions"]
    exports = sorted({
        (r["model"], r["variant"], json.dumps(r["forbidden_ops"], sort_keys=True))
        for r in result["results"] if r.get("exports") and r["variant"] != "baseline"
    })
    commands = result.get("commands") or [result["command"]]
    preset = f" ({result['preset']})" if result.get("preset") else ""
    # runs of given graphs alone (--variants none): speed-ups over each run's first graph
    firsts = [next(iter(run.get("graphs") or {}), None) for run in result.get("runs") or []
              if run.get("variants") == []]
    summary = any(r["variant"] == "mame" for r in result["results"])  # a summary row each
    lines = [
        f"# Latency: {'given graphs' if firsts and not summary else 'baseline vs MaMe vs ToMe'}"
        f"{preset}",
        "",
        *(f"- command: `{c}`" for c in commands),
        f"- device: {result['device']}; CPU: {result['cpu']}; threads: {result['threads']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- timing: {json.dumps(result['timing'])}",
        f"- weights: {_weights(result)}; latency does not depend on weight values",
        "",
        "Speed-ups are against the unpatched model on the same backend and batch, in the same "
        "run. FLOPs-ideal = 1 / MACs ratio; efficiency = speed-up / FLOPs-ideal; "
        "MaMe vs ToMe = ToMe (ToMe-SD for a UNet) latency / MaMe latency (> 1: MaMe is "
        "faster).",
        "",
    ]
    if firsts:
        lines[-1:-1] = [
            "", "Runs of given graphs alone (`--variants none`): speed-ups are against the first "
            f"graph ({', '.join(dict.fromkeys(str(f) for f in firsts))}); efficiency only "
            "where that graph is unmerged."]
    if summary:
        lines += ["## Summary", "", summary_markdown(result["results"]), ""]
    if exports:
        lines += ["## Forbidden ops in the exported graphs", ""]
        lines += [f"- {m} {var}: {ops if ops != '{}' else 'none (static graph)'}"
                  for m, var, ops in exports] + [""]
    lines += ["## All rows", "", format_markdown(result["results"]), ""]
    return "\n".join(lines)


def _weights(result: dict[str, Any]) -> str:
    """The runs' weights ("random" for files written before runs recorded them)."""
    return ", ".join(dict.fromkeys(str(run.get("weights", "random"))
                                   for run in result.get("runs") or [{}]))


def group_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows of one group are timed in turns, in one run: ratios stay inside a group."""
    return row["model"], row["backend"], row["batch"], row.get("precision")


def check_appendable(old: dict[str, Any], device: str, threads: int) -> None:
    """ValueError unless ``old`` holds results measured on the same device with the same
    threads (the page states one of each)."""
    for key, want in (("device", device), ("threads", threads)):
        if old.get(key) != want:
            raise ValueError(f"the existing results are for {key} {old.get(key)!r}, this run "
                             f"for {want!r}")


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows of ``old`` whose (model, backend, batch, precision) group
    ``new`` does not measure; refuses results from another device or thread count."""
    check_appendable(old, new["device"], new["threads"])
    measured = {group_key(r) for r in new["results"]}
    kept = [r for r in old["results"] if group_key(r) not in measured]
    merged = dict(new)
    merged["commands"] = [c for c in old.get("commands") or [old["command"]]
                          if c not in new["commands"]] + list(new["commands"])
    merged["runs"] = list(old.get("runs", [])) + list(new.get("runs", []))
    merged["results"] = kept + new["results"]
    return merged
