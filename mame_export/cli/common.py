"""Arguments shared by the subcommands that take a MODEL."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mame_export.settings import CALIB_METHODS, GRAPH_PRECISIONS

if TYPE_CHECKING:  # the job module imports torch: it loads when a command runs
    from mame_export.request import ExportRequest, Job

_LAYER_PART = re.compile(r"(\d+)(?:-(\d+))?")


def parse_layers(text: str) -> list[int]:
    """'0,1,2' or '0-7' or '0-3,8' -> sorted block indices; empty, reversed or
    negative ranges are refused."""
    hint = "use e.g. 0-7 or 0,2,4"
    if not text.strip():
        raise argparse.ArgumentTypeError(f"--layers is empty; {hint}")
    out: set[int] = set()
    for part in text.split(","):
        m = _LAYER_PART.fullmatch(part.strip())
        if m is None:
            at = f" (at {part.strip()!r})" if part.strip() != text.strip() else ""
            raise argparse.ArgumentTypeError(f"bad --layers {text!r}{at}; {hint}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise argparse.ArgumentTypeError(f"bad --layers {text!r}: the range {a}-{b} runs "
                                             f"backwards; write {b}-{a}")
        out.update(range(a, b + 1))
    return sorted(out)


def add_model_args(p: argparse.ArgumentParser, with_export: bool = True) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="alias (vit_t, vit_s, vit_b, vit_l, vit_h, deit_s, deit_b, "
                        "siglip2_b_512, clip_l336, dinov2_s, videomae_l, sd15-unet, sd21-unet, "
                        "sdxl-unet, pixart_sigma_1024, sd3_medium) or any timm model name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--r", type=float, default=None,
                   help="fraction of patch tokens merged away by the last merge block, "
                        "in [0, 1) (default 0.5)")
    g.add_argument("--target-macs", type=float, default=None, metavar="RATIO",
                   help="solve r for this MACs ratio (merged / unmerged), e.g. 0.5")
    g.add_argument("--plan", type=Path, default=None, metavar="FILE",
                   help="a plan file from `mame-export tune`: its tokens per block, "
                        "similarity, tau and proportional attention")
    p.add_argument("--tau", type=float, default=None,
                   help="in [-1, 1]. Static mode (default 1): how widely a merged token spreads "
                        "(1: its single most similar target). Adaptive mode (default 0.8): the "
                        "similarity a token needs to merge")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="blocks that merge, e.g. 0-7 (default: the first min(8, depth))")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false",
                   help="turn off proportional attention (log size bias)")
    p.add_argument("--mode", choices=("static", "adaptive"), default="static",
                   help="static (fixed shapes, exportable; default) or adaptive (the paper's "
                        "retention of distinctive tokens: eager only, for plan)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--weights", default="auto",
                   help="auto (hub or its cache, else random with a warning), random, "
                        "or a checkpoint PATH (.safetensors, .pth, .pt)")
    p.add_argument("--llava", action="store_true",
                   help="LLaVA's encoder output: the second-to-last layer's hidden states "
                        "without the class token, and their token sizes (clip_l336)")
    if with_export:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--batch", type=int, default=None,
                       help="static batch size, 1 to 4096 (default 1; 2 for sd21-unet)")
        g.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis")
        add_precision_options(
            p, GRAPH_PRECISIONS,
            "precision of the graph (default fp32); int8 and fp8 write a QDQ graph (the merge "
            "stays fp32; see docs/quantization.md)",
            "calibration images for int8/fp8 (a folder, read with the model's preprocessing; "
            "default: random inputs, with a warning)")
        p.add_argument("--opset", type=int, default=18,
                       help="ONNX opset, 18 to 22 (default 18)")
        p.add_argument("--out", type=Path, default=Path("graphs"),
                       help="output folder (default graphs/)")
        p.add_argument("--parity-batches", type=int, default=3,
                       help="fresh random input batches for the parity check, 1 to 1000 "
                            "(default 3)")
        p.add_argument("--seed", type=int, default=None,
                       help="seed for the parity inputs, >= 0 (default: fresh each run)")
        t = p.add_argument_group("TensorRT (needs the trt extra and an NVIDIA GPU)")
        t.add_argument("--trt", action="store_true",
                       help="also build a strongly typed TensorRT engine and check its parity")
        t.add_argument("--engines", type=Path, default=Path("engines"),
                       help="engine folder (default engines/)")
        t.add_argument("--min-batch", type=int, default=None, help="profile min (dynamic batch)")
        t.add_argument("--opt-batch", type=int, default=None, help="profile opt (dynamic batch)")
        t.add_argument("--max-batch", type=int, default=None, help="profile max (dynamic batch)")
        t.add_argument("--workspace", default=None, help="workspace limit, e.g. 4GiB")
        t.add_argument("--timing-cache", type=Path, default=None,
                       help="timing cache file, reused across builds")
        t.add_argument("--builder-opt-level", type=int, default=3,
                       help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object on stdout (logs go to stderr)")


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The settings of a MODEL command as given (checked when resolved into a job)."""
    from mame_export.request import ExportRequest

    req = ExportRequest(
        model=args.model, r=0.5 if args.r is None else args.r, target_macs=args.target_macs,
        tau=args.tau, plan=args.plan,
        layers=args.layers, prop_attn=args.prop_attn,
        mode=args.mode,
        img_size=args.img_size, weights=args.weights, llava=args.llava,
        batch=getattr(args, "batch", None),
        dynamic_batch=getattr(args, "dynamic_batch", False),
        precision=getattr(args, "precision", "fp32"), opset=getattr(args, "opset", 18),
        out_dir=getattr(args, "out", Path("graphs")),
        parity_batches=getattr(args, "parity_batches", 3), seed=getattr(args, "seed", None),
        calib=getattr(args, "calib", None),
        calib_method=getattr(args, "calib_method", "minmax"),
        quant_keep=getattr(args, "quant_keep", ()),
    )
    if getattr(args, "trt", False):
        from mame_export.trt.engine import EngineOptions, parse_size

        req.trt = EngineOptions(
            precision=req.precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            workspace_bytes=parse_size(args.workspace) if args.workspace else None,
            timing_cache=args.timing_cache, builder_opt_level=args.builder_opt_level)
        req.engines_dir = args.engines
    return req


