"""`mame-export MODEL`: export, audit and check one graph (the main job)."""

from __future__ import annotations

import argparse

from mame_export.cli.common import add_model_args, job_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export MODEL with MaMe to a static ONNX graph, audit it "
                                      "and check parity (default command)")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.job import run_export

    meta = run_export(job_from_args(args))
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
    return 0 if meta["ok"] else 1
