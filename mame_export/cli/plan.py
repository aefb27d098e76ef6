"""`mame-export plan MODEL --r R` (or `--plan FILE`): the merge plan without exporting."""

from __future__ import annotations

import argparse

from mame_export.cli.common import add_model_args, request_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the merge plan (tokens per block, MACs)")
    add_model_args(p, with_export=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.job import build

    req = request_from_args(args)
    if req.weights == "auto":  # the plan does not depend on weight values, but a plan
        req.weights = "random"  # file is checked against the weights it was tuned on
        if req.plan is not None:
            from mame_export.planfile import as_plan_file

            req.plan = as_plan_file(req.plan)
            made = req.plan.weights
            req.weights = made[len("file:"):] if made.startswith("file:") else \
                "random" if made.startswith("random") else "auto"
    built = build(req.resolve(export=False), log=lambda _msg: None)
    plan, spec = built.plan, built.job.spec
    assert plan is not None
    if args.json:
        print_json({"model": spec.alias, "source": spec.source_name, "plan": plan.to_dict()})
    else:
        print(plan.table())
    return 0
