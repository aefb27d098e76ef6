"""Fixtures several test files use (plain helpers: tests/helpers.py). Imports are inside
the fixtures: a run of test files that use none of them loads no torch here."""

from __future__ import annotations

import json
import signal
import sys

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Signals at their default disposition for this run and the child processes the tests
    start: a suite started in the background by a non-interactive shell (`cmd &`) or under
    `nohup` inherits SIGINT or SIGHUP ignored, and the tests of Ctrl-C, SIGTERM and SIGHUP
    would then see a command that, rightly, ignores them."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.platform != "win32":
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The TINY ViT exported once per module (export_args, seed 0): its --json record."""
    from helpers import export_args, run_main

    out = tmp_path_factory.mktemp("tiny")
    code, stdout, err = run_main(*export_args(out, "--json"))
    assert code == 0, err
    return json.loads(stdout)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    # Tiny tensors gain nothing from threads, and on a busy small CPU the thread
    # pool's hand-offs cost more than the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
