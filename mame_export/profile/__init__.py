"""Latency of the unpatched model, MaMe and ToMe, per backend, in one run.

Variants: ``baseline`` (unpatched), ``mame`` (each r) and ``tome`` (ToMe with the
same tokens per block as MaMe at that r). Backends are runners
(``mame_export.runners``): ``torch`` (eager), ``torch-compile``, ``onnxrt`` (CPU),
``onnxrt-cuda`` and ``tensorrt``. A backend or variant that cannot run is a row with
a ``skipped`` reason and no timings.

Method (see docs/profiling.md): the variants of one (backend, batch) are timed in
turns, one call each per round, so drift of a shared machine hits them alike;
warm-up, then rounds until every variant has a minimum count and a time budget is
spent; several fresh random input sets (never zeros) rotated; each runner's timed
step owns its synchronisation (CUDA events, a stream sync, or a wall clock on the
CPU); CPU threads pinned for PyTorch and ONNX Runtime alike; median, p90 and p99.
Speed-ups are ratios against the baseline on the same backend and batch, measured
in the same run; the FLOPs-ideal speed-up is 1 / MACs ratio.

Modules: ``timing`` (the shared interleaved timer), ``variants`` (what is compared),
``run`` (one profile run), ``report`` (rows, tables, the published page), ``plots``.
"""

from mame_export.profile.plots import plot, plot_throughput, save_png
from mame_export.profile.report import (
    COLUMNS,
    ProfileReport,
    Row,
    add_speedups,
    cell,
    check_appendable,
    cpu_name,
    device_name,
    format_markdown,
    format_table,
    group_key,
    markdown_page,
    markdown_table,
    merge_results,
    one_line,
    results_header,
    summary_markdown,
    summary_rows,
    versions,
)
from mame_export.profile.run import (
    BACKENDS,
    check_request,
    default_threads,
    pin_threads,
    profile,
    stderr_log,
    time_rows,
)
from mame_export.profile.timing import (
    QUICK,
    Stats,
    TimingSettings,
    measure_interleaved,
    random_input_sets,
    summarize,
    throughput,
)
from mame_export.profile.variants import (
    VARIANTS,
    Variant,
    build_variant,
    export_variant,
    forbidden_census,
    image_shape,
    unpatched_macs,
)

__all__ = [
    "BACKENDS", "COLUMNS", "QUICK", "VARIANTS",
    "ProfileReport", "Row", "Stats", "TimingSettings", "Variant", "add_speedups",
    "build_variant", "cell", "check_appendable", "check_request", "cpu_name",
    "default_threads", "device_name", "export_variant", "forbidden_census", "format_markdown",
    "format_table", "group_key", "image_shape", "markdown_page", "markdown_table",
    "measure_interleaved", "merge_results", "one_line", "pin_threads", "plot",
    "plot_throughput", "profile", "random_input_sets", "results_header", "save_png",
    "stderr_log", "summarize", "summary_markdown", "summary_rows", "throughput", "time_rows",
    "unpatched_macs", "versions",
]
