"""`mame-export plan MODEL --r R` (or `--plan FILE`): the merge plan without exporting."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mame_export.cli.common import add_model_args, request_from_args

if TYPE_CHECKING:
    from mame_export.plan import MergePlan
    from mame_export.request import Job


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the merge plan (tokens per block, MACs)")
    add_model_args(p, with_export=False)
    p.set_defaults(run=run)


def _skeleton_plan(job: Job) -> MergePlan | None:
    """The plan on the family's weightless skeleton, where it has one: plans are arithmetic
    on the modules' shapes, so nothing is built (an SDXL UNet's weights are 10 GB)."""
    from mame_export.errors import UserError
    from mame_export.patch import apply, merge_plan
    from mame_export.request import solve_rs, warn_if_no_effect

    skeleton = job.family.skeleton(job.spec, job.img_size)
    if skeleton is None:
        return None
    if job.target_macs is not None:
        job = job.with_model(rs=solve_rs(job, skeleton, lambda _msg: None))
    try:
        plan = merge_plan(apply(skeleton, job.r, **job.patch_settings()))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    warn_if_no_effect(job, plan)
    return plan


def run(args: argparse.Namespace) -> int:
    from mame_export.cli import print_json
    from mame_export.request import build

    req = request_from_args(args)
    if req.weights == "auto":  # the plan does not depend on weight values, but a plan
        req.weights = "random"  # file is checked against the weights it was tuned on
        if req.plan is not None:
            from mame_export.planfile import as_plan_file

            req.plan = as_plan_file(req.plan)
            made = req.plan.weights
            req.weights = made[len("file:"):] if made.startswith("file:") else \
                "random" if made.startswith("random") else "auto"
    job = req.resolve(export=False)
    plan = _skeleton_plan(job) if req.weights == "random" else None
    if plan is None:
        built = build(job, log=lambda _msg: None)
        plan, job = built.plan, built.job
    spec = job.spec
    assert plan is not None
    if args.json:
        print_json({"model": spec.alias, "source": spec.source_name, "plan": plan.to_dict()})
    else:
        print(plan.table())
    return 0
