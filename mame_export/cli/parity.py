"""`mame-export parity GRAPH_OR_MODEL`: every runner against eager PyTorch."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mame_export.cli.common import add_model_args, request_from_args

PARITY_TMP_PREFIX = "mame-parity-"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="compare runners (onnxrt, onnxrt-cuda, tensorrt) with eager PyTorch on fresh "
             "random inputs; GRAPH.onnx needs its metadata sidecar, MODEL exports to a "
             "temporary folder first",
    )
    add_model_args(p)
    p.add_argument("--runners", default="onnxrt,onnxrt-cuda,tensorrt",
                   help="comma-separated runners (default: all; unavailable ones are skipped)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.job import parity_for_graph

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    weights = None if args.weights == "auto" else args.weights
    if args.model.lower().endswith(".onnx"):
        report = parity_for_graph(Path(args.model), runners, args.parity_batches, args.seed,
                                  weights=weights)
    else:
        from mame_export.artifacts import clean_stale_dirs, tmp_prefix
        from mame_export.job import run_export
        from mame_export.parity import ParityReport
        from mame_export.runners.factory import check_runner_names

        req = request_from_args(args)
        check_runner_names(runners)
        req.runners = tuple(runners)
        # Named with the pid, so a later run can remove the folder of a run that was killed.
        clean_stale_dirs(Path(tempfile.gettempdir()), (PARITY_TMP_PREFIX,))
        with tempfile.TemporaryDirectory(prefix=tmp_prefix(PARITY_TMP_PREFIX)) as tmp:
            req.out_dir = Path(tmp)
            report = ParityReport.from_dict(run_export(req)["parity"])
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
    return 0 if report.passed else 1
