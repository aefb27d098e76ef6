"""`mame-export profile MODEL --r R[,R...]`: latency of baseline / MaMe / ToMe per backend."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mame_export.cli.common import add_model_command, float_list, int_list, name_list
from mame_export.errors import UserError

if TYPE_CHECKING:  # mame_export.profile imports torch: it loads when the command runs
    from mame_export.profile import TimingSettings

DEFAULT_BACKENDS = "torch,onnxrt"


SUMMARY = "latency of the unpatched model, MaMe and ToMe per backend (table, JSON, plot)"
DESCRIPTION = (
    "Times the unpatched model (baseline), MaMe at each r and ToMe with the same tokens per "
    "block, on each backend, in one run. A backend that cannot run here is a row with a skip "
    "reason.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_model_command(sub, "profile", SUMMARY, DESCRIPTION,
                          model_help="alias (vit_t, vit_s, vit_b, ...) or a timm name")
    p.add_argument("--r", type=float_list, required=True, metavar="R[,R...]",
                   help="MaMe ratios in [0, 1), comma-separated")
    p.add_argument("--backends", type=name_list, default=name_list(DEFAULT_BACKENDS),
                   metavar="B[,B...]",
                   help="torch, torch-compile, onnxrt, onnxrt-cuda, tensorrt "
                        f"(default {DEFAULT_BACKENDS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device for the torch backends (default cpu)")
    p.add_argument("--batch", type=int_list, default=[1], metavar="N[,N...]",
                   help="batch sizes (default 1)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch and ONNX Runtime (default: all available)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--weights", default="random",
                   help="random (default; latency does not depend on weight values), auto, "
                        "or a checkpoint PATH")
    p.add_argument("--variants", type=name_list, default=["baseline", "mame", "tome"],
                   metavar="V[,V...]", help="baseline, mame, tome (default: all)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5)")
    p.add_argument("--min-iters", type=int, default=None,
                   help="timed iterations at least (default 30)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="timed iterations at most (default 5000)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget per row in seconds (default 10)")
    p.add_argument("--input-sets", type=int, default=None,
                   help="random input sets rotated (default 4)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (logs go to stderr)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot to PATH")
    p.set_defaults(run=run)


def check_plot_path(path: str) -> None:
    """Refuse, before any timing, a --plot PATH that cannot be written (or matplotlib
    missing): the run takes minutes and its table must not be lost at the end."""
    import importlib.util

    from mame_export.artifacts import check_out_dir

    p = Path(path)
    if os.path.isdir(p):
        raise UserError(f"--plot {path} is a folder; give a file path, e.g. latency.png")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UserError(f"--plot {path} cannot be replaced (permission denied)")
    try:
        check_out_dir(p.parent if str(p.parent) else Path("."))
    except UserError as e:
        raise UserError(f"--plot {path}: {e}") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install 'mame-export[plot]'")


def timing_settings(args: argparse.Namespace) -> TimingSettings:
    from mame_export.profile import TimingSettings

    d = TimingSettings()
    min_iters = d.min_iters if args.min_iters is None else args.min_iters
    return TimingSettings(
        warmup_iters=d.warmup_iters if args.warmup is None else args.warmup,
        warmup_s=d.warmup_s,
        min_iters=min_iters,
        max_iters=(max(d.max_iters, min_iters) if args.max_iters is None else args.max_iters),
        budget_s=d.budget_s if args.seconds is None else args.seconds,
        input_sets=d.input_sets if args.input_sets is None else args.input_sets,
    )


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces this run (recorded in the output)."""
    parts = ["mame-export", "profile", args.model, "--r", ",".join(f"{r:g}" for r in args.r),
             "--backends", ",".join(args.backends), "--device", args.device,
             "--batch", ",".join(str(b) for b in args.batch), "--precision", args.precision]
    for flag, value in (("--threads", args.threads), ("--img-size", args.img_size),
                        ("--warmup", args.warmup), ("--min-iters", args.min_iters),
                        ("--max-iters", args.max_iters), ("--seconds", args.seconds),
                        ("--input-sets", args.input_sets)):
        if value is not None:
            parts += [flag, str(value)]
    if args.weights != "random":
        parts += ["--weights", args.weights]
    if args.variants != ["baseline", "mame", "tome"]:
        parts += ["--variants", ",".join(args.variants)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from mame_export.cli import print_json
    from mame_export.families import build_model, require, resolve
    from mame_export.profile import check_request, format_table, plot, profile

    check_request(args.r, args.backends, args.batch, args.precision, args.variants)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1; got {args.threads}")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size must be positive; got {args.img_size}")
    if args.plot:
        check_plot_path(args.plot)
    spec = resolve(args.model)
    require(spec, "profile", "profile supports image models")
    torch.manual_seed(0)  # the same random weights in every run
    model, source = build_model(spec, args.weights, args.img_size)
    print(f"profiling {spec.alias} ({spec.source_name}, weights: {source})", file=sys.stderr)
    report = profile(
        model,
        model_name=spec.alias,
        rs=args.r,
        backends=args.backends,
        batches=args.batch,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        settings=timing_settings(args),
        variants=args.variants,
        command=command_line(args),
    )
    out = report.to_dict()
    if args.json:
        print_json(out)
    else:
        print(f"device: {report.device} ({report.threads} threads); CPU: {report.cpu}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
        print(f"command: {report.command}")
        print(format_table(out["results"]))
    if args.plot:  # after the results are out: a failing plot loses nothing
        try:
            path = plot(out["results"], args.plot,
                        title=f"{spec.alias}, {report.device}, {args.precision}")
        except OSError as e:
            raise UserError(f"cannot write the plot {args.plot}: {e.strerror or e} (the "
                            "results above are complete)") from None
        print(f"wrote {path}", file=sys.stderr)
    return 0
