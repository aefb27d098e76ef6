"""Pure tensor ops: MaMe merging and MaRe restoration. No model knowledge."""

from mame_export.ops.mame import (
    MergeStep,
    mame_step,
    mame_step_adaptive,
    mame_weights,
    mare_restore,
    merge_weights,
    redundancy_ranks,
    selection_matrix,
    size_aware_similarity,
    stable_order,
    step_macs,
)
from mame_export.ops.partition import Partition, mame_merge, mare_restore_partition, partition

__all__ = [
    "MergeStep",
    "Partition",
    "mame_merge",
    "mame_step",
    "mame_step_adaptive",
    "mame_weights",
    "mare_restore",
    "mare_restore_partition",
    "merge_weights",
    "partition",
    "redundancy_ranks",
    "selection_matrix",
    "stable_order",
    "size_aware_similarity",
    "step_macs",
]
