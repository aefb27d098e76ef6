"""Issue 24 items 11 and 25: temporary folders and full-disk messages of artifacts.py.

A later run removes only the toolkit's own temporary folders (never a user's `.tmp-*`),
and a full disk is reported against the folder the user named, not a private one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
from pathlib import Path

import pytest

from mame_export.artifacts import (
    atomic_write_text,
    clean_stale_dirs,
    private_dir,
    tmp_prefix,
)
from mame_export.cli import main
from mame_export.errors import UserError

DEAD_PID = 4_194_305  # above Linux's pid_max: no such process
TWO_HOURS_AGO = time.time() - 2 * 3600
TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--weights", "random",
        "--parity-batches", "1", "--seed", "0"]


def _old_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    os.utime(path / "notes.txt", (TWO_HOURS_AGO, TWO_HOURS_AGO))
    os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    return path


def _run_main(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


# ---------------------------------------------------------------- 11. a user's .tmp-* folders


@pytest.mark.slow
def test_export_keeps_a_users_tmp_folder(tmp_path: Path) -> None:
    out = tmp_path / "outX"
    out.mkdir()
    mine = _old_folder(out / ".tmp-mydata")
    stale = _old_folder(out / f".tmp-mame-{DEAD_PID}-k2j3h4g5")  # a killed run's
    code, err = _run_main(*TINY, "--out", str(out))
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "mine"
    assert not stale.exists()


@pytest.mark.parametrize("name", [
    ".tmp-mydata", ".tmp-k2j3h4g5", f".tmp-{DEAD_PID}", f".tmp-mame-{DEAD_PID}",
    f".tmp-mame-{DEAD_PID}-", f".tmp-mame-x{DEAD_PID}-abc", f".tmp-mame-{DEAD_PID}-a-b",
    f".tmp-mame-{DEAD_PID}-a.b", f"x.tmp-mame-{DEAD_PID}-abc",
])
def test_only_names_the_toolkit_makes_are_cleaned(tmp_path: Path, name: str) -> None:
    _old_folder(tmp_path / name)
    assert clean_stale_dirs(tmp_path, (".tmp-",)) == []
    assert clean_stale_dirs(tmp_path) == []
    assert (tmp_path / name / "notes.txt").exists()


def test_the_toolkit_names_are_cleaned_when_dead_and_old(tmp_path: Path) -> None:
    ours = _old_folder(tmp_path / f".tmp-mame-{DEAD_PID}-k2j3_h4g")
    fresh = tmp_path / f".tmp-mame-{DEAD_PID}-fresh1"
    fresh.mkdir()
    alive = _old_folder(tmp_path / f"{tmp_prefix()}alive1")
    assert clean_stale_dirs(tmp_path, (".tmp-",)) == [ours]  # the call job.py makes
    _old_folder(ours)
    assert clean_stale_dirs(tmp_path) == [ours]  # the default prefix
    assert fresh.exists() and alive.exists()


def test_parity_temp_prefix_still_cleans(tmp_path: Path) -> None:
    from mame_export.cli.parity import PARITY_TMP_PREFIX

    made = tmp_prefix(PARITY_TMP_PREFIX)
    assert made == f"mame-parity-{os.getpid()}-"
    stale = _old_folder(tmp_path / f"mame-parity-{DEAD_PID}-a1b2c3d4")
    kept = [_old_folder(tmp_path / n) for n in ("mame-parity-mydata", f"{made}live",
                                                 f"other-{DEAD_PID}-a1b2c3d4")]
    assert clean_stale_dirs(tmp_path, (PARITY_TMP_PREFIX,)) == [stale]
    assert all(k.exists() for k in kept)


# ---------------------------------------------------------------- 25. full disk names DIR


def _no_space(*_a: object, **_k: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_a_nested_private_folder_names_the_outer_one(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e, private_dir(tmp_path) as tmp, private_dir(tmp):
        _no_space()
    assert str(e.value) == f"no space left on device while writing to {tmp_path}"


def test_full_disk_writing_a_file_in_a_private_folder_names_where_it_lands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_dir(tmp_path) as tmp:
        monkeypatch.setattr(os, "replace", _no_space)
        with pytest.raises(UserError) as e:
            atomic_write_text(tmp / "g.json", "{}")
        monkeypatch.undo()
    assert str(e.value) == f"no space left on device while writing {tmp_path / 'g.json'}"


@pytest.mark.slow
def test_export_full_disk_while_the_graph_is_written_names_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mame_export.export as ex

    monkeypatch.setattr(ex, "sha256_file", _no_space)  # right after the graph is saved
    out = tmp_path / "outX"
    code, err = _run_main(*TINY, "--out", str(out))
    assert code == 2, err
    assert err.strip().splitlines()[-1] == \
        f"mame-export: error: no space left on device while writing to {out}"


@pytest.mark.slow
def test_export_full_disk_while_the_sidecar_is_written_names_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mame_export.artifacts as artifacts

    class FullFile(io.BytesIO):
        def write(self, _data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(file: str, mode: str = "r", *a: object, **k: object) -> object:
        # atomic_file's temporary file for NAME.json is .NAME.json.XXXX.tmp
        if "w" in mode and ".json." in Path(file).name:
            return FullFile()
        return open(file, mode, *a, **k)  # noqa: SIM115 - handed back to the caller

    monkeypatch.setattr(artifacts, "open", full_open, raising=False)
    out = tmp_path / "outX"
    code, err = _run_main(*TINY, "--out", str(out))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mame-export: error: no space left on device while writing {out}/")
    assert line.endswith(".json") and ".tmp-mame-" not in line
    assert not out.exists()
