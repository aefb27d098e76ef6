"""`mame-export tune MODEL --data DIR --target-macs RATIO`: search the merge plan on your
calibration images and write it as a plan file (`--plan FILE` for every command)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from mame_export.cli.common import add_model_command, float_list, name_list

DESCRIPTION = (
    "Searches, on your calibration images, how many tokens each block keeps (blocks that do "
    "not merge included) and how tokens are compared (size-aware or cosine), for the best "
    "fidelity to the unmerged model at or under each MACs budget (the merge's own products "
    "counted). Writes one plan file per budget: versioned JSON with the model, a hash of its "
    "weights, the input size, the budget, every candidate scored and the chosen schedule. "
    "export, plan, eval and profile take it with --plan FILE. The unmerged outputs are "
    "computed once; each candidate is one merged pass over the images. Ctrl-C leaves no "
    "half-written plan. Score the plan on images it was not tuned on: mame-export eval MODEL "
    "--data OTHER_DIR --plan FILE.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mame_export.settings import DEFAULT_TUNE_CANDIDATES as DEFAULT_CANDIDATES
    from mame_export.settings import SIMILARITIES, TUNE_METRICS

    p = add_model_command(
        sub, "tune", "search the merge plan on your images at a MACs budget; write a plan "
                     "file", DESCRIPTION,
        model_help="alias (vit_s, dinov2_s, deit_b, siglip2_b_512, ...) or a timm name")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="calibration images: a flat folder or class sub-folders (labels are "
                        "not used); video models: clips as folders of frames")
    p.add_argument("--target-macs", type=float_list, required=True, metavar="RATIO[,RATIO...]",
                   help="MACs budgets (merged / unmerged), e.g. 0.5 or 0.64,0.5,0.4")
    p.add_argument("--out", type=Path, default=None, metavar="FILE_OR_DIR",
                   help="the plan file (.json; one budget) or a folder for one file per "
                        "budget (default plans/<model>_<size>_macs<RATIO>.json)")
    p.add_argument("--metric", default="feature-cosine", metavar="NAME",
                   help=f"what the search maximises: {', '.join(TUNE_METRICS)} (classifiers: "
                        "agreement of the top-1 with the unmerged model's); default "
                        "feature-cosine")
    p.add_argument("--max-candidates", type=int, default=DEFAULT_CANDIDATES, metavar="N",
                   help=f"schedules scored per budget (default {DEFAULT_CANDIDATES}): the "
                        "search's bound")
    p.add_argument("--similarity", type=name_list, default=list(SIMILARITIES),
                   metavar="NAME[,NAME]",
                   help=f"similarities to search ({', '.join(SIMILARITIES)}; default both)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-block moves (the search is deterministic for a seed)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images (default: all)")
    p.add_argument("--weights", default="auto",
                   help="auto (hub or its cache, else random with a warning), random, or a "
                        "checkpoint PATH")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--llava", action="store_true",
                   help="tune LLaVA's encoder output (clip_l336): its pooled tokens")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (progress goes to stderr)")
    p.set_defaults(run=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from mame_export import settings
    from mame_export.cli import print_json
    from mame_export.errors import UserError
    from mame_export.request import ExportRequest, resolve_job
    from mame_export.sidecar import versions
    from mame_export.tune import TuneSettings, run_tune

    metric = settings.check_tune_metric(args.metric)
    candidates = settings.check_tune_candidates(args.max_candidates)
    sims = [settings.check_similarity(s) for s in args.similarity]
    if not sims:
        raise UserError("--similarity is empty; give size, cosine or both")
    if args.limit is not None:
        settings.check_int("--limit", args.limit, 1, settings.MAX_LIMIT)
    settings.check_seed(args.seed)
    req = ExportRequest(model=args.model, img_size=args.img_size, weights=args.weights,
                        llava=args.llava, batch=args.batch, threads=args.threads)
    targets = settings.check_target_macs_list(args.target_macs)
    job = resolve_job(req, export=False, target_macs=targets)
    if job.threads:
        torch.set_num_threads(job.threads)
    s = TuneSettings(data=args.data, targets=tuple(targets), metric=metric,
                     max_candidates=candidates, similarities=tuple(dict.fromkeys(sims)),
                     limit=args.limit, seed=args.seed, out=args.out)
    report: dict[str, Any] = run_tune(job, s, _log, batch=args.batch)
    report.update(command=shlex.join(["mame-export", *sys.argv[1:]]), versions=versions())
    if args.json:
        print_json(report)
    else:
        for p in report["plans"]:
            print(p["table"])
            gain = (f"; MaMe's default plan: {p['default_score']:.5f} at MACs "
                    f"{p['default_macs_ratio']:.3f}" if p["default_score"] is not None else "")
            print(f" {report['metric']} on {report['calibration_images']} calibration images: "
                  f"{p['score']:.5f} at MACs {p['macs_ratio']:.3f}{gain}")
            print(f" plan file: {p['plan_file']}\n")
    return 0
