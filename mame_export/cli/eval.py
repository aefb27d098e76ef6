"""`mame-export eval MODEL --data DIR`: accuracy and fidelity of MaMe and ToMe on your images."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mame_export.cli.common import add_model_command, float_list, parse_layers
from mame_export.errors import UserError

DESCRIPTION = (
    "Runs the unmerged model, MaMe at each r and ToMe with the same tokens per block over the "
    "same images (the model's own preprocessing). Reports top-1/top-5 for labelled class "
    "folders, agreement with the unmerged top-1, the mean cosine of outputs and pre-logit "
    "features to the unmerged model, and the MACs ratio. Class sub-folders with integer names "
    "are those class indices; other names map to indices in sorted order.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_model_command(
        sub, "eval", "accuracy and fidelity of the unmerged model, MaMe and ToMe on a folder of "
        "images", DESCRIPTION, model_help="alias (vit_b, deit_s, ...) or a timm name")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="an ImageFolder (class sub-folders) or a flat folder of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--r", type=float_list, default=None, metavar="R[,R...]",
                   help="MaMe ratios in [0, 1), comma-separated (default 0.5)")
    g.add_argument("--target-macs", type=float_list, default=None, metavar="RATIO[,RATIO...]",
                   help="MACs ratios (merged / unmerged) to solve r for, e.g. 0.5")
    p.add_argument("--tau", type=float, default=None,
                   help="MaMe tau in [-1, 1] (default 1: each merged token goes to its single "
                        "most similar target)")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="blocks that merge, e.g. 0-7 (default: the first min(8, depth))")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false",
                   help="turn off proportional attention")
    p.add_argument("--no-tome", dest="tome", action="store_false",
                   help="leave ToMe out of the comparison")
    p.add_argument("--weights", default="auto",
                   help="auto (hub or its cache, else random with a warning), random, or a "
                        "checkpoint PATH")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images (spread over classes)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of accuracy and agreement against MACs")
    p.set_defaults(run=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from mame_export import evaluate as ev
    from mame_export.cli import print_json
    from mame_export.families import build_model, require, resolve
    from mame_export.patch import solve_r
    from mame_export.plan import check_ratio, check_tau

    try:
        if args.tau is not None:
            check_tau(args.tau)
        for r in args.r or []:
            check_ratio(r)
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag, value in (("--batch", args.batch), ("--threads", args.threads),
                        ("--img-size", args.img_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1; got {value}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'mame-export[plot]'") from None
    images = ev.find_images(args.data, args.limit)  # bad data fails before any model work
    spec = resolve(args.model)
    require(spec, "eval", "eval supports image classifiers and encoders")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, source = build_model(spec, args.weights, args.img_size)
    ev.check_labels(images, model)
    _log(f"evaluating {spec.alias} ({spec.source_name}, weights: {source}) on "
         f"{len(images.paths)} images from {args.data}")
    rs = args.r or [0.5]
    if args.target_macs:
        rs = []
        for target in args.target_macs:
            try:
                r = solve_r(ev.copy_of(model), target, tau=args.tau, layers=args.layers,
                            prop_attn=args.prop_attn)
            except ValueError as e:
                raise UserError(str(e)) from None
            _log(f"MACs ratio {target:g} -> r = {r:g}")
            rs.append(r)
    variants = ev.build_variants(model, rs, tau=args.tau, layers=args.layers,
                                 prop_attn=args.prop_attn, tome=args.tome)
    report = ev.evaluate(variants, images, ev.transform_for(model, args.img_size), args.batch,
                         _log)
    from mame_export.sidecar import versions

    report = {"model": spec.alias, "source": spec.source_name, "weights": source,
              "data": str(args.data), "command": shlex.join(["mame-export", *sys.argv[1:]]),
              "versions": versions(), **report}
    if args.plot:
        _log(f"wrote {ev.plot(report, args.plot, title=f'{spec.alias} on {args.data}')}")
    if args.json:
        print_json(report)
    else:
        print(ev.table(report))
    return 0
