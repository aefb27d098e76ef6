"""Weights for every family: checkpoint files (safetensors or torch), strict key checks,
the seeded random init, the hub probe, and a fingerprint of a model's weights.

Below all families: each family's ``build`` reads its checkpoints through here.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from mame_export.errors import CheckpointError, check_file, one_line, warn

# Random weights are drawn from a fixed seed so a graph's eager reference can be rebuilt.
RANDOM_INIT_SEED = 0
RANDOM_SOURCE = f"random init (seed {RANDOM_INIT_SEED})"

T = TypeVar("T")


def seeded(build: Callable[[], T], seed: int = RANDOM_INIT_SEED) -> T:
    """``build()`` with the CPU random generator seeded, leaving the global state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or ``host`` does not answer within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_file(hub_id: str, filenames: Sequence[str]) -> str | None:
    """The first of ``filenames`` that the local hub cache holds for ``hub_id``, if any
    (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        path = try_to_load_from_cache(hub_id, name)
        if isinstance(path, str):
            return path
    return None


def warn_random(reason: str) -> None:
    """The warning every family gives when "auto" weights fall back to random ones."""
    warn(reason)
    warn("using RANDOM weights: parity and latency are valid, predictions are not "
         "(pass --weights PATH to use a local checkpoint)")


def error_detail(e: BaseException, limit: int = 200) -> str:
    """A library's error as one short line (its type named when the text alone says little)."""
    text = one_line(str(e))
    detail = f"{type(e).__name__}: {text}" if len(text) < 20 else text
    if len(detail) > limit:
        detail = detail[:limit - 3].rsplit(" ", 1)[0] + " ..."
    return detail


def _checkpoint_format(p: Path) -> str:
    """'safetensors' or 'torch' from the file's first bytes (not its name); a one-line
    CheckpointError saying what the file is when it is neither."""
    try:
        with open(p, "rb") as f:
            head = f.read(16)
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    if head[8:9] == b"{" and 2 <= n <= size - 8:  # header length, then JSON
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip / legacy pickle
        return "torch"
    if not head:
        what = "it is empty (0 bytes)"
    elif head[8:9] == b"{" and n > size - 8:
        what = f"a truncated safetensors file (its header needs {n} bytes, the file has {size})"
    else:
        what = f"not a safetensors or torch file (it starts with {head!r})"
    raise CheckpointError(f"cannot read checkpoint {p}: {what}")


def _low_precision_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if str(v.dtype).startswith(("torch.float8", "torch.float4"))]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a torch state dict (weights_only), unwrapping common wrappers."""
    p = check_file(path, "checkpoint", CheckpointError)
    fmt = _checkpoint_format(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "safetensors":
                from safetensors.torch import load_file

                obj: Any = load_file(str(p), device="cpu")
            else:
                # An open file, not its name: torch.load reads a *.safetensors name as one.
                with open(p, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(
                f"refused to load checkpoint {p}: it holds Python objects besides tensors, "
                "and loading those could run code; re-save it as a plain state dict or as "
                "safetensors"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {p} (not a readable safetensors or "
                              f"torch file): {error_detail(e)}") from None
    for key in ("state_dict", "model", "model_ema", "module", "params"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors")
    no_data = [k for k, v in obj.items() if v.is_meta]
    if no_data:
        raise CheckpointError(f"checkpoint {p} holds {len(no_data)} meta tensor(s) without "
                              f"values (e.g. {no_data[0]}); save it from a model with real weights")
    odd = [k for k, v in obj.items() if v.layout != torch.strided]
    if odd:
        raise CheckpointError(f"checkpoint {p} holds {len(odd)} sparse or other non-dense "
                              f"tensor(s) (e.g. {odd[0]}); save dense tensors")
    low = _low_precision_keys(obj)
    if low:
        # Refused, not upcast: such checkpoints come quantized with scales (weight_scale ...)
        # that a plain upcast ignores, and an fp32 graph of them would claim weights it lacks.
        kind = str(obj[low[0]].dtype).replace("torch.", "")
        raise CheckpointError(
            f"checkpoint {p} holds {len(low)} {kind.split('_')[0]} tensor(s) (e.g. {low[0]} "
            f"is {kind}); quantized weights are not supported: use a float32, float16 or "
            "bfloat16 checkpoint")
    for pre in ("module.", "model."):
        if obj and all(k.startswith(pre) for k in obj):
            obj = {k[len(pre):]: v for k, v in obj.items()}
    return dict(obj)


def _dtype_kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "bool" if t.dtype == torch.bool else "integer"


def check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], source: object) -> None:
    """One-line CheckpointError if ``sd`` does not fit ``model`` exactly: missing,
    unexpected or mis-shaped keys (a few named), or tensors of another dtype kind."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}: " + ", ".join(parts)
        )
    kinds = [(k, sd[k].dtype, _dtype_kind(v)) for k, v in own.items()
             if _dtype_kind(sd[k]) != _dtype_kind(v)]
    if kinds:
        k, got, want = kinds[0]
        raise CheckpointError(
            f"checkpoint {source} holds {len(kinds)} tensor(s) of the wrong dtype for "
            f"{type(model).__name__} (e.g. {k} is {str(got).replace('torch.', '')}; "
            f"the model needs a {want} tensor)"
        )


def load_state(model: nn.Module, sd: Mapping[str, torch.Tensor], source: object,
               assign: bool = False) -> None:
    """Load ``sd`` strictly after :func:`check_keys`; warns on non-finite values.
    ``assign``: take the tensors as they are (a model built on the meta device)."""
    check_keys(model, sd, source)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warn(f"checkpoint {source} holds NaN or infinite values in {len(bad)} tensor(s) "
             f"(e.g. {bad[0]}): the model's outputs will not be finite")
    model.load_state_dict(dict(sd), strict=True, assign=assign)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint file strictly; mismatches name a few of the offending keys."""
    load_state(model, read_state_dict(path), path)


def state_dict_sha256(model: nn.Module) -> str:
    """A fingerprint of the weights (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
