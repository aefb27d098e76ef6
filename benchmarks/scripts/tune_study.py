"""Benchmark (not a test): a tuned plan (``mame-export tune``) against every uniform
schedule, on real weights and real photos, calibration and scoring on disjoint photos.

Real weights: DINOv2-S/14 (``python ../shared/tools/real-vit-weights.py DIR``). Real
photos: a folder of class folders, one per photo, each holding augmented views of it
(``DATA/<photo>/<view>.png``). The photos are split by name, alternately: the views of
one half calibrate ``tune``, the views of the other half are scored. Per MACs budget,
on the scored half (probe and 1-NN fitted on the unmerged features of half of each
photo's views, scored on the others), it reports feature cosine, probe and 1-NN accuracy
of:

- the tuned MaMe plan (``tune`` on the calibration half);
- MaMe's default plan (the first 8 blocks, uniform) at the same budget;
- ToMe with the same tokens per block as that default;
- ToMe with its own constant tokens per block over all blocks (the largest constant that
  meets the budget, MACs counted with its similarity products).

The tuned and default plans' scores on the calibration half are in each plan file (how
far the search over-fits: compare them with the held-out rows).

    python benchmarks/scripts/tune_study.py --weights W/dinov2_s14_224.safetensors \\
        --data PHOTOS/views --targets 0.64,0.5,0.4

Writes ``benchmarks/results/tune_dinov2_cpu.json`` (command, versions, raw rows, each plan
file), after each budget, and the plan files under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.baselines.tome import apply_tome, tome_plan  # noqa: E402
from mame_export.evaluate import data as eval_data  # noqa: E402
from mame_export.evaluate.images import evaluate_images  # noqa: E402
from mame_export.evaluate.variants import Variant, build_variants, copy_of, plan_variant  # noqa: E402
from mame_export.profile import cpu_name  # noqa: E402
from mame_export.request import ExportRequest, build, resolve_job  # noqa: E402
from mame_export.sidecar import versions  # noqa: E402

MODEL = "vit_small_patch14_dinov2"


def split(data: Path, work: Path) -> tuple[Path, Path, list[str], list[str]]:
    """Two folders of links: the views of alternate photos (sorted by name)."""
    photos = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    calib, score = photos[0::2], photos[1::2]
    for name, part in (("calib", calib), ("score", score)):
        root = work / name
        root.mkdir(parents=True, exist_ok=True)
        for photo in part:
            link = root / photo
            if not link.exists():
                link.symlink_to((data / photo).resolve())
    return work / "calib", work / "score", calib, score


def tome_constant(model: torch.nn.Module, target: float) -> Variant:
    """ToMe's own schedule: the same tokens removed in every block, the smallest constant
    whose MACs meet ``target``."""
    for k in range(1, 1000):
        m = apply_tome(copy_of(model), r_tokens=k)
        plan = tome_plan(m)
        if plan.flops_ratio <= target:
            return Variant(f"ToMe const {k}/block", "tome-constant", plan.r, m, plan.to_dict())
    raise ValueError(f"no constant ToMe schedule reaches MACs {target}")


def score(weights: str, data: Path, plan_path: Path, target: float, img: int,
          log: Any) -> dict[str, Any]:
    req = ExportRequest(model=MODEL, img_size=img, weights=weights, plan=plan_path, batch=16)
    job = resolve_job(req, export=False, target_macs=[target], plan_is_variant=True)
    built = build(job, log=log, patch=False)
    job, model = built.job, built.model
    assert job.io is not None and job.plan_file is not None
    variants = build_variants(model, list(job.rs), tau=job.tau, layers=None, prop_attn=True,
                              family=job.family)
    variants.append(plan_variant(model, job.plan_file, job.plan_variant_settings()))
    variants.append(tome_constant(model, target))
    items = eval_data.find_images(data)
    prep = job.family.eval_preprocessing(job.spec, model, img)
    rows, notes = evaluate_images(variants, job.io, items, eval_data.transform_from(**prep),
                                  16, log)
    return {"images": len(items.paths), "rows": rows, "notes": notes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", type=Path, required=True, help="DATA/<photo>/<view> images")
    ap.add_argument("--targets", default="0.5,0.64,0.4")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--max-candidates", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tune_study"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tune_dinov2_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    calib, scored, calib_photos, score_photos = split(args.data, args.work)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]), "cpu": cpu_name(),
        "threads": args.threads, "versions": versions(), "model": MODEL,
        "weights": args.weights, "img_size": args.img_size, "calibration_photos": calib_photos,
        "scored_photos": score_photos, "results": []}
    for target in args.targets.split(","):  # one budget at a time, written as it ends
        tune_cmd = [sys.executable, "-m", "mame_export", "tune", MODEL, "--img-size",
                    str(args.img_size), "--weights", args.weights, "--data", str(calib),
                    "--target-macs", target, "--max-candidates", str(args.max_candidates),
                    "--threads", str(args.threads), "--out", str(args.work / "plans"), "--json"]
        log("$ " + shlex.join(tune_cmd))
        t0 = time.perf_counter()
        tuned = json.loads(subprocess.run(tune_cmd, check=True, stdout=subprocess.PIPE,
                                          cwd=ROOT, text=True).stdout)
        plan = tuned["plans"][0]
        log(f"scoring MACs {target} on the held-out photos")
        held_out = score(args.weights, scored, Path(plan["plan_file"]), float(target),
                         args.img_size, log)
        report["results"].append({
            "target_macs": float(target), "tune_command": shlex.join(tune_cmd),
            "tune_seconds": round(time.perf_counter() - t0, 1), "tune": tuned,
            "plan_file": json.loads(Path(plan["plan_file"]).read_text()),
            "held_out": held_out})
        atomic_write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nMACs budget {target} (held-out photos; calibration: tuned "
              f"{plan['score']:.4f}, default {plan['default_score']:.4f})")
        print(f"{'variant':<22} {'MACs':>6} {'cos(feat)':>10} {'probe':>7} {'1-NN':>7}")
        for r in held_out["rows"]:
            print(f"{r['name']:<22} {r['macs_ratio'] or 1:>6.3f} {r['cosine_features']:>10.4f}"
                  f" {r.get('probe_accuracy') or 0:>7.3f} {r.get('knn_accuracy') or 0:>7.3f}",
                  flush=True)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
