"""Pure tensor ops: MaMe merging and MaRe restoration. No model knowledge."""

from mame_export.ops.mame import (
    Partition,
    mame_merge,
    mame_step,
    mame_step_adaptive,
    mame_weights,
    mare_restore,
    partition,
)

__all__ = [
    "Partition",
    "mame_merge",
    "mame_step",
    "mame_step_adaptive",
    "mame_weights",
    "mare_restore",
    "partition",
]
