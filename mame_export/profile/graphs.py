"""Graphs exported elsewhere (``--graph NAME=PATH``: merged, unmerged, reduced precision,
from another version), timed as variants beside the ones the profiler exports.

A graph is checked against the model's inputs (its family's IOSpec) at every batch of the
run before anything is timed: the same input names, ranks and sizes, a static batch that
is the batch asked for, float inputs. Its inputs are fed in the graph's own float type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mame_export.errors import UserError
from mame_export.families import IOSpec

# Names the profiler's own variants take: a graph must not be mistaken for one.
RESERVED = ("baseline", "mame", "tome", "tomesd")
_FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # the ONNX element type's name (FLOAT, FLOAT16, ...)
    shape: tuple[int | str | None, ...] | None  # None: the rank is not declared


@dataclass(frozen=True)
class GraphVariant:
    """One ``--graph NAME=PATH``: what is timed, and what its sidecar (if it has its own,
    beside it) says about its plan."""

    name: str
    path: Path
    precision: str
    inputs: tuple[GraphInput, ...]
    forbidden: dict[str, int] = field(default_factory=dict)
    r: float | None = None
    flops_ratio: float | None = None
    gmacs: float | None = None
    final_tokens: int | None = None


def parse_graph_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a one-line UserError otherwise."""
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise UserError(f"--graph takes NAME=PATH (e.g. old=graphs/vit_b_r0.5.onnx); got {text!r}")
    return name, Path(path)


def load_graph_variant(name: str, path: str | Path) -> GraphVariant:
    """Read the graph at ``path`` (inputs, precision, forbidden ops; its sidecar's plan when
    the sidecar records this very file). Unreadable files are one-line UserErrors."""
    from mame_export.artifacts import sha256_file
    from mame_export.graph import graph_inputs, graph_precision, load_graph
    from mame_export.profile.variants import forbidden_census

    path = Path(path)
    model = load_graph(path)
    inputs = tuple(GraphInput(t.name, t.dtype, t.shape if t.ranked else None)
                   for t in graph_inputs(model))
    plan = _sidecar_plan(path, lambda: sha256_file(path))  # the file the sidecar records
    return GraphVariant(
        name, path, graph_precision(model), inputs, forbidden_census(path),
        r=plan.get("r"), flops_ratio=plan.get("flops_ratio"), gmacs=plan.get("gmacs"),
        final_tokens=int(plan["final_patches"]) if "final_patches" in plan else None)


def _sidecar_plan(path: Path, digest: Callable[[], str]) -> dict[str, float]:
    """The plan a mame-export sidecar beside ``path`` records, if it is this graph's own
    (its ``onnx_sha256`` matches); else {}: a graph is timed without one."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or not isinstance(meta.get("plan"), dict):
        return {}
    if meta.get("onnx_sha256") != digest():
        return {}
    plan = meta["plan"]
    return {k: float(plan[k]) for k in ("r", "flops_ratio", "gmacs", "final_patches")
            if isinstance(plan.get(k), (int, float)) and not isinstance(plan.get(k), bool)
            and math.isfinite(plan[k])}


def check_graph_names(graphs: Sequence[GraphVariant]) -> None:
    """Each NAME once, and none of the profiler's own variant names."""
    seen: set[str] = set()
    for g in graphs:
        if g.name in RESERVED:
            raise UserError(f"--graph {g.name}={g.path}: {g.name!r} names one of the profiler's "
                            f"own variants ({', '.join(RESERVED)}); pick another NAME")
        if g.name in seen:
            raise UserError(f"--graph {g.name}=...: the NAME {g.name!r} is given twice")
        seen.add(g.name)


def model_input_shapes(io: IOSpec, batch: int) -> dict[str, tuple[int, ...]]:
    """Input name -> shape the model takes at ``batch`` (from its IOSpec)."""
    arrays = io.make_inputs(batch, torch.Generator().manual_seed(0))
    return {n: tuple(a.shape) for n, a in zip(io.input_names, arrays, strict=True)}


def check_graph_inputs(graph: GraphVariant, io: IOSpec, batch: int, model: str) -> None:
    """A one-line UserError naming the first way ``graph``'s inputs differ from what
    ``model`` takes at ``batch``: names, rank, a size, a static batch, a non-float type."""
    want = model_input_shapes(io, batch)
    where = f"--graph {graph.name}={graph.path}"
    names = [i.name for i in graph.inputs]
    if sorted(names) != sorted(want):
        raise UserError(f"{where}: its inputs are ({', '.join(names) or 'none'}); {model} takes "
                        f"({', '.join(want)})")
    for inp in graph.inputs:
        shape, expected = inp.shape, want[inp.name]
        if inp.dtype not in _FLOAT_TYPES:
            raise UserError(f"{where}: input {inp.name} is {inp.dtype}; {model} takes float "
                            "inputs")
        if shape is None:  # the rank is not declared: anything goes
            continue
        if len(shape) != len(expected):
            raise UserError(f"{where}: input {inp.name} has rank {len(shape)} {_dims(shape)}; "
                            f"{model} takes rank {len(expected)} {_dims(expected)}")
        if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
            raise UserError(f"{where}: input {inp.name} has a static batch of {shape[0]}, the "
                            f"run asks for batch {batch} (export it at that batch or with "
                            "--dynamic-batch, or drop that --batch)")
        for axis, (got, exp) in enumerate(zip(shape, expected, strict=True)):
            if isinstance(got, int) and got > 0 and got != exp:
                raise UserError(f"{where}: input {inp.name} is {_dims(shape)}; {model} at batch "
                                f"{batch} takes {_dims(expected)} (axis {axis} differs)")


def _dims(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
