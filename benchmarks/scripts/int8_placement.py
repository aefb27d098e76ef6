"""Issue 20 study (not a test): which tensors cost INT8 MaMe its accuracy and selection
agreement on real DINOv2-S/14 weights, placement by placement.

Run ``int8_dinov2.py`` first: it links the calibration and scored photos and writes the
fp32 graphs (dynamic batch) under ``/tmp/int8_dinov2``. Then, per variant
``SPEC=PLAN`` (PLAN: r0, r0.5 or macs0.5):

    python benchmarks/scripts/int8_placement.py WEIGHTS minmax=r0.5 \\
        "minmax:blocks.*.mlp.fc2=r0.5" percentile=r0.5 fp32=r0.5 noise=r0.5
    PYTHONPATH=/path/to/neural-compressor-2.6 python benchmarks/scripts/int8_placement.py \\
        WEIGHTS "sq0.5:blocks.*.mlp.fc2=r0.5"

SPEC is ``METHOD[:KEEP+KEEP...]`` (the calibrator and ``--quant-keep`` patterns),
``sqALPHA[:KEEP...]`` (ONNX Runtime's SmoothQuant option with that alpha, MinMax; it needs
neural-compressor 2.x's ONNX adaptor, which 3.x removed; the merge, attention's activation
products and the kept layers are left out of the smoothing as they are out of
quantization), ``fp32`` (the fp32 graph itself) or ``noise`` (the fp32 graph against itself
on inputs plus uniform noise of half an 8-bit step: the selection agreement's noise floor).

Scores on the scored views, through ONNX Runtime: feature cosine to the fp32 unmerged graph,
leave-one-out 1-NN, and the selection agreement with the fp32 graph of the same plan.
Results accumulate in ``--out`` (default ``/tmp/int8_placement.json``); a variant already
there is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from int8_dinov2 import WORK, scored_feeds  # noqa: E402
from int8_scores import fidelity  # noqa: E402

from mame_export.evaluate import data as eval_data  # noqa: E402
from mame_export.quant import qdq  # noqa: E402
from mame_export.quant.agreement import selection_agreement  # noqa: E402
from mame_export.quant.calib import Feeds  # noqa: E402
from mame_export.quant.scope import activation_matmuls, kept_by_pattern, merge_nodes  # noqa: E402

GRAPHS = {"r0": "r0", "r0.5": "r0.5", "macs0.5": "r0.669922"}


def fp32_graph(plan: str) -> Path:
    return WORK / "graphs" / next(
        p.name for p in sorted((WORK / "graphs").glob(f"*_{GRAPHS[plan]}_224px_bdyn_fp32_*.onnx")))


class Study:
    def __init__(self, weights: str, out: Path) -> None:
        self.out = out
        self.res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        self.labels = np.array(eval_data.find_images(WORK / "scored").labels)
        self.feeds = scored_feeds(WORK / "scored", weights)
        self.calib = [{k: v[i:i + 1] for k, v in f.items()}
                      for f in scored_feeds(WORK / "calib", weights)
                      for i in range(len(next(iter(f.values()))))]
        self.ref = self.features(fp32_graph("r0"))

    def features(self, path: Path, feeds: list[dict] | None = None) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, f)[0] for f in feeds or self.feeds])

    def record(self, name: str, row: dict[str, Any]) -> None:
        self.res[name] = row
        self.out.write_text(json.dumps(self.res, indent=1) + "\n")
        print(name, json.dumps(row), flush=True)

    def score(self, name: str, path: Path, plan: str, extra: dict[str, Any]) -> None:
        cos_mean, cos_min, knn = fidelity(self.features(path), self.ref, self.labels)
        row = {"plan": plan, "cos_mean": cos_mean, "cos_min": cos_min, "knn1": knn, **extra}
        if plan != "r0" and path != fp32_graph(plan):
            a = selection_agreement(fp32_graph(plan), path, self.feeds)
            row["agreement"] = {k: a.get(k) for k in ("token_fraction", "fraction", "by_block")}
        self.record(name, row)

    def noise(self, name: str, plan: str) -> None:
        """The fp32 graph against a copy of itself that adds U(-0.5, 0.5) / 255 (in the
        normalised units: half an 8-bit step) to its input, one noise image for all."""
        from onnx import helper, numpy_helper

        src = fp32_graph(plan)
        m = onnx.load(str(src))
        inp = m.graph.input[0].name
        rng = np.random.default_rng(0)
        std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
        noise = (rng.uniform(-0.5, 0.5, (1, 3, 224, 224)) / 255 / std).astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(noise, "input_noise"))
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                if x == inp:
                    n.input[i] = "noisy_pixels"
        m.graph.node.insert(0, helper.make_node("Add", [inp, "input_noise"], ["noisy_pixels"],
                                                name="add_noise"))
        dst = Path("/tmp") / f"int8_placement_noisy_{plan}.onnx"
        onnx.save(m, str(dst), save_as_external_data=True, location=dst.name + ".data")
        a = selection_agreement(src, dst, self.feeds)
        self.record(name, {"plan": plan, "agreement": {
            k: a.get(k) for k in ("token_fraction", "fraction", "by_block")},
            "note": "fp32 graph vs itself on inputs + U(-0.5,0.5)/255"})

    def quantized(self, name: str, spec: str, plan: str) -> None:
        method, _, keep_text = spec.partition(":")
        keep = tuple(k for k in keep_text.split("+") if k)
        src = fp32_graph(plan)
        dst = Path("/tmp") / f"int8_placement_{abs(hash(name))}.onnx"
        t0 = time.time()
        undo = smoothquant(src, keep, float(method[2:])) if method.startswith("sq") else None
        try:
            summ = qdq.quantize_graph(src, dst, Feeds(list(self.calib)), "int8",
                                      "minmax" if undo else method,
                                      f"{len(self.calib)} photos", report=undo is None,
                                      keep=keep)
        finally:
            if undo:
                undo()
        self.score(name, dst, plan, {"quant_s": round(time.time() - t0, 1),
                                     "quantized": summ.matmuls_quantized,
                                     "worst": summ.worst_layers[:5]})
        dst.unlink()


def smoothquant(src: Path, keep: tuple[str, ...], alpha: float):  # noqa: ANN201 - an undo
    """Turn on ONNX Runtime's SmoothQuant for the next quantize_graph, with the merge,
    attention's activation products and the kept layers left out of the smoothing."""
    from neural_compressor.adaptor.ox_utils import smooth_quant as sqm

    m = onnx.load(str(src), load_external_data=False)
    protected = set(merge_nodes(m)) | set(activation_matmuls(m)) | set(kept_by_pattern(m, keep))
    dump, quantize_static = sqm.ORTSmoothQuant._dump_op_info, qdq.quantize_static

    def filtered_dump(self, *a, **k):  # noqa: ANN001, ANN202
        dump(self, *a, **k)
        for t in list(self.tensors_to_node):
            self.tensors_to_node[t] = [n for n in self.tensors_to_node[t]
                                       if n[0] not in protected]
            if not self.tensors_to_node[t]:
                del self.tensors_to_node[t]

    def with_sq(*a, extra_options=None, **k):  # noqa: ANN002, ANN003, ANN202
        return quantize_static(*a, extra_options={**extra_options, "SmoothQuant": True,
                                                  "SmoothQuantAlpha": alpha}, **k)

    sqm.ORTSmoothQuant._dump_op_info = filtered_dump
    qdq.quantize_static = with_sq

    def undo() -> None:
        sqm.ORTSmoothQuant._dump_op_info, qdq.quantize_static = dump, quantize_static
    return undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("variants", nargs="+", metavar="SPEC=PLAN")
    ap.add_argument("--out", type=Path, default=Path("/tmp/int8_placement.json"))
    args = ap.parse_args()
    study = Study(args.weights, args.out)
    for item in args.variants:
        spec, plan = item.split("=", 1)
        name = f"{spec}@{plan}"
        if name in study.res:
            continue
        if spec == "fp32":
            study.score(name, fp32_graph(plan), plan, {})
        elif spec == "noise":
            study.noise(name, plan)
        else:
            study.quantized(name, spec, plan)


if __name__ == "__main__":
    main()
