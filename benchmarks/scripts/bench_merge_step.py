"""Benchmark (not a test): the MaMe merge step's own cost on CPU, and SDPA vs. explicit
attention with proportional attention on, including a static ONNX export check.

What it measures, on timm's ``vit_base_patch16_224`` (random weights):

1. one ViT-B block at N = 197 tokens, batch 8: unpatched, patched without merging,
   patched with a merge (block 0 of the r = 0.5 plan), and ``mame_step`` alone;
   the step's share of a block's time;
2. the whole model at batch 8, r = 0.5, with ``fused_attn=True`` (the log-size bias as
   an additive mask through ``scaled_dot_product_attention``) vs ``fused_attn=False``
   (explicit ``softmax(q k^T + bias) v``), and the unpatched model for reference;
3. ``torch.onnx.export(..., dynamo=True)`` of both patched variants: op census and the
   forbidden-op audit (TopK/Sort/NonZero/Scatter*/GatherElements/GatherND/ArgMax and
   Gather on computed indices), plus ONNX Runtime parity.

Timings are medians of many repeats after warm-up. Results go to
``benchmarks/results/merge_step_cpu.json`` together with the command, versions, CPU,
thread count and load average (the machine may be shared: read them with that in mind).

    python benchmarks/scripts/bench_merge_step.py            # the recorded run
    python benchmarks/scripts/bench_merge_step.py --depth 2 --repeats 3 --full-repeats 1 \\
        --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

import mame_export  # noqa: E402
from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.ops import mame_step  # noqa: E402
from mame_export.profile import TimingSettings, measure_interleaved, results_header  # noqa: E402
from mame_export.runners import TimedStep  # noqa: E402

MODEL = "vit_base_patch16_224"


def time_ms(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall-clock milliseconds per run of each function, after ``warmup`` runs, from the
    project's interleaved timer (the functions take turns, so a load change on a shared
    machine hits every variant alike instead of whichever happened to run at the time)."""
    settings = TimingSettings(warmup_iters=warmup, warmup_s=0.0, min_iters=repeats,
                              max_iters=repeats, budget_s=0.0, input_sets=2)
    steps = {name: TimedStep(run=lambda _, fn=fn: fn(), inputs=[None]) for name, fn in fns.items()}
    with torch.inference_mode():
        got = measure_interleaved(steps, settings)
    failed = {k: v for k, v in got.items() if isinstance(v, Exception)}
    if failed:
        raise next(iter(failed.values()))
    return {k: [float(t) for t in v] for k, v in got.items()}  # type: ignore[union-attr]


def summary(samples: list[float]) -> dict[str, float | list[float]]:
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "samples_ms": [round(s, 4) for s in samples],
    }


def build(depth: int, fused: bool, r: float | None) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=depth).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return mame_export.apply(model, r) if r is not None else model


def bench_block(args: argparse.Namespace) -> dict:
    """Merge step vs. one ViT-B block, N = 197, batch 8."""
    torch.manual_seed(0)
    model = build(args.depth, fused=True, r=None)
    plain_block = copy.deepcopy(model.blocks[0])
    mame_export.apply(model, args.r)
    plan = mame_export.merge_plan(model)
    block = model.blocks[0]
    n_in, n_out = plan.blocks[0].tokens_in, plan.blocks[0].tokens_out
    n_keep = n_out - plan.num_protected  # patches the block keeps
    x = torch.randn(args.batch, n_in, model.embed_dim)
    ones = torch.ones(args.batch, n_in, 1)
    metric = torch.randn(args.batch, n_in - 1, block.attn.head_dim)
    w, n = args.warmup, args.repeats

    def step() -> object:
        return mame_step(x[:, 1:], metric, ones[:, 1:], n_keep, plan.tau)

    runs = time_ms({
        "block_unpatched": lambda: plain_block(x),
        "block_patched_no_merge": lambda: block(x, ones, None),
        "block_patched_merge": lambda: block(x, ones, n_keep),
        "mame_step_alone": step,
    }, w, n)
    res = {k: summary(v) for k, v in runs.items()}
    med = {k: v["median_ms"] for k, v in res.items()}
    return {
        "tokens_in": n_in,
        "tokens_out": n_out,
        "batch": args.batch,
        "timings": res,
        "step_share_of_block": med["mame_step_alone"] / med["block_patched_no_merge"],
        "merge_block_vs_plain_block": med["block_patched_merge"] / med["block_unpatched"],
    }


