"""The merge decisions of one run, read the same way from an ONNX graph and from eager PyTorch.

Which tokens a MaMe step merges is decided by comparisons on the data
(:mod:`mame_export.ops.mame`): a comparison matrix of redundancy scores ranks the
candidates, ``rank < n_merge`` picks the merged ones and ``sim == best`` each one's
target. A parity check may excuse a sample that is off the element bound as a
*selection flip* only where such a decision really differs between two runs, so both
sides expose the same tensors, by one rule:

- a graph's decisions are the outputs of its comparison nodes (Less, Greater, Equal,
  LessOrEqual, GreaterOrEqual) on floating-point inputs, in graph order (the exporter
  keeps the program's order and folds comparisons of constants away);
- eager PyTorch's are the results of its comparison ops (lt, gt, eq, le, ge) on
  floating-point tensors during one forward pass, in the order they ran.

The two lists pair by position. Where their counts or shapes differ (another model, a
graph edited by hand), they cannot be paired and no sample passes as a flip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch.overrides import TorchFunctionMode

GRAPH_COMPARISONS = ("Less", "Greater", "Equal", "LessOrEqual", "GreaterOrEqual")
# torch's names of the same comparisons (functions, methods and operators); `ne` is left
# out, as the exporter writes it as Not(Equal), which the graph side does not read.
TORCH_COMPARISONS = frozenset({
    "lt", "gt", "eq", "le", "ge", "less", "greater", "less_equal", "greater_equal",
    "__lt__", "__gt__", "__eq__", "__le__", "__ge__",
})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type that the graph declares or shape inference finds."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - without inference, only the declared types count
        graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def graph_decisions(model: onnx.ModelProto) -> list[str]:
    """The names of a graph's decision tensors (see the module docstring), in graph order.

    A comparison whose input type is unknown counts: reading one too many makes the lists
    unpairable, which refuses flips rather than excusing one."""
    types = _element_types(model)
    return [node.output[0] for node in model.graph.node
            if node.op_type in GRAPH_COMPARISONS and node.domain in ("", "ai.onnx")
            and types.get(node.input[0], onnx.TensorProto.FLOAT) in _FLOAT_TYPES]


def with_decision_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are its own, then its decision tensors."""
    names = graph_decisions(model)
    copied = copy.deepcopy(model)
    declared = {o.name for o in copied.graph.output}
    for name in names:
        if name not in declared:
            copied.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    return copied, names


class DecisionRecorder(TorchFunctionMode):
    """Records eager PyTorch's decisions (see the module docstring) while it is active:
    ``with DecisionRecorder() as rec: model(x)``, then ``rec.decisions``."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[torch.Tensor] = []

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        first = args[0] if args else None
        if (getattr(func, "__name__", "") in TORCH_COMPARISONS
                and isinstance(out, torch.Tensor) and out.dtype == torch.bool
                and isinstance(first, torch.Tensor) and first.is_floating_point()):
            self.decisions.append(out.detach())
        return out


def per_sample_differences(reference: Sequence[np.ndarray], other: Sequence[np.ndarray],
                           samples: int) -> np.ndarray | str:
    """For each of ``samples`` samples, whether any of its decisions differs between two
    runs; or, where the lists cannot be paired, one line saying why."""
    if len(reference) != len(other):
        return (f"the graph makes {len(other)} data-dependent comparisons, eager PyTorch "
                f"{len(reference)}")
    differs = np.zeros(samples, dtype=bool)
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        if a.shape != b.shape:
            return (f"comparison {i} has shape {list(b.shape)} in the graph and "
                    f"{list(a.shape)} in eager PyTorch")
        if a.ndim == 0 or a.shape[0] != samples:
            return f"comparison {i} (shape {list(a.shape)}) has no axis of {samples} sample(s)"
        differs |= (a != b).reshape(samples, -1).any(axis=1)
    return differs


def merge_agreement(reference: Sequence[np.ndarray], other: Sequence[np.ndarray],
                    groups: Sequence[str], samples: int) -> tuple[int, int] | str:
    """How many merges pick the same tokens in two runs of graphs that pair (an fp32 graph
    and its quantized form): ``(same, merges)``, a merge being one sample in one group of
    decisions (``groups[i]`` names the merge that decision ``i`` belongs to, e.g. its
    block's merge scope) and the same when every decision of it agrees; or, where the
    lists cannot be paired, one line saying why."""
    if not len(reference) == len(other) == len(groups):
        return (f"{len(reference)} and {len(other)} decisions in the two runs, "
                f"{len(groups)} groups")
    names = list(dict.fromkeys(groups))
    differs = np.zeros((samples, len(names)), dtype=bool)
    for i, (a, b, g) in enumerate(zip(reference, other, groups, strict=True)):
        if a.shape != b.shape or a.ndim == 0 or a.shape[0] != samples:
            return f"decision {i} has shapes {list(a.shape)} and {list(b.shape)}"
        differs[:, names.index(g)] |= (a != b).reshape(samples, -1).any(axis=1)
    return int((~differs).sum()), int(differs.size)
