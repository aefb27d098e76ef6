"""The registry: every model family, and every model alias they declare.

Adding a family is one subpackage (see :mod:`mame_export.families.base`) and one line in
:data:`FAMILY_MODULES`. Families are imported on first use, so an optional dependency
(diffusers, transformers) is needed only by the family that uses it.
"""

from __future__ import annotations

import difflib
import functools
import importlib

import torch.nn as nn

from mame_export.families.base import (
    Family,
    IOSpec,
    ModelSpec,
    UnknownModelError,
    UnsupportedModelError,
)

FAMILY_MODULES = (
    "mame_export.families.timm_vit",
    "mame_export.families.sd_unet",
    "mame_export.families.transformers",
    "mame_export.families.dit",
)

__all__ = ["Family", "IOSpec", "ModelSpec", "UnknownModelError", "UnsupportedModelError",
           "all_families", "build_model", "family_for_model", "get_family", "registry", "resolve"]


@functools.cache
def all_families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(m).FAMILY for m in FAMILY_MODULES)


def get_family(name: str) -> Family:
    """The family called ``name`` (or one of its aliases)."""
    for fam in all_families():
        if name in fam.names():
            return fam
    raise KeyError(f"no model family {name!r}")


@functools.cache
def registry() -> dict[str, ModelSpec]:
    """alias -> ModelSpec, over every family, in registry order."""
    out: dict[str, ModelSpec] = {}
    for fam in all_families():
        for spec in fam.entries():
            if spec.alias in out:
                raise RuntimeError(f"alias {spec.alias} is declared twice")
            out[spec.alias] = spec
    return out


def resolve(name: str) -> ModelSpec:
    """An alias, or a name a family builds (any timm model name) -> ModelSpec; unknown
    names name the closest ones."""
    reg = registry()
    if name in reg:
        return reg[name]
    for fam in all_families():
        spec = fam.resolve(name)
        if spec is not None:
            return spec
    candidates = list(reg) + [n for fam in all_families() for n in fam.known_names()]
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (aliases: {', '.join(reg)})")


def build_model(spec: ModelSpec, weights: str = "auto",
                img_size: int | None = None) -> tuple[nn.Module, str]:
    """Build ``spec``'s model in eval mode; return it and a description of the weights'
    source. ``weights``: "auto", "random" or a checkpoint path (see Family.build)."""
    return get_family(spec.family).build(spec, weights, img_size)


def family_for_model(model: nn.Module) -> Family:
    """The family whose patch applies to ``model``; TypeError naming what is supported."""
    for fam in all_families():
        if fam.matches(model):
            return fam
    supported = "; ".join(f.summary for f in all_families())
    raise TypeError(f"MaMe does not support {type(model).__module__}.{type(model).__name__}; "
                    f"supported: {supported}")
