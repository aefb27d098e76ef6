"""A profile request checked before any work: its ratios, backends, batches, precision,
variants, and the given graphs against the model's inputs (one-line UserErrors)."""

from __future__ import annotations

from collections.abc import Sequence

from mame_export.errors import UserError
from mame_export.families import IOSpec
from mame_export.profile.graphs import GraphVariant, check_graph_inputs, check_graph_names
from mame_export.profile.quantized import check_quantized_backends
from mame_export.profile.variants import VARIANTS
from mame_export.runners.factory import (
    EAGER_RUNNERS,
    GRAPH_RUNNERS,
    RUNNER_NAMES,
    check_runner_names,
)
from mame_export.settings import check_batches, check_graph_precision, check_rs

BACKENDS = RUNNER_NAMES


def check_request(
    rs: Sequence[float],
    backends: Sequence[str],
    batches: Sequence[int],
    precision: str,
    variants: Sequence[str],
    graphs_only: bool = False,
    one_session: bool = False,
) -> tuple[list[float], list[str]]:
    """Validate a profile request (UserError with one line); return (rs, backends) cleaned.

    ``graphs_only``: no variant is built, only given graphs are timed (``variants`` must be
    empty, and ``rs`` are not used); ``one_session``: graph backends only."""
    rs = [] if graphs_only else check_rs(rs)
    backends = check_runner_names(backends, BACKENDS, what="backend", flag="--backends")
    check_batches(batches)
    check_graph_precision(precision)
    check_quantized_backends(precision, backends)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or (not variants and not graphs_only):
        raise UserError(f"unknown variant(s) {', '.join(bad) or '(none given)'}; choose from "
                        f"{', '.join(VARIANTS)}")
    if graphs_only and variants:
        raise UserError("--variants none times the given graphs only; it takes no other variant")
    eager = [b for b in backends if b in EAGER_RUNNERS]
    if one_session and eager:
        raise UserError(f"--one-session holds one graph session at a time; it applies to the "
                        f"graph backends ({', '.join(GRAPH_RUNNERS)}), not to "
                        f"{', '.join(eager)} (their models are all in memory anyway)")
    return rs, backends


def check_graphs(graphs: Sequence[GraphVariant], io: IOSpec, batches: Sequence[int],
                 backends: Sequence[str], model_name: str) -> None:
    """Refuse, before any work, given graphs that cannot be timed beside the model."""
    if not graphs:
        return
    check_graph_names(graphs)
    if not any(b in GRAPH_RUNNERS for b in backends):
        raise UserError(f"--graph needs a graph backend ({', '.join(GRAPH_RUNNERS)}) in "
                        f"--backends; got {', '.join(backends)}")
    for batch in batches:
        for g in graphs:
            check_graph_inputs(g, io, batch, model_name)
