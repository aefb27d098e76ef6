"""tools/gpu_check.py: its markdown page (``gpu_check.md``), from the run's record.

The tables are ``mame_export.profile.report``'s (``markdown_table``, ``format_markdown``
with this tool's latency columns).
"""

from __future__ import annotations

from typing import Any

LAT_COLUMNS = (
    ("backend", "backend", ""), ("model", "model", ""), ("batch", "batch", ""),
    ("variant", "variant", ""), ("r_target", "target", ""), ("r", "r", ".3f"),
    ("flops_ratio", "MACs ratio", ".3f"), ("p50_ms", "p50 ms", ".3f"),
    ("p90_ms", "p90 ms", ".3f"), ("throughput", "img/s", ".1f"),
    ("speedup", "speed-up", ".2f"), ("ideal_speedup", "ideal", ".2f"),
    ("efficiency", "efficiency", ".0%"), ("compile_s", "compile s", ".1f"),
    ("iterations", "n", ""),
)


def render_markdown(doc: dict[str, Any]) -> str:
    from mame_export.profile import cell, format_markdown, markdown_table

    parts = doc["parts"]
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny models)' if doc['dry_run'] else ''}", "",
             f"- command: `{doc['command']}`",
             f"- started {doc['started_utc']}, elapsed {doc['elapsed_s']} s of a "
             f"{doc['budget_s']:g} s budget; complete: {doc['complete']}"]
    if doc.get("watchdog"):
        lines.append(f"- **{doc['watchdog']}**")
    lines += ["", "## Parts", ""]
    lines += markdown_table(["part", "status", "seconds", "reason / error"], [
        [p, parts[p]["status"], cell(parts[p].get("seconds")),
         cell(parts[p].get("reason") or parts[p].get("error") or "")] for p in parts])
    env = parts["env"].get("data")
    if env:
        ort = env.get("onnxruntime", {})
        gpu = env.get("gpu", {})
        pk = env.get("packages", {})
        lines += ["", "## Environment", ""]
        lines += markdown_table(["what", "value"], [
            ["device", cell(gpu.get("name", f"CPU: {env.get('cpu')}"))],
            ["GPU memory GiB / capability",
             f"{cell(gpu.get('memory_gib'))} / {cell(gpu.get('capability'))}"],
            ["driver", f"{cell(env.get('driver_version'))} ({cell(env.get('driver_source'))})"],
            ["torch / CUDA / cuDNN",
             f"{env.get('torch')} / {cell(env.get('torch_cuda'))} / {cell(env.get('cudnn'))}"],
            ["timm / onnx / onnxscript",
             f"{cell(pk.get('timm'))} / {cell(pk.get('onnx'))} / {cell(pk.get('onnxscript'))}"],
            ["onnxruntime / providers",
             f"{cell(ort.get('version'))} / {', '.join(ort.get('providers') or []) or '-'}"],
            ["python", cell(env.get("python"))],
            ["CPU / threads", f"{cell(env.get('cpu'))} / {cell(env.get('cpu_threads'))}"],
            ["UTC date", cell(env.get("utc_date"))],
        ])
    par = parts["parity"]
    if par.get("results"):
        lines += ["", "## Parity on the device vs CPU fp32", "",
                  f"{par.get('model_desc')}; MaMe r={par.get('r')} "
                  f"(MACs ratio {cell(par.get('flops_ratio'), '.3f')}); "
                  f"{par.get('samples')} samples. {par.get('method')}. Note: {par.get('note')}",
                  ""]
        lines += markdown_table(["variant", "precision", "status", "max abs", "max rel", "cos min",
                         "cos mean", "top-1", "flips (within error)", "tolerance"], [
            [i["variant"], i["precision"], i["status"], cell(i.get("max_abs_diff"), ".3g"),
             cell(i.get("max_rel_diff"), ".3g"), cell(i.get("cosine_min"), ".6f"),
             cell(i.get("cosine_mean"), ".6f"), cell(i.get("top1_agreement"), ".3f"),
             f"{len(i['top1_flips'])} ({i['top1_flips_within_error']})"
             if "top1_flips" in i else "-",
             cell(i.get("error") or i.get("reason") or i.get("tolerance"))]
            for i in par["results"]])
    lat = parts["latency"]
    if lat.get("rows") or lat.get("groups"):
        lines += ["", "## Latency", "", cell(lat.get("method")), ""]
        for m, v in lat.get("r_half_macs", {}).items():
            lines.append(f"- {m}: MACs halve at r={v['r']:g} (ratio {v['flops_ratio']:.4f})")
        for gi in lat.get("groups", []):
            note = gi.get("skipped") or gi.get("error")
            if note:
                lines.append(f"- group {gi['model']} b{gi['batch']} {gi['backend']}: {note}")
        lines += [""] + format_markdown(lat.get("rows", []), LAT_COLUMNS).splitlines()
    ort = parts["ort"]
    if ort.get("status") not in ("pending", "not_selected"):
        lines += ["", "## ONNX Runtime", ""]
        if ort.get("reason"):
            lines.append(f"skipped: {ort['reason']}")
        if ort.get("stand_in"):
            lines.append(ort["stand_in"])
        for p in ort.get("parity", []):
            run = p["runners"][0] if p.get("runners") else {}
            lines.append(f"- parity {p['variant']} r={p['r']:g} vs {p['reference']}: "
                         f"{'passed' if p['passed'] else run.get('status', 'failed')}, "
                         f"max_abs {cell(p.get('max_abs_diff'), '.3g')} "
                         f"({p['tolerance']['text']}) {run.get('reason', '')}".rstrip())
        if ort.get("rows"):
            lines += [""] + format_markdown(ort["rows"], LAT_COLUMNS).splitlines()
    return "\n".join(lines) + "\n"
