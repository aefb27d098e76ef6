"""``eval --graph PATH``: an exported ONNX graph, run through ONNX Runtime, as one more
variant scored against the eager unmerged model (the accuracy of what is deployed).

The graph must take and return what the family's IO spec says at this input size (else
one line, exit 2); its sidecar, when beside it, must be the graph's own and name the same
model and weights, and gives the row its r and MACs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.evaluate.variants import Batch, Variant
from mame_export.families import IOSpec, ModelSpec


class GraphMismatchError(UserError):
    """The graph does not fit the model eval runs (inputs, outputs, model, weights)."""


def _dims(shape: tuple[Any, ...]) -> str:
    return "[" + ",".join("B" if not isinstance(d, int) or d < 1 else str(d)
                          for d in shape) + "]"


def check_graph_io(model: Any, io: IOSpec, name: str, what: str) -> int | None:
    """Refuse a graph whose inputs or outputs are not the IO spec's (names, order, and
    every dimension after the batch); return its static batch, or None if dynamic."""
    from mame_export.graph import graph_inputs, graph_outputs

    inputs, outputs = graph_inputs(model), graph_outputs(model)
    example = io.make_inputs(1, torch.Generator().manual_seed(0))
    want = [(n, tuple(t.shape[1:])) for n, t in zip(io.input_names, example, strict=True)]
    have = [(t.name, tuple(t.shape[1:])) for t in inputs]
    if have != want:
        shown = ", ".join(f"{n}{_dims(('B', *s))}" for n, s in have)
        needed = ", ".join(f"{n}{_dims(('B', *s))}" for n, s in want)
        raise GraphMismatchError(f"graph {name} takes {shown or 'no inputs'}; {what} takes "
                                 f"{needed}: export the graph for this model and size")
    got = tuple(t.name for t in outputs)
    if got != tuple(io.output_names):
        raise GraphMismatchError(f"graph {name} returns {', '.join(got)}; {what} returns "
                                 f"{', '.join(io.output_names)} (another --llava setting?)")
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return batch if isinstance(batch, int) and batch > 0 else None


class GraphModel:
    """A graph in ONNX Runtime as a callable on torch tensors; a static-batch graph gets
    the batch in pieces of its size (the last padded by repeating its last item)."""

    def __init__(self, path: Path, io: IOSpec, batch: int | None,
                 threads: int | None) -> None:
        from mame_export.runners.factory import make_runner

        self.io, self.batch = io, batch
        self.runner = make_runner("onnxrt", onnx_path=path, threads=threads)

    def _infer(self, inputs: Batch) -> tuple[torch.Tensor, ...]:
        feeds = {n: t.numpy() for n, t in zip(self.io.input_names, inputs, strict=True)}
        outs = self.runner.infer(feeds)
        return tuple(torch.from_numpy(np.asarray(outs[n])) for n in self.io.output_names)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(inputs[0])
        if self.batch is None or self.batch == n:
            return self._infer(inputs)
        pieces = []
        for i in range(0, n, self.batch):
            part = [t[i:i + self.batch] for t in inputs]
            pad = self.batch - len(part[0])
            if pad:
                part = [torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in part]
            pieces.append([o[:self.batch - pad] for o in self._infer(tuple(part))])
        return tuple(torch.cat(p) for p in zip(*pieces, strict=True))


def _sidecar(path: Path, spec: ModelSpec, model: nn.Module) -> dict[str, Any] | None:
    """The graph's sidecar, checked to be its own and of this model and weights; None
    when there is none."""
    from mame_export.artifacts import sha256_file
    from mame_export.checkpoints import state_dict_sha256
    from mame_export.errors import path_problem
    from mame_export.sidecar import read_sidecar

    if path_problem(path.with_suffix(".json")) == "not found":
        return None
    meta, _req = read_sidecar(path)
    if meta.get("onnx_sha256") != sha256_file(path):
        raise GraphMismatchError(f"metadata sidecar {path.with_suffix('.json')} belongs to "
                                 f"another graph (its onnx_sha256 is not {path.name}'s); "
                                 "put the graph's own sidecar beside it, or remove it")
    alias = (meta.get("model") or {}).get("alias")
    if alias != spec.alias:
        raise GraphMismatchError(f"graph {path.name} is of model {alias}; eval runs "
                                 f"{spec.alias}: give eval the graph's model")
    recorded = meta.get("weights_sha256")
    if recorded and recorded != state_dict_sha256(model):
        raise GraphMismatchError(f"graph {path.name} was exported with other weights "
                                 f"({meta.get('weights')}); pass them with --weights PATH")
    return meta


def check_graph(path: str | os.PathLike, spec: ModelSpec, io: IOSpec,
                img_size: int | None) -> int | None:
    """Read the graph at ``path`` (without its weights) and check its inputs and outputs
    against ``io``; its static batch, or None if dynamic."""
    from mame_export.graph import load_graph

    path = Path(path)
    size = img_size or spec.img_size
    return check_graph_io(load_graph(path), io, path.name, f"{spec.alias} at size {size}")


def graph_variant(path: str | os.PathLike, spec: ModelSpec, io: IOSpec, model: nn.Module,
                  img_size: int | None, threads: int | None,
                  notes: list[str]) -> Variant:
    """The graph at ``path`` as a variant named by its file name (see the module doc)."""
    path = Path(path)
    batch = check_graph(path, spec, io, img_size)
    meta = _sidecar(path, spec, model)
    runner = GraphModel(path, io, batch, threads)
    if meta is None:
        notes.append(f"no sidecar beside {path.name}: its r, MACs, model and weights are "
                     "not known or checked")
        return Variant(path.name, "graph", None, runner)
    settings = meta.get("settings") or {}
    precision = settings.get("precision")
    if precision not in (None, "fp32"):
        notes.append(f"{path.name} is an {precision} graph: its row includes the rounding "
                     "of that precision")
    return Variant(path.name, "graph", settings.get("r"), runner, meta.get("plan") or {})
