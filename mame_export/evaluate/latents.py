"""UNet ``eval`` data: a flat folder of latent tensors, streamed in batches.

Each file is ``.npy`` (read with ``allow_pickle=False``: a pickle is never run) or
``.safetensors`` (its one tensor, or the one named ``latents``), of shape (C, H, W) for
one latent or (N, C, H, W) for N. A file's shape is read from its header and checked
before its data is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mame_export.errors import one_line
from mame_export.evaluate.files import (
    IMAGE_SUFFIXES,
    DataError,
    check_folder,
    scan,
    with_suffix_in,
)
from mame_export.settings import is_int

LATENT_SUFFIXES = (".npy", ".safetensors")


def find_latents(root: str | Path, limit: int | None = None) -> tuple[Path, ...]:
    """The latent files directly in ``root``, sorted by name; ``limit`` keeps the first N.
    A folder of images instead is refused in one line (a UNet's eval input is latents)."""
    root = Path(root)
    if limit is not None and not (is_int(limit) and limit >= 1):
        raise DataError(f"--limit must be an integer >= 1; got {limit!r}")
    check_folder(root, "latents (.npy, .safetensors)")
    dirs, files = scan(root)
    latents = with_suffix_in(files, LATENT_SUFFIXES)
    if latents:
        return tuple(latents[:limit])
    images = with_suffix_in(files, IMAGE_SUFFIXES)
    if not images:
        images = next((with_suffix_in(scan(d)[1], IMAGE_SUFFIXES) for d in dirs[:1]), [])
    if images:
        raise DataError(f"eval of a UNet takes latents (.npy/.safetensors), not images: "
                        f"{root} holds {images[0].name}, ...; encode the images with the "
                        "model's VAE and save one latent per file")
    raise DataError(f"no latents in {root} (looked for {', '.join(LATENT_SUFFIXES)} files "
                    "directly in it)")


def load_latents(
    paths: Sequence[Path], batch: int, expected_shape: Sequence[int]
) -> Iterator[torch.Tensor]:
    """float32 batches of shape (batch, *expected_shape) (the last one may be shorter), as a
    stream: at most one file and one batch are held at a time. ``expected_shape`` is one
    latent's (C, H, W). A file of another shape, or with NaN/inf, is one DataError naming
    it."""
    if not (is_int(batch) and batch >= 1):
        raise DataError(f"--batch must be an integer >= 1; got {batch!r}")
    return _latent_batches(paths, batch, tuple(int(s) for s in expected_shape))


def _latent_batches(paths: Sequence[Path], batch: int,
                    expected: tuple[int, ...]) -> Iterator[torch.Tensor]:
    buf: list[torch.Tensor] = []
    for path in paths:
        for latent in _read(Path(path), expected):
            buf.append(latent)
            if len(buf) == batch:
                yield torch.stack(buf)
                buf = []
    if buf:
        yield torch.stack(buf)


def _read(path: Path, expected: tuple[int, ...]) -> torch.Tensor:
    """The file's latents as an (N, *expected) float32 tensor."""
    try:
        if path.suffix.lower() == ".npy":
            tensor = _read_npy(path, expected)
        else:
            tensor = _read_safetensors(path, expected)
    except DataError:
        raise
    # numpy and safetensors raise ValueError, OSError, EOFError, ... for a corrupt file.
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read latent {path}: {one_line(str(e)) or type(e).__name__}") \
            from None
    if not tensor.is_floating_point():
        raise DataError(f"latent {path} has dtype {tensor.dtype}; latents are floats")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"latent {path} holds NaN or infinite values")
    return tensor if tensor.dim() == len(expected) + 1 else tensor.unsqueeze(0)


def _check_shape(path: Path, shape: Sequence[int], expected: tuple[int, ...]) -> None:
    shape = tuple(shape)
    if shape != expected and not (len(shape) == len(expected) + 1 and shape[1:] == expected
                                  and shape[0] >= 1):
        want = ", ".join(map(str, expected))
        raise DataError(f"latent {path} has shape {shape}; the UNet takes ({want}) or "
                        f"(N, {want})")


def _read_npy(path: Path, expected: tuple[int, ...]) -> torch.Tensor:
    import numpy as np

    # mmap: the header's shape is checked before the data is read into memory.
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    _check_shape(path, array.shape, expected)
    if array.dtype.kind != "f":
        raise DataError(f"latent {path} has dtype {array.dtype}; latents are floats")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _read_safetensors(path: Path, expected: tuple[int, ...]) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if len(keys) == 1:
            key = keys[0]
        elif "latents" in keys:
            key = "latents"
        else:
            raise DataError(f"latent {path} holds tensors {keys[:5]}; give it one tensor, or "
                            "name the latents 'latents'")
        _check_shape(path, f.get_slice(key).get_shape(), expected)
        return f.get_tensor(key)
