"""PyTorch -> ONNX: static token shapes, static or dynamic batch, atomic writes."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mame_export.errors import ExportError, UserError

# Protobuf caps a single serialized model at 2 GiB; above this, weights go to a side file.
EXTERNAL_DATA_BYTES = 1_800_000_000
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OutputDirError(UserError):
    """The output folder cannot be created or written."""


@dataclass(frozen=True)
class IOSpec:
    """What a family's graph takes and returns (declared once per family)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    """(batch, generator) -> fresh random inputs, float32, never all zeros."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    seconds: float
    external_data: bool
    bytes: int
    exporter: str
    opset: int | None = None  # the default-domain opset the saved graph declares


class _Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 inside a reduced-precision graph (Cast in, Cast out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def reduced_precision_copy(
    model: nn.Module, dtype: torch.dtype, fp32_norms: bool = True
) -> nn.Module:
    """A copy of ``model`` in ``dtype`` for export; LayerNorms stay fp32 when ``fp32_norms``.

    MaMe's own weight computation and token sizes are float32 in every precision
    (see ``mame_export.ops``), so the precision that lands in the graph is: matmuls,
    convolutions, activations and softmax in ``dtype``; merge weights, sizes and,
    by default, normalisations in float32.
    """
    out = copy.deepcopy(model).to(dtype)
    if fp32_norms:
        for m in out.modules():
            if isinstance(m, nn.LayerNorm):
                m.__class__ = _Fp32LayerNorm
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that a file can be made in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"cannot write to {path}: {e.strerror or e}") from None


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
_PID_IN_NAME = re.compile(r"-(\d+)-[^-]*$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def tmp_prefix(base: str = TMP_PREFIX) -> str:
    """``base`` + this process's pid + '-': the prefix of its temporary folders."""
    return f"{base}{os.getpid()}-"


def clean_stale_dirs(folder: Path, prefixes: Sequence[str],
                     max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporary folders in ``folder`` that an earlier, killed run left: named with
    one of ``prefixes``, owned by this user, untouched for ``max_age_s`` and made by a
    process that no longer runs (folders without a pid in their name, as older versions
    made, need only the age). Returns what was removed; errors are ignored."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        if not any(e.name.startswith(p) for p in prefixes):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        if now - st.st_mtime < max_age_s:
            continue
        m = _PID_IN_NAME.search(e.name)
        if m and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        if not os.path.exists(e.path):
            removed.append(Path(e.path))
    return removed


def _rmtree_quietly(path: Path) -> None:
    with signals_deferred():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_dir(final_dir: Path) -> Iterator[Path]:
    """A folder of this run's own inside ``final_dir`` (same file system, so its files
    can be renamed into place); removed on the way out, whatever happens."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=final_dir, prefix=tmp_prefix()))
    except OSError as e:
        raise OutputDirError(f"cannot write to {final_dir}: {e.strerror or e}") from None
    try:
        yield tmp
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left on device while writing to {final_dir}") \
                from None
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
    shown = final_dir.parent if final_dir.name.startswith(TMP_PREFIX) else final_dir
    with signals_deferred(), locked_dir(final_dir):
        for n in names:
            dst = final_dir / n
            if dst.is_dir() and not dst.is_symlink():
                raise OutputDirError(f"cannot write {dst}: a folder of that name is in the way")
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary file in the same folder and a rename: readers see the
    old file or the whole new one, never a part. The file gets the mode the umask asks
    for, like any file ``open()`` makes."""
    ensure_writable_dir(path.parent)
    if path.is_dir() and not path.is_symlink():
        raise OutputDirError(f"cannot write {path}: a folder of that name is in the way")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputDirError(f"no space left on device while writing {path}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _quiet() -> contextlib.AbstractContextManager:
    """Silence the exporter's own chatter (it prints progress to stdout)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    # The exporter and onnxscript's version converter log warnings with tracebacks
    # (e.g. a conversion they could not do); the outcome is checked on the saved graph.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, previous)
    return stack


def graph_opset(path: str | os.PathLike) -> int | None:
    """The default-domain opset a saved graph declares (its weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] = ("pixels",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = False,
    opset: int = 18,
    max_batch: int = 4096,
) -> ExportResult:
    """Export ``model`` to ``path`` with the dynamo exporter (fixed token shapes).

    Written atomically: the graph (and its ``.data`` side file when the weights
    exceed protobuf's 2 GB limit) appears only when complete.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"output graph must end in .onnx: {path}")
    external = param_bytes(model) > EXTERNAL_DATA_BYTES
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    t0 = time.perf_counter()
    with atomic_dir_write(path.parent) as tmp:
        tmp_path = tmp / path.name
        try:
            with _quiet(), torch.inference_mode(False), torch.no_grad():
                program = torch.onnx.export(
                    model.eval(),
                    tuple(example_inputs),
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                    external_data=external,
                    optimize=True,
                    verbose=False,
                )
                if program is None:  # only when dynamo=False, which we never use
                    raise ExportError("the exporter returned no program")
                program.save(str(tmp_path), external_data=external)
        except UserError:
            raise
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - exporter failures become one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {msg[:300]}") from e
        digest = sha256_file(tmp_path)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        written = graph_opset(tmp_path)
        if written != opset:
            raise ExportError(f"the exporter wrote an opset-{written} graph for --opset {opset}; "
                              "use an opset it can target (see --help)")
    return ExportResult(path, digest, time.perf_counter() - t0, external, size,
                        "torch.onnx dynamo", written)
