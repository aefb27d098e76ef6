"""Parity verdicts: element bounds, cosine, and top-1 on decisive samples."""

from __future__ import annotations

import numpy as np

from mame_export.parity import TOLERANCES, compare_outputs, tolerance_for

FP16 = TOLERANCES["fp16"]


def test_a_flip_inside_the_tolerance_band_is_not_a_disagreement():
    ref = np.array([[1.00, 0.98, 0.0, 0.0]])  # margin 0.02 < 2 x (0.05 + 0.05 x 1)
    out = np.array([[0.98, 1.00, 0.0, 0.0]])
    s = compare_outputs("logits", ref, out, FP16)
    assert s.top1_agreement == 0.0 and s.decisive_samples == 0 and s.top1_decisive is None
    assert s.passed


def test_a_flip_on_a_decisive_sample_fails():
    ref = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    out = ref.copy()
    out[0] = [0.0, 4.0, 0.0]  # far outside the element bound too
    s = compare_outputs("logits", ref, out, FP16)
    assert s.decisive_samples == 2 and s.top1_decisive == 0.5 and not s.passed


def test_agreeing_decisive_samples_pass():
    ref = np.array([[3.0, 0.5, 0.0]] * 50)
    out = ref + 0.01
    s = compare_outputs("logits", ref, out, FP16)
    assert s.decisive_samples == 50 and s.top1_decisive == 1.0 and s.passed


def test_fp32_has_no_top1_criterion_but_reports_agreement():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = compare_outputs("logits", ref, ref + 5e-4, TOLERANCES["fp32"])
    assert s.passed and s.top1_agreement == 1.0
    assert not compare_outputs("logits", ref, ref + 2e-3, TOLERANCES["fp32"]).passed


def test_merged_fp32_allows_a_selection_flip_but_not_a_real_error():
    ref = np.array([[3.0, 1.0, 0.5, 0.2]] * 4)
    flip = ref.copy()
    flip[0, 2] += 0.006  # off the element bound, direction kept: a merge picked another token
    plain, merged = TOLERANCES["fp32"], tolerance_for("fp32", merged=True)
    assert not compare_outputs("logits", ref, flip, plain).passed
    s = compare_outputs("logits", ref, flip, merged)
    assert s.passed and s.selection_flips == 1
    wrong = ref.copy()
    wrong[1] = [1.0, 3.0, 0.5, 0.2]  # a decisive top-1 change is never a flip
    assert not compare_outputs("logits", ref, wrong, merged).passed
    scaled = ref * 1.02  # the same direction, 2% too large: not a flip
    assert not compare_outputs("logits", ref, scaled, merged).passed
    bent = ref + np.array([[0.0, 0.3, -0.3, 0.3]])  # 15% relative error
    assert not compare_outputs("logits", ref, bent, merged).passed
    assert tolerance_for("fp16", merged=True) == TOLERANCES["fp16"]
