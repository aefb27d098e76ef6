"""Files and folders: hashes, writable-folder checks, file modes, held signals, temporary
folders of one's own, and atomic writes (a reader sees the old file or the whole new one).

The lowest level of the package: standard library and ``mame_export.errors`` only. Every
file ``mame_export`` writes goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mame_export.errors import UserError


class OutputDirError(UserError):
    """The output folder cannot be created or written."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()



def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that a file can be made in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"cannot write to {shown_path(path)}: {e.strerror or e}") \
            from None


def check_out_dir(path: Path) -> None:
    """Raise OutputDirError unless ``path`` is, or could be made as, a writable folder.

    Creates nothing: a run that fails before it writes leaves no folder behind."""
    path = Path(path)
    probe = path
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            if probe.parent == probe:
                raise OutputDirError(f"cannot write to {path}: no such folder") from None
            probe = probe.parent
            continue
        except OSError as e:
            raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise OutputDirError(f"cannot write to {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to {path}: {probe} is not writable "
                             "(permission denied or a read-only file system)")


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the folders made, deepest first
    (for :func:`remove_dirs` when the run fails)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None
    return missing


def remove_dirs(folders: Sequence[Path]) -> None:
    """Remove the folders :func:`make_dirs` made, as long as they are still empty."""
    for f in folders:
        with contextlib.suppress(OSError):
            f.rmdir()


# ------------------------------------------------------------------ file modes


def _umask() -> int:
    try:  # Linux 4.7+: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp (always 0600) the mode the umask asks for."""
    os.chmod(path, default_file_mode())


# ------------------------------------------------------------------ signals


_DEFERRED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                          if hasattr(signal, n))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then act on them as the
    handlers in place would have: a short step (a few renames) runs to its end.

    Only the main thread can handle signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, object] = {}
    for s in _DEFERRED_SIGNALS:
        if signal.getsignal(s) is None:  # a handler set outside Python: left alone
            continue
        try:
            old[s] = signal.signal(s, lambda signum, _frame: pending.append(signum))
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            continue
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        for s in dict.fromkeys(pending):
            h = old.get(s)
            if callable(h):
                h(s, None)  # e.g. Python's Ctrl-C handler: raises KeyboardInterrupt
            elif h == signal.SIG_DFL:
                signal.raise_signal(s)


# ------------------------------------------------------------------ temporary folders

