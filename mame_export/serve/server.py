"""A local Triton Inference Server for checks and benchmarks: the ``tritonserver`` binary the
``nvidia-pytriton`` wheel carries, with its Python backend, on 127.0.0.1 only.

PyTriton's own ``Triton().bind()`` fails on some Pythons (its multiprocessing resource
tracker), so the binary is driven directly: the Python backend stub for this Python is
copied into a private copy of the backend folder, the server gets free loopback ports and
its own temporary folder, and it is stopped (and the folder removed) on the way out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mame_export.errors import UserError

INSTALL_HINT = "pip install nvidia-pytriton (it carries the tritonserver binary)"


class ServerUnavailable(UserError):
    """No Triton server binary here, or it did not start."""


@dataclass(frozen=True)
class ServerFiles:
    """Where the wheel keeps the server binary, its backends and its libraries."""

    binary: Path
    backends: Path
    stub: Path
    libs: Path


def server_files() -> ServerFiles:
    """The ``tritonserver`` binary and the Python backend stub for this Python, from the
    installed ``nvidia-pytriton`` wheel; ServerUnavailable (one line) if it is missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable(f"no Triton server here; {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for p in (files.binary, files.backends / "python", files.stub):
        if not p.exists():
            raise ServerUnavailable(f"the nvidia-pytriton install lacks {p} (Python {version}); "
                                    f"{INSTALL_HINT}")
    return files


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """A running server: its loopback URLs and its log file."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _first_error(log: Path) -> str:
    """The first error line of the server's log (why a model did not load), else its end."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
    return " | ".join((errors or lines)[:3])[:1000]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # Triton unloads its models and exits on SIGINT
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def local_server(repository: Path, start_timeout_s: float = 60.0,
                 models: list[str] | None = None) -> Iterator[LocalServer]:
    """Start ``tritonserver`` on ``repository`` (127.0.0.1, free ports), wait until it is
    ready, yield it, and stop it. ``models``: load only these (explicit model control)."""
    files = server_files()
    with tempfile.TemporaryDirectory(prefix="mame-triton-") as tmp:
        backends = Path(tmp) / "backends"
        shutil.copytree(files.backends / "python", backends / "python")
        shutil.copy2(files.stub, backends / "python" / files.stub.name)
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        cmd = [str(files.binary), f"--model-repository={repository}",
               f"--backend-directory={backends}", "--http-address=127.0.0.1",
               f"--http-port={http_port}", "--grpc-address=127.0.0.1",
               f"--grpc-port={grpc_port}", "--allow-metrics=false", "--allow-sagemaker=false",
               "--allow-vertex-ai=false", "--exit-timeout-secs=5",
               f"--cache-directory={tmp}/cache"]
        if models is not None:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        env = dict(os.environ)
        # The Python backend's stub runs the model with this Python's packages (numpy,
        # onnxruntime): the stub's embedded interpreter does not know this environment.
        paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [*paths, *filter(None, [env.get("PYTHONPATH")])]))
        # The stub links libpython3.X.so: this Python's own (a setup-python or pyenv build)
        # after any the system has.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [
            str(files.libs), env.get("LD_LIBRARY_PATH"), sysconfig.get_config_var("LIBDIR")]))
        log = Path(tmp) / "tritonserver.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        server = LocalServer(process, http_port, grpc_port, log)
        try:
            deadline = time.monotonic() + start_timeout_s
            while not _ready(http_port):
                if process.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited with code {process.returncode}" if process.poll() is not None
                           else f"not ready after {start_timeout_s:.0f} s")
                    raise ServerUnavailable(f"tritonserver {why}: {_first_error(server.log)}")
                time.sleep(0.2)
            yield server
        finally:
            _stop(process)
