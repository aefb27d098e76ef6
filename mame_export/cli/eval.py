"""`mame-export eval MODEL --data DIR`: accuracy and fidelity of MaMe and ToMe on your data."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mame_export.cli.common import (
    add_model_command,
    add_precision_options,
    float_list,
    parse_layers,
)
from mame_export.errors import UserError

if TYPE_CHECKING:
    from mame_export.request import Job

DESCRIPTION = (
    "Runs the unmerged model, MaMe at each r and ToMe with the same tokens per block (ToMe-SD "
    "on a UNet) over the same inputs, preprocessed the way the model's family says. "
    "Classifiers: top-1/top-5 on labelled class folders, agreement with the unmerged top-1, "
    "the mean cosine of outputs and pre-logit features. Encoders (CLIP, SigLIP, DINOv2, "
    "--llava, timm models without a head): feature cosine, and on labelled folders 1-NN and "
    "linear-probe accuracy. Video classifiers: on clips (folders of frames). UNets: noise-"
    "prediction cosine and relative L2 error over 10 timesteps, on --data latents or seeded "
    "random ones (a fidelity check, not image quality). --graph adds an exported graph run "
    "through ONNX Runtime; --precision int8 adds the unmerged model and MaMe as INT8 QDQ "
    "graphs (ONNX Runtime). Class sub-folders with integer names are those class indices; "
    "other names map to indices in sorted order.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_model_command(
        sub, "eval", "accuracy and fidelity of the unmerged model, MaMe and ToMe on your data",
        DESCRIPTION, model_help="alias (vit_b, dinov2_s, videomae_l, sd21-unet, ...) or a timm "
                                "name")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="an ImageFolder (class sub-folders) or a flat folder of images; clips "
                        "as folders of frames (video models); latents (UNets: optional, "
                        "default seeded random latents)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--r", type=float_list, default=None, metavar="R[,R...]",
                   help="MaMe ratios in [0, 1), comma-separated (default 0.5)")
    g.add_argument("--target-macs", type=float_list, default=None, metavar="RATIO[,RATIO...]",
                   help="MACs ratios (merged / unmerged) to solve r for, e.g. 0.5")
    p.add_argument("--plan", type=Path, default=None, metavar="FILE",
                   help="also score this plan file (mame-export tune); without --r or "
                        "--target-macs, the uniform plans are those at its MACs budget")
    p.add_argument("--tau", type=float, default=None,
                   help="MaMe tau in [-1, 1] (default 1: each merged token goes to its single "
                        "most similar target)")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="blocks that merge, e.g. 0-7 (default: the first min(8, depth))")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false",
                   help="turn off proportional attention")
    p.add_argument("--no-tome", dest="tome", action="store_false",
                   help="leave ToMe (ToMe-SD) out of the comparison")
    p.add_argument("--llava", action="store_true",
                   help="evaluate LLaVA's encoder output (clip_l336): its pooled tokens")
    p.add_argument("--graph", type=Path, default=None, metavar="PATH",
                   help="also score this exported ONNX graph (ONNX Runtime, CPU) of the model")
    p.add_argument("--weights", default="auto",
                   help="auto (hub or its cache, else random with a warning), random, or a "
                        "checkpoint PATH")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images (spread over classes); UNets without --data: "
                        "N random latents (default 4)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    add_precision_options(
        p, ("fp32", "int8"),
        "int8: also score the unmerged model and MaMe as INT8 QDQ graphs in ONNX Runtime, "
        "beside the fp32 rows (docs/quantization.md)",
        "int8: calibration images, disjoint from --data (default: random inputs, with a "
        "warning)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of accuracy (or fidelity) against MACs")
    p.set_defaults(run=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_args(args: argparse.Namespace) -> None:
    """What only eval takes, checked before any work (the rest is the job's)."""
    from mame_export import settings
    from mame_export.errors import check_file

    if args.limit is not None:
        settings.check_int("--limit", args.limit, 1, settings.MAX_LIMIT)
    if args.graph is not None:
        check_file(args.graph, "graph")
    if args.plot:
        from mame_export.cli.plotpath import check_plot_path

        check_plot_path(args.plot)


def resolved_job(args: argparse.Namespace) -> Job:
    """The one resolved job of this eval: every setting checked once, and the model's
    structure, layers and input size checked as export checks them, before any build."""
    from mame_export.request import ExportRequest

    req = ExportRequest(model=args.model, tau=args.tau, layers=args.layers,
                        prop_attn=args.prop_attn, img_size=args.img_size, weights=args.weights,
                        llava=args.llava, batch=args.batch, threads=args.threads,
                        plan=args.plan, precision=args.precision, calib=args.calib,
                        calib_method=args.calib_method, quant_keep=args.quant_keep)
    from mame_export.request import resolve_job

    if args.r is None and args.target_macs is None and args.plan is None:
        return req.resolve(export=False)
    return resolve_job(req, export=False, rs=args.r, target_macs=args.target_macs,
                       plan_is_variant=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from mame_export import evaluate as ev
    from mame_export.cli import print_json
    from mame_export.sidecar import versions

    check_args(args)
    job = resolved_job(args)
    spec = job.spec
    if job.threads:
        torch.set_num_threads(job.threads)
    settings = ev.EvalSettings(data=args.data, tome=args.tome, limit=args.limit,
                               graph=args.graph)
    result = ev.run_eval(job, settings, _log)
    data = str(args.data) if args.data is not None else None
    report: dict[str, Any] = {
        "model": spec.alias, "source": spec.source_name, "weights": result["weights"],
        "data": data, "command": shlex.join(["mame-export", *sys.argv[1:]]),
        "versions": versions(), **result}
    if args.json:
        print_json(report)
    else:
        print(ev.table(report))
    if args.plot:  # after the results are out: a failing plot loses nothing
        try:
            path = ev.plot(report, args.plot, title=f"{spec.alias} on {data or 'latents'}")
        except OSError as e:
            raise UserError(f"cannot write the plot {args.plot}: {e.strerror or e} (the "
                            "results above are complete)") from None
        _log(f"wrote {path}")
    return 0
