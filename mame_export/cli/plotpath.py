"""``--plot PATH`` of the commands that draw one (profile, eval): checked before any work,
so a run of minutes never ends by losing its results to an unwritable path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mame_export.errors import UserError


def check_plot_path(path: str | os.PathLike, flag: str = "--plot",
                    needs_matplotlib: bool = True) -> None:
    """Refuse, before any work, an output PATH (``flag``: --plot, --markdown) that cannot
    be written: a folder, a file without write permission, a parent folder that is not one
    or cannot be written (a path through a file), or, for a plot, matplotlib missing."""
    from mame_export.artifacts import check_out_dir

    p = Path(path)
    if os.path.isdir(p):
        raise UserError(f"{flag} {path} is a folder; give a file path")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path} cannot be replaced (permission denied)")
    try:
        check_out_dir(p.parent if str(p.parent) else Path("."))
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}") from None
    if needs_matplotlib and importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"{flag} needs matplotlib: pip install 'mame-export[plot]'")