# Temporary folders this tool makes carry its pid, so a later run can tell a live run's
# folder from one a killed run (SIGKILL, power loss) left behind.
TMP_PREFIX = ".tmp-mame-"
STALE_AFTER_S = 3600.0
# What follows a prefix in a name tmp_prefix() + mkdtemp made: the pid, '-', a random tail.
# Matched whole, so a user's own `.tmp-mydata` is never taken for one of ours.
_PID_AND_TAIL = re.compile(r"(?:mame-)?(\d+)-[A-Za-z0-9_]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OSError, OverflowError):  # cannot tell (a pid too large for the OS): keep it
        return True
    return True


def tmp_prefix(base: str = TMP_PREFIX) -> str:
    """``base`` + this process's pid + '-': the prefix of its temporary folders."""
    return f"{base}{os.getpid()}-"


def _maker_pid(name: str, prefixes: Sequence[str]) -> int | None:
    """The pid in ``name`` if it is a temporary folder's name made with one of ``prefixes``
    (``<prefix><pid>-<tail>``, or ``<prefix>mame-<pid>-<tail>`` for a short prefix such as
    ``.tmp-``); None for any other name."""
    for p in prefixes:
        if name.startswith(p) and (m := _PID_AND_TAIL.fullmatch(name, len(p))):
            return int(m.group(1))
    return None


def clean_stale_dirs(folder: Path, prefixes: Sequence[str] = (TMP_PREFIX,),
                     max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporary folders in ``folder`` that an earlier, killed run left: named as
    :func:`tmp_prefix` names them with one of ``prefixes`` (``.tmp-mame-<pid>-*`` by default),
    owned by this user, untouched for ``max_age_s`` and made by a process that no longer
    runs. Any other folder, a user's ``.tmp-mydata`` included, is left alone. Returns what
    was removed; errors are ignored."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        pid = _maker_pid(e.name, prefixes)
        if pid is None or pid == os.getpid():
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        if now - st.st_mtime < max_age_s or _pid_alive(pid):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        if not os.path.exists(e.path):
            removed.append(Path(e.path))
    return removed


def shown_path(path: Path) -> Path:
    """``path`` as the user sees it: without this toolkit's private folders, so a file being
    written in ``DIR/.tmp-mame-PID-x/`` is named by where it lands, ``DIR/NAME``."""
    path = Path(path)
    parts = [p for p in path.parts if _maker_pid(p, (TMP_PREFIX,)) is None]
    return Path(*parts) if parts else path


def _rmtree_quietly(path: Path) -> None:
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_dir(final_dir: Path) -> Iterator[Path]:
    """A folder of this run's own inside ``final_dir`` (same file system, so its files
    can be renamed into place); removed on the way out, whatever happens."""
    shown = shown_path(final_dir)  # a private folder inside another names the outer one
    try:
        tmp = Path(tempfile.mkdtemp(dir=final_dir, prefix=tmp_prefix()))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left on device while writing to {shown}") from None
        raise OutputDirError(f"cannot write to {shown}: {e.strerror or e}") from None
    try:
        yield tmp
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left on device while writing to {shown}") from None
        raise
    finally:
        _rmtree_quietly(tmp)


@contextlib.contextmanager
def locked_dir(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # e.g. NFS without flock: renames stay atomic
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def commit_files(tmp: Path, final_dir: Path, names: Sequence[str]) -> None:
    """Move ``tmp/NAME`` to ``final_dir/NAME`` for every name: all of them, or none.

    Signals are held and the folder is locked while the renames run, so neither a
    Ctrl-C nor another run committing to the same folder can split the set; if a rename
    fails, the files already replaced are put back as they were. The last name lands
    last (give the graph last: it appears only once its sidecar and data are in place).
    """
    shown = shown_path(final_dir)
    with signals_deferred(), locked_dir(final_dir):
        for n in names:
            dst = final_dir / n
            if dst.is_dir() and not dst.is_symlink():
                raise OutputDirError(f"cannot write {shown / n}: a folder of that name is in "
                                     "the way")
        done: list[tuple[Path, Path | None]] = []  # (destination, backup of the old file)
        try:
            for n in names:
                dst, backup = final_dir / n, None
                if os.path.lexists(dst):
                    backup = tmp / f".old-{n}"
                    try:
                        os.link(dst, backup, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(dst, backup, follow_symlinks=False)
                os.replace(tmp / n, dst)
                done.append((dst, backup))
        except BaseException as e:
            for dst, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, dst)
                    else:
                        os.unlink(dst)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OutputDirError(f"no space left on device while writing to {shown}") \
                    from None
            if isinstance(e, OSError):
                raise OutputDirError(f"cannot write to {shown}: {e.strerror or e}") from None
            raise


@contextlib.contextmanager
def atomic_dir_write(final_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``final_dir``; files written there are moved into
    ``final_dir`` only if the block succeeds (os.replace is atomic per file), and the
    folder is removed in every case, so no half-written artifact is ever left."""
    ensure_writable_dir(final_dir)
    with private_dir(final_dir) as tmp:
        yield tmp
        # Side files first, the main file last: a reader never sees a graph
        # whose external data is not in place yet.
        files = sorted(tmp.iterdir(), key=lambda p: p.suffix == ".onnx")
        commit_files(tmp, final_dir, [f.name for f in files])


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write (by any means: a plot's
    ``savefig``, a library's ``save``); when the block succeeds it replaces ``path`` with a
    rename, so readers see the old file or the whole new one, never a part; otherwise it is
    removed. The file gets the mode the umask asks for, like any file ``open()`` makes."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    if path.is_dir() and not path.is_symlink():
        raise OutputDirError(f"cannot write {shown_path(path)}: a folder of that name is in "
                             "the way")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left on device while writing {shown_path(path)}") \
                from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move the finished folder ``tmp_dir`` to ``final_dir`` with one rename (a reader sees
    no folder or the whole one), with signals held and the parent locked; a folder already
    at ``final_dir`` is never replaced (OutputDirError)."""
    shown = shown_path(final_dir)
    with signals_deferred(), locked_dir(final_dir.parent):
        if os.path.lexists(final_dir):
            raise OutputDirError(f"cannot write {shown}: it exists already")
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputDirError(f"no space left on device while writing {shown}") \
                    from None
            raise OutputDirError(f"cannot write {shown}: {e.strerror or e}") from None
