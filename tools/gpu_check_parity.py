"""tools/gpu_check.py, part 2: parity on the device against fp32 eager PyTorch on the CPU.

Imported by ``tools/gpu_check.py`` only; torch and mame_export load when the part runs.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

from gpu_check_parts import PARITY_R, build, free_cuda


@contextlib.contextmanager
def strict_fp32() -> Iterator[dict[str, Any]]:
    """TF32 off and no cuDNN autotuning for the fp32 comparison; restored afterwards."""
    import warnings

    import torch

    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the allow_tf32 flags are deprecated in newer torch
        bench = cudnn.benchmark
        try:
            legacy, before = True, (mm.allow_tf32, cudnn.allow_tf32)
            mm.allow_tf32 = cudnn.allow_tf32 = False
        except Exception:  # noqa: BLE001 - a torch that only has the fp32_precision API
            legacy, before = False, (mm.fp32_precision, cudnn.fp32_precision)
            mm.fp32_precision = cudnn.fp32_precision = "ieee"
        cudnn.benchmark = False
        state: dict[str, Any] = {"api": "allow_tf32" if legacy else "fp32_precision",
                                 "cudnn.benchmark": False}
        for key, obj, attr in (("matmul.allow_tf32", mm, "allow_tf32"),
                               ("cudnn.allow_tf32", cudnn, "allow_tf32"),
                               ("matmul.fp32_precision", mm, "fp32_precision")):
            with contextlib.suppress(Exception):
                state[key] = getattr(obj, attr)
    try:
        yield state
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                mm.allow_tf32, cudnn.allow_tf32 = before
            else:
                mm.fp32_precision, cudnn.fp32_precision = before
            cudnn.benchmark = bench


def per_sample_cosine(ref: Any, out: Any) -> list[float]:
    import numpy as np

    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)
    return [float(c) for c in cos]


def top1_flips(ref: Any, out: Any) -> list[dict[str, Any]]:
    """Samples whose top-1 class differs: the reference's margin between the two classes
    and the sample's largest |difference|. With random weights the margins are small; a
    flip with margin <= 2 x max |diff| is explained by the numerical error alone."""
    import numpy as np

    a, b = ref.argmax(1), out.argmax(1)
    found = []
    for i in np.nonzero(a != b)[0]:
        margin = float(ref[i, a[i]] - ref[i, b[i]])
        err = float(np.abs(ref[i].astype(np.float64) - out[i]).max())
        found.append({"sample": int(i), "ref_class": int(a[i]), "class": int(b[i]),
                      "ref_margin": margin, "max_abs_diff": err,
                      "within_error": bool(margin <= 2 * err)})
    return found


def part_parity(chk: Any, rec: dict[str, Any]) -> None:
    import numpy as np

    import mame_export
    from mame_export.export import PRECISIONS
    from mame_export.parity import TOLERANCES, compare_outputs, tolerance_for
    from mame_export.profile import image_shape, one_line
    from mame_export.runners.factory import make_runner

    cfg = chk.cfg
    base, desc = build(cfg.parity_model, cfg.dry_run, chk.models)
    mame = mame_export.apply(copy.deepcopy(base), r=PARITY_R)
    plan = mame_export.merge_plan(mame)
    c, h, w = image_shape(base)
    rng = np.random.default_rng(1234)
    feeds = [{"pixels": rng.standard_normal((cfg.parity_batch, c, h, w)).astype(np.float32)}
             for _ in range(cfg.parity_batches)]
    rec.update(
        model=cfg.parity_model, model_desc=desc, r=PARITY_R, flops_ratio=plan.flops_ratio,
        device=cfg.device, samples=cfg.parity_batch * cfg.parity_batches,
        reference="eager PyTorch fp32 on the CPU, same weights",
        note=("random weights: logits are small and close (see ref_top1_margin_median_std, "
              "the median top-2 gap in logit std units), so top-1 can flip on numerical "
              "noise alone; top1_flips lists each flip with its margin and error"),
        method=("candidate: eager PyTorch on the device; fp32 with TF32 off; fp16/bf16 by "
                "model.to(dtype) with inputs cast to it (the latency rows' precision), "
                "outputs compared in float64; verdict by mame_export.parity.compare_outputs "
                "per batch (all batches must pass), cosine per sample, top-1 over all samples"),
        tolerances={p: {**vars(t), "text": t.describe()} for p, t in TOLERANCES.items()},
        results=[])
    passed = True
    for label, model in (("mame", mame), ("unmerged", base)):
        with make_runner("torch", model=copy.deepcopy(model)) as ref_runner:
            t0 = time.monotonic()
            refs = [ref_runner.infer(f)["logits"] for f in feeds]
            ref_s = time.monotonic() - t0
        ref_all = np.concatenate(refs)
        top2 = np.sort(ref_all, axis=1)[:, -2:]
        margin = float(np.median((top2[:, 1] - top2[:, 0]) / (ref_all.std(axis=1) + 1e-12)))
        for precision in ("fp32", "fp16", "bf16"):
            if chk.left() < 5:
                rec["results"].append({"variant": label, "precision": precision,
                                       "status": "skipped", "reason": "time budget"})
                continue
            # The merged model selects tokens by data: fp32 allows selection flips.
            tol = tolerance_for(precision, merged=label == "mame")
            item: dict[str, Any] = {"variant": label, "r": PARITY_R if label == "mame" else 0.0,
                                    "precision": precision, "tolerance": tol.describe(),
                                    "ref_seconds": round(ref_s, 2),
                                    "ref_top1_margin_median_std": margin}
            try:
                dtype = None if precision == "fp32" else PRECISIONS[precision]
                cand = make_runner("torch", model=copy.deepcopy(model), device=cfg.device,
                                   dtype=dtype)
                with strict_fp32() as settings, cand:
                    outs = [cand.infer(f)["logits"] for f in feeds]
                item["cuda_settings"] = settings
                stats = [compare_outputs("logits", r, o, tol)
                         for r, o in zip(refs, outs, strict=True)]
                out_all = np.concatenate(outs)
                cos = per_sample_cosine(ref_all, out_all)
                top1 = float((ref_all.argmax(1) == out_all.argmax(1)).mean())
                flips = top1_flips(ref_all, out_all)
                ok = all(s.passed for s in stats)
                item.update(
                    status="passed" if ok else "failed",
                    max_abs_diff=max(s.max_abs_diff for s in stats),
                    max_rel_diff=max(s.max_rel_diff for s in stats),
                    bound_ok=bool(all(
                        np.all(np.abs(r.astype(np.float64) - o) <= tol.max_abs
                               + (tol.max_rel or 0.0) * np.abs(r.astype(np.float64)))
                        for r, o in zip(refs, outs, strict=True))),
                    cosine_min=min(cos), cosine_mean=float(np.mean(cos)), cosine_per_sample=cos,
                    cosine_ok=None if tol.min_cosine is None else min(cos) >= tol.min_cosine,
                    top1_agreement=top1,
                    top1_decisive=[st.top1_decisive for st in stats],
                    selection_flips=sum(st.selection_flips or 0 for st in stats),
                    top1_ok=None if tol.min_top1 is None else top1 >= tol.min_top1,
                    top1_flips=flips,
                    top1_flips_within_error=sum(f["within_error"] for f in flips),
                    finite=bool(np.isfinite(out_all).all()),
                )
                passed &= ok
            except Exception as e:  # noqa: BLE001 - one precision failing is one row
                item.update(status="error", error=one_line(e))
                passed = False
            finally:
                free_cuda()
            rec["results"].append(item)
            chk.log(f"parity: {label} {precision}: {item['status']}"
                    + (f" max_abs={item['max_abs_diff']:.3g} cos_min={item['cosine_min']:.6f} "
                       f"top1={item['top1_agreement']:.3f} ({len(item['top1_flips'])} flips, "
                       f"{item['top1_flips_within_error']} within error)"
                       if "max_abs_diff" in item else
                       f" ({item.get('error') or item.get('reason')})"))
            chk.write()
    rec["passed"] = passed
    if not passed:
        rec["status"] = "failed"
