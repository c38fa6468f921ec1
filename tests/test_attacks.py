"""mia.attacks: features per access level, candidates, and cross-validated selection.

Synthetic data with a known answer: member scores are shifted by ``delta`` standard deviations of a
Gaussian, so the best possible (Bayes) accuracy with balanced classes is Phi(delta / 2).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from mia import attacks
from mia.core import signals as sig
from mia import selection
from mia.attacks import Candidate, fit, label_only_features, posterior_features
from mia.selection import cross_validate, select

# ---------------------------------------------------------------------------------------------
# Helpers


def _membership(n: int, rng: np.random.Generator) -> np.ndarray:
    m = np.repeat(np.array([0, 1], dtype=np.int64), n // 2)
    return rng.permutation(m)


def _bayes(delta: float) -> float:
    """Accuracy of the best threshold between N(0, 1) (non-members) and N(delta, 1) (members)."""
    return float(norm.cdf(delta / 2))


def _report(selection, name: str):
    return next(c for c in selection.candidates if c.name == name)


# ---------------------------------------------------------------------------------------------
# Features


def test_posterior_features_two_views():
    logits = np.array([
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # identity
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],  # flip
    ])
    labels = np.array([0, 2])
    feats = posterior_features(logits, labels, ["id", "flip"])
    assert list(feats) == list(sig.SIGNALS) + ["aug_flip_lsc", "view1_lsc"]  # no aug_mean_lsc with two views
    # logit-scaled confidence z_y - log sum_{j != y} exp(z_j), by hand
    lsc_id = np.array([2 - math.log(2), -math.log(1 + math.e)])
    lsc_flip = np.array([-math.log(2), 1 - math.log(2 * math.e)])
    np.testing.assert_allclose(feats["logit_scaled_confidence"], lsc_id, rtol=1e-12)
    np.testing.assert_allclose(feats["aug_flip_lsc"], [1 - math.log(2), -(math.log(1 + math.e) + math.log(2)) / 2],
                               rtol=1e-12)
    np.testing.assert_allclose(feats["aug_flip_lsc"], (lsc_id + lsc_flip) / 2, rtol=1e-12)
    np.testing.assert_allclose(feats["view1_lsc"], lsc_flip, rtol=1e-12)
    # every plain signal comes from the image itself (view 0) only
    for name, values in sig.all_signals(logits[0], labels).items():
        np.testing.assert_array_equal(feats[name], values)
        assert feats[name].dtype == np.float64


def test_posterior_features_three_views_flip_found_by_name():
    logits = np.array([
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # identity
        [[math.log(3), 0.0, 0.0], [0.0, 0.0, 5.0]],  # a shift
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],  # flip, not at index 1
    ])
    labels = np.array([0, 2])
    feats = posterior_features(logits, labels, ["id", "id:dx+1dy+0", "flip"])
    lsc = np.array([
        [2 - math.log(2), -math.log(1 + math.e)],
        [math.log(3) - math.log(2), 5 - math.log(2)],
        [-math.log(2), -math.log(2)],
    ])
    np.testing.assert_allclose(feats["aug_flip_lsc"], (lsc[0] + lsc[2]) / 2, rtol=1e-12)
    np.testing.assert_allclose(feats["aug_mean_lsc"], lsc.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(feats["view1_lsc"], lsc[1], rtol=1e-12)
    np.testing.assert_allclose(feats["view2_lsc"], lsc[2], rtol=1e-12)


def test_posterior_features_identity_only_and_shape_check():
    logits = np.zeros((1, 4, 3))
    feats = posterior_features(logits, np.array([0, 1, 2, 0]), ["id"])
    assert list(feats) == list(sig.SIGNALS)
    with pytest.raises(ValueError):
        posterior_features(logits[0], np.array([0, 1, 2, 0]), ["id"])  # (n, C): no view axis
    with pytest.raises(ValueError):
        posterior_features(logits, np.array([0, 1, 2, 0]), ["id", "flip"])  # views do not match


def test_label_only_features_by_hand():
    predicted = np.array([[0, 1, 0, 3], [0, 0, 0, 3], [1, 1, 2, 3]], dtype=np.int64)
    labels = np.array([0, 1, 2, 3])
    feats = label_only_features(predicted, labels)
    assert list(feats) == ["correctness", "aug_correct_count"]
    np.testing.assert_array_equal(feats["correctness"], [1.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(feats["aug_correct_count"], [2.0, 2.0, 1.0, 3.0])
    assert all(v.dtype == np.float64 for v in feats.values())
    # one view: correctness only; any integer dtype is accepted
    single = label_only_features(predicted[:1].astype(np.int32), labels)
    assert list(single) == ["correctness"]
    with pytest.raises(ValueError):
        label_only_features(predicted, labels[:3])


def test_noise_features_by_hand():
    labels = np.array([0, 1, 2, 3])
    predicted = labels[None, :].copy()
    # four noisy queries: two at level 0.1, two at level 0.2
    noisy = np.array([[0, 1, 2, 0],
                      [0, 0, 2, 0],
                      [1, 1, 2, 0],
                      [1, 0, 2, 0]], dtype=np.int16)
    feats = label_only_features(predicted, labels, noisy, [0.1, 0.1, 0.2, 0.2])
    assert list(feats) == ["correctness", "noise_correct", "sigma0.1_correct", "sigma0.2_correct"]
    np.testing.assert_array_equal(feats["noise_correct"], [0.5, 0.5, 1.0, 0.0])
    np.testing.assert_array_equal(feats["sigma0.1_correct"], [1.0, 0.5, 1.0, 0.0])
    np.testing.assert_array_equal(feats["sigma0.2_correct"], [0.0, 0.5, 1.0, 0.0])
    # one level: the pooled fraction only
    one = label_only_features(predicted, labels, noisy[:2], [0.1, 0.1])
    assert list(one) == ["correctness", "noise_correct"]
    np.testing.assert_array_equal(one["noise_correct"], [1.0, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="noise_levels"):
        label_only_features(predicted, labels, noisy, [0.1])
    with pytest.raises(ValueError, match="noise_levels"):
        label_only_features(predicted, labels, noisy)
    with pytest.raises(ValueError):
        label_only_features(predicted, labels, noisy[:, :3], [0.1] * 4)
    with pytest.raises(TypeError, match="integer predicted labels"):
        label_only_features(predicted, labels, noisy.astype(np.float32), [0.1] * 4)


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.0, 1.0, 0.0, 3.0]]),  # integral values, float dtype: still refused
        np.full((1, 4), 0.25, dtype=np.float32),  # probabilities
        np.zeros((2, 4, 10), dtype=np.float32),  # logits of every view
        np.zeros((2, 4, 10), dtype=np.float16),
    ],
)
def test_label_only_features_refuse_floats(array):
    with pytest.raises(TypeError, match="integer predicted labels"):
        label_only_features(array, np.array([0, 1, 2, 3]))


# ---------------------------------------------------------------------------------------------
# Folds


def test_stratified_folds_balanced_and_deterministic():
    rng = np.random.default_rng(3)
    membership = rng.permutation(np.r_[np.ones(13, np.int64), np.zeros(22, np.int64)])
    folds = selection.stratified_folds(membership, 5, seed=7)
    assert folds.shape == (35,) and folds.dtype == np.int64
    assert set(folds.tolist()) == set(range(5))
    for cls, total in ((1, 13), (0, 22)):
        counts = np.bincount(folds[membership == cls], minlength=5)
        assert counts.sum() == total and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, selection.stratified_folds(membership, 5, seed=7))
    assert not np.array_equal(folds, selection.stratified_folds(membership, 5, seed=8))


def test_cross_validation_never_scores_a_record_with_a_fit_that_saw_it():
    """Out-of-fold predictions of a global threshold: each fold's threshold comes from the other folds."""
    rng = np.random.default_rng(1)
    m = _membership(40, rng)
    feats = {"s": m + rng.normal(size=40)}
    labels = np.zeros(40, np.int64)
    _, preds = cross_validate(Candidate("global", "s"), feats, labels, m, k=4, seed=5)
    folds = selection.stratified_folds(m, 4, seed=5)
    for f in range(4):
        train = folds != f
        t = fit(Candidate("global", "s"), {"s": feats["s"][train]}, labels[train], m[train]).threshold
        np.testing.assert_array_equal(preds[folds == f], (feats["s"][folds == f] >= t).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Selection


def test_cv_selects_the_informative_feature():
    rng = np.random.default_rng(0)
    n, delta = 2000, 1.0
    m = _membership(n, rng)
    labels = rng.integers(0, 10, n)
    feats = {"noise_a": rng.normal(size=n), "signal": delta * m + rng.normal(size=n), "noise_b": rng.normal(size=n)}
    cands = tuple(Candidate("global", k) for k in feats)
    sel = select(cands, feats, labels, m, feats, labels, selection="cv", k=5, seed=0)
    assert sel.chosen == "signal" and sel.selection == "cv" and sel.folds == 5
    assert abs(_report(sel, "signal").cv["accuracy"] - _bayes(delta)) < 0.03
    for noise in ("noise_a", "noise_b"):
        assert abs(_report(sel, noise).cv["accuracy"] - 0.5) < 0.05
    # the chosen candidate is refitted on all of eval and applied to test
    t = sel.fitted.threshold
    np.testing.assert_array_equal(sel.test_predictions, (feats["signal"] >= t).astype(np.int64))
    assert sel.test_predictions.dtype == np.int64


def test_in_sample_accuracy_is_optimistic_and_cv_is_not():
    """On few records, per-class thresholds on pure noise look better in-sample than a real but weak
    signal; cross-validation sees through it, in-sample selection (the seed's method) does not."""
    rng = np.random.default_rng(0)
    n, delta = 300, 0.6
    m = _membership(n, rng)
    labels = rng.integers(0, 10, n)
    feats = {"weak": delta * m + rng.normal(size=n), "noise": rng.normal(size=n)}
    cands = (Candidate("global", "weak"), Candidate("global", "noise"), Candidate("class", "noise"))
    cv = select(cands, feats, labels, m, feats, labels, selection="cv", min_class_count=10)
    in_sample = select(cands, feats, labels, m, feats, labels, selection="in_sample", min_class_count=10)
    assert cv.chosen == "weak"
    assert in_sample.chosen == "noise@class"
    assert in_sample.folds is None and all(c.cv is None for c in in_sample.candidates)
    for name in ("noise", "noise@class"):
        rep = _report(cv, name)
        assert rep.eval["accuracy"] > rep.cv["accuracy"]  # in-sample optimism
        assert abs(rep.cv["accuracy"] - 0.5) < 0.06
    assert _report(cv, "noise@class").eval["accuracy"] > _report(cv, "weak").eval["accuracy"]
    assert abs(_report(cv, "weak").cv["accuracy"] - _bayes(delta)) < 0.05


def test_per_class_threshold_beats_global_on_class_offsets():
    rng = np.random.default_rng(2)
    n = 1200
    m = _membership(n, rng)
    labels = rng.integers(0, 4, n)
    # each class has its own level (3 apart); members sit 2 above their class's non-members
    feats = {"s": 3.0 * labels + 2.0 * m + rng.normal(scale=0.5, size=n)}
    cands = (Candidate("global", "s"), Candidate("class", "s"))
    sel = select(cands, feats, labels, m, feats, labels, selection="cv")
    assert sel.chosen == "s@class"
    per_class, global_ = _report(sel, "s@class").cv["accuracy"], _report(sel, "s").cv["accuracy"]
    assert per_class > 0.95 and per_class > global_ + 0.15
    thresholds = sel.fitted.class_thresholds.per_class
    for c in range(4):
        assert 3.0 * c < thresholds[c] < 3.0 * c + 2.0


def test_per_class_scores_agree_with_predictions():
    """Score >= 0 exactly where the per-class rule predicts a member, fallback classes included."""
    rng = np.random.default_rng(4)
    n = 200
    m = _membership(n, rng)
    labels = rng.integers(0, 3, n)
    labels = np.where((m == 1) & (np.arange(n) < 40), 7, labels)  # class 7: members only -> fallback
    labels[:3] = 9  # class 9: 3 records -> fallback (min_class_count)
    feats = {"s": labels + m + rng.normal(size=n)}
    fitted = fit(Candidate("class", "s"), feats, labels, m, min_class_count=20)
    assert {7, 9} <= set(fitted.class_thresholds.fallback_classes)
    test_labels = np.r_[labels, [5, 5]]  # class 5 never seen: global threshold
    test_feats = {"s": np.r_[feats["s"], [-100.0, 100.0]]}
    scores = fitted.score(test_feats, test_labels)
    pred = fitted.predict(test_feats, test_labels)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(pred, (scores >= 0).astype(np.int64))
    assert pred[-2:].tolist() == [0, 1]


def test_fixed_candidate_is_the_seed_task3_rule():
    """The seed's label-only attack: member exactly when the record is classified correctly."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, 50)
    predicted = np.stack([np.where(rng.random(50) < 0.6, labels, (labels + 1) % 10) for _ in range(3)])
    test_labels = rng.integers(0, 10, 30)
    test_predicted = np.stack([np.where(rng.random(30) < 0.6, test_labels, (test_labels + 3) % 10)
                               for _ in range(3)])
    ev, te = label_only_features(predicted, labels), label_only_features(test_predicted, test_labels)
    correct_eval = (predicted[0] == labels).astype(np.int64)
    # membership chosen so that the opposite rule would be perfect: a fixed rule must not adapt
    sel = select(attacks.SEED_LABEL_ONLY, ev, labels, 1 - correct_eval, te, test_labels, selection="in_sample")
    assert sel.chosen == "correctness>=0.5"
    assert sel.fitted.threshold == 0.5
    np.testing.assert_array_equal(sel.test_predictions, (test_predicted[0] == test_labels).astype(np.int64))
    assert _report(sel, sel.chosen).eval["accuracy"] == 0.0


def test_logistic_regression_combines_features():
    rng = np.random.default_rng(6)
    n, delta = 2000, 1.0
    m = _membership(n, rng)
    labels = rng.integers(0, 10, n)
    feats = {"a": delta * m + rng.normal(size=n), "b": delta * m + rng.normal(size=n)}
    cands = (Candidate("global", "a"), Candidate("global", "b"), Candidate("logreg", features=("a", "b")))
    sel = select(cands, feats, labels, m, feats, labels, selection="cv", test_membership=m)
    assert sel.chosen == "logreg"
    combined = _report(sel, "logreg")
    assert abs(combined.cv["accuracy"] - _bayes(delta * math.sqrt(2))) < 0.03
    assert combined.cv["accuracy"] > max(_report(sel, name).cv["accuracy"] for name in ("a", "b")) + 0.03
    assert combined.test is not None and combined.test["accuracy"] == combined.eval["accuracy"]  # test == eval here
    # predictions are the learned score thresholded; the score grows with both features
    np.testing.assert_array_equal(sel.test_predictions, (sel.test_scores >= sel.fitted.threshold).astype(np.int64))
    probe = {"a": np.array([0.0, 1.0, 0.0]), "b": np.array([0.0, 0.0, 1.0])}
    s = sel.fitted.score(probe, np.zeros(3, np.int64))
    assert s[1] > s[0] and s[2] > s[0]


def test_candidate_names_and_lists():
    assert [c.name for c in attacks.SEED_POSTERIOR] == list(sig.SEED_SIGNALS)
    assert Candidate("class", "hinge").name == "hinge@class"
    names = ["confidence", "correctness", "aug_mean_lsc"]
    strong = [c.name for c in attacks.strong_posterior_candidates(names)]
    assert strong == ["confidence", "aug_mean_lsc", "confidence@class", "aug_mean_lsc@class", "logreg",
                      "logreg_class"]
    # per-view inputs feed only the learned candidates
    with_views = attacks.strong_posterior_candidates(names + ["view1_lsc", "view2_lsc"])
    assert [c.name for c in with_views] == strong
    assert with_views[-1].features == ("confidence", "aug_mean_lsc", "view1_lsc", "view2_lsc")
    label = attacks.strong_label_only_candidates(["correctness", "aug_correct_count"])
    assert [c.name for c in label] == ["correctness", "aug_correct_count", "correctness@class",
                                       "aug_correct_count@class", "logreg", "logreg_class", "correctness>=0.5"]
    # the seed's method is a candidate (last) whenever its four signals are there
    full = [c.name for c in attacks.strong_posterior_candidates(list(sig.SEED_SIGNALS) + ["hinge"])]
    assert full[-1] == "seed_method" and full.count("seed_method") == 1
    assert label[-2].features == ("correctness", "aug_correct_count")
    assert [c.name for c in attacks.strong_label_only_candidates(["correctness"])] == ["correctness", "correctness@class",
                                                                                     "correctness>=0.5"]
    # noisy queries: the pooled fraction is thresholded, the per-level fractions feed the learned ones,
    # which then leave out the image's own correctness
    names = ["correctness", "aug_correct_count", "noise_correct", "sigma0.1_correct", "sigma0.2_correct", "label_lira"]
    label = attacks.strong_label_only_candidates(names)
    assert [c.name for c in label][:4] == ["correctness", "aug_correct_count", "noise_correct", "label_lira"]
    assert [c.name for c in label][-3:] == ["logreg", "logreg_class", "correctness>=0.5"]
    assert label[-2].features == ("aug_correct_count", "label_lira", "sigma0.1_correct", "sigma0.2_correct")
    pooled = attacks.strong_label_only_candidates(["correctness", "noise_correct"])
    assert [c.name for c in pooled] == ["correctness", "noise_correct", "correctness@class", "noise_correct@class",
                                        "correctness>=0.5"]
    with pytest.raises(ValueError):
        select(attacks.SEED_POSTERIOR, {}, np.zeros(2, np.int64), np.zeros(2), {}, np.zeros(2, np.int64),
               selection="best")


def test_class_standardized_logreg_uses_class_offsets():
    # members score 1 higher than non-members, but each class sits at its own offset (0, 5, 10):
    # only a model that knows the class can separate well; logreg_class sees per-class z-scores
    rng = np.random.default_rng(3)
    n = 1200
    labels = rng.integers(0, 3, n)
    membership = rng.integers(0, 2, n)
    x = 5.0 * labels + membership + 0.5 * rng.standard_normal(n)
    feats = {"s": x}
    plain = select((Candidate("logreg", features=("s",)),), feats, labels, membership, feats, labels,
                   test_membership=membership).candidates[0]
    by_class = select((Candidate("logreg_class", features=("s",)),), feats, labels, membership, feats, labels,
                      test_membership=membership).candidates[0]
    # Bayes accuracy with sd 0.5 and a gap of 1: Phi(1) = 0.841
    assert by_class.cv["accuracy"] > 0.80
    assert by_class.cv["accuracy"] > plain.cv["accuracy"] + 0.1


def test_one_standard_error_rule_prefers_higher_auc_among_near_ties():
    def report(name, acc, auc):
        return selection.CandidateReport(name, "", {"accuracy": acc, "auc": auc}, {}, {})

    # n = 2500, best accuracy 0.6: one standard error = sqrt(0.6 * 0.4 / 2500) = 0.0098
    reports = [report("a", 0.600, 0.60), report("b", 0.592, 0.70), report("c", 0.585, 0.90)]
    assert selection._one_standard_error_choice(reports, 2500) == "b"  # c is 0.015 below: too far
    reports = [report("a", 0.600, 0.60), report("b", 0.600, 0.60)]
    assert selection._one_standard_error_choice(reports, 2500) == "a"  # full tie: the earlier one


# ---------------------------------------------------------------------------------------------
# The seed's method as a floor


def _cv_report(name, acc, auc):
    return selection.CandidateReport(name, name, {"accuracy": acc, "auc": auc}, {}, {})


def test_floor_excludes_candidates_below_the_seed_even_within_one_standard_error():
    # n = 500: one standard error at 60 % is 2.2 points; "fancy" is within it but below the seed's CV accuracy
    reports = [_cv_report("fancy", 0.595, 0.70), _cv_report("other", 0.605, 0.62), _cv_report("seed_method", 0.60, 0.61)]
    assert selection._one_standard_error_choice(reports, 500) == "fancy"  # the rule without a floor
    assert selection._one_standard_error_choice(reports, 500, "seed_method") == "other"
    reports[1] = _cv_report("other", 0.59, 0.62)
    assert selection._one_standard_error_choice(reports, 500, "seed_method") == "seed_method"


def test_seed_candidate_fits_what_the_seeds_in_sample_choice_fits():
    rng = np.random.default_rng(3)
    m = np.tile([0, 1], 100)
    feats = {s: rng.normal(size=200) + (1.5 if s == "neg_loss" else 0.1) * m for s in sig.SEED_SIGNALS}
    labels = rng.integers(0, 10, 200)
    seed_sel = selection.select(attacks.SEED_POSTERIOR, feats, labels, m, feats, labels, selection="in_sample")
    fitted = attacks.fit(attacks.SEED_POSTERIOR_CANDIDATE, feats, labels, m)
    assert seed_sel.chosen == "neg_loss"
    assert fitted.inner.candidate.signal == "neg_loss"
    assert fitted.threshold == seed_sel.fitted.threshold
    np.testing.assert_array_equal(fitted.predict(feats, labels), seed_sel.fitted.predict(feats, labels))
    assert fitted.describe_fit() == {"signal": "neg_loss", "threshold": seed_sel.fitted.threshold}


@pytest.mark.parametrize("seed", range(6))
def test_chosen_attack_is_never_below_the_seed_by_cross_validation(seed):
    """Small eval sets (n = 120), weak signals, many noisy candidates: the chosen candidate's CV accuracy
    is at least the seed method's own CV accuracy."""
    rng = np.random.default_rng(seed)
    n = 120
    m = rng.permutation(np.tile([0, 1], n // 2))
    labels = rng.integers(0, 10, n)
    names = list(sig.SEED_SIGNALS) + ["hinge", "logit_scaled_confidence"]
    feats = {s: rng.normal(size=n) + rng.uniform(0, 0.5) * m for s in names}
    cands = attacks.strong_posterior_candidates(names)
    sel = selection.select(cands, feats, labels, m, feats, labels, selection="cv", floor="seed_method",
                         min_class_count=5)
    cv = {r.name: r.cv["accuracy"] for r in sel.candidates}
    assert cv[sel.chosen] >= cv["seed_method"] - 1e-12
