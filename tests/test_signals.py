"""Tests for mia.core.signals: hand-computed values, extreme logits against mpmath, orientation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mia.core.signals import (
    SEED_SIGNALS,
    SIGNALS,
    all_signals,
    confidence,
    correctness,
    hinge,
    logit_scaled_confidence,
    neg_entropy,
    neg_loss,
    neg_modified_entropy,
)

LN2, LN3, LN34 = math.log(2), math.log(3), math.log(0.75)


def test_hand_computed_three_classes():
    # z = [ln 2, 0, 0]  ->  exp(z) = [2, 1, 1], sum 4  ->  p = [1/2, 1/4, 1/4].
    # Row 0, y = 0 (the argmax):
    #   confidence = 1/2;  neg_loss = ln(1/2) = -ln 2
    #   neg_entropy = 1/2 ln(1/2) + 2 * 1/4 ln(1/4) = -ln2/2 - ln2 = -1.5 ln 2
    #   Mentr = -(1 - 1/2) ln(1/2) - [1/4 ln(3/4) + 1/4 ln(3/4)] = ln2/2 - ln(3/4)/2
    #   logit-scaled = ln 2 - ln(e^0 + e^0) = 0;  hinge = ln 2 - 0;  correct = 1
    # Row 1, y = 1:
    #   confidence = 1/4;  neg_loss = -2 ln 2;  neg_entropy = -1.5 ln 2 (label-free)
    #   Mentr = -(3/4) ln(1/4) - [1/2 ln(1/2) + 1/4 ln(3/4)] = 1.5 ln2 + 0.5 ln2 - ln(3/4)/4
    #   logit-scaled = 0 - ln(2 + 1) = -ln 3 (= ln((1/4)/(3/4)));  hinge = 0 - ln 2;  correct = 0
    z = np.array([[LN2, 0.0, 0.0], [LN2, 0.0, 0.0]])
    y = np.array([0, 1])
    got = all_signals(z, y)
    expected = {
        "confidence": [0.5, 0.25],
        "neg_entropy": [-1.5 * LN2, -1.5 * LN2],
        "neg_modified_entropy": [-(LN2 / 2 - LN34 / 2), -(2 * LN2 - LN34 / 4)],
        "neg_loss": [-LN2, -2 * LN2],
        "logit_scaled_confidence": [0.0, -LN3],
        "hinge": [LN2, -LN2],
        "correctness": [1.0, 0.0],
    }
    assert list(got) == list(SIGNALS)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-14, atol=1e-15, err_msg=name)
        assert got[name].dtype == np.float64


def test_hand_computed_two_classes():
    # z = [0, ln 3] -> p = [1/4, 3/4], y = 1 (the argmax).
    #   confidence = 3/4;  neg_loss = ln(3/4);  logit-scaled = ln 3 - 0 = ln 3;  hinge = ln 3
    #   neg_entropy = 1/4 ln(1/4) + 3/4 ln(3/4)
    #   Mentr = -(1/4) ln(3/4) - 1/4 ln(1 - 1/4) = -ln(3/4)/2
    z = np.array([[0.0, LN3]])
    y = np.array([1])
    np.testing.assert_allclose(confidence(z, y), [0.75], rtol=1e-14)
    np.testing.assert_allclose(neg_loss(z, y), [LN34], rtol=1e-14)
    np.testing.assert_allclose(logit_scaled_confidence(z, y), [LN3], rtol=1e-14)
    np.testing.assert_allclose(hinge(z, y), [LN3], rtol=1e-14)
    np.testing.assert_allclose(neg_entropy(z, y), [0.25 * math.log(0.25) + 0.75 * LN34], rtol=1e-14)
    np.testing.assert_allclose(neg_modified_entropy(z, y), [LN34 / 2], rtol=1e-14)
    np.testing.assert_array_equal(correctness(z, y), [1.0])


def test_ties_between_classes():
    # z = [1, 1, 1], y = 2: p = 1/3 each; argmax is class 0 (first maximum) -> incorrect;
    # hinge = 1 - 1 = 0; logit-scaled = 1 - ln(2e) = -ln 2;  Mentr = -(2/3) ln(1/3) - 2/3 ln(2/3).
    z = np.ones((1, 3))
    y = np.array([2])
    got = all_signals(z, y)
    np.testing.assert_array_equal(got["correctness"], [0.0])
    np.testing.assert_allclose(got["hinge"], [0.0], atol=0)
    np.testing.assert_allclose(got["logit_scaled_confidence"], [-LN2], rtol=1e-14)
    mentr = -(2 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    np.testing.assert_allclose(got["neg_modified_entropy"], [-mentr], rtol=1e-14)
    # z = [5, 5], y = 0 (the argmax): log(1 - p_0) = ln(1/2), logit-scaled exactly 0, never -0.0.
    got = all_signals([[5.0, 5.0]], [0])
    assert got["logit_scaled_confidence"][0] == 0.0
    assert not np.signbit(got["logit_scaled_confidence"][0])


def _reference(z: list[float], y: int) -> dict[str, float]:
    """The definitions evaluated with 1200 significant digits.

    log(1 - p_i) is taken as log(sum_{j != i} e^{z_j}) - logsumexp(z), an exact identity, because
    1 - p_i itself would need ~434,000 digits for a margin of 1e6.
    """
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(1200):
        zs = [mpmath.mpf(v) for v in z]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zs))
        logp = [v - lse for v in zs]
        p = [mpmath.exp(v) for v in logp]
        others = [i for i in range(len(z)) if i != y]

        def log1mp(i: int):
            return mpmath.log(mpmath.fsum(mpmath.exp(zs[j]) for j in range(len(z)) if j != i)) - lse

        mentr = -mpmath.exp(log1mp(y)) * logp[y] - mpmath.fsum(p[i] * log1mp(i) for i in others)
        out = {
            "confidence": p[y],
            "neg_entropy": mpmath.fsum(pi * li for pi, li in zip(p, logp)),
            "neg_modified_entropy": -mentr,
            "neg_loss": logp[y],
            "logit_scaled_confidence": zs[y]
            - mpmath.log(mpmath.fsum(mpmath.exp(zs[i]) for i in others)),
            "hinge": zs[y] - max(zs[i] for i in others),
            "correctness": mpmath.mpf(1 if int(np.argmax(z)) == y else 0),
        }
        return {k: float(v) for k, v in out.items()}


EXTREME_CASES = [
    ([1000.0, 0.0, 0.0], 0),
    ([1000.0, 0.0, 0.0], 1),
    ([0.0, -1000.0], 0),
    ([0.0, -1000.0], 1),
    ([40.0, 0.0], 0),  # p_0 = 1 - 4e-18 rounds to 1: a naive 1 - p gives log(0)
    ([40.0, 0.0], 1),
    ([1e6, -1e6, 3.0, 2.5], 0),  # huge margins
    ([1e6, -1e6, 3.0, 2.5], 2),
    ([-1e6, 1e6 - 1e-3, 1e6], 1),  # two huge, nearly tied logits
    ([745.0, 0.0, -745.0], 2),
    ([1e-300, -1e-300], 1),
    ([30.0, 0.0, -5.0, 29.0], 3),
]


@pytest.mark.parametrize("z, y", EXTREME_CASES)
def test_extreme_logits_match_high_precision(z, y):
    got = all_signals(np.array([z]), np.array([y]))
    want = _reference(z, y)
    for name in SIGNALS:
        value = got[name][0]
        assert np.isfinite(value), name
        # Results below ~1e-300 underflow to 0, which is as close as float64 gets.
        np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-300, err_msg=name)


def test_float32_and_torch_inputs_are_converted_to_float64():
    rng = np.random.default_rng(0)
    z32 = (rng.normal(size=(6, 4)) * 3).astype(np.float32)
    y = rng.integers(0, 4, size=6)
    want = all_signals(z32.astype(np.float64), y)
    from_tensor = all_signals(torch.from_numpy(z32), torch.from_numpy(y))
    from_half = all_signals(torch.from_numpy(z32).to(torch.bfloat16), y)
    half_as_64 = torch.from_numpy(z32).to(torch.bfloat16).to(torch.float64).numpy()
    for name in SIGNALS:
        assert from_tensor[name].dtype == np.float64
        np.testing.assert_array_equal(from_tensor[name], want[name])
        np.testing.assert_array_equal(from_half[name], all_signals(half_as_64, y)[name])


def test_matches_naive_formulas_on_moderate_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 5)) * 2
    y = rng.integers(0, 5, size=200)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    py = p[np.arange(200), y]
    other = np.ones_like(p, dtype=bool)
    other[np.arange(200), y] = False
    zo = np.where(other, z, -np.inf)
    naive = {
        "confidence": py,
        "neg_entropy": (p * np.log(p)).sum(axis=1),
        "neg_modified_entropy": (1 - py) * np.log(py)
        + np.where(other, p * np.log(1 - p), 0).sum(axis=1),
        "neg_loss": np.log(py),
        "logit_scaled_confidence": np.log(py / (1 - py)),
        "hinge": z[np.arange(200), y] - zo.max(axis=1),
        "correctness": (z.argmax(axis=1) == y).astype(float),
    }
    got = all_signals(z, y)
    for name in SIGNALS:
        np.testing.assert_allclose(got[name], naive[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(SIGNALS[name](z, y), got[name])


def test_shift_invariance():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 3)) * 4
    y = rng.integers(0, 3, size=50)
    base = all_signals(z, y)
    shifted = all_signals(z + 1e4, y)
    for name in SIGNALS:
        np.testing.assert_allclose(shifted[name], base[name], rtol=1e-9, atol=1e-9, err_msg=name)


def test_orientation_members_score_higher():
    # Member: confident and right. Non-members: hesitant but right; confidently wrong.
    z = np.array([[6.0, 0.0, -1.0], [1.0, 0.6, 0.0], [0.0, 3.0, 0.0]])
    y = np.array([0, 0, 0])
    got = all_signals(z, y)
    for name in SIGNALS:
        member, hesitant, wrong = got[name]
        assert member >= hesitant > wrong or name == "neg_entropy", name
        if name not in ("correctness", "neg_entropy"):
            assert member > hesitant, name
    # neg_entropy ignores the label: only confidence matters.
    assert got["neg_entropy"][0] > got["neg_entropy"][1]


def test_sigmoid_of_logit_scaled_is_confidence():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(30, 6)) * 5
    y = rng.integers(0, 6, size=30)
    lsc = logit_scaled_confidence(z, y)
    np.testing.assert_allclose(1 / (1 + np.exp(-lsc)), confidence(z, y), rtol=1e-12)


def test_empty_input():
    got = all_signals(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    for name in SIGNALS:
        assert got[name].shape == (0,) and got[name].dtype == np.float64


def test_registry():
    assert SEED_SIGNALS == ("confidence", "neg_entropy", "neg_modified_entropy", "neg_loss")
    assert set(SEED_SIGNALS) <= set(SIGNALS)
    assert len(SIGNALS) == 7


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros(3), np.zeros(3, dtype=int), "shape \\(n, C\\)"),
        (np.zeros((2, 1)), np.zeros(2, dtype=int), "at least 2 classes"),
        (np.zeros((2, 3)), np.zeros(3, dtype=int), "labels must have shape \\(2,\\)"),
        (np.zeros((2, 3)), np.array([0, 3]), "labels must lie in \\[0, 3\\)"),
        (np.zeros((2, 3)), np.array([-1, 0]), "labels must lie"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "labels must be integers"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), np.array([0, 0]), "NaN or infinite"),
        (np.array([[0.0, np.inf], [0.0, 0.0]]), np.array([0, 0]), "NaN or infinite"),
    ],
)
def test_invalid_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        confidence(logits, labels)
