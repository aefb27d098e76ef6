"""`mame-export MODEL`: export, audit and check one graph (the main job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mame_export.cli.common import add_model_args, job_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export MODEL with MaMe to a static ONNX graph, audit it "
                                      "and check parity (default command)")
    add_model_args(p)
    p.add_argument("--triton", type=Path, default=None, metavar="DIR",
                   help="also write a Triton model repository for the graph (or engine) to DIR "
                        "(see `mame-export triton --help` for its options)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.job import run_export

    serve = None
    if args.triton is not None:  # refused before the export's work, not after
        from mame_export.cli.triton import check_before_export, options_from_args

        serve = options_from_args(args)
        check_before_export(args.triton, serve)
    meta = run_export(job_from_args(args))
    if serve is not None and meta["ok"]:
        from mame_export.cli.triton import serve_exported

        written = serve_exported(meta, args.triton, serve)
        meta["triton"] = {k: v for k, v in written.items() if k != "config_text"}
    if args.json:
        print_json(meta)
    else:
        plan, parity = meta["plan"], meta["parity"]
        print(f"graph:    {meta['onnx']}")
        print(f"metadata: {meta['metadata_path']}")
        print(f"plan:     {plan['num_patches']} -> {plan['final_patches']} patches, "
              f"MACs x{plan['flops_ratio']:.3f}")
        print(f"audit:    {'passed' if meta['audit']['passed'] else 'FAILED'}")
        diff = parity["max_abs_diff"]
        print(f"parity:   {'passed' if parity['passed'] else 'FAILED'} "
              f"(max abs diff {diff if diff is None else f'{diff:.3g}'}, "
              f"tolerance {parity['tolerance']['text']})")
        if "triton" in meta:
            print(f"triton:   {meta['triton']['config']} (version {meta['triton']['version']})")
    return 0 if meta["ok"] else 1
