"""Artifacts: the graph and its sidecar land together or not at all (Ctrl-C, SIGTERM,
SIGHUP, a full disk), names differ per setting, stale temporary folders are cleaned (only
the toolkit's own), full-disk messages name the user's folder, files follow the umask, and
a failed run leaves no folder behind. Sections name the issue and item a test comes from.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    TINY,
    cli_env,
    export_args,
    one_line_error,
    run_main,
    vit_t_export_args,
)

from mame_export.artifacts import (
    atomic_write_text,
    clean_stale_dirs,
    private_dir,
    sha256_file,
    tmp_prefix,
)
from mame_export.errors import UserError

DEAD_PID = 4_194_305  # above Linux's pid_max: no such process
TWO_HOURS_AGO = time.time() - 2 * 3600


def _old_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    os.utime(path / "notes.txt", (TWO_HOURS_AGO, TWO_HOURS_AGO))
    os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    return path


def pair_is_consistent(folder: Path) -> bool:
    """Every graph in ``folder`` has its own sidecar and every sidecar its graph."""
    graphs = sorted(p.stem for p in folder.glob("*.onnx"))
    sidecars = sorted(p.stem for p in folder.glob("*.json"))
    if graphs != sidecars:
        return False
    return all(json.loads((folder / f"{s}.json").read_text())["onnx_sha256"]
               == sha256_file(folder / f"{s}.onnx") for s in graphs)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) \
        if folder.exists() else []


# ---------------------------------------------------------------- issue 12 item 1: the pair


def test_1_ctrl_c_between_the_renames_lands_both_or_neither(tmp_path, monkeypatch) -> None:
    out = tmp_path / "g"
    real_replace = os.replace
    fired = []

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if Path(dst).parent == out and not fired:  # the first file lands in the folder ...
            fired.append(Path(dst).name)
            signal.raise_signal(signal.SIGINT)  # ... and the user presses Ctrl-C

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_main(*export_args(out))
    assert fired and code == 130, err
    assert "interrupted" in err
    assert pair_is_consistent(out), sorted(p.name for p in out.iterdir())
    assert hidden(out) == []


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import mame_export.export as ex

    def interrupted_sha(path, *a, **k):
        assert Path(path).is_file()  # the graph exists in the temporary folder ...
        raise KeyboardInterrupt  # ... when the user presses Ctrl-C

    monkeypatch.setattr(ex, "sha256_file", interrupted_sha)
    out = tmp_path / "g"
    code, _, err = run_main(*vit_t_export_args(out))
    assert code == 130
    assert "interrupted" in err
    assert not out.exists()  # ... and nothing is left behind, not even the folder


# ---------------------------------------------------------------- issue 12 item 2: two runs


def test_2_names_differ_per_setting() -> None:
    from mame_export.families import resolve
    from mame_export.job import ExportRequest, graph_stem

    spec = resolve("vit_t")
    base = dict(model="vit_t", batch=1)
    variants = [dict(), dict(tau=0.5), dict(layers=[0, 1]), dict(prop_attn=False),
                dict(weights="random"), dict(weights="/some/ckpt.safetensors"), dict(opset=20)]
    stems = [graph_stem(spec, ExportRequest(**base, **v)) for v in variants]
    assert len(set(stems)) == len(stems), stems
    # the same settings always give the same name
    assert graph_stem(spec, ExportRequest(**base)) == stems[0]


def test_2_parity_runs_on_the_runs_own_copy(tmp_path, monkeypatch) -> None:
    import mame_export.job as job

    out = tmp_path / "g"
    seen = []
    real = job.select_runners

    def spy(reference, io_, onnx_path, *a, **k):
        seen.append(Path(onnx_path))
        # another run lands its graph under the same name meanwhile
        out.mkdir(exist_ok=True)
        (out / Path(onnx_path).name).write_bytes(b"another run's graph")
        return real(reference, io_, onnx_path, *a, **k)

    monkeypatch.setattr(job, "select_runners", spy)
    code, stdout, err = run_main(*export_args(out, "--json"))
    assert code == 0, err
    assert seen and seen[0].parent != out and seen[0].parent.name.startswith(".tmp-mame-")
    assert pair_is_consistent(out)  # this run's pair, whole
    assert json.loads(stdout)["parity"]["passed"]


# ---------------------------------------------------------------- where the output goes


def test_13_output_file_that_is_a_folder(tiny_export, tmp_path) -> None:
    out = tmp_path / "g"
    (out / Path(tiny_export["onnx"]).name).mkdir(parents=True)
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "a folder of that name is in the way")
    assert "[1/5]" not in err


def test_unwritable_output_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_main("vit_t", "--out", str(blocker / "sub"), "--weights", "random")
    assert code == 2
    one_line_error(err, "cannot write to")


def test_14_failed_runs_leave_no_output_folder(tmp_path, monkeypatch) -> None:
    import mame_export.job as job
    from mame_export.errors import ExportError

    out = tmp_path / "new" / "deeper"
    code, _, err = run_main("vit_t", "--layers", "99", "--out", str(out))
    assert code == 2
    assert not (tmp_path / "new").exists()

    def fails(*_a, **_k):  # a failure after the folder was made removes it too
        assert out.is_dir()
        raise ExportError("ONNX export failed: on purpose")

    monkeypatch.setattr(job, "export_onnx", fails)
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "on purpose")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- issue 12 item 3: full disk


def test_3_full_disk_while_the_sidecar_is_written_lands_nothing(tmp_path, monkeypatch) -> None:
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "g"
    code, _, err = run_main(*export_args(out))
    assert code == 2
    one_line_error(err, "no space left on device")
    assert not out.exists() or list(out.iterdir()) == []


def test_3_full_disk_keeps_the_previous_pair(tiny_export, tmp_path, monkeypatch) -> None:
    out = tmp_path / "g"
    out.mkdir()
    for p in (Path(tiny_export["onnx"]), Path(tiny_export["metadata_path"])):
        shutil.copy(p, out / p.name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def full(src, dst, *a, **k):  # the sidecar lands, then the graph's rename fails
        if str(dst).endswith(".onnx") and Path(dst).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = run_main(*export_args(out, "--seed", "7"))
    assert code == 2
    one_line_error(err, "no space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import mame_export.export as ex

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", full)
    out = tmp_path / "g"
    code, _, err = run_main(*vit_t_export_args(out))
    assert code == 2
    one_line_error(err, "no space left on device")
    assert not out.exists()  # the run made the folder, and took it back


# ---------------------------------------------------------------- issue 12 item 4: signals

_SIGNAL_SCRIPT = """
import os, signal, sys, time
import mame_export.export as ex
from mame_export.cli import main

