"""Tests for mia.core.metrics: hand-computed ROC/AUC/TPR@FPR, and agreement with scikit-learn."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mia.core.metrics import AttackMetrics, accuracy, attack_metrics, auc, roc_curve, tpr_at_fpr


def test_accuracy_hand():
    # pred 1 0 1 1 vs membership 1 1 1 0: positions 0 and 2 agree -> 2/4.
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(np.array([1, 1]), np.array([1, 1])) == 1.0


def test_accuracy_validation():
    with pytest.raises(ValueError, match="zero records"):
        accuracy([], [])
    with pytest.raises(ValueError, match="shape"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        accuracy([1, 2], [1, 0])


def test_auc_hand():
    # Members [3, 2], non-members [2, 1]. Pairs (member, non-member):
    # (3,2) win, (3,1) win, (2,2) tie = 1/2, (2,1) win -> (1 + 1 + 0.5 + 1) / 4 = 0.875.
    assert auc([3.0, 2.0, 2.0, 1.0], [1, 1, 0, 0]) == 0.875
    assert auc([1.0, 2.0], [0, 1]) == 1.0
    assert auc([1.0, 2.0], [1, 0]) == 0.0
    assert auc(np.full(5, 4.0), [1, 0, 1, 0, 0]) == 0.5


def test_infinite_scores_are_ordered():
    # Members +inf, 1; non-members -inf, 1: pairs win, win, win, tie -> 3.5 / 4.
    scores, member = [np.inf, 1.0, -np.inf, 1.0], [1, 1, 0, 0]
    assert auc(scores, member) == 0.875
    fpr, tpr = roc_curve(scores, member)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    am = attack_metrics(scores, [1, 1, 0, 1], member)
    assert am.auc == 0.875 and am.accuracy == 0.75


def test_roc_hand_with_ties():
    # Scores 3 (member), 2 (member), 2 (non-member), 1 (non-member); P = N = 2.
    # Thresholds 3, 2, 1 (descending):  t=3: TP 1 FP 0;  t=2: TP 2 FP 1;  t=1: TP 2 FP 2.
    fpr, tpr = roc_curve([3.0, 2.0, 2.0, 1.0], [1, 1, 0, 0])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])


def test_tpr_at_fpr_hand():
    # Members 10, 9, 5; non-members 8, 4, 3, 2, 1 (P = 3, N = 5, FPR step 0.2).
    # ROC points: (0,0) (0,1/3) (0,2/3) (0.2,2/3) (0.2,1) (0.4,1) (0.6,1) (0.8,1) (1,1).
    scores = [10.0, 9.0, 5.0, 8.0, 4.0, 3.0, 2.0, 1.0]
    member = [1, 1, 1, 0, 0, 0, 0, 0]
    assert tpr_at_fpr(scores, member, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, member, 0.1) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, member, 0.2) == 1.0
    assert tpr_at_fpr(scores, member, 1.0) == 1.0


def test_tpr_at_fpr_tie_cannot_be_split():
    # Member and non-member tied at the top score 5: ROC (0,0) (0.5,0.5) (0.5,1) (1,1).
    scores, member = [5.0, 5.0, 1.0, 0.0], [1, 0, 1, 0]
    assert tpr_at_fpr(scores, member, 0.4) == 0.0
    assert tpr_at_fpr(scores, member, 0.5) == 1.0


def test_tpr_at_fpr_exact_boundary():
    # 100 non-members, exactly one above every member: FPR 1/100 must count as <= 0.01.
    scores = np.concatenate([[100.0], np.arange(99) - 200.0, np.arange(10) + 50.0])
    member = np.concatenate([np.zeros(100), np.ones(10)]).astype(int)
    assert tpr_at_fpr(scores, member, 0.01) == 1.0
    assert tpr_at_fpr(scores, member, 0.001) == 0.0


def test_agrees_with_sklearn_on_random_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101, 1000):
        for _ in range(10):
            member = rng.integers(0, 2, size=n)
            member[0], member[-1] = 0, 1  # both classes present
            scores = rng.integers(0, max(2, n // 4), size=n).astype(np.float64)
            want = skm.roc_auc_score(member, scores)
            assert auc(scores, member) == pytest.approx(want, abs=1e-12)
            fpr, tpr = roc_curve(scores, member)
            sk_fpr, sk_tpr, _ = skm.roc_curve(member, scores, drop_intermediate=False)
            np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
            np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
            assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
            assert len(fpr) == len(np.unique(scores)) + 1


def test_ranking_metrics_need_both_classes():
    for fn in (auc, roc_curve):
        with pytest.raises(ValueError, match="one member and one non-member"):
            fn([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="fpr must be in"):
        tpr_at_fpr([1.0, 2.0], [0, 1], 1.5)


def test_attack_metrics():
    # Hand example: auc 0.875 (above); pred from threshold 2 -> [1 1 1 0] vs [1 1 0 0] -> 3/4.
    # No non-member scores 3, so at FPR 0 the best TPR is 1/2 (only the score-3 member).
    scores = np.array([3.0, 2.0, 2.0, 1.0])
    member = np.array([1, 1, 0, 0])
    pred = (scores >= 2).astype(int)
    am = attack_metrics(scores, pred, member)
    assert am == AttackMetrics(
        accuracy=0.75, auc=0.875, tpr_at_1pct_fpr=0.5, tpr_at_01pct_fpr=0.5, n=4, n_members=2
    )
    d = am.to_dict()
    assert d == {
        "accuracy": 0.75,
        "auc": 0.875,
        "tpr_at_1pct_fpr": 0.5,
        "tpr_at_01pct_fpr": 0.5,
        "n": 4,
        "n_members": 2,
    }
    json.dumps(d)


def test_attack_metrics_single_class_reports_nan():
    am = attack_metrics([1.0, 2.0, 3.0], [1, 1, 0], [1, 1, 1])
    assert am.accuracy == pytest.approx(2 / 3)
    assert math.isnan(am.auc) and math.isnan(am.tpr_at_1pct_fpr) and math.isnan(am.tpr_at_01pct_fpr)
    d = am.to_dict()
    assert d["auc"] is None and d["n_members"] == 3
    json.dumps(d)


def test_attack_metrics_validation():
    with pytest.raises(ValueError, match="pred must have shape"):
        attack_metrics([1.0, 2.0], [1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        attack_metrics([1.0, np.nan], [1, 0], [0, 1])


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals

from mia.core.metrics import _ranking_stats, _resampled_counts, bootstrap_intervals  # noqa: E402


def test_bootstrap_hand_cases():
    # members 3 and 4 scored above non-members 1 and 2: every resample is perfectly ranked
    b = bootstrap_intervals([3.0, 4.0, 1.0, 2.0], [1, 1, 0, 0], [1, 1, 0, 0], n_resamples=200)
    assert b.intervals["auc"] == (1.0, 1.0) and b.intervals["tpr_at_1pct_fpr"] == (1.0, 1.0)
    assert b.intervals["accuracy"] == (1.0, 1.0)
    # members all predicted right, non-members all wrong: stratified resamples keep P = N = 2, so
    # accuracy is always 2 / 4
    b = bootstrap_intervals([3.0, 4.0, 1.0, 2.0], [1, 1, 1, 1], [1, 1, 0, 0], n_resamples=200)
    assert b.intervals["accuracy"] == (0.5, 0.5)
    # 2 non-members: 1% and 0.1% of 2 allow no false positive at all
    assert b.negatives_at_fpr == {"tpr_at_1pct_fpr": 0, "tpr_at_01pct_fpr": 0}
    assert b.few_negatives == ["tpr_at_1pct_fpr", "tpr_at_01pct_fpr"]


def test_bootstrap_flags_cuts_with_fewer_than_10_negatives():
    rng = np.random.default_rng(0)
    m = np.r_[np.ones(1000, np.int64), np.zeros(1000, np.int64)]
    s = m + rng.normal(size=2000)
    b = bootstrap_intervals(s, (s > 0.5).astype(np.int64), m, n_resamples=50)
    # 1% of 1,000 non-members is 10 false positives (enough); 0.1% is one
    assert b.negatives_at_fpr == {"tpr_at_1pct_fpr": 10, "tpr_at_01pct_fpr": 1}
    assert b.few_negatives == ["tpr_at_01pct_fpr"]
    d = b.to_dict()
    assert d["few_negatives"] == ["tpr_at_01pct_fpr"] and d["resamples"] == 50 and len(d["auc"]) == 2
    json.dumps(d)


def test_resampled_ranking_stats_equal_the_exact_metrics_on_each_resample():
    rng = np.random.default_rng(1)
    m = np.r_[np.ones(60, np.int64), np.zeros(140, np.int64)]
    s = np.round(m + rng.normal(size=200), 1)  # ties
    _, groups = np.unique(s, return_inverse=True)
    pos, neg = np.flatnonzero(m == 1), np.flatnonzero(m == 0)
    pos_draw, neg_draw = pos[rng.integers(0, 60, (5, 60))], neg[rng.integers(0, 140, (5, 140))]
    stats = _ranking_stats(_resampled_counts(groups, groups.max() + 1, pos_draw),
                           _resampled_counts(groups, groups.max() + 1, neg_draw))
    for i in range(5):
        idx = np.r_[pos_draw[i], neg_draw[i]]
        assert stats["auc"][i] == pytest.approx(auc(s[idx], m[idx]), abs=1e-12)
        assert stats["tpr_at_1pct_fpr"][i] == tpr_at_fpr(s[idx], m[idx], 0.01)
        assert stats["tpr_at_01pct_fpr"][i] == tpr_at_fpr(s[idx], m[idx], 0.001)


def test_bootstrap_accuracy_interval_matches_the_binomial_width_and_is_seeded():
    rng = np.random.default_rng(2)
    n = 2000
    m = np.r_[np.ones(n // 2, np.int64), np.zeros(n // 2, np.int64)]
    pred = np.where(rng.random(n) < 0.6, m, 1 - m)  # about 60 % right
    s = pred + rng.normal(size=n)
    b = bootstrap_intervals(s, pred, m, n_resamples=1000, seed=0)
    lo, hi = b.intervals["accuracy"]
    acc = accuracy(pred, m)
    assert lo < acc < hi
    # 95 % of a normal: +-1.96 standard errors, sqrt(0.6 * 0.4 / 2000) = 0.011 -> width about 0.043
    assert abs((hi - lo) - 2 * 1.96 * math.sqrt(acc * (1 - acc) / n)) < 0.008
    assert b.intervals == bootstrap_intervals(s, pred, m, n_resamples=1000, seed=0).intervals
    assert b.intervals != bootstrap_intervals(s, pred, m, n_resamples=1000, seed=1).intervals
