"""PyTorch -> ONNX: static token shapes, static or dynamic batch, atomic writes."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.errors import ExportError, UserError

# Protobuf caps a single serialized model at 2 GiB; above this, weights go to a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutputDirError(UserError):
    """The output folder cannot be created or written."""


@dataclass(frozen=True)
class IOSpec:
    """What a family's graph takes and returns (declared once per family)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    """(batch, generator) -> fresh random inputs, float32, never all zeros."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    seconds: float
    external_data: bool
    bytes: int
    exporter: str


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_dir_write(final_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``final_dir``; files written there are moved into
    ``final_dir`` only if the block succeeds (os.replace is atomic per file), and the
    folder is removed in every case, so no half-written artifact is ever left."""
    ensure_writable_dir(final_dir)
    tmp = Path(tempfile.mkdtemp(dir=final_dir, prefix=".tmp-"))
    try:
        yield tmp
        # Side files first, the main file last: a reader never sees a graph
        # whose external data is not in place yet.
        files = sorted(tmp.iterdir(), key=lambda p: p.suffix == ".onnx")
        for f in files:
            os.replace(f, final_dir / f.name)
    except OSError as e:
        if e.errno == 28:
            raise OutputDirError(f"no space left on device while writing to {final_dir}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary file in the same folder and a rename: readers see the
    old file or the whole new one, never a part."""
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == 28:
            raise OutputDirError(f"no space left on device while writing {path}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _quiet() -> contextlib.AbstractContextManager:
    """Silence the exporter's own chatter (it prints progress to stdout)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
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
            with _quiet(), torch.inference_mode(False), torch.no_grad():
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
    return ExportResult(path, digest, time.perf_counter() - t0, external, size, "torch.onnx dynamo")
