"""PNG plots of latency rows, written atomically (matplotlib, the plot extra)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mame_export.artifacts import atomic_write_bytes
from mame_export.errors import UserError


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Save and close ``fig``: readers see the old file or the whole new one."""
    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """PNG: median latency against r, one panel per (model, batch); per backend the
    MaMe line, the FLOPs-ideal curve (baseline x MACs ratio) and the ToMe (ToMe-SD)
    points. Rows of given graphs (``--graph``) are in the tables, not here."""
    plt = _pyplot()
    timed = [r for r in rows if r.get("median_ms") is not None]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    if not panels:
        raise UserError("nothing to plot: no result rows")
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        for b in backends:
            sel = [r for r in timed if r["model"] == model and r["batch"] == batch
                   and r["backend"] == b]
            base = [r for r in sel if r["variant"] == "baseline"]
            mame = sorted((r for r in sel if r["variant"] == "mame"), key=lambda r: r["r"])
            c = colors[b]
            line = base + mame
            if line:
                ax.plot([r["r"] for r in line], [r["median_ms"] for r in line], "o-", color=c,
                        label=f"{b}: MaMe")
            if base:
                ideal = [(0.0, base[0]["median_ms"])] + [
                    (r["r"], base[0]["median_ms"] * r["flops_ratio"])
                    for r in rows if r["model"] == model and r["batch"] == batch
                    and r["backend"] == b and r["variant"] == "mame" and r.get("flops_ratio")
                ]
                ideal.sort()
                ax.plot([x for x, _ in ideal], [y for _, y in ideal], ":", color=c,
                        label=f"{b}: FLOPs-ideal")
            for variant, marker, label in (("tome", "x", "ToMe"), ("tomesd", "+", "ToMe-SD")):
                pts = sorted((r for r in sel if r["variant"] == variant), key=lambda r: r["r"])
                if pts:
                    ax.plot([r["r"] for r in pts], [r["median_ms"] for r in pts], marker,
                            color=c, markersize=9, mew=2, linestyle="none",
                            label=f"{b}: {label}")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("r (fraction of patch tokens merged)")
        ax.set_ylabel("median latency (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_throughput(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                    title: str = "") -> bool:
    """PNG: throughput bars per (model, batch), one bar per timed row, each annotated
    with its speed-up (and the FLOPs-ideal); False if no row was timed."""
    timed = [r for r in rows if r.get("throughput")]
    if not timed:
        return False
    plt = _pyplot()
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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    return True
