"""What several test files share: running the command line and reading its one-line errors,
tiny ONNX graphs, tiny models, PNG files. Shared fixtures are in conftest.py.

Imported as ``from helpers import ...``: pytest puts tests/ on sys.path (rootdir-relative,
no package), as it does for conftest.py, which is never imported by hand.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
# The tiny timm ViT the reliability tests export: 32 px, 4 patches, random weights.
TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--weights", "random"]
# The optional package each family needs: an alias of a family without it is skipped.
FAMILY_NEEDS = {"sd-unet": "diffusers", "transformers": "transformers", "dit": "diffusers"}


# ---------------------------------------------------------------- the command line


def run_main(*args: str) -> tuple[int, str, str]:
    """main() in this process, with its stdout and stderr."""
    from mame_export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def export_args(out: Path, *extra: str) -> list[str]:
    """An export of the TINY ViT to ``out``: one parity batch, seed 0."""
    return [*TINY, "--out", str(out), "--parity-batches", "1", "--seed", "0", *extra]


def vit_t_export_args(out: Path) -> list[str]:
    """An export of vit_t at 224 px (r=0.5, random weights, one parity batch) to ``out``."""
    return ["vit_t", "--r", "0.5", "--weights", "random", "--out", str(out),
            "--parity-batches", "1"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a command line run in a child process: offline, this checkout."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mame_export ARGS`` in a child process."""
    return subprocess.run([sys.executable, "-m", "mame_export", *args], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(), cwd=REPO)


def one_line_error(err: str, needle: str = "", alone: bool = False) -> str:
    """The one ``mame-export:`` line of ``err``, holding ``needle``; no traceback, no colour.
    ``alone``: that line is all of ``err``."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("mame-export:")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "\x1b" not in err
    if alone:
        assert len(err.strip().splitlines()) == 1, err
    return lines[0]


def cli_error(*args: str, code: int = 2, alone: bool = False) -> str:
    """main(ARGS) exits with ``code`` and one error line (see one_line_error): that line."""
    rc, _, err = run_main(*args)
    assert rc == code, err
    return one_line_error(err, alone=alone)


# ---------------------------------------------------------------- tiny ONNX graphs


def vi(name: str, shape: list | None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def int64s(name: str, values: list[int], shape: list[int] | None = None) -> onnx.TensorProto:
    """An int64 tensor of ``values`` (1-D unless ``shape`` says otherwise, [] a scalar)."""
    return helper.make_tensor(name, TensorProto.INT64, [len(values)] if shape is None else shape,
                              values)


def onnx_model(nodes, inputs, outputs, inits=(), functions=(), opset: int = 18,
               domains=()) -> onnx.ModelProto:
    """A graph of ``nodes`` at ``opset``; ``domains`` ((name, version) pairs) are imported,
    and so is each model-local function's domain (at version 1)."""
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in domains)]
    named = {d for d, _ in domains}
    for f in functions:
        if f.domain not in named:
            named.add(f.domain)
            imports.append(helper.make_opsetid(f.domain, 1))
    return helper.make_model(g, opset_imports=imports, functions=list(functions), ir_version=10)


# ---------------------------------------------------------------- tiny models and images


def registry_params(llava: bool = False) -> list:
    """One pytest.param per registry alias, skipped where its family's package is missing.
    ``llava``: params (alias, llava), with a LLaVA one for clip_l336 as well."""
    from mame_export.families import get_family, registry

    out = []
    for alias, spec in registry().items():
        dep = FAMILY_NEEDS.get(spec.family)
        mark = pytest.mark.skipif(dep is not None and importlib.util.find_spec(dep) is None,
                                  reason=f"{spec.family} needs {dep}")
        if not llava:
            out.append(pytest.param(alias, id=alias, marks=mark))
            continue
        out.append(pytest.param(alias, False, id=alias, marks=mark))
        if "llava" in get_family(spec.family).capabilities and alias == "clip_l336":
            out.append(pytest.param(alias, True, id=f"{alias}-llava", marks=mark))
    return out


def tiny_model(alias: str, **kwargs):  # noqa: ANN201 - (Family, ModelSpec)
    """The family of registry alias ``alias`` and its tiny spec, with builder ``kwargs``."""
    from mame_export.families import get_family, registry
    from mame_export.families.base import with_kwargs

    spec = registry()[alias]
    family = get_family(spec.family)
    spec = family.tiny(spec)
    return family, with_kwargs(spec, spec.alias, **kwargs) if kwargs else spec


def tiny_vit(**kw):  # noqa: ANN201 - a timm VisionTransformer
    """A seeded 32 px timm ViT of 4 px patches (64 patches), 4 blocks 32 wide, in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    return VisionTransformer(**{**args, **kw}).eval()


def write_png(path: Path, pixels: int | np.ndarray = 0, size: tuple[int, int] = (8, 8)) -> None:
    """An RGB PNG at ``path`` (folders made): ``pixels`` as an (H, W, 3) array, or one grey
    value over ``size``."""
    from PIL import Image

    if np.isscalar(pixels):
        pixels = np.full((*size, 3), pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels).astype(np.uint8)).save(path)
