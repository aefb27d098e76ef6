"""Methods MaMe is measured against. Not registered with :func:`mame_export.apply`."""

from mame_export.baselines.tome import (
    Matching,
    apply_tome,
    bipartite_soft_matching,
    is_tome_patched,
    merge_wavg,
    tome_plan,
)

__all__ = [
    "Matching",
    "apply_tome",
    "bipartite_soft_matching",
    "is_tome_patched",
    "merge_wavg",
    "tome_plan",
]