real = ex.sha256_file

def slow(path, *a, **k):  # the graph is half done in the temporary folder when ...
    os.kill(os.getpid(), signal.{sig})  # ... a timeout or a CI cancel stops the run
    time.sleep(30)
    return real(path, *a, **k)

ex.sha256_file = slow
sys.exit(main({args!r}))
"""


@pytest.mark.parametrize("sig, command", [("SIGTERM", "export"), ("SIGHUP", "parity")])
def test_4_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig, command) -> None:
    out, tmpdir = tmp_path / "g", tmp_path / "tmp"
    tmpdir.mkdir()
    args = export_args(out) if command == "export" else ["parity", *TINY, "--runners", "onnxrt",
                                                        "--parity-batches", "1"]
    script = _SIGNAL_SCRIPT.format(sig=sig, args=args)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=cli_env(TMPDIR=str(tmpdir)), cwd=REPO)
    assert res.returncode == 128 + getattr(signal, sig), res.stderr
    one_line_error(res.stderr, f"interrupted ({sig})")
    assert hidden(out) == [] and (not out.exists() or list(out.iterdir()) == [])
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("mame-")] == []


# ---------------------------------------------------------------- issue 12 item 4: stale folders


def test_4_a_later_run_removes_stale_temporary_folders(tmp_path) -> None:
    out = tmp_path / "g"
    out.mkdir()
    stale = [out / f".tmp-mame-{DEAD_PID}-abc123"]  # ours
    kept = [out / f".tmp-mame-{DEAD_PID}-fresh1",  # too recent to judge
            out / f".tmp-mame-{os.getpid()}-alive1",  # its process still runs
            out / ".tmp-k2j3h4g5"]  # no pid: maybe a user's (issue 24 item 11)
    for d in stale + kept:
        d.mkdir()
        (d / "partial.onnx").write_bytes(b"half a graph")
    for d in stale + kept[1:]:
        os.utime(d, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    code, _, err = run_main(*export_args(out))
    assert code == 0, err
    assert [d for d in stale if d.exists()] == []
    assert all(d.exists() for d in kept)


def test_4_stale_parity_folders_in_tmp_are_removed(tmp_path) -> None:
    stale = tmp_path / f"mame-parity-{DEAD_PID}-xyz"
    alive = tmp_path / f"mame-parity-{os.getpid()}-xyz"
    other = tmp_path / f"someone-elses-{DEAD_PID}-xyz"
    for d in (stale, alive, other):
        d.mkdir()
        os.utime(d, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    assert clean_stale_dirs(tmp_path, ("mame-parity-",)) == [stale]
    assert alive.exists() and other.exists()


# ---------------------------------------------------------------- issue 24 item 11: .tmp-* folders


@pytest.mark.slow
def test_export_keeps_a_users_tmp_folder(tmp_path: Path) -> None:
    out = tmp_path / "outX"
    out.mkdir()
    mine = _old_folder(out / ".tmp-mydata")
    stale = _old_folder(out / f".tmp-mame-{DEAD_PID}-k2j3h4g5")  # a killed run's
    code, _, err = run_main(*export_args(out))
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


# ---------------------------------------------------------------- issue 24 item 25: full disk


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
    code, _, err = run_main(*export_args(out))
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
    code, _, err = run_main(*export_args(out))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mame-export: error: no space left on device while writing {out}/")
    assert line.endswith(".json") and ".tmp-mame-" not in line
    assert not out.exists()


# ---------------------------------------------------------------- issue 12 item 11: file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_11_files_follow_the_umask(tmp_path, umask_022) -> None:
    f = tmp_path / "meta.json"
    f.write_text("{}")
    os.chmod(f, 0o644)
    atomic_write_text(f, "{}\n")  # re-writing keeps a readable file readable
    assert f.stat().st_mode & 0o777 == 0o644
    os.umask(0o027)
    g = tmp_path / "new.json"
    atomic_write_text(g, "{}\n")
    assert g.stat().st_mode & 0o777 == 0o640


def test_11_exported_sidecar_and_plot_follow_the_umask(tmp_path, umask_022) -> None:
    pytest.importorskip("matplotlib")
    from mame_export.profile import plot

    code, stdout, err = run_main(*export_args(tmp_path / "g", "--json"))
    assert code == 0, err
    meta = json.loads(stdout)
    assert Path(meta["metadata_path"]).stat().st_mode & 0o777 == 0o644
    assert Path(meta["onnx"]).stat().st_mode & 0o777 == 0o644
    rows = [{"model": "m", "batch": 1, "backend": "torch", "variant": "baseline", "r": 0.0,
             "median_ms": 1.0}]
    png = plot(rows, tmp_path / "p.png")
    assert png.stat().st_mode & 0o777 == 0o644
