"""Fixtures several test files use (plain helpers: tests/helpers.py). Imports are inside
the fixtures: a run of test files that use none of them loads no torch here."""

from __future__ import annotations

import json

import pytest


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
