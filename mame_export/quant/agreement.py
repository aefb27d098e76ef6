"""Selection agreement: the fraction of merges in which a quantized graph picks the same
tokens as the fp32 graph it was made from, on the same inputs.

Both graphs run in ONNX Runtime with their decision tensors as extra outputs
(:mod:`mame_export.runners.decisions`); a decision belongs to the merge whose name scope
its comparison node carries (:func:`mame_export.quant.scope.merge_scope_of`). Only a
merge's *final* decisions are compared: those no other comparison of the same merge reads.
They are the one-hot selection (which candidates merge, in which order) and each merged
token's target (``sim == best``); the rank comparisons before them only order candidates
within a side, which the stable order discards (:func:`mame_export.ops.mame.stable_order`),
so two runs that order two kept tokens differently still merge the same tokens. A merge
(one sample, one merging block) agrees when all its final decisions do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mame_export.quant.scope import merge_scope_of
from mame_export.runners.decisions import graph_decisions, merge_agreement
from mame_export.runners.factory import make_runner


def final_decisions(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Those of ``names`` (decision tensors) whose values reach no other comparison of
    their own merge scope (see the module docstring)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    producer = {o: n for n in model.graph.node for o in n.output}
    decided = set(names)
    out = []
    for name in names:
        scope = merge_scope_of(producer[name])
        todo, seen, final = [name], {name}, True
        while todo and final:
            for node in consumers.get(todo.pop(), []):
                if merge_scope_of(node) != scope:
                    continue
                if any(o in decided for o in node.output):
                    final = False
                    break
                for o in node.output:
                    if o not in seen:
                        seen.add(o)
                        todo.append(o)
        if final:
            out.append(name)
    return out


def token_states(merged: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample and candidate (B, Na): -1 if kept, else the index of the target it merges
    into. ``merged`` (B, Na): ``rank < n_merge``; ``targets`` (B, Nb, n_merge): ``sim ==
    best`` over the merged candidates in their original order (first best on a tie)."""
    states = np.full(merged.shape, -1, dtype=np.int64)
    for b in range(merged.shape[0]):
        where = np.flatnonzero(merged[b])
        if len(where) == targets.shape[2]:
            states[b, where] = targets[b].argmax(axis=0)
        else:  # not a merge step's pair: every candidate counts as different
            states[b] = -2
    return states


def selection_agreement(fp32_graph: Path, quantized_graph: Path,
                        feeds: Sequence[dict[str, np.ndarray]], threads: int | None = None
                        ) -> dict[str, Any]:
    """How often the quantized graph merges as the fp32 graph does, on ``feeds``:

    - ``tokens``: of every candidate token in every merge step and sample, the fraction
      with the same fate (kept, or merged into the same target): the headline figure;
    - ``merges``: of every (sample, merging block), the fraction in which all final
      decisions agree (one token of ~100 that moves makes the whole merge differ);
    - ``by_block``: the token fraction per merging block, in graph order.

    Decisions pair by tensor name: the quantizer keeps the names of the nodes it leaves
    alone, but may reorder them. ``"error"``: why the runs could not be paired."""
    models = [onnx.load(str(p), load_external_data=False) for p in (fp32_graph, quantized_graph)]
    names = [graph_decisions(m) for m in models]
    node_of = {o: n for n in models[0].graph.node for o in n.output}
    missing = [n for n in names[0] if n not in set(names[1])]
    if missing:
        return {"error": f"{len(missing)} decision tensor(s) of the fp32 graph are not in the "
                         f"quantized one (e.g. {missing[0]})"}
    final = final_decisions(models[0], names[0])
    groups = [merge_scope_of(node_of[n]) or "outside a merge" for n in final]
    # Each step's merged set (its Less: rank < n_merge) pairs with the final decision after it.
    masks = [n for n in names[0] if node_of[n].op_type == "Less"
             and merge_scope_of(node_of[n]) is not None]
    steps = list(zip(masks, final, strict=False)) if len(masks) == len(final) else []
    runs = []
    for path in (fp32_graph, quantized_graph):
        runner = make_runner("onnxrt", onnx_path=path, threads=threads)
        try:
            runs.append([runner.infer_with_decisions(f) for f in feeds])
        finally:
            runner.deactivate()
    same = merges = same_tokens = tokens = 0
    per_step = {mask: [0, 0] for mask, _ in steps}
    for ref, cand, feed in zip(runs[0], runs[1], feeds, strict=True):
        if ref is None or cand is None:
            return {"error": "the runner could not read its merge decisions"}
        ours = [dict(zip(names[0], ref[1], strict=True)),
                dict(zip(names[1], cand[1], strict=True))]
        samples = int(next(iter(feed.values())).shape[0])
        got = merge_agreement([ours[0][n] for n in final], [ours[1][n] for n in final],
                              groups, samples)
        if isinstance(got, str):
            return {"error": got}
        same, merges = same + got[0], merges + got[1]
        for mask, target in steps:
            a, b = (token_states(o[mask], o[target]) for o in ours)
            same_tokens += int((a == b).sum())
            tokens += a.size
            per_step[mask][0] += int((a == b).sum())
            per_step[mask][1] += a.size
    out: dict[str, Any] = {"same": same, "merges": merges,
                           "fraction": same / merges if merges else 1.0}
    if steps:
        out.update(same_tokens=same_tokens, tokens=tokens,
                   token_fraction=same_tokens / tokens if tokens else 1.0,
                   # where disagreement starts: once a merge picks other tokens, every
                   # later block holds other tokens in other places, so it cascades
                   by_block={str(merge_scope_of(node_of[m])).removesuffix(".mame_merge"):
                             round(k / n, 4) if n else 1.0 for m, (k, n) in per_step.items()})
    return out
