"""tools/gpu_check.py, parts 3 and 4: ``mame-export profile ... --json`` per latency group,
and ONNX Runtime CUDA (the profile command on the ``onnxrt-cuda`` backend).

The r where MACs halve comes from ``mame-export plan MODEL --target-macs 0.5 --json``.
Rows are the profile command's JSON rows, with ``p50_ms`` (= ``median_ms``) and
``r_target`` added. Imported by ``tools/gpu_check.py`` only.
"""

from __future__ import annotations

import math
from typing import Any

from gpu_check_parts import HALF_MACS, PARITY_R, LatencyGroup


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rows_with_targets(rows: list[dict[str, Any]], r_half: float | None) -> list[dict[str, Any]]:
    """The profile rows as recorded: ``p50_ms`` and which r each row's variant was asked at."""
    out = []
    for row in rows:
        d = dict(row)
        d["p50_ms"] = d.get("median_ms")
        r = d.get("r")
        if d.get("variant") == "baseline":
            d["r_target"] = "unmerged"
        elif r is not None and r_half is not None and math.isclose(r, r_half, abs_tol=1e-9):
            d["r_target"] = "MACs/2"
        else:
            d["r_target"] = f"r={_f(r, 'g')}"
        out.append(d)
    return out


def r_half_macs(chk: Any, model: str, flags: tuple[str, ...] = ()) -> float | None:
    """The smallest r whose MaMe plan has at most half the MACs (the plan command), cached."""
    key = " ".join([model, *flags])
    if key not in chk.r_half:
        call = chk.cli(["plan", model, *flags, "--target-macs", f"{HALF_MACS:g}", "--weights",
                        "random", "--json"], min_s=10, cap_s=chk.cfg.cap_s,
                       reserve_s=chk.ort_reserve())
        plan = (call.data or {}).get("plan") or {}
        chk.r_half[key] = {"r": plan.get("r"), "flops_ratio": plan.get("flops_ratio"),
                           "solver": "mame-export plan --target-macs", "call": call.record()}
        if plan.get("r") is not None:
            chk.log(f"latency: {key}: MACs halve at r={plan['r']:g} "
                    f"(ratio {plan['flops_ratio']:.4f})")
    return chk.r_half[key]["r"]


def profile_args(cfg: Any, model: str, flags: tuple[str, ...], rs: list[float],
                 backends: tuple[str, ...], batches: tuple[int, ...],
                 variants: tuple[str, ...], precision: str) -> list[str]:
    return ["profile", model, *flags, "--r", ",".join(repr(r) for r in rs),
            "--backends", ",".join(backends), "--device", cfg.device,
            "--batch", ",".join(map(str, batches)), "--precision", precision,
            "--variants", ",".join(variants), *cfg.timing_flags(), "--json"]


