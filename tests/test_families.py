"""One contract over every registry entry, at tiny size: build, apply at r=0 (the model is
unchanged), plan, export, audit and parity. A new alias is tested the day it is added."""

from __future__ import annotations

import pytest
import torch
from helpers import registry_params, tiny_model

import mame_export
from mame_export.families import all_families, get_family, resolve
from mame_export.job import build_model, io_spec, run_export
from mame_export.patch import merge_plan
from mame_export.request import ExportRequest


def _outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("alias", registry_params())
def test_r0_is_the_unpatched_model_and_the_plan_counts_tokens(alias):
    family, spec = tiny_model(alias)
    model, source = build_model(spec, "random")
    assert source.startswith("random init")
    io = io_spec(spec, model, None)
    inputs = io.make_inputs(2, torch.Generator().manual_seed(0))
    ref = _outputs(model, inputs)
    keys = list(model.state_dict())
    options = family.patch_options(spec, None)
    mame_export.apply(model, 0.0, **options)
    assert list(model.state_dict()) == keys
    for a, b in zip(_outputs(model, inputs), ref, strict=True):
        assert float((a - b).abs().max()) <= 1e-5
    plan0 = merge_plan(model)
    assert plan0.macs <= plan0.macs_unpatched and not plan0.merge_layers
    mame_export.apply(model, 0.5, **options)
    plan = merge_plan(model)
    assert plan.merge_layers and plan.macs < plan.macs_unpatched
    outs = _outputs(model, inputs)
    assert len(outs) == len(io.output_names)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("alias", registry_params())
def test_export_audit_and_parity(alias, tmp_path):
    _, spec = tiny_model(alias)
    req = ExportRequest(model=spec.alias, r=0.5, weights="random", out_dir=tmp_path,
                        parity_batches=2, seed=0, runners=("onnxrt",))
    meta = run_export(req, log=lambda _: None, spec=spec)
    assert meta["audit"]["passed"], meta["audit"]
    assert meta["audit"]["forbidden_ops"] == []
    assert meta["parity"]["passed"], meta["parity"]
    assert meta["ok"]
    assert meta["model"]["family"] == spec.family
    assert meta["plan"]["blocks"] and any(b["merges"] for b in meta["plan"]["blocks"])


def test_every_family_is_found_by_name_alias_and_model():
    for family in all_families():
        for name in family.names():
            assert get_family(name) is family
    with pytest.raises(KeyError):
        get_family("no-such-family")
    assert resolve("vit_b").family == "timm-vit"
    assert mame_export.supported_families() == [f.name for f in all_families()]


def test_a_model_of_no_family_is_refused_in_one_line():
    with pytest.raises(TypeError, match="MaMe does not support torch.nn.modules.linear.Linear"):
        mame_export.apply(torch.nn.Linear(2, 2), 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("alias", registry_params())
def test_the_default_export_of_every_alias_passes(alias, tmp_path):
    """``mame-export ALIAS --weights random`` with every other setting at its default, on
    the tiny form, which keeps what the real model does that its graph could show (DINOv2:
    a position table built for another size than it runs at, too large to fold away)."""
    _, spec = tiny_model(alias)
    req = ExportRequest(model=spec.alias, weights="random", out_dir=tmp_path)
    meta = run_export(req, log=lambda _: None, spec=spec)
    assert meta["audit"]["passed"], meta["audit"]["findings"]
    assert meta["parity"]["passed"], meta["parity"]
    assert meta["ok"]
