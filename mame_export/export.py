"""PyTorch -> ONNX: static token shapes, static or dynamic batch, written atomically
(through :mod:`mame_export.artifacts`)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export import settings
from mame_export.artifacts import atomic_dir_write, sha256_file
from mame_export.errors import ExportError, UserError
from mame_export.quant.scope import merge_scopes

# Protobuf caps a single serialized model at 2 GiB; above this, weights go to a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000
# The torch dtype of each precision name (the names' one home: settings.PRECISIONS).
DTYPES = dict(zip(settings.PRECISIONS, (torch.float32, torch.float16, torch.bfloat16),
                  strict=True))
# Quantized graphs are exported in fp32, then quantized (mame_export.quant).
DTYPES.update(dict.fromkeys(settings.QUANTIZED_PRECISIONS, torch.float32))
PRECISIONS = DTYPES  # the earlier name


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    seconds: float
    external_data: bool
    bytes: int
    exporter: str
    opset: int | None = None  # the default-domain opset the saved graph declares


class _Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 inside a reduced-precision graph (Cast in, Cast out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def reduced_precision_copy(
    model: nn.Module, dtype: torch.dtype, fp32_norms: bool = True
) -> nn.Module:
    """A copy of ``model`` in ``dtype`` for export; LayerNorms stay fp32 when ``fp32_norms``.

    MaMe's own weight computation and token sizes are float32 in every precision
    (see ``mame_export.ops``), so the precision that lands in the graph is: matmuls,
    convolutions, activations and softmax in ``dtype``; merge weights, sizes and,
    by default, normalisations in float32.
    """
    out = copy.deepcopy(model).to(dtype)
    if fp32_norms:
        for m in out.modules():
            if isinstance(m, nn.LayerNorm):
                m.__class__ = _Fp32LayerNorm
    return out


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _quiet() -> contextlib.AbstractContextManager:
    """Silence the exporter's own chatter (it prints progress to stdout)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    # The exporter and onnxscript's version converter log warnings with tracebacks
    # (e.g. a conversion they could not do); the outcome is checked on the saved graph.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, previous)
    return stack


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] = ("pixels",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = False,
    opset: int = 18,
    max_batch: int = 4096,
) -> ExportResult:
    """Export ``model`` to ``path`` with the dynamo exporter (fixed token shapes).

    Written atomically: the graph (and its ``.data`` side file when the weights
    exceed protobuf's 2 GB limit) appears only when complete.
    """
    from mame_export.graph import graph_opset  # onnx: loaded only when a graph is made

    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"output graph must end in .onnx: {path}")
    external = param_bytes(model) > EXTERNAL_DATA_BYTES
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    t0 = time.perf_counter()
    with atomic_dir_write(path.parent) as tmp:
        tmp_path = tmp / path.name
        try:
            # The merge runs under its name scope, which the exporter records on each
            # node (mame_export.quant.scope: how int8 keeps the merge in fp32).
            with _quiet(), torch.inference_mode(False), torch.no_grad(), \
                    merge_scopes(model):
                program = torch.onnx.export(
                    model.eval(),
                    tuple(example_inputs),
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                    external_data=external,
                    optimize=True,
                    verbose=False,
                )
                if program is None:  # only when dynamo=False, which we never use
                    raise ExportError("the exporter returned no program")
                program.save(str(tmp_path), external_data=external)
        except UserError:
            raise
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - exporter failures become one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {msg[:300]}") from e
        digest = sha256_file(tmp_path)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        written = graph_opset(tmp_path)
        if written != opset:
            raise ExportError(f"the exporter wrote an opset-{written} graph for --opset {opset}; "
                              "use an opset it can target (see --help)")
    return ExportResult(path, digest, time.perf_counter() - t0, external, size,
                        "torch.onnx dynamo", written)