def run_group(chk: Any, g: LatencyGroup) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One profile call: (the group's record, its rows)."""
    gi: dict[str, Any] = {"model": g.model, "flags": list(g.flags), "batches": list(g.batches),
                          "backends": list(g.backends), "variants": list(g.variants)}
    r_half = r_half_macs(chk, g.model, g.flags) if "half" in g.targets else None
    rs = [PARITY_R if t == "0.5" else r_half for t in g.targets]
    if any(r is None for r in rs):
        gi["error"] = "no r where MACs halve: " + str(chk.r_half[" ".join([g.model, *g.flags])]
                                                      ["call"].get("error"))
        return gi, []
    call = chk.cli(profile_args(chk.cfg, g.model, g.flags, rs, g.backends, g.batches,
                                g.variants, chk.cfg.precision),
                   min_s=g.min_s, cap_s=g.cap_s, reserve_s=chk.ort_reserve())
    gi.update(call.record())
    if call.data is None:
        gi["skipped" if call.skipped else "error"] = call.skipped or call.error
        return gi, []
    return gi, rows_with_targets(call.data.get("results", []), r_half)


def part_latency(chk: Any, rec: dict[str, Any]) -> None:
    cfg = chk.cfg
    rec.update(
        precision=cfg.precision, device=cfg.device, timing=cfg.timing,
        compile_backend=cfg.compile_backend,
        method=("mame-export profile per group: the variants of one (model, backend, batch) "
                "timed in turns, one call each per round with a rotating start, after "
                "warm-up; the command's own timing (CUDA events on the GPU) and speed-ups "
                "(baseline p50 / variant p50 in the same group; ideal = 1 / MACs ratio; "
                "efficiency = speed-up / ideal); the r where MACs halve from mame-export plan "
                "--target-macs 0.5"),
        r_half_macs={}, groups=[], rows=[])
    if cfg.dry_run:
        rec["stand_ins"] = chk.stand_ins
    any_skipped = False
    for g in cfg.groups:
        gi, rows = run_group(chk, g)
        rec["groups"].append(gi)
        rec["rows"].extend(rows)
        rec["r_half_macs"] = {k: {kk: v[kk] for kk in ("r", "flops_ratio", "solver")}
                              for k, v in chk.r_half.items() if v["r"] is not None}
        rec["plan_calls"] = [v["call"] for v in chk.r_half.values()]
        any_skipped |= "error" in gi or "skipped" in gi or any(r["skipped"] for r in rows)
        note = gi.get("skipped") or gi.get("error")
        if note:
            chk.log(f"latency: {g.label}: {'skipped' if 'skipped' in gi else 'ERROR'} ({note})")
        for r in rows:
            chk.log(f"latency: {r['model']} b{r['batch']} {r['backend']} {r['variant']:<8} "
                    f"r={_f(r['r'], 'g'):<6} "
                    + (f"skipped ({r['skipped']})" if r["skipped"] else
                       f"p50 {r['median_ms']:.3f} ms {_f(r.get('throughput'), '.0f')} img/s "
                       f"speed-up {_f(r.get('speedup'), '.2f')} "
                       f"ideal {_f(r.get('ideal_speedup'), '.2f')}"))
        chk.write(plot_too=True)
    if any_skipped:
        rec["status"] = "partial"


# ---------------------------------------------------------------- part 4: ONNX Runtime CUDA


def part_ort(chk: Any, rec: dict[str, Any]) -> None:
    """The unmerged and MaMe graphs timed in turns on ONNX Runtime CUDA (``onnxrt`` on the
    CPU in a dry run); their parity is the parity part's, for the same runner."""
    cfg = chk.cfg
    backend = cfg.ort_backend
    rec.update(provider="cuda" if backend == "onnxrt-cuda" else "cpu", backend=backend,
               model=cfg.ort_model, batch=cfg.ort_batch, precision="fp32")
    if cfg.dry_run:
        rec["stand_in"] = "dry run: the CPU execution provider stands in for CUDA"
    call = chk.cli(profile_args(cfg, cfg.ort_model, (), [PARITY_R], (backend,),
                                (cfg.ort_batch,), ("baseline", "mame"), "fp32"),
                   min_s=20, cap_s=cfg.cap_s, reserve_s=0.0)
    rec["call"] = call.record()
    parity = [i for i in chk.doc["parts"]["parity"].get("results", [])
              if i.get("runner") == backend]
    rec["parity"] = parity
    rec["parity_passed"] = bool(parity) and all(i["status"] == "passed" for i in parity)
    if call.data is None:
        rec.update(status="skipped" if call.skipped else "error",
                   reason=call.skipped or call.error)
        chk.log(f"ort: {rec['status']} ({rec['reason']})")
        return
    rows = rows_with_targets(call.data.get("results", []), None)
    rec["rows"] = rows
    rec["exports"] = [{"variant": r["variant"], "r": r["r"], "exports": r.get("exports"),
                       "forbidden_ops": r.get("forbidden_ops")} for r in rows]
    for d in rows:
        chk.log(f"ort: {d['variant']} r={_f(d['r'], 'g')}: "
                + (f"skipped ({d['skipped']})" if d["skipped"] else
                   f"p50 {d['median_ms']:.3f} ms, {_f(d.get('throughput'), '.0f')} img/s"))
    if rows and all(r["skipped"] for r in rows):
        rec.update(status="skipped", reason=sorted({r["skipped"] for r in rows})[0])
    elif not rec["parity_passed"] or any(r["skipped"] for r in rows):
        rec["status"] = "failed"
    if rows and not all(r["skipped"] for r in rows):
        ort_int8(chk, rec, backend)


def ort_int8(chk: Any, rec: dict[str, Any], backend: str) -> None:
    """With budget left: the same graphs and their INT8 QDQ twins (``profile --precision
    int8``: random calibration, the merge in fp32), all four timed in turns."""
    cfg = chk.cfg
    call = chk.cli(profile_args(cfg, cfg.ort_model, (), [PARITY_R], (backend,),
                                (cfg.ort_batch,), ("baseline", "mame"), "int8"),
                   min_s=40, cap_s=cfg.cap_s, reserve_s=0.0)
    got: dict[str, Any] = {"call": call.record()}
    rec["int8"] = got
    if call.data is None:
        got["skipped" if call.skipped else "error"] = call.skipped or call.error
        chk.log(f"ort int8: {'skipped' if call.skipped else 'ERROR'} "
                f"({call.skipped or call.error})")
        return
    got["rows"] = rows_with_targets(call.data.get("results", []), None)
    for d in got["rows"]:
        chk.log(f"ort int8: {d['variant']} {d.get('precision', '')} r={_f(d['r'], 'g')}: "
                + (f"skipped ({d['skipped']})" if d["skipped"] else
                   f"p50 {d['median_ms']:.3f} ms, speed-up {_f(d.get('speedup'), '.2f')}, "
                   f"vs fp32 baseline {_f(d.get('speedup_vs_fp32'), '.2f')}"))
