"""Class swaps: how every patch (MaMe, and the ToMe baseline) changes a module's forward.

A patched module keeps its object, weights, ``state_dict`` keys and ``isinstance``
checks; only its class becomes a generated subclass ``<prefix><Base>`` of ``(mixin,
Base)``, which records ``Base`` so re-patching and removal find the original class.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from mame_export.plan import BlockSettings

SETTINGS_ATTR = "_block_settings"


@functools.cache
def patched_class(mixin: type, base: type, prefix: str = "MaMe") -> type:
    return type(f"{prefix}{base.__name__}", (mixin, base), {"_unpatched_base": base})


def unpatched_class(module: nn.Module) -> type:
    """The class ``module`` had before any patch."""
    cls = type(module)
    return cls.__dict__.get("_unpatched_base", cls)


def swap(module: nn.Module, mixin: type, prefix: str = "MaMe",
         settings: BlockSettings | None = None) -> None:
    """Give ``module`` the forward of ``mixin`` (replacing an earlier patch) and, for a
    block, its settings."""
    module.__class__ = patched_class(mixin, unpatched_class(module), prefix)
    if settings is not None:
        setattr(module, SETTINGS_ATTR, settings)


def restore(root: nn.Module, *attrs: str) -> nn.Module:
    """Undo every swap below ``root`` and drop the block settings and ``attrs``."""
    for module in root.modules():
        module.__class__ = unpatched_class(module)
        for name in (SETTINGS_ATTR, *attrs):
            module.__dict__.pop(name, None)
    return root


def settings_of(module: nn.Module) -> BlockSettings:
    return getattr(module, SETTINGS_ATTR)