def bench_models(args: argparse.Namespace) -> dict:
    """Whole model, batch 8: r = 0.5 with SDPA + mask vs explicit attention; unpatched."""
    x = torch.randn(args.batch, 3, 224, 224)
    models = {name: build(args.depth, fused, r) for name, fused, r in [
        ("unpatched_sdpa", True, None),
        ("mame_sdpa_mask", True, args.r),
        ("mame_explicit", False, args.r),
    ]}
    runs = time_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, 1,
                   args.full_repeats)
    out = {name: summary(v) for name, v in runs.items()}
    for name, model in models.items():
        if mame_export.patch.is_patched(model):
            out[name]["flops_ratio"] = mame_export.merge_plan(model).flops_ratio
    return out


def check_export(args: argparse.Namespace) -> dict:
    """Dynamo export of both patched variants: op census, forbidden ops, ORT parity."""
    import onnx
    import onnxruntime as ort

    from mame_export.audit import forbidden_ops, op_census

    x = torch.randn(1, 3, 224, 224)
    out = {}
    for name, fused in [("mame_sdpa_mask", True), ("mame_explicit", False)]:
        model = build(args.depth, fused, args.r)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            t0 = time.perf_counter()
            try:
                torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
            except Exception as e:  # noqa: BLE001 - recorded, not raised: it is the finding
                out[name] = {"exported": False, "error": f"{type(e).__name__}: {e}"[:500]}
                continue
            seconds = time.perf_counter() - t0
            graph = onnx.load(path)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            with torch.inference_mode():
                ref = model(x).numpy()
            out[name] = {
                "exported": True,
                "export_seconds": round(seconds, 1),
                "op_census": dict(sorted(op_census(graph).items())),
                "forbidden_ops": [str(f) for f in forbidden_ops(graph)],
                "ort_max_abs_diff": float(abs(got - ref).max()),
            }
        del model
    return out


def print_table(res: dict) -> None:
    blk = res["block"]
    t = {k: v["median_ms"] for k, v in blk["timings"].items()}
    print(f"\nViT-B block, batch {blk['batch']}, {blk['tokens_in']} -> {blk['tokens_out']} "
          f"tokens ({res['threads']} threads, {res['cpu']}):")
    for k, v in t.items():
        print(f"  {k:<24} {v:9.2f} ms")
    print(f"  merge step share of a block: {100 * blk['step_share_of_block']:.1f} %")
    print(f"\nWhole model {MODEL} (depth {res['depth']}), batch {res['batch']}, r={res['r']}:")
    for k, v in res["model"].items():
        ratio = f"  (FLOPs ratio {v['flops_ratio']:.3f})" if "flops_ratio" in v else ""
        print(f"  {k:<24} {v['median_ms']:9.1f} ms{ratio}")
    for k, v in res.get("export", {}).items():
        if not v["exported"]:
            print(f"  export {k}: FAILED {v['error'][:120]}")
            continue
        print(f"  export {k}: ok in {v['export_seconds']} s, forbidden ops "
              f"{len(v['forbidden_ops'])}, ORT max |diff| {v['ort_max_abs_diff']:.2e}, "
              f"ops {', '.join(v['op_census'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=12, help="ViT-B blocks (12 = the real model)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15, help="block and step timings")
    ap.add_argument("--full-repeats", type=int, default=4, help="whole-model timings")
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export check")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "merge_step_cpu.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    res: dict = {
        **results_header(),  # its load_avg is the load before the run
        "r": args.r,
        "batch": args.batch,
        "depth": args.depth,
    }
    res["block"] = bench_block(args)
    res["model"] = bench_models(args)
    if not args.no_export:
        res["export"] = check_export(args)
    res["load_average_after"] = os.getloadavg()
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out} ({res['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
