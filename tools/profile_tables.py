"""Produce the published latency tables: baseline vs MaMe vs ToMe, in one run per preset.

    python tools/profile_tables.py            # CPU matrix -> benchmarks/results/profile_cpu.*
    python tools/profile_tables.py --gpu      # GPU matrix -> benchmarks/results/profile_gpu.*
    python tools/profile_tables.py --quick    # smoke run (vit_t, batch 1, r 0.5), temp folder

A preset too long for one sitting (the GPU one on a machine lent for minutes at a
time) can be run in parts that add up to one table:

    python tools/profile_tables.py --gpu --models vit_b --batches 1
    python tools/profile_tables.py --gpu --models vit_b --batches 256 --append
    ...

``--append`` keeps the rows of the existing ``profile_<preset>.json`` for every
(model, backend, batch) group this part does not measure, and refuses to mix
devices. Ratios are only ever taken inside one group, which one part times whole.

Writes raw JSON, a PNG and a markdown page (command, device, versions, the
summary against the FLOPs-ideal and ToMe, and every row, as
``mame_export.profile.report`` lays it out), and prints the markdown. Run the real
presets on a quiet machine: timings taken while other work shares the CPU are not
worth publishing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

try:
    import mame_export  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mame_export.artifacts import atomic_write_text
from mame_export.families import build_model, resolve
from mame_export.profile import (
    QUICK,
    TimingSettings,
    check_appendable,
    device_name,
    markdown_page,
    merge_results,
    plot,
    profile,
    stderr_log,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[str, ...]
    batches: tuple[int, ...]
    rs: tuple[float, ...]
    backends: tuple[str, ...]
    device: str
    precision: str
    timing: TimingSettings


PRESETS = {
    "cpu": Preset(
        "cpu", ("vit_b", "vit_s"), (1, 8), (0.25, 0.5, 0.75), ("torch", "onnxrt"), "cpu", "fp32",
        TimingSettings(warmup_iters=3, warmup_s=2.0, min_iters=20, max_iters=2000, budget_s=8.0,
                       input_sets=4),
    ),
    "gpu": Preset(
        "gpu", ("vit_b", "vit_l"), (1, 256), (0.25, 0.5, 0.75),
        ("torch", "torch-compile", "onnxrt-cuda"), "cuda", "fp16",
        TimingSettings(warmup_iters=10, warmup_s=2.0, min_iters=50, max_iters=5000, budget_s=5.0,
                       input_sets=4),
    ),
    "quick": Preset("quick", ("vit_t",), (1,), (0.5,), ("torch", "onnxrt"), "cpu", "fp32", QUICK),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the GPU matrix (needs CUDA)")
    mode.add_argument("--quick", action="store_true",
                      help="smoke run: vit_t, batch 1, r 0.5, few iterations")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; --quick: a temp folder)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--backends", default=None, help="override the preset's backends")
    p.add_argument("--models", default=None, help="override the preset's models (aliases)")
    p.add_argument("--batches", default=None, help="override the preset's batch sizes")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing profile_<preset>.json: keep its rows for the "
                        "(model, backend, batch) groups this run does not measure")
    p.add_argument("--seconds", type=float, default=None, help="override the time per row")
    p.add_argument("--min-iters", type=int, default=None, help="override the minimum iterations")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS["gpu" if args.gpu else "quick" if args.quick else "cpu"]
    if args.backends:
        preset = replace(preset, backends=tuple(b.strip() for b in args.backends.split(",")))
    if args.models:
        preset = replace(preset, models=tuple(m.strip() for m in args.models.split(",")))
    if args.batches:
        preset = replace(preset, batches=tuple(int(b) for b in args.batches.split(",")))
    timing = preset.timing
    if args.seconds is not None:
        timing = replace(timing, budget_s=args.seconds)
    if args.min_iters is not None:
        timing = replace(timing, min_iters=args.min_iters,
                         max_iters=max(timing.max_iters, args.min_iters))
    if preset.device == "cuda" and not torch.cuda.is_available():
        print("profile_tables: --gpu needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="profile-quick-")) if args.quick
                           else RESULTS)
    command = shlex.join(["python", "tools/profile_tables.py", *sys.argv[1:]]
                         if argv is None else ["python", "tools/profile_tables.py", *argv])
    stem = f"profile_{preset.name}"
    json_path, png_path, md_path = (out_dir / f"{stem}{ext}" for ext in (".json", ".png", ".md"))
    old = json.loads(json_path.read_text()) if args.append and json_path.exists() else None
    if old is not None:  # refuse before measuring, not after
        try:
            check_appendable(old, preset.name, device_name(preset.device))
        except ValueError as e:
            print(f"profile_tables: --append: {e}", file=sys.stderr)
            return 2

    reports = []
    for alias in preset.models:
        spec = resolve(alias)
        torch.manual_seed(0)
        model, _ = build_model(spec, "random")
        stderr_log(f"== {alias} ({spec.source_name}, random weights) ==")
        reports.append(profile(
            model, model_name=alias, rs=preset.rs, backends=preset.backends,
            batches=preset.batches, device=preset.device, precision=preset.precision,
            threads=args.threads, settings=timing, command=command,
        ))
        del model
    first = reports[0]
    result = {
        "preset": preset.name,
        "command": command,
        "device": first.device,
        "cpu": first.cpu,
        "threads": first.threads,
        "versions": first.versions,
        "timing": first.settings["timing"],
        "runs": [r.settings for r in reports],
        "results": [row for r in reports for row in r.to_dict()["results"]],
    }
    if old is not None:
        result = merge_results(old, result)
    atomic_write_text(json_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot(result["results"], png_path,
         title=f"{preset.name}: {first.device}, {preset.precision}, {first.threads} threads")
    page = markdown_page(result)
    atomic_write_text(md_path, page)
    print(page)
    stderr_log(f"wrote {json_path}, {png_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
