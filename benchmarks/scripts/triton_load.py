"""Benchmark (not a test): a bounded load test of a real Triton Inference Server on loopback,
unmerged against MaMe r = 0.5, at concurrency 1, 4 and 16.

Both graphs (unmerged: r = 0 through the same exporter) are exported with a dynamic batch
(``mame-export triton MODEL --backend python``, random weights) into one model repository,
and served together by the ``tritonserver`` binary of ``nvidia-pytriton`` (2.51, Python
backend: ``model.py`` runs the graph with ONNX Runtime on the CPU) on 127.0.0.1. A small
``tritonclient`` gRPC driver sends a fixed number of batch-1 requests per cell, each worker
with its own client, and stops at the count or at the cell's time limit, whichever comes
first: the throughput, p50/p99 latency and failed requests (which must be 0) of every cell,
and the server's own batch statistics. (``perf_analyzer``: the PyPI ``perf-analyzer`` that
pip resolves here is a 2 KB wheel without the binary.)

Results go to ``benchmarks/results/triton_load_cpu.{json,md}`` with the command, versions,
CPU and load average (the machine may be shared: read them with that in mind).

    timeout 1200 python benchmarks/scripts/triton_load.py            # the recorded run
    python benchmarks/scripts/triton_load.py --model vit_t --img-size 32 --requests 4,8,16 \\
        --out /tmp/load.json                                          # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/scripts/)
sys.path.insert(0, str(ROOT))

from mame_export.artifacts import atomic_write_text  # noqa: E402
from mame_export.cli import main as cli_main  # noqa: E402
from mame_export.profile import results_header  # noqa: E402
from mame_export.serve.server import local_server  # noqa: E402

CONCURRENCY = (1, 4, 16)


def export_model(model: str, r: float, img_size: int | None, repo: Path, graphs: Path,
                 name: str, max_batch: int, queue_delay_us: int) -> None:
    """``mame-export triton MODEL`` with the Python backend (the tool itself, not a copy)."""
    args = ["triton", model, "--r", f"{r:g}", "--weights", "random", "--dynamic-batch",
            "--max-batch", str(max_batch), "--out", str(graphs), "--parity-batches", "1",
            "--seed", "0", "--repo", str(repo), "--backend", "python", "--name", name,
            "--max-queue-delay-us", str(queue_delay_us)]
    if img_size:
        args += ["--img-size", str(img_size)]
    code = cli_main(args)
    if code != 0:
        raise SystemExit(f"export of {model} r={r} failed (exit {code})")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_cell(url: str, name: str, input_name: str, shape: list[int], concurrency: int,
             requests: int, limit_s: float) -> dict[str, Any]:
    """``requests`` batch-1 requests from ``concurrency`` workers (one gRPC client each),
    stopping early at ``limit_s``: latency per request and the cell's throughput."""
    import tritonclient.grpc as tgrpc

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + limit_s
    x = np.random.default_rng(0).standard_normal([1, *shape], dtype=np.float32)

    def worker() -> None:
        client = tgrpc.InferenceServerClient(url)
        inp = tgrpc.InferInput(input_name, x.shape, "FP32")
        inp.set_data_from_numpy(x)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= requests:
                    break
                issued[0] += 1
            start = time.perf_counter()
            try:
                client.infer(name, [inp], client_timeout=limit_s)
                ms = (time.perf_counter() - start) * 1e3
                with lock:
                    latencies.append(ms)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                with lock:
                    failures.append(f"{type(e).__name__}: {str(e)[:200]}")
        client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"model": name, "concurrency": concurrency, "requests": requests,
            "completed": len(latencies), "failed": len(failures),
            "failures": sorted(set(failures))[:5], "stopped_by_time_limit": len(latencies)
            + len(failures) < requests, "wall_s": round(wall, 3),
            "throughput_rps": round(len(latencies) / wall, 2) if wall > 0 else None,
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None}


