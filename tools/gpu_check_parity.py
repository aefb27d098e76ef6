"""tools/gpu_check.py, part 2: ``mame-export parity MODEL --json`` per precision.

Each call exports the model at ``PARITY_R`` to a temporary folder and compares every graph
runner (ONNX Runtime CPU and CUDA, TensorRT; the ones that cannot run here are reported
as skipped with the reason) with eager fp32 PyTorch on fresh random inputs, with the
project's tolerances. Imported by ``tools/gpu_check.py`` only.
"""

from __future__ import annotations

from typing import Any

from gpu_check_parts import PARITY_R


def parity_items(report: dict[str, Any], precision: str) -> list[dict[str, Any]]:
    """One item per runner of a ``parity --json`` report: its verdict and worst numbers."""
    items = []
    for run in report.get("runners", []):
        outs = run.get("outputs") or []

        def worst(key: str, pick: Any = max, outs: list[dict[str, Any]] = outs) -> Any:
            vals = [o[key] for o in outs if o.get(key) is not None]
            return pick(vals) if vals else None

        items.append({
            "variant": "mame", "r": PARITY_R, "precision": precision,
            "runner": run["runner"], "status": run["status"], "reason": run.get("reason", ""),
            "tolerance": report["tolerance"]["text"], "samples": run.get("samples"),
            "max_abs_diff": worst("max_abs_diff"), "max_rel_diff": worst("max_rel_diff"),
            "cosine_min": worst("cosine", min), "top1_agreement": worst("top1_agreement", min),
            "selection_flips": run.get("selection_flips"),
            "finite": all(o.get("nonfinite") is None for o in outs) if outs else None,
        })
    return items


def part_parity(chk: Any, rec: dict[str, Any]) -> None:
    cfg = chk.cfg
    rec.update(
        model=cfg.parity_model, r=PARITY_R, batch=cfg.parity_batch,
        samples=cfg.parity_batch * cfg.parity_batches,
        reference="eager PyTorch fp32 on the CPU, same weights (the parity command's)",
        method=("mame-export parity MODEL --r R --precision P --json: the graph exported at "
                "each precision, every graph runner against the reference on fresh random "
                "inputs with the project's tolerances; a runner that cannot run here is "
                "skipped with the reason"),
        calls=[], results=[])
    if cfg.dry_run:
        rec["stand_in"] = chk.stand_ins.get(cfg.parity_model)
    passed = True
    for precision in cfg.parity_precisions:
        call = chk.cli(["parity", cfg.parity_model, "--r", f"{PARITY_R:g}", "--weights",
                        "random", "--batch", str(cfg.parity_batch), "--parity-batches",
                        str(cfg.parity_batches), "--seed", "0", "--precision", precision,
                        "--json"], min_s=20, cap_s=cfg.cap_s, reserve_s=chk.ort_reserve())
        rec["calls"].append(call.record())
        if call.data is None:
            rec["results"].append({"variant": "mame", "r": PARITY_R, "precision": precision,
                                   "status": "skipped" if call.skipped else "error",
                                   "reason": call.skipped or call.error})
            passed = False
        else:
            items = parity_items(call.data, precision)
            rec["results"] += items
            passed &= bool(call.data.get("passed"))
            for i in items:
                chk.log(f"parity: {precision} {i['runner']}: {i['status']}"
                        + (f" max_abs={i['max_abs_diff']:.3g}" if i["max_abs_diff"] is not None
                           else f" ({i['reason']})"))
        chk.write()
    rec["passed"] = passed
    if not passed:
        rec["status"] = "failed"
