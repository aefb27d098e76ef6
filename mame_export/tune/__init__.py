"""``mame-export tune``: a merge schedule searched on the user's own images, written as a
plan file (:mod:`mame_export.planfile`) that every command takes with ``--plan FILE``."""

from mame_export.tune.run import DEFAULT_CANDIDATES, TuneSettings, run_tune
from mame_export.tune.search import Search, keep_of, shape_counts

__all__ = ["DEFAULT_CANDIDATES", "Search", "TuneSettings", "keep_of", "run_tune",
           "shape_counts"]
