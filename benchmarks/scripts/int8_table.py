"""The tables of ``int8_dinov2.py``'s JSON as Markdown (benchmarks/results/int8_dinov2_cpu.md).

Usage: python benchmarks/scripts/int8_table.py RESULT.json > RESULT.md
"""

from __future__ import annotations

import json
import sys


def fmt(v: object, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def main() -> None:
    d = json.load(open(sys.argv[1]))
    print(f"# INT8 QDQ MaMe: {d['model']}, real weights, package photos\n")
    print(f"Calibration photos ({len(d['calibration_photos'])}, flat + view v0): "
          f"{', '.join(d['calibration_photos'])}.  ")
    print(f"Scored photos ({len(d['scored_photos'])}, views v0-v3, class = photo): "
          f"{', '.join(d['scored_photos'])}.\n")
    print("| graph | r | feature cosine to fp32 unmerged (eager) | 1-NN acc | probe acc | "
          "selection agreement vs fp32 graph | audit | worst layer SQNR (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in d["rows"].items():
        g = d["graphs"][name]
        graph_row = next(v for v in row["eval"]["variants"] if v["method"] == "graph")
        agree = row.get("selection_agreement")
        agree_text = (f"{agree['fraction']:.4f} ({agree['same']}/{agree['merges']})"
                      if agree and "fraction" in agree else "-")
        q = g.get("quantization") or {}
        worst = (q.get("worst_layers") or [{}])[0]
        worst_text = (f"{worst['sqnr_db']:.1f} ({worst['scope']})" if worst else "-")
        print(f"| {name} | {fmt(g['r'], 'g')} | {fmt(graph_row.get('cosine_features'))} | "
              f"{fmt(graph_row.get('knn_accuracy'))} | {fmt(graph_row.get('probe_accuracy'))} | "
              f"{agree_text} | {'passed' if g['audit_passed'] else 'FAILED'} | {worst_text} |")
    prof = d.get("profile")
    if prof:
        print(f"\nONNX Runtime CPU ({prof.get('cpu')}, {prof.get('threads')} threads), the graphs "
              "timed in turns in one `profile` run:\n")
        print("| graph | batch | median ms | p90 ms | speed-up over fp32 unmerged |")
        print("|---|---|---|---|---|")
        rows = [r for r in prof["results"] if r.get("graph")]
        base = {r["batch"]: r["median_ms"] for r in rows if r["variant"] == "fp32-unmerged"}
        for r in rows:
            b, ms = base.get(r["batch"]), r.get("median_ms")
            speed = f"{b / ms:.2f}x" if b and ms else "-"
            print(f"| {r['variant']} | {r['batch']} | {fmt(ms, '.1f')} | "
                  f"{fmt(r.get('p90_ms'), '.1f')} | {speed} |")
    print(f"\nWhole run: {d['seconds'] / 60:.1f} min.")


if __name__ == "__main__":
    main()
