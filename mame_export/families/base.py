"""What a model family declares, once: its names, how to build a model at an image size
and load its weights, its graph's inputs and outputs, and its patcher.

A family is one subpackage of :mod:`mame_export.families` holding a :class:`Family`
instance named ``FAMILY``; the registry (``families/__init__.py``) lists it in one line.
Its patcher (a :class:`Patcher`, in the family's ``patch.py``) applies MaMe and answers
the plan builder's questions (:func:`mame_export.plan.build_plan`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from mame_export.errors import UserError
from mame_export.plan import (
    MAX_TOKENS,
    TOKEN_RULE,
    BlockPlan,
    MergePlan,
    Size,
    build_plan,
    default_merge_layers,
    keep_schedule,
)


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


class Patcher(ABC):
    """How MaMe patches one family's models, and the family's hooks into the one plan
    builder (:func:`mame_export.plan.build_plan`, :class:`mame_export.plan.PlanHooks`).

    A patcher imports its optional dependency (timm, diffusers, transformers) inside its
    methods, so holding one costs nothing until a model is patched.
    """

    family: str = ""  # the name its plans carry
    restores: bool = False  # MaRe restores every position after each block (UNets)
    size_option: str = "img_size"  # the keyword of apply/build_plan giving the input size
    # Takes an explicit keep schedule and a similarity (plan files, ``mame-export tune``):
    # the ViT-like families, whose tokens flow from block to block.
    schedules: bool = False

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` is one this patcher patches."""

    @abstractmethod
    def apply(self, model: nn.Module, r: float, *, tau: float, layers: Sequence[int] | None,
              prop_attn: bool, mode: str, **options: Any) -> nn.Module:
        """Patch ``model`` in place at ``r`` (re-applying replaces the plan); return it."""

    def build_plan(self, model: nn.Module, r: float, tau: float = 1.0,
                   layers: Sequence[int] | None = None, prop_attn: bool = True,
                   mode: str = "static", **options: Any) -> MergePlan:
        """The merge plan of ``model`` (patched or not) at these settings; the input size is
        the keyword named :attr:`size_option` (default: the model's own)."""
        size = options.pop(self.size_option, None)
        schedule = options.pop("schedule", None)
        similarity = options.pop("similarity", "size")
        if not self.schedules and (schedule is not None or similarity != "size"):
            raise ValueError(f"merge schedules and similarities (plan files, mame-export tune) "
                             f"apply to ViT-style encoders and classifiers; {self.family} "
                             "models merge by their own plan")
        return build_plan(self, model, r, tau, layers, prop_attn, mode, size,
                          schedule=schedule, similarity=similarity, **options)

    # ---- the plan builder's hooks (plan.PlanHooks) -------------------------------------

    @abstractmethod
    def num_patches(self, model: nn.Module, size: Size | None = None) -> int:
        """Patch tokens at ``size`` (None: the model's own input size)."""

    @abstractmethod
    def depth(self, model: nn.Module) -> int:
        """Blocks a forward runs."""

    @abstractmethod
    def protected(self, model: nn.Module) -> int:
        """Leading tokens that never merge (class, distillation, registers)."""

    @abstractmethod
    def macs(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
             merge_cost: bool, **options: Any) -> int:
        """Analytic MACs of one batch-1 forward running ``blocks``."""

    def block_tokens(self, model: nn.Module, size: Size | None = None) -> list[int]:
        """Mergeable tokens entering each block when nothing merges."""
        return [self.num_patches(model, size)] * self.depth(model)

    def default_layers(self, depth: int) -> list[int]:
        """The merge layers when none are given: the first ``min(8, depth)`` blocks."""
        return default_merge_layers(depth)

    def keep_counts(self, tokens: Sequence[int], r: float,
                    layers: Sequence[int]) -> tuple[int | None, ...]:
        """Per block, the mergeable tokens kept: the compounded schedule
        (:func:`mame_export.plan.keep_schedule`), tokens flowing from block to block."""
        return keep_schedule(tokens[0] if tokens else 0, r, layers, len(tokens))

    def notes(self, model: nn.Module, size: Size | None, blocks: Sequence[BlockPlan],
              **options: Any) -> list[str]:
        """Lines the plan's table adds for this family."""
        return []

    # ---- input size --------------------------------------------------------------------

    def input_step(self, model: nn.Module) -> int:
        """Input sizes are multiples of this (the patch size)."""
        return 1

    def max_input_size(self, model: nn.Module) -> int:
        """The largest square input side (a multiple of :meth:`input_step`) whose blocks
        hold at most :data:`mame_export.plan.MAX_TOKENS` tokens each."""
        step, p = self.input_step(model), self.protected(model)

        def fits(k: int) -> bool:
            return max(self.block_tokens(model, k * step), default=0) + p <= MAX_TOKENS

        lo, hi = 1, math.isqrt(MAX_TOKENS) + 1  # a side of k steps holds >= k * k tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo * step

    def check_input_size(self, model: nn.Module, name: str, size: int | None) -> None:
        """One-line UnsupportedModelError for an input size whose blocks would hold more
        tokens than a plan accepts; runs on a weightless skeleton, before any build."""
        if size is None:
            return
        tokens = max(self.block_tokens(model, size), default=0) + self.protected(model)
        if tokens > MAX_TOKENS:
            raise UnsupportedModelError(
                f"--img-size {size} is too large for {name}: {tokens} tokens per block; "
                f"MaMe plans {TOKEN_RULE}: use --img-size {self.max_input_size(model)} or less")


class Family:
    """Base class of a model family; subclasses override what they support.

    ``capabilities`` names what the family's models have beyond what every family does
    (export, plan, parity, eval, profile): ``"tome"`` (the ToMe baseline applies),
    ``"tomesd"`` (ToMe-SD applies: diffusers UNets), ``"llava"`` (LLaVA's encoder output).
    """

    name: str = ""
    aliases: tuple[str, ...] = ()  # other names of the family (e.g. its plan's name)
    summary: str = ""  # what the family covers, for error messages
    patcher: Patcher  # applies MaMe to the family's models and plans it
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
        export at ``img_size``; every family's check includes the patcher's size bound
        (:meth:`Patcher.check_input_size`)."""
        self.patcher.check_input_size(model, name, img_size)

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

    def matches(self, model: nn.Module) -> bool:
        try:
            return bool(self.patcher.matches(model))
        except ImportError:  # an optional dependency is missing: not this family's model
            return False

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def eval_preprocessing(self, spec: ModelSpec, model: nn.Module,
                           img_size: int | None) -> dict[str, Any] | None:
        """How ``eval`` prepares an image for ``model``: the keyword arguments of
        :func:`mame_export.evaluate.data.transform_from` (mean, std, size, crop_pct,
        interpolation, crop_mode), or None for a model that takes latents, not images.
        A family without it cannot be evaluated."""
        raise UnsupportedModelError(f"eval does not support {self.name} models ({spec.alias}): "
                                    "the family declares no eval preprocessing")


def with_kwargs(spec: ModelSpec, alias: str, **kwargs: Any) -> ModelSpec:
    """``spec`` under another alias with its builder keywords updated."""
    return replace(spec, alias=alias, kwargs={**spec.kwargs, **kwargs})
