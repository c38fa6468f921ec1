"""Tests for mia.core.thresholds: exact sweep against brute force, ties, per-class fallback."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia.core.thresholds import (
    ClassThresholds,
    brute_force_sweep,
    choose_shrinkage,
    consistent_ranking,
    grid_sweep,
    predict,
    predict_per_class,
    sweep,
    sweep_per_class,
)


def test_hand_example():
    # scores 1 2 3 4, membership 0 0 1 1. Cuts: -inf, 1.5, 2.5, 3.5, +inf.
    # Correct counts: -inf -> 2 (the members); 1.5 -> 3; 2.5 -> 4; 3.5 -> 3; +inf -> 2.
    sw = sweep([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1])
    np.testing.assert_array_equal(sw.thresholds, [-np.inf, 1.5, 2.5, 3.5, np.inf])
    np.testing.assert_array_equal(sw.accuracies, [0.5, 0.75, 1.0, 0.75, 0.5])
    assert sw.best_threshold == 2.5 and sw.best_accuracy == 1.0
    assert sw.thresholds.dtype == np.float64 and sw.accuracies.dtype == np.float64


def test_ties_stay_together_and_first_maximum_wins():
    # scores 1 1 2 2, membership 0 1 1 1. Distinct values 1, 2 -> cuts -inf, 1.5, +inf.
    # -inf: all members -> 3/4.  1.5: [0 0 1 1] -> 3/4.  +inf: none -> 1/4.
    # Equal best accuracy at -inf and 1.5: the first (smallest) threshold is chosen.
    sw = sweep([1.0, 1.0, 2.0, 2.0], [0, 1, 1, 1])
    np.testing.assert_array_equal(sw.thresholds, [-np.inf, 1.5, np.inf])
    np.testing.assert_array_equal(sw.accuracies, [0.75, 0.75, 0.25])
    assert sw.best_threshold == -np.inf and sw.best_accuracy == 0.75


def test_order_of_records_does_not_matter():
    scores = np.array([3.0, 1.0, 2.0, 1.0, 3.0])
    member = np.array([1, 0, 1, 1, 0])
    perm = np.array([4, 2, 0, 3, 1])
    a, b = sweep(scores, member), sweep(scores[perm], member[perm])
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.accuracies, b.accuracies)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.accuracies, b.accuracies)
    assert a.best_threshold == b.best_threshold
    assert a.best_accuracy == b.best_accuracy


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100, 400])
def test_matches_brute_force_with_many_ties(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        n_values = rng.integers(1, max(2, n // 3) + 1)
        scores = rng.integers(0, n_values, size=n).astype(np.float64) * 0.37 - 1.0
        member = rng.integers(0, 2, size=n)
        sw = sweep(scores, member)
        _assert_same(sw, brute_force_sweep(scores, member))
        # Every cut separates consecutive distinct values: u_k < t_k <= u_{k+1}.
        values = np.unique(scores)
        cuts = sw.thresholds[1:-1]
        assert np.all(values[:-1] < cuts) and np.all(cuts <= values[1:])
        assert sw.best_accuracy == sw.accuracies.max()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([-np.inf, -2.5, -1.0, 0.0, 0.0, 1e-9, 3.0, 1e300, np.inf]),
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_matches_brute_force_property(records):
    scores = np.array([s for s, _ in records], dtype=np.float64)
    member = np.array([m for _, m in records])
    _assert_same(sweep(scores, member), brute_force_sweep(scores, member))


def test_all_equal_scores():
    sw = sweep(np.full(6, 0.5), [1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(sw.thresholds, [-np.inf, np.inf])
    np.testing.assert_allclose(sw.accuracies, [4 / 6, 2 / 6])
    assert sw.best_threshold == -np.inf


def test_single_record_and_single_class():
    sw = sweep([7.0], [0])
    np.testing.assert_array_equal(sw.accuracies, [0.0, 1.0])
    assert sw.best_threshold == np.inf and sw.best_accuracy == 1.0
    # Only members: predicting everyone a member (-inf) is perfect.
    sw = sweep([1.0, 2.0, 3.0], [1, 1, 1])
    assert sw.best_threshold == -np.inf and sw.best_accuracy == 1.0
    # Only non-members: +inf is perfect.
    sw = sweep([1.0, 2.0, 3.0], [0, 0, 0])
    assert sw.best_threshold == np.inf and sw.best_accuracy == 1.0


def test_adjacent_floats_and_huge_values():
    lo = 1.0
    hi = np.nextafter(1.0, 2.0)  # no float strictly between them
    sw = sweep([lo, hi], [0, 1])
    assert sw.best_threshold == hi and sw.best_accuracy == 1.0
    np.testing.assert_array_equal(predict([lo, hi], sw.best_threshold), [0, 1])
    # The midpoint of huge values must not overflow to inf.
    sw = sweep([1.5e308, 1.7e308], [0, 1])
    assert np.isfinite(sw.best_threshold) and sw.best_accuracy == 1.0


def test_infinite_scores():
    # Distinct values -inf, 1, +inf -> cuts 1 (midpoint with -inf is -inf, so the upper value) and
    # +inf (midpoint with +inf). A +inf score is a member for every threshold, so the final
    # "no one" candidate is left out.
    # -inf: all members -> 2/4;  1: [0 1 1 1] vs [0 0 1 1] -> 3/4;  +inf: [0 0 0 1] -> 3/4.
    scores = [-np.inf, 1.0, 1.0, np.inf]
    member = [0, 0, 1, 1]
    sw = sweep(scores, member)
    np.testing.assert_array_equal(sw.thresholds, [-np.inf, 1.0, np.inf])
    np.testing.assert_array_equal(sw.accuracies, [0.5, 0.75, 0.75])
    assert sw.best_threshold == 1.0
    np.testing.assert_array_equal(predict(scores, sw.best_threshold), [0, 1, 1, 1])
    _assert_same(sw, brute_force_sweep(scores, member))
    # Only -inf scores: candidates -inf (all members) and +inf (no one).
    np.testing.assert_array_equal(sweep([-np.inf], [0]).accuracies, [0.0, 1.0])
    # Only +inf scores: one candidate.
    np.testing.assert_array_equal(sweep([np.inf, np.inf], [0, 1]).thresholds, [-np.inf])
    # -inf next to +inf: the midpoint is NaN, so the cut is +inf.
    np.testing.assert_array_equal(sweep([-np.inf, np.inf], [0, 1]).thresholds, [-np.inf, np.inf])
    with pytest.raises(ValueError, match="finite"):
        grid_sweep([0.0, np.inf], [0, 1])


def test_predict_uses_greater_or_equal():
    out = predict(np.array([1.0, 2.0, 3.0]), 2.0)
    np.testing.assert_array_equal(out, [0, 1, 1])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(predict([1.0, 2.0], -np.inf), [1, 1])
    np.testing.assert_array_equal(predict([1.0, 2.0], np.inf), [0, 0])


def test_grid_sweep():
    # linspace(0, 4, 3) = [0, 2, 4]; scores 0..4, membership 0 0 1 1 1.
    # t=0: all member -> 3/5; t=2: [0 0 1 1 1] -> 5/5; t=4: [0 0 0 0 1] -> 3/5.
    sw = grid_sweep([0.0, 1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1, 1], n_points=3)
    np.testing.assert_array_equal(sw.thresholds, [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(sw.accuracies, [0.6, 1.0, 0.6])
    assert sw.best_threshold == 2.0
    assert grid_sweep(np.full(4, 2.0), [0, 1, 0, 1]).thresholds.shape == (1,)
    # The exact sweep is never worse than the grid.
    rng = np.random.default_rng(5)
    for _ in range(10):
        scores = rng.normal(size=300)
        member = (scores + rng.normal(size=300) > 0).astype(int)
        assert sweep(scores, member).best_accuracy >= grid_sweep(scores, member).best_accuracy
    assert len(grid_sweep(rng.normal(size=50), rng.integers(0, 2, 50)).thresholds) == 100


@pytest.mark.parametrize(
    "scores, member, match",
    [
        ([], [], "zero records"),
        ([1.0, np.nan], [0, 1], "NaN"),
        ([1.0, 2.0], [0, 2], "only 0 and 1"),
        ([1.0, 2.0], [0, 1, 1], "shape \\(2,\\)"),
        ([[1.0, 2.0]], [0, 1], "shape \\(n,\\)"),
    ],
)
def test_sweep_rejects_bad_input(scores, member, match):
    with pytest.raises(ValueError, match=match):
        sweep(scores, member)
    with pytest.raises(ValueError, match=match):
        brute_force_sweep(scores, member)


def test_predict_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        predict([1.0, np.nan], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        predict([1.0], float("nan"))


def _per_class_data():
    # Class 0: non-members 0..14, members 20..34            -> own cut (14 + 20) / 2 = 17.
    # Class 1: non-members -40..-26, members -20..-6        -> own cut (-26 + -20) / 2 = -23.
    # Class 2: only 5 records (< min_count = 20)            -> fallback.
    # Class 3: 25 records, all members                      -> fallback.
    scores = np.concatenate([
        np.arange(0, 15), np.arange(20, 35),
        np.arange(-40, -25), np.arange(-20, -5),
        [1.0, 2.0, 3.0, 4.0, 5.0],
        np.linspace(-50, 50, 25),
    ]).astype(np.float64)
    member = np.concatenate([
        np.zeros(15), np.ones(15), np.zeros(15), np.ones(15), [0, 1, 0, 1, 0], np.ones(25),
    ]).astype(np.int64)
    labels = np.repeat([0, 1, 2, 3], [30, 30, 5, 25])
    return scores, member, labels


def test_sweep_per_class_and_fallback():
    scores, member, labels = _per_class_data()
    ct = sweep_per_class(scores, member, labels, min_count=20)
    assert isinstance(ct, ClassThresholds)
    assert ct.global_threshold == sweep(scores, member).best_threshold
    assert ct.per_class[0] == 17.0
    assert ct.per_class[1] == -23.0
    assert ct.fallback_classes == [2, 3]
    assert ct.per_class[2] == ct.global_threshold == ct.per_class[3]
    # A smaller min_count lets class 2 have its own threshold; class 3 still has one class only.
    ct_small = sweep_per_class(scores, member, labels, min_count=5)
    assert ct_small.fallback_classes == [3]
    assert ct_small.per_class[2] == sweep(scores[labels == 2], member[labels == 2]).best_threshold


def test_predict_per_class_uses_global_for_unseen_labels():
    ct = ClassThresholds(global_threshold=0.0, per_class={0: 17.0, 1: -23.0}, fallback_classes=[])
    scores = np.array([16.0, 18.0, -24.0, -22.0, -1.0, 1.0])
    labels = np.array([0, 0, 1, 1, 7, 7])  # label 7 never seen -> threshold 0
    out = predict_per_class(scores, labels, ct)
    np.testing.assert_array_equal(out, [0, 1, 0, 1, 0, 1])
    assert out.dtype == np.int64
    # Fitted thresholds classify the fitting data of the separable classes perfectly.
    scores, member, labels = _per_class_data()
    fitted = sweep_per_class(scores, member, labels)
    pred = predict_per_class(scores, labels, fitted)
    mask = labels < 2
    np.testing.assert_array_equal(pred[mask], member[mask])


def test_sweep_per_class_validation():
    with pytest.raises(ValueError, match="labels must have shape"):
        sweep_per_class([1.0, 2.0], [0, 1], [0])
    with pytest.raises(ValueError, match="labels must be integers"):
        sweep_per_class([1.0, 2.0], [0, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="min_count"):
        sweep_per_class([1.0, 2.0], [0, 1], [0, 1], min_count=0)


def _loop_per_class(s, m, lab, min_count):
    """The definition: an exact sweep per label, global fallback below min_count or with one class."""
    g = sweep(s, m).best_threshold
    out, fb = {}, []
    for c in np.unique(lab).tolist():
        mask = lab == c
        if mask.sum() < min_count or m[mask].min() == m[mask].max():
            out[c], fb = g, fb + [c]
        else:
            out[c] = sweep(s[mask], m[mask]).best_threshold
    return g, out, fb


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 1.0, 2.0, np.inf]) | st.floats(-3, 3), min_size=n, max_size=n),
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 4), min_size=n, max_size=n))),
    st.integers(1, 6))
def test_sweep_per_class_equals_a_sweep_per_label(data, min_count):
    s, m, lab = (np.array(x) for x in data)
    s = s.astype(np.float64)
    ct = sweep_per_class(s, m, lab, min_count=min_count)
    g, per_class, fallback = _loop_per_class(s, m, lab, min_count)
    assert ct.global_threshold == g and ct.fallback_classes == fallback
    assert ct.per_class == per_class


# ---------------------------------------------------------------------------------------------
# Per-class thresholds shrunk towards the global one


def test_shrinkage_hand_example():
    # class 0: scores 1 2 3 4, membership 0 0 1 1 (own best cut 2.5, 4 of 4 right);
    # class 1: scores 5 6 7 8, membership 0 0 0 1 (own best cut 7.5 = the global best, 6 of 8 right).
    # Over the global cuts, class 0 gets 4 + n0 * 5/8 at 2.5 and 2 + n0 * 6/8 at 7.5, n0 = lambda * 8 / 2:
    # 2.5 while n0 <= 16 (lambda <= 4; at 4 a tie, the smaller cut), 7.5 beyond.
    s, m, lab = [1.0, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1]
    for lam, expected in ((0.0, 2.5), (1.0, 2.5), (4.0, 2.5), (8.0, 7.5), (np.inf, 7.5)):
        ct = sweep_per_class(s, m, lab, min_count=1, shrinkage=lam)
        assert ct.per_class == {0: expected, 1: 7.5} and ct.global_threshold == 7.5 and ct.shrinkage == lam
    with pytest.raises(ValueError, match="shrinkage"):
        sweep_per_class(s, m, lab, shrinkage=-1.0)


def _class_data(seed: int, n: int, classes: int, class_effect: float, scale: float = 0.6):
    rng = np.random.default_rng(seed)
    m = rng.permutation(np.repeat([0, 1], n // 2))
    lab = rng.integers(0, classes, n)
    return class_effect * lab + m + rng.normal(scale=scale, size=n), m, lab


GRID = (0.0, 0.25, 1.0, 4.0, np.inf)


@pytest.mark.parametrize("seed", range(3))
def test_shrinkage_keeps_real_class_differences(seed):
    # each class sits 3 above the previous; members 1 above their class's non-members
    s, m, lab = _class_data(seed, 1200, 4, 3.0)
    lam = choose_shrinkage(s, m, lab, GRID, min_count=20)
    assert lam < np.inf
    ct = sweep_per_class(s, m, lab, min_count=20, shrinkage=lam)
    for c in range(4):
        assert 3.0 * c < ct.per_class[c] < 3.0 * c + 1.0


@pytest.mark.parametrize("seed", range(3))
def test_shrinkage_returns_near_global_when_class_differences_are_noise(seed):
    # no class effect, 10 classes of about 40 records, a weak signal: free per-class cuts chase noise
    s, m, lab = _class_data(seed, 400, 10, 0.0, scale=1.2)
    lam = choose_shrinkage(s, m, lab, GRID, min_count=20)
    assert lam >= 1.0  # at most half weight on an average class's own records
    spread = lambda ct: max(abs(t - ct.global_threshold) for t in ct.per_class.values())  # noqa: E731
    shrunk, free = (sweep_per_class(s, m, lab, min_count=20, shrinkage=x) for x in (lam, 0.0))
    assert spread(shrunk) < 0.6 * spread(free)


def test_choose_shrinkage_single_value_and_determinism():
    s, m, lab = _class_data(0, 300, 5, 0.5)
    assert choose_shrinkage(s, m, lab, (1.0,)) == 1.0
    assert choose_shrinkage(s, m, lab, GRID, seed=3) == choose_shrinkage(s, m, lab, GRID, seed=3)


def test_consistent_ranking_by_hand():
    rank = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    pred = np.array([0, 0, 1, 0, 1, 1])  # agrees with rank >= 0.25 except record 3 (0.4, predicted 0)
    scores, t = consistent_ranking(rank, pred)
    np.testing.assert_array_equal((scores >= t).astype(int), pred)
    # the best cut is 0.25 (one disagreement; 0.45 has one too, sweep keeps the first): only record 3 moves
    assert t == pytest.approx(0.25)
    np.testing.assert_array_equal(scores[[0, 1, 2, 4, 5]], rank[[0, 1, 2, 4, 5]])
    assert scores[3] == np.nextafter(t, -np.inf)
    # a predicted member below the cut moves up to it
    scores, t = consistent_ranking(rank, np.array([1, 0, 0, 0, 1, 1]))
    assert t == pytest.approx(0.45) and scores[0] == t and (scores[1:4] == rank[1:4]).all()
    # everyone or no one a member: the ranking as is, at -inf / +inf
    assert consistent_ranking(rank, np.ones(6))[1] == -np.inf and consistent_ranking(rank, np.zeros(6))[1] == np.inf
    with pytest.raises(ValueError, match="finite"):
        consistent_ranking(np.array([0.0, np.inf]), np.array([0, 1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=1, max_size=40))
def test_consistent_ranking_always_gives_the_predictions(records):
    rank = np.array([float(r) for r, _ in records])
    pred = np.array([int(p) for _, p in records])
    scores, t = consistent_ranking(rank, pred)
    np.testing.assert_array_equal((scores >= t).astype(int), pred)
    agree = (rank >= t) == pred.astype(bool)
    np.testing.assert_array_equal(scores[agree], rank[agree])  # records on the right side keep their scores


def test_half_precision_tensors_are_read_exactly():
    # bf16 has no numpy dtype: 0.1 in bf16 is 0.10009765625 = 205 / 2048, kept exactly in float32
    import torch

    from mia.core.arrays import to_numpy

    x = torch.tensor([0.1, -2.5], dtype=torch.bfloat16)
    out = to_numpy(x)
    assert out.dtype == np.float32 and out.tolist() == [205 / 2048, -2.5]
    assert to_numpy([1, 0]).tolist() == [1, 0]
