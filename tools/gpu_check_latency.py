"""tools/gpu_check.py, parts 3 and 4: latency of the variants per (model, batch, backend),
and ONNX Runtime CUDA (exports, parity, latency), over the project's runners and its
shared interleaved timer (``mame_export.profile``).

Imported by ``tools/gpu_check.py`` only; torch and mame_export load when a part runs.
"""

from __future__ import annotations

import copy
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from gpu_check_parts import PARITY_R, build, free_cuda, solve_r_for_macs


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def row_dicts(rows: list[Any], extras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as recorded: the profiler's keys, ``p50_ms`` (= median) and the extras."""
    out = []
    for rw, ex in zip(rows, extras, strict=True):
        d = rw.to_dict()
        d["p50_ms"] = d["median_ms"]
        d.update(ex)
        out.append(d)
    return out


def resolve_r(chk: Any, model_name: str, target: str) -> float:
    if target == "half":
        if model_name not in chk.r_half:
            base, _ = build(model_name, chk.cfg.dry_run, chk.models)
            t0 = time.monotonic()
            chk.r_half[model_name] = solve_r_for_macs(base)
            r, ratio, how = chk.r_half[model_name]
            chk.log(f"latency: {model_name}: MACs halve at r={r:g} (ratio {ratio:.4f}, "
                    f"solved by {how} in {time.monotonic() - t0:.1f} s)")
        return chk.r_half[model_name][0]
    return float(target)


def _variants_for(chk: Any, g: Any, built: dict[tuple, Any]) -> list[tuple]:
    """The group's (variant, r, target) keys, building each patched copy once per model."""
    from mame_export.profile import build_variant, unpatched_macs

    base, _ = build(g.model, chk.cfg.dry_run, chk.models)
    macs_key = (g.model, "macs0")
    if macs_key not in built:
        built[macs_key] = unpatched_macs(base)
    keys = []
    specs = [("baseline", 0.0, "-")] if "baseline" in g.variants else []
    for target in g.targets:
        r = resolve_r(chk, g.model, target)
        specs += [(v, r, target) for v in ("mame", "tome") if v in g.variants]
    for v, r, target in specs:
        key = (g.model, v, r)
        if key not in built:
            built[key] = build_variant(base, v, r, built[macs_key])
        keys.append((key, target))
    return keys


def _compile_skip(chk: Any, reserve_s: float) -> str:
    """Why the next compile does not fit the budget, or ""; the last compile is the best
    guess of the next (the first one also pays for starting inductor's workers)."""
    guess = (chk.compile_times[-1] if chk.compile_times else chk.cfg.compile_guess_s) * 1.3
    if chk.left() - reserve_s < guess + 10:
        return (f"time budget: {chk.left():.0f} s left, a compile is estimated at {guess:.0f} s "
                f"(+{reserve_s:.0f} s kept for later parts)")
    return ""


def time_group(chk: Any, g: Any, built: dict[tuple, Any],
               reserve_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Activate (and compile) each variant's runner, then time them all in turns."""
    import torch

    from mame_export.export import PRECISIONS
    from mame_export.profile import (
        Row,
        add_speedups,
        image_shape,
        one_line,
        random_input_sets,
        time_rows,
    )
    from mame_export.runners import TimedStep, compile_room, deactivating
    from mame_export.runners.factory import make_runner

    cfg = chk.cfg
    gi: dict[str, Any] = {"model": g.model, "batch": g.batch, "backend": g.backend,
                          "precision": cfg.precision}
    t_group = time.monotonic()
    keys = _variants_for(chk, g, built)
    base, _ = build(g.model, cfg.dry_run, chk.models)
    arrays = random_input_sets(g.batch, image_shape(base), cfg.timing.input_sets, seed=g.batch)
    feeds = [{"pixels": a} for a in arrays]
    rows: list[Any] = []
    extra: list[dict[str, Any]] = []
    steps: dict[int, TimedStep] = {}
    compiled = g.backend == "torch-compile"
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        torch._dynamo.reset()  # no compiled graph of an earlier group is reused
    with compile_room(len(keys)), deactivating([]) as runners:
        for key, target in keys:
            var = built[key]
            row = Row(g.model, var.name, g.backend, g.batch, var.r, cfg.precision,
                      flops_ratio=var.flops_ratio, gmacs=var.gmacs,
                      final_tokens=var.final_tokens)
            ex: dict[str, Any] = {"r_target": "unmerged" if var.name == "baseline" else
                                  ("MACs/2" if target == "half" else f"r={target}")}
            rows.append(row)
            extra.append(ex)
            row.skipped = var.error or (compiled and _compile_skip(chk, reserve_s)) or None
            if row.skipped:
                if not var.error:
                    chk.log(f"latency: {g.model} b{g.batch} {g.backend} {var.name} "
                            f"r={var.r:g}: skipped ({row.skipped})")
                continue
            try:
                runner = make_runner(g.backend, model=var.model, device=cfg.device,
                                     dtype=PRECISIONS[cfg.precision],
                                     compile_backend=cfg.compile_backend)
                runners.append(runner)
                step = runner.prepare_timing(feeds)
                t0 = time.perf_counter()
                step.run(step.inputs[0])  # the first call: compiles under torch.compile
                step.wait()
                first = time.perf_counter() - t0
                ex["first_call_s"] = round(first, 3)
                if compiled:
                    ex["compile_s"] = round(first, 2)
                    ex["compile_backend"] = cfg.compile_backend
                    chk.compile_times.append(first)
                    chk.log(f"latency: compiled {g.model} b{g.batch} {var.name} "
                            f"r={var.r:g} in {first:.1f} s")
                steps[len(rows) - 1] = step
            except Exception as e:  # noqa: BLE001 - a variant that fails is a row saying why
                row.skipped = f"failed: {one_line(e)}"
                free_cuda()
        if steps:
            chk.log(f"latency: timing {len(steps)} variant(s) in turns: {g.model} "
                    f"b{g.batch} {g.backend} ...")
        time_rows(rows, steps, cfg.timing)
    add_speedups(rows)
    if compiled:
        torch._dynamo.reset()
    if on_gpu:
        gi["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    gi["seconds"] = round(time.monotonic() - t_group, 2)
    return row_dicts(rows, extra), gi


def part_latency(chk: Any, rec: dict[str, Any]) -> None:
    from mame_export.profile import one_line

    cfg = chk.cfg
    rec.update(
        precision=cfg.precision, device=cfg.device,
        timing=vars(cfg.timing),
        method=("variants of one (model, batch, backend) timed in turns, one call each per "
                "round with a rotating start (mame_export.profile.measure_interleaved), after "
                "warm-up; CUDA events on the GPU (perf_counter + sync on the CPU); "
                f"{cfg.timing.input_sets} standard-normal input sets on the device, rotated; "
                f"torch.inference_mode; model.to({cfg.precision}); torch.compile(dynamic=False, "
                f"backend={cfg.compile_backend}), its first call (compile) recorded as "
                "compile_s and not timed; speed-up = "
                "baseline p50 / variant p50 in the same group; ideal = 1 / MACs ratio; "
                "efficiency = speed-up / ideal"),
        r_half_macs={}, groups=[], rows=[])
    built: dict[tuple, Any] = {}
    reserve = cfg.ort_reserve_s if chk.ort_can_run else 0.0
    any_skipped = False
    current_model = None
    for g in cfg.groups:
        if current_model is not None and g.model != current_model:
            # variants of the previous model are not needed again if no later group uses them
            if all(h.model != current_model for h in cfg.groups[cfg.groups.index(g):]):
                for k in [k for k in built if k[0] == current_model]:
                    del built[k]
                free_cuda()
        current_model = g.model
        label = f"{g.model} b{g.batch} {g.backend}"
        if chk.left() - reserve < 15:
            rec["groups"].append({"model": g.model, "batch": g.batch, "backend": g.backend,
                                  "skipped": f"time budget: {chk.left():.0f} s left"})
            chk.log(f"latency: {label}: skipped (time budget)")
            any_skipped = True
            chk.write()
            continue
        try:
            rows, gi = time_group(chk, g, built, reserve)
        except Exception as e:  # noqa: BLE001 - a group that fails is recorded, the rest runs
            gi = {"model": g.model, "batch": g.batch, "backend": g.backend,
                  "error": one_line(e), "traceback": traceback.format_exc(limit=8)[-3000:]}
            rows = []
            chk.log(f"latency: {label}: ERROR {one_line(e)}")
            free_cuda()
        rec["groups"].append(gi)
        rec["rows"].extend(rows)
        rec["r_half_macs"] = {m: {"r": r, "flops_ratio": q, "solver": how}
                              for m, (r, q, how) in chk.r_half.items()}
        any_skipped |= "error" in gi or any(r["skipped"] for r in rows)
        for r in rows:
            chk.log(f"latency: {label} {r['variant']:<8} r={r['r']:<6g} "
                    + (f"skipped ({r['skipped']})" if r["skipped"] else
                       f"p50 {r['median_ms']:.3f} ms p90 {r['p90_ms']:.3f} "
                       f"{r['throughput']:.0f} img/s speed-up {_f(r['speedup'], '.2f')} "
                       f"ideal {_f(r['ideal_speedup'], '.2f')}"))
        chk.write(plot_too=True)
    built.clear()
    if any_skipped:
        rec["status"] = "partial"


# ---------------------------------------------------------------- part 4: ONNX Runtime CUDA


def ort_reason(provider: str) -> str:
    """Why ONNX Runtime cannot run with ``provider`` here, or ""."""
    from mame_export.runners import ort_availability

    ok, reason = ort_availability(provider)
    if ok:
        return ""
    if provider == "cuda":
        try:
            import onnxruntime as ort

            provs = ort.get_available_providers()
        except ImportError:
            return "onnxruntime is not installed"
        if "CUDAExecutionProvider" not in provs:
            from mame_export.sidecar import versions

            gpu_pkg = versions().get("onnxruntime-gpu")
            why = ("onnxruntime-gpu not installed" if gpu_pkg is None else
                   f"onnxruntime-gpu {gpu_pkg} is installed but its CUDA libraries did not load")
            return f"CUDAExecutionProvider not available: {why} (providers: {', '.join(provs)})"
    return reason


def part_ort(chk: Any, rec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from mame_export.parity import check_parity
    from mame_export.profile import (
        Row,
        add_speedups,
        build_variant,
        default_threads,
        export_variant,
        image_shape,
        one_line,
        random_input_sets,
        time_rows,
        unpatched_macs,
    )
    from mame_export.runners import TimedStep, deactivating
    from mame_export.runners.factory import make_runner

    cfg = chk.cfg
    provider = cfg.ort_provider
    backend = "onnxrt-cuda" if provider == "cuda" else "onnxrt"
    rec.update(provider=provider, backend=backend, model=cfg.ort_model, batch=cfg.ort_batch,
               precision="fp32")
    if cfg.dry_run:
        rec["stand_in"] = "dry run: the CPU execution provider stands in for CUDA"
    reason = ort_reason(provider)
    if reason:
        rec.update(status="skipped", reason=reason)
        chk.log(f"ort: skipped ({reason})")
        return
    base, desc = build(cfg.ort_model, cfg.dry_run, chk.models)
    shape = image_shape(base)
    macs0 = unpatched_macs(base)
    rec.update(model_desc=desc, exports=[], parity=[], rows=[])
    threads = torch.get_num_threads() if cfg.dry_run else default_threads()
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as wd:
        graphs: list[tuple[Any, Path]] = []
        for name, r in (("baseline", 0.0), ("mame", PARITY_R)):
            var = build_variant(base, name, r, macs0)  # fresh fp32 copies on the CPU
            t0 = time.monotonic()
            info = export_variant(var, cfg.ort_batch, shape, torch.float32, Path(wd))
            ex = {"variant": name, "r": r, "seconds": round(time.monotonic() - t0, 2),
                  "error": info.error, "forbidden_ops": info.forbidden}
            if info.path is not None:
                ex["bytes"] = info.path.stat().st_size
                graphs.append((var, info.path))
            rec["exports"].append(ex)
            chk.log(f"ort: exported {name} r={r:g} b{cfg.ort_batch} in {ex['seconds']:.1f} s"
                    + (f" ({info.error})" if info.error else ""))
            chk.write()

        def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
            return {"pixels": rng.standard_normal((cfg.ort_batch, *shape)).astype(np.float32)}

        ok_all = True
        for var, path in graphs:
            ref = make_runner("torch", model=copy.deepcopy(var.model), label="torch-cpu-fp32")
            cand = make_runner(backend, onnx_path=path, threads=threads)
            rep = check_parity(ref, [cand], feeds, precision="fp32", batches=2, seed=0)
            cand.deactivate()
            d = rep.to_dict()
            d["variant"], d["r"] = var.name, var.r
            rec["parity"].append(d)
            ok_all &= rep.passed
            chk.log(f"ort: parity {var.name}: {'passed' if rep.passed else 'FAILED'} "
                    f"(max_abs {_f(rep.max_abs_diff, '.3g')})")
            chk.write()
        arrays = random_input_sets(cfg.ort_batch, shape, cfg.timing.input_sets, seed=7)
        rows: list[Any] = []
        steps: dict[int, TimedStep] = {}
        with deactivating([]) as runners:
            for var, path in graphs:
                row = Row(cfg.ort_model, var.name, backend, cfg.ort_batch, var.r, "fp32",
                          flops_ratio=var.flops_ratio, gmacs=var.gmacs,
                          final_tokens=var.final_tokens, exports=True)
                rows.append(row)
                try:  # the sessions take turns: idle ones must not spin
                    runners.append(make_runner(backend, onnx_path=path, threads=threads,
                                               spinning=False))
                    steps[len(rows) - 1] = runners[-1].prepare_timing(
                        [{"pixels": a} for a in arrays])
                except Exception as e:  # noqa: BLE001 - recorded per row
                    row.skipped = f"failed: {one_line(e)}"
            chk.log(f"ort: timing {len(steps)} graph(s) in turns on {backend} ...")
            time_rows(rows, steps, cfg.timing)
        add_speedups(rows)
        for d in row_dicts(rows, [{"r_target": "unmerged" if rw.variant == "baseline" else
                                   f"r={rw.r:g}"} for rw in rows]):
            rec["rows"].append(d)
            chk.log(f"ort: {d['variant']} r={d['r']:g}: "
                    + (f"skipped ({d['skipped']})" if d["skipped"] else
                       f"p50 {d['median_ms']:.3f} ms, {d['throughput']:.0f} img/s"))
    rec["parity_passed"] = ok_all
    if not ok_all or len(graphs) < 2:
        rec["status"] = "failed"
