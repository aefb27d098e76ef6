"""tools/gpu_check.py: its markdown page (``gpu_check.md``), from the run's record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LAT_COLUMNS = (
    ("backend", "backend", ""), ("model", "model", ""), ("batch", "batch", ""),
    ("variant", "variant", ""), ("precision", "precision", ""), ("r_target", "target", ""),
    ("r", "r", ".3f"),
    ("flops_ratio", "MACs ratio", ".3f"), ("p50_ms", "p50 ms", ".3f"),
    ("p90_ms", "p90 ms", ".3f"), ("throughput", "img/s", ".1f"),
    ("speedup", "speed-up", ".2f"), ("speedup_vs_fp32", "vs fp32", ".2f"),
    ("ideal_speedup", "ideal", ".2f"),
    ("efficiency", "efficiency", ".0%"), ("iterations", "n", ""),
)


def cell(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return "-"
    try:
        text = format(v, spec)
    except (TypeError, ValueError):
        text = str(v)
    return text.replace("|", "/").replace("\n", " ")


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in body)]


def row_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Timed rows in the latency columns; a skipped row says why in its last cell."""
    head = [h for _, h, _ in LAT_COLUMNS] + ["skipped"]
    return table(head, [[cell(r.get(k), spec) for k, _, spec in LAT_COLUMNS]
                        + [cell(r.get("skipped"))] for r in rows])


def _commands(parts: dict[str, Any]) -> list[list[str]]:
    calls = []
    for name, rec in parts.items():
        found = [*rec.get("calls", []), *rec.get("plan_calls", []),
                 *(g for g in rec.get("groups", []) if "command" in g)]
        if "call" in rec:
            found.append(rec["call"])
        if "call" in (rec.get("int8") or {}):
            found.append(rec["int8"]["call"])
        calls += [[name, f"`{c['command']}`", cell(c.get("exit_code")), cell(c.get("seconds")),
                   cell(c.get("skipped") or c.get("error"))] for c in found]
    return calls


def render_markdown(doc: dict[str, Any]) -> str:
    parts = doc["parts"]
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny stand-ins)' if doc['dry_run'] else ''}", "",
             f"- command: `{doc['command']}`",
             f"- started {doc['started_utc']}, elapsed {doc['elapsed_s']} s of a "
             f"{doc['budget_s']:g} s budget; complete: {doc['complete']}"]
    if doc.get("watchdog"):
        lines.append(f"- **{doc['watchdog']}**")
    for alias, what in doc.get("stand_ins", {}).items():
        lines.append(f"- stand-in for {alias}: {what}")
    lines += ["", "## Parts", ""]
    lines += table(["part", "status", "seconds", "reason / error"], [
        [p, parts[p]["status"], cell(parts[p].get("seconds")),
         cell(parts[p].get("reason") or parts[p].get("error") or "")] for p in parts])
    env = parts["env"].get("data")
    if env:
        ort = env.get("onnxruntime", {})
        gpu = env.get("gpu", {})
        pk = env.get("packages", {})
        lines += ["", "## Environment", ""]
        lines += table(["what", "value"], [
            ["device", cell(gpu.get("name", f"CPU: {env.get('cpu')}"))],
            ["GPU memory GiB / capability",
             f"{cell(gpu.get('memory_gib'))} / {cell(gpu.get('capability'))}"],
            ["driver", f"{cell(env.get('driver_version'))} ({cell(env.get('driver_source'))})"],
            ["torch / CUDA / cuDNN",
             f"{env.get('torch')} / {cell(env.get('torch_cuda'))} / {cell(env.get('cudnn'))}"],
            ["timm / onnx / onnxscript / transformers",
             " / ".join(cell(pk.get(k)) for k in ("timm", "onnx", "onnxscript",
                                                  "transformers"))],
            ["onnxruntime / providers",
             f"{cell(ort.get('version'))} / {', '.join(ort.get('providers') or []) or '-'}"],
            ["python", cell(env.get("python"))],
            ["CPU / threads", f"{cell(env.get('cpu'))} / {cell(env.get('cpu_threads'))}"],
            ["UTC date", cell(env.get("utc_date"))],
        ])
    par = parts["parity"]
    if par.get("results"):
        lines += ["", "## Parity of the exported graph vs eager fp32 PyTorch", "",
                  f"{par.get('model')}, MaMe r={par.get('r')}, batch {par.get('batch')}, "
                  f"{par.get('samples')} samples. {par.get('method')}.", ""]
        lines += table(["precision", "runner", "status", "max abs", "max rel", "cos min",
                        "top-1", "selection flips", "tolerance / reason"], [
            [i["precision"], cell(i.get("runner")), i["status"],
             cell(i.get("max_abs_diff"), ".3g"), cell(i.get("max_rel_diff"), ".3g"),
             cell(i.get("cosine_min"), ".6f"), cell(i.get("top1_agreement"), ".3f"),
             cell(i.get("selection_flips")), cell(i.get("reason") or i.get("tolerance"))]
            for i in par["results"]])
    lat = parts["latency"]
    if lat.get("rows") or lat.get("groups"):
        lines += ["", "## Latency", "", cell(lat.get("method")), ""]
        for m, v in lat.get("r_half_macs", {}).items():
            lines.append(f"- {m}: MACs halve at r={v['r']:g} (ratio {v['flops_ratio']:.4f})")
        for gi in lat.get("groups", []):
            note = gi.get("skipped") or gi.get("error")
            if note:
                lines.append(f"- group {' '.join([gi['model'], *gi.get('flags', [])])} "
                             f"{','.join(gi['backends'])}: {note}")
        if lat.get("rows"):
            lines += [""] + row_table(lat["rows"])
    ort = parts["ort"]
    if ort.get("status") not in ("pending", "not_selected"):
        lines += ["", "## ONNX Runtime", ""]
        if ort.get("reason"):
            lines.append(f"{ort['status']}: {ort['reason']}")
        if ort.get("stand_in"):
            lines.append(ort["stand_in"])
        for p in ort.get("parity", []):
            lines.append(f"- parity {p['precision']} on {p['runner']}: {p['status']}, max_abs "
                         f"{cell(p.get('max_abs_diff'), '.3g')} ({p.get('tolerance')})")
        if ort.get("rows"):
            lines += [""] + row_table(ort["rows"])
        int8 = ort.get("int8") or {}
        if int8.get("rows"):
            lines += ["", "INT8 QDQ graphs beside their fp32 graphs (random calibration; the "
                      "merge in fp32):", ""] + row_table(int8["rows"])
        elif int8.get("skipped") or int8.get("error"):
            lines.append(f"- int8: {int8.get('skipped') or int8.get('error')}")
    commands = _commands(parts)
    if commands:
        lines += ["", "## Commands", ""]
        lines += table(["part", "command", "exit", "seconds", "skipped / error"], commands)
    return "\n".join(lines) + "\n"
