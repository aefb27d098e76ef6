"""``--plot PATH`` of the commands that draw one (profile, eval): checked before any work,
so a run of minutes never ends by losing its results to an unwritable path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mame_export.errors import UserError


def check_plot_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, a --plot PATH that cannot be written: a folder, a file
    without write permission, a parent folder that is not one or cannot be written (a
    path through a file), or matplotlib missing."""
    from mame_export.artifacts import check_out_dir

    p = Path(path)
    if os.path.isdir(p):
        raise UserError(f"--plot {path} is a folder; give a file path, e.g. plot.png")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UserError(f"--plot {path} cannot be replaced (permission denied)")
    try:
        check_out_dir(p.parent if str(p.parent) else Path("."))
    except UserError as e:
        raise UserError(f"--plot {path}: {e}") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install 'mame-export[plot]'")
