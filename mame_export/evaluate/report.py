"""How an ``eval`` report is shown: a fixed-width table per kind of model, and a PNG of
accuracy (or fidelity) against the MACs ratio."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (header, key, digits) per kind of model: what its rows are judged by.
COLUMNS: dict[str, list[tuple[str, str, int]]] = {
    "classifier": [("top1", "top1", 4), ("top5", "top5", 4), ("agree", "top1_agreement", 4),
                   ("cos(out)", "cosine_outputs", 4), ("cos(feat)", "cosine_features", 4)],
    "encoder": [("cos(feat)", "cosine_features", 4), ("1-NN", "knn_accuracy", 4),
                ("agree", "knn_agreement", 4), ("probe", "probe_accuracy", 4),
                ("agree", "probe_agreement", 4)],
    "denoiser": [("cos(noise)", "cosine_outputs", 5), ("rel L2", "rel_l2", 5)],
}
# The plot's panels per kind, (key, axis label): those with any value are drawn.
PANELS: dict[str, list[tuple[str, str]]] = {
    "classifier": [("top1", "top-1 accuracy"), ("top1_agreement", "top-1 agreement with unmerged")],
    "encoder": [("probe_accuracy", "linear-probe accuracy"),
                ("cosine_features", "feature cosine to unmerged")],
    "denoiser": [("cosine_outputs", "noise-prediction cosine to unmerged"),
                 ("rel_l2", "relative L2 error of the noise prediction")],
}
_KIND_ALIASES = {"unet": "denoiser"}  # reports written before DiTs joined


def _kind(report: dict[str, Any]) -> str:
    kind = report.get("kind", "classifier")
    return _KIND_ALIASES.get(kind, kind)


MARKERS = {"mame": ("o-", "MaMe"), "mame-plan": ("D", "MaMe, plan file"),
           "tome": ("x--", "ToMe"), "tomesd": ("x--", "ToMe-SD"), "graph": ("*", "graph"),
           "unmerged-int8": ("s", "unmerged, int8"), "mame-int8": ("s-.", "MaMe, int8"),
           "mame-plan-int8": ("d", "MaMe plan file, int8")}


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """A fixed-width table of the variants, then the notes."""
    cols = COLUMNS[_kind(report)]
    rows = report["variants"]
    width = max([14, *(len(r["name"]) for r in rows)])
    lines = [f"{'variant':<{width}} {'MACs':>6} {'r':>6} "
             + " ".join(f"{h:>10}" for h, _, _ in cols)]
    for r in rows:
        lines.append(f"{r['name']:<{width}} {_fmt(r['macs_ratio'], 3):>6} "
                     f"{_fmt(r['r'], 3):>6} "
                     + " ".join(f"{_fmt(r.get(k), d):>10}" for _, k, d in cols))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG: the report's measures against the MACs ratio, one line per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mame_export.artifacts import atomic_write_bytes

    rows = report["variants"]
    panels = [p for p in PANELS[_kind(report)]
              if any(r.get(p[0]) is not None for r in rows)] or [("cosine_outputs",
                                                                 "output cosine to unmerged")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for method, (style, name) in MARKERS.items():
            pts = sorted((r["macs_ratio"], r[key]) for r in rows if r["method"] == method
                         and r.get(key) is not None and r["macs_ratio"] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=name, markersize=9
                        if method == "graph" else 6)
        base = [r[key] for r in rows if r["method"] == "unmerged" and r.get(key) is not None]
        if base:
            ax.axhline(base[0], color="gray", lw=0.8, label="unmerged")
        ax.set_xlabel("MACs ratio (merged / unmerged)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