def job_from_args(args: argparse.Namespace, export: bool = True) -> Job:
    """The one resolved job of a MODEL command (see mame_export.request.resolve_job)."""
    return request_from_args(args).resolve(export=export)


def float_list(text: str) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5] (an option of several numbers)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.25,0.5; got {text!r}") from None


def int_list(text: str) -> list[int]:
    """'1,8' -> [1, 8]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8; got {text!r}") from None


def name_list(text: str) -> list[str]:
    """'torch, onnxrt' -> ['torch', 'onnxrt']."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_model_command(sub: argparse._SubParsersAction, name: str, summary: str,
                      description: str, model_help: str) -> argparse.ArgumentParser:
    """A subcommand whose first argument is a MODEL alias (eval, profile)."""
    p = sub.add_parser(name, help=summary, description=description)
    p.add_argument("model", metavar="MODEL", help=model_help)
    return p


def patterns(text: str) -> tuple[str, ...]:
    """A comma-separated list of patterns (empty items dropped)."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_precision_options(p: argparse.ArgumentParser, precisions: tuple[str, ...],
                          precision_help: str, calib_help: str) -> None:
    """``--precision``, ``--calib``, ``--calib-method`` and ``--quant-keep``, one set for
    export, eval and profile (each command says what the precision means for it)."""
    p.add_argument("--precision", choices=precisions, default="fp32", help=precision_help)
    p.add_argument("--calib", type=Path, default=None, metavar="DIR", help=calib_help)
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax",
                   help="int8: activation ranges from the calibration: minmax (default), "
                        "entropy or percentile (ONNX Runtime's calibrators)")
    p.add_argument("--quant-keep", type=patterns, default=(), metavar="PATTERN[,PATTERN...]",
                   help="int8/fp8: also keep these layers in high precision, by module path "
                        "(fnmatch, e.g. 'blocks.*.mlp.fc2'; the merge always stays fp32)")
