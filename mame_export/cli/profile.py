"""`mame-export profile MODEL --r R[,R...]`: latency of the unpatched model, MaMe and the
family's ToMe per backend, given graphs beside them, and the published page."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mame_export.cli.common import (
    add_model_command,
    add_precision_options,
    float_list,
    int_list,
    name_list,
    parse_layers,
)
from mame_export.cli.plotpath import check_plot_path
from mame_export.errors import UserError
from mame_export.settings import GRAPH_PRECISIONS

if TYPE_CHECKING:  # mame_export.profile imports torch: it loads when the command runs
    from mame_export.families import ModelSpec
    from mame_export.profile import TimingSettings
    from mame_export.request import Job

DEFAULT_BACKENDS = "torch,onnxrt"
NOTHING_TIMED = 1  # exit status of a run whose every row was skipped


SUMMARY = "latency of the unpatched model, MaMe and ToMe per backend (table, JSON, page, plot)"
DESCRIPTION = (
    "Times the unpatched model (baseline), MaMe at each r and the family's ToMe (timm ViTs: "
    "ToMe with the same tokens per block; the SD UNet: ToMe-SD at the same r), and any "
    "--graph, on each backend, in one run. A backend that cannot run here is a row with a "
    f"skip reason; a run where every row is skipped exits {NOTHING_TIMED}.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_model_command(sub, "profile", SUMMARY, DESCRIPTION,
                          model_help="a registry alias (vit_b, sd21-unet, clip_l336, ...) or "
                                     "a timm name")
    p.add_argument("--r", type=float_list, default=None, metavar="R[,R...]",
                   help="MaMe ratios in [0, 1), comma-separated (needed unless --plan: then "
                        "MaMe's uniform plan at the plan file's MACs budget)")
    p.add_argument("--plan", type=Path, default=None, metavar="FILE",
                   help="also time this plan file's schedule (mame-export tune): the "
                        "mame-plan variant")
    p.add_argument("--backends", type=name_list, default=name_list(DEFAULT_BACKENDS),
                   metavar="B[,B...]",
                   help="torch, torch-compile, onnxrt, onnxrt-cuda, tensorrt "
                        f"(default {DEFAULT_BACKENDS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device for the torch backends (default cpu)")
    p.add_argument("--batch", type=int_list, default=None, metavar="N[,N...]",
                   help="batch sizes, 1 to 4096 (default: the model's, 1; 2 for the "
                        "denoisers: CFG)")
    add_precision_options(
        p, GRAPH_PRECISIONS,
        "fp32 (default), fp16, bf16; int8/fp8 time each variant's fp32 graph and its QDQ "
        "graph on the graph backends (the merge stays fp32)",
        "int8/fp8: calibration images (default: random inputs, with a warning; latency does "
        "not depend on them)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch and ONNX Runtime (default: all available)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--weights", default="random",
                   help="random (default; latency does not depend on weight values), auto, "
                        "or a checkpoint PATH")
    p.add_argument("--llava", action="store_true",
                   help="LLaVA's encoder output: image features and token sizes (clip_l336)")
    p.add_argument("--tau", type=float, default=None, help="MaMe's tau, in [-1, 1]")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="blocks that merge, e.g. 0-7 (MaMe and ToMe; default the family's)")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false",
                   help="turn off proportional attention (MaMe and ToMe)")
    p.add_argument("--variants", type=name_list, default=None, metavar="V[,V...]",
                   help="baseline, mame, tome (timm ViTs), tomesd (sd-unet), mame-plan "
                        "(--plan) (default: all that apply to the model); none: time the "
                        "--graph files only (no --r; the model is not built where its family "
                        "can read its inputs without weights; speed-ups over the first graph)")
    p.add_argument("--graph", action="append", default=[], metavar="NAME=PATH",
                   help="also time this exported ONNX graph on the graph backends (repeatable; "
                        "its inputs must be the model's at each batch)")
    p.add_argument("--one-session", action="store_true",
                   help="graph backends: hold one session in memory at a time; every timed "
                        "call loads its graph, warms it up (--warmup calls, default 1 here) and "
                        "frees it (for denoisers whose sessions do not fit in memory together; "
                        "a load per call, so use few --min-iters)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up iterations (default 5; with --one-session, per load: 1)")
    p.add_argument("--min-iters", type=int, default=None,
                   help="timed iterations at least (default 30, or --max-iters if lower)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="timed iterations at most (default 5000)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget per row in seconds, > 0 (default 10)")
    p.add_argument("--input-sets", type=int, default=None,
                   help="random input sets rotated, 2 to 64 (default 4)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (logs go to stderr)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot to PATH")
    p.add_argument("--markdown", default=None, metavar="PAGE.md",
                   help="write the published page (summary, every row) to PAGE.md and its raw "
                        "results to PAGE.json")
    p.add_argument("--append", action="store_true",
                   help="with --markdown: merge into the existing PAGE.json, keeping its rows "
                        "of the (model, backend, batch) groups this run does not measure")
    p.set_defaults(run=run)


def timing_settings(args: argparse.Namespace) -> TimingSettings:
    """The timing flags, each checked (mame_export.settings), as TimingSettings."""
    from mame_export.profile import TimingSettings
    from mame_export.settings import (
        check_input_sets,
        check_profile_iters,
        check_profile_seconds,
        check_warmup,
    )

    d = TimingSettings()
    if args.one_session:  # every timed call is a load: one warm-up per load by default
        d = TimingSettings(warmup_iters=1, warmup_s=0.0)
    min_iters, max_iters = check_profile_iters(args.min_iters, args.max_iters, d.min_iters,
                                               d.max_iters)
    return TimingSettings(
        warmup_iters=d.warmup_iters if args.warmup is None else check_warmup(args.warmup),
        warmup_s=d.warmup_s,
        min_iters=min_iters,
        max_iters=max_iters,
        budget_s=d.budget_s if args.seconds is None else check_profile_seconds(args.seconds),
        input_sets=d.input_sets if args.input_sets is None else check_input_sets(args.input_sets),
    )


def resolved_job(args: argparse.Namespace) -> Job:
    """The one resolved job of this profile: every model and merge setting checked once,
    and the model's structure and input size checked as export checks them, before any
    build."""
    from mame_export.request import ExportRequest, resolve_job

    req = ExportRequest(model=args.model, tau=args.tau, layers=args.layers,
                        prop_attn=args.prop_attn, img_size=args.img_size, weights=args.weights,
                        llava=args.llava, precision=args.precision, threads=args.threads,
                        batch=None if not args.batch else args.batch[0], plan=args.plan,
                        calib=args.calib, calib_method=args.calib_method,
                        quant_keep=args.quant_keep)
    return resolve_job(req, export=False, rs=args.r, plan_is_variant=True)


def command_line(args: argparse.Namespace, spec: ModelSpec) -> str:
    """The canonical command that reproduces this run (recorded in the output)."""
    rs = ["--r", ",".join(f"{r:g}" for r in args.r)] if args.r is not None else []
    plan = ["--plan", str(args.plan)] if args.plan is not None else []
    parts = ["mame-export", "profile", args.model, *rs, *plan,
             "--backends", ",".join(args.backends), "--device", args.device,
             "--batch", ",".join(str(b) for b in args.batch or [spec.default_batch]),
             "--precision", args.precision]
    if args.calib is not None:
        parts += ["--calib", str(args.calib)]
    if args.calib_method != "minmax":
        parts += ["--calib-method", args.calib_method]
    if args.quant_keep:
        parts += ["--quant-keep", ",".join(args.quant_keep)]
    for flag, value in (("--threads", args.threads), ("--img-size", args.img_size),
                        ("--tau", args.tau), ("--warmup", args.warmup),
                        ("--min-iters", args.min_iters), ("--max-iters", args.max_iters),
                        ("--seconds", args.seconds), ("--input-sets", args.input_sets)):
        if value is not None:
            parts += [flag, f"{value:g}"]
    if args.layers is not None:
        parts += ["--layers", ",".join(str(i) for i in args.layers)]
    parts += ["--llava"] if args.llava else []
    parts += [] if args.prop_attn else ["--no-prop-attn"]
    if args.weights != "random":
        parts += ["--weights", args.weights]
    if args.variants is not None:
        parts += ["--variants", ",".join(args.variants)]
    for g in args.graph:
        parts += ["--graph", g]
    parts += ["--one-session"] if args.one_session else []
    return shlex.join(parts)


def _old_results(args: argparse.Namespace, threads: int | None) -> dict[str, Any] | None:
    """With --append: the existing PAGE.json, checked against this run before any timing."""
    if not args.append:
        return None
    if not args.markdown:
        raise UserError("--append needs --markdown PAGE.md (it merges into PAGE.json)")
    from mame_export.profile import check_appendable, default_threads, device_name

    path = Path(args.markdown).with_suffix(".json")
    if not path.exists():
        return None  # the first part of a page
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict) or not isinstance(old.get("results"), list):
            raise ValueError("not a profile results file")
        check_appendable(old, device_name(args.device), threads or default_threads())
    except (OSError, ValueError) as e:
        raise UserError(f"--append: {path}: {e}") from None
    return old


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.profile import (
        check_request,
        format_table,
        load_graph_variant,
        parse_graph_arg,
        plot,
        profile_model,
    )

    if args.variants and "none" in args.variants and args.variants != ["none"]:
        raise UserError("--variants none times the --graph files only; it takes no other "
                        "variant")
    graphs_only = args.variants == ["none"]
    if graphs_only and (args.r is not None or args.plan is not None):
        raise UserError("--variants none times the --graph files only; drop --r and --plan")
    if args.r is None and args.plan is None and not graphs_only:
        raise UserError("--r is needed (e.g. --r 0.5), or --plan FILE (see `mame-export "
                        "profile --help`)")
    variants = [] if graphs_only else args.variants
    check_request([0.0] if args.r is None else args.r, args.backends,
                  [1] if args.batch is None else args.batch,
                  args.precision, ["baseline"] if variants is None else variants,
                  graphs_only=graphs_only, one_session=args.one_session)
    settings = timing_settings(args)
    graph_args = [parse_graph_arg(g) for g in args.graph]
    if args.plot:
        check_plot_path(args.plot)
    if args.markdown:
        if Path(args.markdown).suffix != ".md":
            raise UserError(f"--markdown takes a PAGE.md path (its results go to PAGE.json); "
                            f"got {args.markdown}")
        for path in (args.markdown, str(Path(args.markdown).with_suffix(".json"))):
            check_plot_path(path, "--markdown", needs_matplotlib=False)
    job = resolved_job(args)  # every model setting checked once, before any build
    if job.calib is not None:  # int8: a bad --calib folder is refused before the build
        from mame_export.quant.calib import find_calib_images

        find_calib_images(job.calib, 1)
    old = _old_results(args, job.threads)
    graphs = [load_graph_variant(name, path) for name, path in graph_args]
    report = profile_model(
        job, variants=variants, batches=args.batch, graphs=graphs, backends=args.backends,
        device=args.device, settings=settings, command=command_line(args, job.spec),
        graphs_only=graphs_only, one_session=args.one_session,
    )
    out = report.to_dict()
    if args.json:
        print_json(out)
    else:
        print(f"device: {report.device} ({report.threads} threads); CPU: {report.cpu}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
        print(f"command: {report.command}")
        print(format_table(out["results"]))
    rows = out["results"]
    if args.markdown:
        rows = _write_page(Path(args.markdown), report, old)
    if args.plot:  # after the results are out: a failing plot loses nothing
        try:
            models = ", ".join(dict.fromkeys(r["model"] for r in rows))
            path = plot(rows, args.plot, title=f"{models}, {report.device}, {args.precision}")
        except OSError as e:
            raise UserError(f"cannot write the plot {args.plot}: {e.strerror or e} (the "
                            "results above are complete)") from None
        print(f"wrote {path}", file=sys.stderr)
    if all(r["skipped"] for r in out["results"]):
        reasons = sorted({r["skipped"] for r in out["results"]})
        print(f"mame-export: nothing was timed: every row was skipped ({'; '.join(reasons)})",
              file=sys.stderr)
        return NOTHING_TIMED
    return 0


def _write_page(page: Path, report: Any, old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Write PAGE.json (merged into ``old`` with --append) and PAGE.md; return the rows."""
    from mame_export.artifacts import atomic_write_text
    from mame_export.jsonsafe import json_safe
    from mame_export.profile import markdown_page, merge_results, results_record

    result = results_record([report])
    if old is not None:
        result = merge_results(old, result)
    data = page.with_suffix(".json")
    try:
        atomic_write_text(data, json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        atomic_write_text(page, markdown_page(result))
    except OSError as e:
        raise UserError(f"cannot write {page}: {e.strerror or e} (the results above are "
                        "complete)") from None
    print(f"wrote {data} and {page}", file=sys.stderr)
    return result["results"]
