"""`mame-export triton SOURCE --repo DIR`: a Triton model repository for a graph, an engine,
or a MODEL exported first (and `--triton DIR` on export)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mame_export.cli.common import add_model_args, int_list, job_from_args

if TYPE_CHECKING:
    from mame_export.serve import ServeOptions

ENGINE_SUFFIXES = (".plan", ".engine")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The config options (``--max-batch`` is the model arguments' own: for a dynamic-batch
    graph or engine it is also the config's max_batch_size)."""
    g = p.add_argument_group("Triton config")
    g.add_argument("--name", default=None,
                   help="model name in the repository (default: from the file name)")
    g.add_argument("--model-version", dest="model_version", type=int, default=None,
                   help="version folder (default: one past the highest there, else 1)")
    g.add_argument("--backend", choices=("auto", "python"), default="auto",
                   help="auto: onnxruntime_onnx for a graph, tensorrt_plan for an engine; "
                        "python: a model.py that runs the graph with ONNX Runtime on the CPU")
    g.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="instance kind for onnxruntime_onnx (default gpu)")
    g.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    g.add_argument("--preferred-batch", type=int_list, default=None, metavar="SIZES",
                   help="dynamic batcher's preferred sizes, e.g. 4,8 (default: max/2 and max)")
    g.add_argument("--max-queue-delay-us", type=int, default=500, metavar="US",
                   help="how long the dynamic batcher waits to fill a batch (default 500)")
    g.add_argument("--triton-ort-trt", action="store_true",
                   help="ONNX on GPU: TensorRT acceleration inside ONNX Runtime")
    g.add_argument("--triton-ort-trt-precision", choices=("fp32", "fp16"), default=None,
                   help="its precision (default: the graph's)")
    g.add_argument("--triton-ort-trt-workspace", default=None, metavar="SIZE",
                   help="its workspace, e.g. 4GiB")
    g.add_argument("--gpu", default=None,
                   help="the GPU model a tensorrt_plan repository is for (default: this one)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "triton",
        help="write a Triton model repository for a graph (.onnx), an engine (.plan) or a "
             "MODEL exported first",
        description="Write DIR/<name>/config.pbtxt (derived from the graph, checked with "
                    "Triton's schema) and DIR/<name>/<version>/ with the graph or engine and "
                    "its sidecars. SOURCE: GRAPH.onnx, ENGINE.plan, or a MODEL alias (exported "
                    "first with the export options below).")
    add_model_args(p)
    p.add_argument("--repo", type=Path, required=True, metavar="DIR",
                   help="the model repository (made if missing)")
    add_serve_args(p)
    p.set_defaults(run=run)


def options_from_args(args: argparse.Namespace, **override: Any) -> ServeOptions:
    """The serve options of a `triton` (or `export --triton`) run, checked."""
    from mame_export.serve import ServeOptions

    workspace = getattr(args, "triton_ort_trt_workspace", None)
    if workspace is not None:
        from mame_export.trt.engine import parse_size

        workspace = parse_size(workspace)
    opts = ServeOptions(
        name=getattr(args, "name", None), version=getattr(args, "model_version", None),
        backend=getattr(args, "backend", "auto"), device=getattr(args, "device", "gpu"),
        instances=getattr(args, "instances", 1), max_batch=getattr(args, "max_batch", None),
        preferred_batch=tuple(getattr(args, "preferred_batch", None) or ()),
        queue_delay_us=getattr(args, "max_queue_delay_us", 500),
        ort_trt=getattr(args, "triton_ort_trt", False),
        ort_trt_precision=getattr(args, "triton_ort_trt_precision", None),
        ort_trt_workspace=workspace, gpu=getattr(args, "gpu", None), **override)
    opts.validate()
    return opts


def check_before_export(repo: Path, opts: ServeOptions) -> None:
    """What can be refused before an export's work: the repository path, the name, the
    schema (tritonclient) being here."""
    from mame_export.artifacts import check_out_dir
    from mame_export.serve.config import model_config_pb2

    model_config_pb2()
    check_out_dir(repo)


def serve_exported(meta: dict[str, Any], repo: Path, opts: ServeOptions) -> dict[str, Any]:
    """Write the repository for what an export made: its engine when it built one (and the
    backend is not python), else its graph."""
    from mame_export.serve import write_model

    engine = meta.get("engine")
    source = engine["plan"] if engine and opts.backend != "python" else meta["onnx"]
    return write_model(Path(source), repo, opts)


def print_written(result: dict[str, Any]) -> None:
    print(f"model:    {result['model']} version {result['version']} ({result['platform']}, "
          f"max_batch_size {result['max_batch_size']})")
    print(f"config:   {result['config']}")
    print(f"files:    {', '.join(result['files'])}")


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json

    opts = options_from_args(args)
    source = str(args.model)
    if source.lower().endswith((".onnx", *ENGINE_SUFFIXES)):
        from mame_export.serve import write_model

        result = write_model(Path(source), args.repo, opts)
        meta: dict[str, Any] = {"ok": True}
    else:
        from mame_export.job import run_export

        check_before_export(args.repo, opts)
        meta = run_export(job_from_args(args))
        if not meta["ok"]:
            if args.json:
                print_json({"ok": False, "export": meta, "triton": None})
            else:
                print(f"the export failed its checks (see above); nothing written to "
                      f"{args.repo}", file=sys.stderr)
            return 1
        result = serve_exported(meta, args.repo, opts)
    if args.json:
        print_json({"ok": True, "triton": {k: v for k, v in result.items()
                                           if k != "config_text"},
                    **({"export": meta} if "onnx" in meta else {})})
    else:
        print_written(result)
    return 0