def batch_stats(url: str, name: str) -> dict[str, Any]:
    import tritonclient.grpc as tgrpc

    client = tgrpc.InferenceServerClient(url)
    stats = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
    client.close()
    return {"inference_count": int(stats.get("inference_count", 0)),
            "execution_count": int(stats.get("execution_count", 0)),
            "batch_sizes": {b["batch_size"]: int(b["compute_infer"]["count"])
                            for b in stats.get("batch_stats", [])}}


def serving_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("tritonclient", "nvidia-pytriton", "grpcio"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Triton load test (CPU, loopback)", "",
        f"Command: `{result['command']}`", "",
        f"Server: tritonserver {result['server_version']} (nvidia-pytriton), Python backend, "
        f"ONNX Runtime on the CPU; {result['settings']['model']} at "
        f"{result['settings']['img_size']} px, random weights, "
        f"dynamic batch up to {result['settings']['max_batch']}, queue delay "
        f"{result['settings']['queue_delay_us']} us, 1 instance, "
        f"{result['settings']['ort_threads']} ONNX Runtime threads.", "",
        f"Machine: {result['cpu']}, load average before {result['load_avg']}, after "
        f"{result['load_avg_after']}. {result['note']}", "",
        "| model | concurrency | requests | completed | failed | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        lines.append(f"| {c['model']} | {c['concurrency']} | {c['requests']} | "
                     f"{c['completed']} | {c['failed']} | {c['throughput_rps']} | "
                     f"{c['p50_ms']} | {c['p99_ms']} |")
    lines += ["", "Server batch statistics (batch size: executions; 4 warm-up requests per "
              "model included):", ""]
    for name, s in result["server_stats"].items():
        lines.append(f"- {name}: {s['inference_count']} inferences in {s['execution_count']} "
                     f"executions; {s['batch_sizes']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_s")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--r", type=float, default=0.5, help="the merged variant's r")
    ap.add_argument("--requests", default="32,64,128",
                    help="requests per cell at concurrency 1,4,16")
    ap.add_argument("--cell-limit-s", type=float, default=120.0, help="time limit per cell")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/triton_load_cpu.json")
    args = ap.parse_args()
    requests = [int(n) for n in args.requests.split(",")]
    header = results_header()
    os.environ["MAME_TRITON_ORT_THREADS"] = str(args.ort_threads)  # the model.py's sessions
    with tempfile.TemporaryDirectory(prefix="mame-triton-load-") as tmp:
        repo, graphs = Path(tmp) / "repo", Path(tmp) / "graphs"
        names = {f"{args.model}_unmerged": 0.0, f"{args.model}_r{args.r:g}": args.r}
        for name, r in names.items():
            export_model(args.model, r, args.img_size, repo, graphs, name, args.max_batch,
                         args.queue_delay_us)
        cfg = (repo / next(iter(names)) / "config.pbtxt").read_text()
        import tritonclient.grpc as tgrpc
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        parsed = text_format.Parse(cfg, model_config_pb2.ModelConfig())
        input_name, shape = parsed.input[0].name, list(parsed.input[0].dims)
        cells = []
        with local_server(repo, start_timeout_s=120) as server:
            client = tgrpc.InferenceServerClient(server.grpc_url)
            server_version = client.get_server_metadata(as_json=True)["version"]
            client.close()
            for name in names:
                run_cell(server.grpc_url, name, input_name, shape, 1, 4, 60)  # warm-up
                for c, n in zip(CONCURRENCY, requests, strict=True):
                    cell = run_cell(server.grpc_url, name, input_name, shape, c, n,
                                    args.cell_limit_s)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                    cells.append(cell)
            stats = {name: batch_stats(server.grpc_url, name) for name in names}
    header["versions"].update(serving_versions())
    result = {**header, "server_version": server_version,
              "settings": {"model": args.model, "img_size": shape[-1], "r": args.r,
                           "max_batch": args.max_batch, "queue_delay_us": args.queue_delay_us,
                           "ort_threads": args.ort_threads, "requests": requests,
                           "cell_limit_s": args.cell_limit_s, "address": "127.0.0.1"},
              "cells": cells, "server_stats": stats, "load_avg_after": os.getloadavg(),
              "note": args.note,
              "failed_total": sum(c["failed"] for c in cells)}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0 if result["failed_total"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
