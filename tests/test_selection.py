"""mia.selection: repeated stratified cross-validation, the floor of the seed's method, test intervals."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia import attacks, selection
from mia.attacks import Candidate
from mia.core import signals as sig
from mia.core.folds import repeated_stratified_folds, stratified_folds


def _membership(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.array([0, 1], dtype=np.int64), n // 2))


def test_repeated_folds_are_stratified_distinct_and_start_with_the_single_split():
    m = _membership(50, np.random.default_rng(0))
    folds = repeated_stratified_folds(m, 5, 4, seed=3)
    assert folds.shape == (4, 50) and folds.dtype == np.int64
    np.testing.assert_array_equal(folds[0], stratified_folds(m, 5, seed=3))
    for row in folds:
        for cls in (0, 1):
            counts = np.bincount(row[m == cls], minlength=5)
            assert counts.tolist() == [5] * 5
    assert len({row.tobytes() for row in folds}) == 4
    np.testing.assert_array_equal(folds, repeated_stratified_folds(m, 5, 4, seed=3))
    with pytest.raises(ValueError):
        repeated_stratified_folds(m, 5, 0, seed=3)


def test_fold_accuracy_and_paired_difference_by_hand():
    # 2 repeats of 2 folds over 4 records (membership 1 1 0 0)
    m = np.array([1, 1, 0, 0])
    folds = np.array([[0, 1, 0, 1], [1, 0, 0, 1]])
    preds = np.array([[1, 0, 0, 0], [1, 1, 1, 1]])
    # repeat 0: fold 0 = records 0, 2 -> both right; fold 1 = records 1, 3 -> 1 of 2
    # repeat 1: fold 0 = records 1, 2 -> 1 of 2;   fold 1 = records 0, 3 -> 1 of 2
    acc = selection.fold_accuracy(preds, m, folds)
    np.testing.assert_array_equal(acc, [[1.0, 0.5], [0.5, 0.5]])
    d = selection.paired_difference(acc, np.full((2, 2), 0.5))
    assert d["mean"] == 0.125 and d["se"] == pytest.approx(0.25 / 2)  # differences 0.5 0 0 0: sd 0.25


def test_cv_accuracy_is_the_mean_over_all_folds_and_the_floor_difference_is_paired():
    rng = np.random.default_rng(4)
    n = 300
    m = _membership(n, rng)
    labels = rng.integers(0, 5, n)
    feats = {"a": 0.8 * m + rng.normal(size=n), "b": 0.3 * m + rng.normal(size=n)}
    cands = (Candidate("global", "a"), Candidate("global", "b"))
    sel = selection.select(cands, feats, labels, m, feats, labels, k=5, repeats=3, floor="b")
    assert sel.repeats == 3 and sel.folds == 5
    for rep in sel.candidates:
        assert rep.fold_accuracy.shape == (3, 5)
        assert rep.cv["accuracy"] == pytest.approx(rep.fold_accuracy.mean())
        assert rep.cv["repeats"] == 3 and rep.cv["folds"] == 5
    a, b = sel.candidates
    assert a.cv["vs_floor"]["mean"] == pytest.approx(a.cv["accuracy"] - b.cv["accuracy"])
    assert b.cv["vs_floor"] == {"mean": 0.0, "se": 0.0}
    # one repeat: the single split of cross_validate
    one = selection.select(cands, feats, labels, m, feats, labels, k=5, repeats=1)
    _, preds = selection.cross_validate(cands[0], feats, labels, m, k=5)
    assert one.candidates[0].cv["accuracy"] == pytest.approx(np.mean(preds == m))


@pytest.mark.parametrize("seed", range(4))
def test_small_eval_set_picks_the_real_signal_over_per_class_noise(seed):
    """n = 200: per-class thresholds on noise look good in-sample; the weak real signal is the right choice."""
    rng = np.random.default_rng(seed)
    n = 200
    m = _membership(n, rng)
    labels = rng.integers(0, 4, n)
    feats = {"weak": 0.8 * m + rng.normal(size=n), "noise": rng.normal(size=n)}
    cands = (Candidate("global", "noise"), Candidate("class", "noise"), Candidate("global", "weak"))
    sel = selection.select(cands, feats, labels, m, feats, labels, min_class_count=10)
    assert sel.chosen == "weak"


def _one_signal(seed: int, resamples: int):
    """(selection of one global threshold on a signal with membership + noise, its features, labels,
    membership): 400 records, eval and test the same, with bootstrap intervals."""
    rng = np.random.default_rng(seed)
    n = 400
    m = _membership(n, rng)
    labels = rng.integers(0, 3, n)
    feats = {"s": m + rng.normal(size=n)}
    sel = selection.select((Candidate("global", "s"),), feats, labels, m, feats, labels, test_membership=m,
                           bootstrap_resamples=resamples)
    return sel, feats, labels, m


def test_bootstrap_intervals_of_the_chosen_attack_on_test():
    sel, feats, labels, m = _one_signal(5, 200)
    iv = sel.test_intervals
    assert iv["resamples"] == 200 and iv["few_negatives"] == ["tpr_at_1pct_fpr", "tpr_at_01pct_fpr"]
    test = sel.chosen_report.test
    for key in ("accuracy", "auc"):
        assert iv[key][0] <= test[key] <= iv[key][1]
    no_key = selection.select((Candidate("global", "s"),), feats, labels, m, feats, labels)
    assert no_key.test_intervals is None


def test_scores_follow_the_best_cv_auc_and_give_the_chosen_predictions():
    """The predictions come from the accuracy choice, the scores' order from the best CV AUC."""
    rng = np.random.default_rng(11)
    n = 600
    m = _membership(n, rng)
    labels = rng.integers(0, 3, n)
    # 'step': 0/1, right for 80 % of the records (accuracy 0.8, AUC 0.8, no order within a side);
    # 'smooth': a Gaussian shift of 1.5 (accuracy Phi(0.75) = 0.77, AUC Phi(1.06) = 0.86)
    feats = {"step": (m ^ (rng.random(n) < 0.2)).astype(float), "smooth": 1.5 * m + rng.normal(size=n)}
    cands = (Candidate("global", "step"), Candidate("global", "smooth"))
    sel = selection.select(cands, feats, labels, m, feats, labels, test_membership=m, bootstrap_resamples=0)
    assert (sel.chosen, sel.ranking) == ("step", "smooth")
    np.testing.assert_array_equal((sel.test_scores >= sel.score_threshold).astype(int), sel.test_predictions)
    assert sel.test_metrics["accuracy"] == sel.chosen_report.test["accuracy"]  # the predictions are the chosen's
    assert sel.test_metrics["auc"] > sel.chosen_report.test["auc"] + 0.05
    own = selection.select(cands, feats, labels, m, feats, labels, test_membership=m, bootstrap_resamples=0,
                           ranking=False)
    assert own.ranking is None and own.test_metrics == own.chosen_report.test


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(30, 80), strength=st.floats(0.0, 1.0))
def test_chosen_cv_accuracy_is_never_below_the_seed_methods(seed, n, strength):
    """Property: on small, weak, random eval sets the chosen attack's CV accuracy (repeated CV, the same
    splits for all) is at least that of the seed's method, which is always among the candidates."""
    rng = np.random.default_rng(seed)
    m = _membership(2 * n, rng)
    labels = rng.integers(0, 4, 2 * n)
    names = list(sig.SEED_SIGNALS) + ["hinge"]
    feats = {s: rng.normal(size=2 * n) + rng.uniform(0, strength) * m for s in names}
    cands = attacks.strong_posterior_candidates(names)
    sel = selection.select(cands, feats, labels, m, feats, labels, repeats=2, floor="seed_method",
                           min_class_count=5, class_priors=(0.0, 1.0, np.inf))
    cv = {r.name: r.cv["accuracy"] for r in sel.candidates}
    assert cv[sel.chosen] >= cv["seed_method"] - 1e-12
    assert sel.chosen_report.cv["vs_floor"]["mean"] >= -1e-12


def test_evaluate_table_shows_intervals_and_flags_coarse_tpr():
    from types import SimpleNamespace

    from mia import report
    from mia.config import TaskConfig

    sel, _, _, _ = _one_signal(6, 100)
    outcome = SimpleNamespace(task=TaskConfig(1, "posterior"), victim="v", seed=sel, used=sel)
    table = report.comparison_table(SimpleNamespace(outcomes=[outcome]))
    lo, hi = sel.test_intervals["accuracy"]
    assert f"[{100 * lo:.1f}-{100 * hi:.1f}]" in table
    assert "stratified percentile bootstrap intervals (100 resamples)" in table
    # 200 non-members: 0.1 % allows no false positive, 1 % two
    assert "* TPR@0.1%: the FPR cut allows only 0 false positive(s)" in table
    assert "* TPR@1%: the FPR cut allows only 2 false positive(s)" in table
