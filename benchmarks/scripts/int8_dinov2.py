"""INT8 QDQ MaMe on real DINOv2-S/14 weights and the package photos (issue 20).

Exports fp32 and int8 graphs (dynamic batch) of DINOv2-S/14 at 224 px unmerged, at
r = 0.5 and where the MACs halve (--target-macs 0.5); the int8 ones are calibrated on half
of the photos (by name), and everything is scored on the other half:

- ``mame-export eval MODEL --r 0 --graph G`` per graph: feature cosine to fp32 unmerged
  (eager), 1-NN and probe accuracy over the scored photos' four views (class = photo);
- selection agreement: the fraction of merges in which the int8 graph picks the same tokens
  as the fp32 graph of the same plan, on the scored views;
- ``mame-export profile`` with the graphs as ``--graph NAME=PATH`` (ONNX Runtime CPU, the
  graphs timed in turns, batch 1 and 8).

Usage: python benchmarks/scripts/int8_dinov2.py WEIGHTS PHOTOS OUT_JSON [--skip-profile]
(PHOTOS holds views/<name>/v0..v3.png and flat/<name>.png).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

MODEL = "vit_small_patch14_dinov2"
WORK = Path("/tmp/int8_dinov2")


def run(*args: str) -> str:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "mame_export", *args], capture_output=True,
                       text=True)
    print(f"  {' '.join(args[:3])} ... rc={p.returncode} in {time.time() - t0:.0f} s",
          flush=True)
    if p.returncode not in (0, 1):
        print(p.stderr[-3000:])
        raise SystemExit(p.returncode)
    return p.stdout


def link_split(photos: Path) -> tuple[Path, Path, list[str], list[str]]:
    """Calibration: the first half of the photos by name (flat photo and view v0); scored:
    the other half's four views, one class folder per photo."""
    names = sorted(p.name for p in (photos / "views").iterdir() if p.is_dir())
    calib_names, scored_names = names[: len(names) // 2], names[len(names) // 2:]
    calib, scored = WORK / "calib", WORK / "scored"
    for d in (calib, scored):
        d.mkdir(parents=True, exist_ok=True)
    for n in calib_names:
        flat = next(iter(sorted((photos / "flat").glob(f"{n}.*"))))  # .png or .jpg
        for src, dst in ((flat, calib / f"{n}{flat.suffix}"),
                         (photos / "views" / n / "v0.png", calib / f"{n}_v0.png")):
            if not dst.is_symlink():
                dst.symlink_to(src)
    for n in scored_names:
        (scored / n).mkdir(exist_ok=True)
        for v in sorted((photos / "views" / n).glob("v*.png")):
            if not (scored / n / v.name).exists():
                (scored / n / v.name).symlink_to(v)
    return calib, scored, calib_names, scored_names


def export(weights: str, merge: list[str], precision: str, calib: Path) -> dict:
    args = ["export", MODEL, *merge, "--weights", weights, "--img-size", "224",
            "--dynamic-batch", "--precision", precision, "--out", str(WORK / "graphs"),
            "--parity-batches", "1", "--seed", "0", "--json"]
    if precision == "int8":
        args += ["--calib", str(calib)]
    return json.loads(run(*args))


def scored_feeds(scored: Path, weights: str) -> list[dict]:
    """The scored views, preprocessed as eval does, in batches of 8."""
    import numpy as np

    from mame_export.evaluate import data as eval_data
    from mame_export.families import get_family, resolve

    spec = resolve(MODEL)
    family = get_family(spec.family)
    model, _ = family.build(spec, weights, 224)
    transform = eval_data.transform_from(**family.eval_preprocessing(spec, model, 224))
    found = eval_data.find_images(scored)
    return [{"pixels": np.ascontiguousarray(x.float().numpy())}
            for x in eval_data.load_batches(found, transform, 8)]


def main() -> None:
    weights, photos, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    t0 = time.time()
    calib, scored, calib_names, scored_names = link_split(photos)
    plans = {"unmerged": ["--r", "0"], "r0.5": ["--r", "0.5"], "macs0.5": ["--target-macs", "0.5"]}
    graphs: dict[str, dict] = {}
    for plan, merge in plans.items():
        for precision in ("fp32", "int8"):
            meta = export(weights, merge, precision, calib)
            graphs[f"{precision}-{plan}"] = {
                "onnx": meta["onnx"], "r": meta.get("settings", {}).get("r"),
                "audit_passed": meta["audit"]["passed"], "ok": meta["ok"],
                "parity": meta["parity"], "quantization": meta.get("quantization")}
    from mame_export.quant.agreement import selection_agreement

    feeds = scored_feeds(scored, weights)
    rows = {}
    for name, g in graphs.items():
        report = json.loads(run("eval", MODEL, "--r", "0", "--no-tome", "--weights", weights,
                                "--img-size", "224", "--data", str(scored), "--graph",
                                g["onnx"], "--batch", "8", "--json"))
        rows[name] = {"eval": report}
        if name.startswith("int8-") and name != "int8-unmerged":
            fp32 = graphs["fp32-" + name.split("-", 1)[1]]["onnx"]
            rows[name]["selection_agreement"] = selection_agreement(
                Path(fp32), Path(g["onnx"]), feeds)
    result = {"model": MODEL, "weights": weights, "calibration_photos": calib_names,
              "scored_photos": scored_names, "graphs": graphs, "rows": rows}
    if "--skip-profile" not in sys.argv:
        gs = [f"--graph={n}={graphs[n]['onnx']}" for n in
              ("fp32-unmerged", "fp32-r0.5", "int8-unmerged", "int8-r0.5", "fp32-macs0.5",
               "int8-macs0.5")]
        result["profile"] = json.loads(run(
            "profile", MODEL, "--r", "0", "--variants", "baseline", "--backends", "onnxrt",
            "--batch", "1,8", "--img-size", "224", "--seconds", "20", *gs, "--json"))
    result["seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
