"""`mame-export audit GRAPH.onnx`: exit 1 on any finding."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit an ONNX graph (forbidden ops, checker, "
                                     "shape inference, TensorRT pre-flight)")
    p.add_argument("graph", metavar="GRAPH.onnx")
    p.add_argument("--no-tensorrt", dest="tensorrt", action="store_false",
                   help="skip the TensorRT parser pre-flight")
    p.add_argument("--expect-dynamic-batch", action="store_true",
                   help="also a finding when an input's first dim is not symbolic or an "
                        "output's is fixed (what a --dynamic-batch export must give)")
    p.add_argument("--allow-domain", dest="allow_domains", action="append", default=[],
                   metavar="NAME", help="a custom op domain whose ops keep shapes static "
                                        "(repeatable; by default such ops are findings)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=run, native=("onnx",))  # no torch: an audit reads the graph only


def run(args: argparse.Namespace) -> int:
    from mame_export.audit import audit
    from mame_export.cli import print_json

    report = audit(args.graph, expect_dynamic_batch=args.expect_dynamic_batch,
                   allow_domains=args.allow_domains, tensorrt=args.tensorrt)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
    return 0 if report.passed else 1
