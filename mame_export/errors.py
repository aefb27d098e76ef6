"""Errors a user can cause or fix. The CLI prints them as one line and exits non-zero.

This module imports nothing heavy: the command line loads it before anything else.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import sys
from pathlib import Path


class UserError(Exception):
    """An error the user caused or can fix (bad name, bad option, bad file, no space)."""

    exit_code = 2


class ExportError(UserError):
    """The model could not be exported to ONNX."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a `timeout`, a CI cancel, a closed terminal), raised where the
    program is so that every clean-up a Ctrl-C runs also runs for them."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stderr_log(msg: str) -> None:
    """A progress line, on stderr (stdout stays for --json)."""
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning for the user, on stderr (stdout stays for --json)."""
    print(f"warning: {msg}", file=sys.stderr)


def one_line(text: str) -> str:
    """``text`` without terminal colour codes, on one line."""
    return " ".join(_ANSI.sub("", text).split())


def path_problem(path: str | os.PathLike) -> str | None:
    """None if ``path`` is a readable regular file (symlinks followed); otherwise what is
    wrong with it, in a few words ("not found", "is a folder, not a file", ...)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "is a dangling symlink" if os.path.islink(p) else "not found"
    except NotADirectoryError:
        return "not found (a part of its path is a file, not a folder)"
    except PermissionError:
        return "cannot be read (permission denied)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        return f"cannot be read ({e.strerror or e})"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def check_file(path: str | os.PathLike, what: str,
               error: type[UserError] = UserError) -> Path:
    """``path`` as a Path if it is a readable regular file; else ``error`` saying why.

    Checked before any open, so a FIFO never blocks the run and a folder or a symlink
    loop is not reported as missing."""
    problem = path_problem(path)
    if problem is None:
        return Path(path)
    if problem == "not found":
        raise error(f"{what} not found: {path}")
    raise error(f"{what} {path} {problem}")
