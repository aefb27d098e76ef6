"""The code's shape: no import loop, no import back up the flow, no file over the limit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    path = ROOT / "tools" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_import_graph_has_no_loop_no_upward_import_and_no_long_file():
    assert _tool().problems() == []


def test_the_checker_sees_a_loop_and_an_upward_import():
    tool = _tool()
    assert tool.find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert tool.find_cycles({"a": {"b"}, "b": set()}) == []
    assert tool.layer_of("mame_export.job") > tool.layer_of("mame_export.families.timm_vit.patch")
    assert tool.layer_of("mame_export.ops.mame") < tool.layer_of("mame_export.families")
