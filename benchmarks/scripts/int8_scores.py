"""Scores of the graphs ``int8_dinov2.py`` exported, through ONNX Runtime only (its eval step
ran past the run's time limit): per graph, the feature cosine to the fp32 unmerged graph
and leave-one-out 1-NN accuracy over the scored views (class = photo), and the selection
agreement of each int8 merged graph with its fp32 graph.

Usage: python benchmarks/scripts/int8_scores.py GRAPHS_DIR SCORED_DIR WEIGHTS OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from int8_dinov2 import MODEL, scored_feeds  # noqa: E402


def fidelity(f: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Features ``f`` against the reference's: (mean and min cosine per image,
    leave-one-out 1-NN accuracy by cosine)."""
    cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return float(cos.mean()), float(cos.min()), float((labels[sim.argmax(1)] == labels).mean())


def main() -> None:
    graphs_dir, scored, weights, out = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3],
                                        Path(sys.argv[4]))
    import onnxruntime as ort

    from mame_export.evaluate import data as eval_data
    from mame_export.quant.agreement import selection_agreement

    t0 = time.time()
    labels = np.array(eval_data.find_images(scored).labels)
    feeds = scored_feeds(scored, weights)
    graphs = {}
    for meta_path in sorted(graphs_dir.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        s = meta["settings"]
        # r = 0.5, or the r solved for MACs 0.5 (the sidecar records the r)
        plan = "unmerged" if s["r"] == 0 else "r0.5" if s["r"] == 0.5 else "macs0.5"
        graphs[f"{s['precision']}-{plan}"] = {"onnx": meta["onnx"], "r": s["r"]}
    feats = {}
    for name, g in graphs.items():
        sess = ort.InferenceSession(g["onnx"], providers=["CPUExecutionProvider"])
        feats[name] = np.concatenate([sess.run(None, f)[0] for f in feeds])
    ref = feats["fp32-unmerged"]
    rows = {}
    for name, f in feats.items():
        cos_mean, cos_min, knn = fidelity(f, ref, labels)
        rows[name] = {**graphs[name], "feature_cosine_mean": cos_mean,
                      "feature_cosine_min": cos_min, "knn_1_accuracy": knn}
    for plan in ("r0.5", "macs0.5"):
        rows[f"int8-{plan}"]["selection_agreement"] = selection_agreement(
            Path(graphs[f"fp32-{plan}"]["onnx"]), Path(graphs[f"int8-{plan}"]["onnx"]), feeds)
    result = {"model": MODEL, "weights": weights, "images": int(len(labels)),
              "classes": int(labels.max() + 1), "reference": "fp32-unmerged graph (ORT)",
              "rows": rows, "seconds": time.time() - t0}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
