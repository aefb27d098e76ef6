"""The merge's name scope: how the merge's nodes are found in an exported graph.

The dynamo exporter records, on every ONNX node it writes, the module path it was traced
under (metadata ``pkg.torch.onnx.name_scopes``, e.g. ``['', 'blocks.3', 'blocks.3.mame_merge',
'matmul_2']``). While a model is exported, :func:`merge_scopes` gives each block that merges
(a module with ``_block_settings`` and a ``_merge`` method: timm, transformers and the ToMe
baseline) a parameterless sub-module ``mame_merge`` and routes the block's merge through it,
so every node of the merge (similarities, rank comparisons, one-hot selections, the
prefix-count matmuls with their constant triangular matrix, the weighted sums) carries that
scope. No op is added or removed: the graph is the same, only its metadata says more.

:func:`merge_nodes` is then the rule: a node is the merge's if one of its name scopes ends in
``mame_merge``. The quantizer excludes exactly those, the audit counts them, the tests check
that none is quantized.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import torch.nn as nn

MERGE_SCOPE = "mame_merge"  # the sub-module name that marks the merge
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's node metadata key
# The ops a QDQ graph quantizes here (where TensorRT's explicit quantization puts Q/DQ).
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
MERGE_KEPT = "merge (mame_merge scope: exact selection)"
ATTENTION_KEPT = "activation x activation (attention scores and values)"
# The graph-level metadata key that records --quant-keep's patterns in a QDQ graph, so the
# audit can say why those layers were kept without the command line that made the graph.
KEEP_KEY = "mame_export.quant_keep"


class MergeScope(nn.Module):
    """Calls the function it is given: a named place in the module tree for the merge."""

    def forward(self, merge: Callable[..., Any], *args: Any) -> Any:
        return merge(*args)


def merging_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose merge runs through their own ``_merge`` method."""
    return [m for m in model.modules()
            if hasattr(m, "_block_settings") and callable(getattr(m, "_merge", None))]


@contextlib.contextmanager
def merge_scopes(model: nn.Module) -> Iterator[int]:
    """While active, each merging block's ``_merge`` runs inside its ``mame_merge``
    sub-module; yields how many blocks were scoped. The model is as before afterwards."""
    scoped = []
    for block in merging_blocks(model):
        if MERGE_SCOPE in block._modules:  # already scoped (nested use)
            continue
        block.add_module(MERGE_SCOPE, MergeScope())
        # An instance attribute shadows the class's method for this block only.
        block._merge = functools.partial(block._modules[MERGE_SCOPE], type(block)._merge
                                         .__get__(block))
        scoped.append(block)
    try:
        yield len(scoped)
    finally:
        for block in scoped:
            del block._modules[MERGE_SCOPE]
            del block.__dict__["_merge"]


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The module paths the exporter recorded for ``node`` (empty if none)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            text = prop.value.strip()
            if text.startswith("[") and text.endswith("]"):
                return [s.strip().strip("'\"") for s in text[1:-1].split(",") if s.strip()]
    return []


def merge_scope_of(node: onnx.NodeProto) -> str | None:
    """The merge scope ``node`` belongs to (``blocks.3.mame_merge``), or None."""
    for scope in node_scopes(node):
        if scope == MERGE_SCOPE or scope.endswith("." + MERGE_SCOPE):
            return scope
    return None


def module_path(node: onnx.NodeProto) -> str:
    """The module ``node`` was traced in (``blocks.3.mlp.fc2``; '' if none recorded): the
    innermost name scope, which the exporter follows with the op's own name."""
    scopes = node_scopes(node)
    return scopes[-2] if len(scopes) > 1 else ""


def kept_by_pattern(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """The MatMul/Gemm/Conv nodes outside the merge whose module path matches one of the
    ``fnmatch`` ``patterns`` (``--quant-keep 'blocks.*.mlp.fc2'``), in graph order."""
    return [n.name for n in model.graph.node
            if patterns and n.op_type in QUANTIZED_OPS and merge_scope_of(n) is None
            and any(fnmatch.fnmatchcase(module_path(n), p) for p in patterns)]


def keep_patterns(model: onnx.ModelProto) -> tuple[str, ...]:
    """The --quant-keep patterns a QDQ graph records (none if it records none)."""
    for prop in model.metadata_props:
        if prop.key == KEEP_KEY:
            return tuple(p for p in prop.value.split(",") if p)
    return ()


def merge_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the main graph's nodes that belong to a merge (see the module
    docstring), in graph order."""
    return [n.name for n in model.graph.node if merge_scope_of(n) is not None]


def has_scope_metadata(model: onnx.ModelProto) -> bool:
    """Whether the exporter recorded name scopes in this graph (graphs from other
    exporters, or edited by hand, have none: their merge cannot be found by the rule)."""
    return any(p.key == NAME_SCOPES for n in model.graph.node for p in n.metadata_props)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls outside the merge whose two inputs are both computed (neither an
    initializer nor a Constant): attention's score and value products. They stay in high
    precision: per-tensor INT8 keeps 127 steps of the softmax probabilities' [0, 1], and
    on DINOv2-S the attention output fell to 7-9 dB SQNR (docs/quantization.md)."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and merge_scope_of(n) is None
            and not any(i in constant for i in n.input)]


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """The nodes of a QDQ graph that compute on dequantized inputs (a DequantizeLinear of
    an activation or a weight feeds one of their inputs)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq_out for i in n.input)}


def count_quantized(model: onnx.ModelProto) -> tuple[int, dict[str, int], list[str], int]:
    """(MatMul/Gemm/Conv quantized, kept ones by why, merge nodes quantized, merge nodes)
    of a QDQ graph, read from the graph itself (the audit's numbers)."""
    done = quantized_nodes(model)
    merge = set(merge_nodes(model))
    attention = set(activation_matmuls(model))
    patterns = keep_patterns(model)
    by_pattern = set(kept_by_pattern(model, patterns))
    quantized, kept = 0, {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        if n.name in done:
            quantized += 1
            continue
        why = (MERGE_KEPT if n.name in merge else ATTENTION_KEPT if n.name in attention
               else f"--quant-keep {','.join(patterns)}" if n.name in by_pattern
               else "not quantized by the calibrator")
        kept[why] = kept.get(why, 0) + 1
    return quantized, kept, sorted(done & merge), len(merge)
