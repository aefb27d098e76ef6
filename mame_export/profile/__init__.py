"""Latency of the unpatched model, MaMe and the family's ToMe, per backend, in one run.

Variants: ``baseline`` (unpatched), ``mame`` (each r), ``tome`` (ToMe with the same
tokens per block as MaMe at that r; timm ViTs), ``tomesd`` (ToMe-SD at the same r; the
Stable Diffusion UNet), and any exported graph given as ``--graph NAME=PATH`` (on the
graph backends). Inputs and outputs are the family's (``Family.io_spec``). Backends are
runners (``mame_export.runners``): ``torch`` (eager), ``torch-compile``, ``onnxrt``
(CPU), ``onnxrt-cuda`` and ``tensorrt``. A backend or variant that cannot run is a row
with a ``skipped`` reason and no timings.

Method (see docs/profiling.md): the variants of one (backend, batch) are timed in
turns, one call each per round, so drift of a shared machine hits them alike;
warm-up, then rounds until every variant has a minimum count and a time budget is
spent; several fresh random input sets (never zeros) rotated; each runner's timed
step owns its synchronisation (CUDA events, a stream sync, or a wall clock on the
CPU); CPU threads pinned for PyTorch and ONNX Runtime alike; median, p90 and p99.
Speed-ups are ratios against the baseline on the same backend and batch, measured
in the same run; the FLOPs-ideal speed-up is 1 / MACs ratio.

Modules: ``timing`` (the shared interleaved timer), ``variants`` (what is compared),
``graphs`` (given graphs, checked against the model's inputs), ``run`` (one profile
run), ``models`` (a run from a model spec, any family), ``report`` (rows, tables),
``pages`` (the published page, results measured in parts), ``plots``.
"""

from mame_export.profile.checks import BACKENDS, check_request
from mame_export.profile.graphs import (
    GraphVariant,
    check_graph_inputs,
    load_graph_variant,
    parse_graph_arg,
)
from mame_export.profile.models import check_variants, profile_model
from mame_export.profile.pages import (
    check_appendable,
    group_key,
    markdown_page,
    merge_results,
    results_record,
    summary_markdown,
    summary_rows,
)
from mame_export.profile.plots import plot, plot_throughput, save_png
from mame_export.profile.report import (
    COLUMNS,
    ProfileReport,
    Row,
    add_speedups,
    cell,
    cpu_name,
    device_name,
    format_markdown,
    format_table,
    markdown_table,
    one_line,
    results_header,
    versions,
)
from mame_export.profile.run import (
    PROFILE_TMP_PREFIX,
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
    input_feeds,
    measure_interleaved,
    summarize,
    throughput,
)
from mame_export.profile.variants import (
    VARIANTS,
    MergeSettings,
    Variant,
    build_variant,
    export_variant,
    family_variants,
    forbidden_census,
)

__all__ = [
    "BACKENDS", "COLUMNS", "PROFILE_TMP_PREFIX", "QUICK", "VARIANTS",
    "GraphVariant", "MergeSettings", "ProfileReport", "Row", "Stats", "TimingSettings",
    "Variant", "add_speedups", "build_variant", "cell", "check_appendable",
    "check_graph_inputs", "check_request", "check_variants", "cpu_name", "default_threads",
    "device_name", "export_variant", "family_variants", "forbidden_census", "format_markdown",
    "format_table", "group_key", "input_feeds",
    "load_graph_variant", "markdown_page", "markdown_table", "measure_interleaved",
    "merge_results", "one_line", "parse_graph_arg", "pin_threads", "plot", "plot_throughput",
    "profile", "profile_model", "results_header", "results_record",
    "save_png", "stderr_log", "summarize", "summary_markdown", "summary_rows", "throughput",
    "time_rows", "versions",
]
