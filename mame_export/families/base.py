"""What a model family declares, once: its names, how to build a model at an image size
and load its weights, its graph's inputs and outputs, and its patch.

A family is one subpackage of :mod:`mame_export.families` holding a :class:`Family`
instance named ``FAMILY``; the registry (``families/__init__.py``) lists it in one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError


class UnknownModelError(UserError):
    """The model name is neither an alias nor a name a family can build."""


class UnsupportedModelError(UserError):
    """A model MaMe cannot patch, or this tool cannot export, at these settings."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: alias -> source name (with pretrained tag), family, input size."""

    alias: str
    source_name: str
    family: str
    img_size: int
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to the family's builder
    default_batch: int = 1


@dataclass(frozen=True)
class IOSpec:
    """What a family's graph takes and returns."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    """(batch, generator) -> fresh random inputs, float32, never all zeros."""
    class_scores: bool = True
    """The outputs are class scores: reduced-precision parity also checks top-1 agreement.
    False for dense outputs (noise predictions, hidden states), where top-1 means nothing."""


class Family:
    """Base class of a model family; subclasses override what they support.

    ``capabilities`` names the commands beyond export/plan/parity that the family's
    models work with: ``"eval"`` (a classifier judged on labelled images), ``"profile"``
    (image-input latency variants) and ``"tome"`` (the ToMe baseline applies).
    """

    name: str = ""
    aliases: tuple[str, ...] = ()  # other names of the family (e.g. its plan's name)
    summary: str = ""  # what the family covers, for error messages
    patch_module: str = ""  # dotted name of the module with matches/apply/build_plan
    capabilities: frozenset[str] = frozenset()

    def entries(self) -> list[ModelSpec]:
        """The registry aliases of this family."""
        return []

    def resolve(self, name: str) -> ModelSpec | None:
        """A spec for a name outside the registry that this family builds, else None."""
        return None

    def known_names(self) -> list[str]:
        """Names beyond the registry that :meth:`resolve` accepts, for "closest" hints."""
        return []

    def skeleton(self, spec: ModelSpec, img_size: int | None = None) -> nn.Module | None:
        """The model's modules without weights (meta device), or None when that is not
        cheap: lets structure checks run before anything is built or downloaded."""
        return None

    def check(self, model: nn.Module, name: str, img_size: int | None, export: bool) -> None:
        """One-line UnsupportedModelError for a model of this family MaMe cannot patch or
        export at ``img_size``."""

    def build(self, spec: ModelSpec, weights: str, img_size: int | None) -> tuple[nn.Module, str]:
        """The model in eval mode and where its weights came from. ``weights``: "auto"
        (hub or its cache, else seeded random with a warning), "random", or a path."""
        raise NotImplementedError

    def io_spec(self, spec: ModelSpec, model: nn.Module, img_size: int | None) -> IOSpec:
        raise NotImplementedError

    def patch_options(self, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
        """Family-only keyword arguments for ``apply`` (e.g. a UNet's latent size)."""
        return {}

    def tiny(self, spec: ModelSpec) -> ModelSpec:
        """A small random-weight model of the same kind, for the shared test contract."""
        raise NotImplementedError

    def patch(self) -> ModuleType:
        return importlib.import_module(self.patch_module)

    def matches(self, model: nn.Module) -> bool:
        try:
            return bool(self.patch().matches(model))
        except ImportError:  # an optional dependency is missing: not this family's model
            return False

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def with_kwargs(spec: ModelSpec, alias: str, **kwargs: Any) -> ModelSpec:
    """``spec`` under another alias with its builder keywords updated."""
    return replace(spec, alias=alias, kwargs={**spec.kwargs, **kwargs})
