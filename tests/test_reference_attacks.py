"""mia.references.attacks: LiRA and RMIA against hand-computed values, memory, label-only, bundle entry points."""
from __future__ import annotations

import dataclasses

import math
import tracemalloc

import numpy as np
import pytest

from mia.bundle import discover
from mia.models.loading import load_victim_model
from mia.io.records import load_records, save_records
from mia.core.reference_stats import (
    calibrated_aug_count,
    fit_gaussians,
    label_lira,
    lira_offline,
    lira_online,
    rmia_dominance,
    rmia_log_ratios,
    rmia_scores,
)
from mia.core.laplace import PRIOR_SCALES
from mia.core.metrics import auc
from mia.references.attacks import ReferenceOptions, VictimAnswers, victim_reference_features
from mia.references.logits import penultimate_features, reference_features
from mia.references import Distill, ReferenceRecipe, load_reference_set, make_masks, reference_logits, train_references
from mia.scoring import FLIP, IDENTITY, compute_logits, noise_views


# Two records, four reference models, one view. Model k trains on record i where MASK[k, i].
MASK = np.array([[True, False], [True, True], [False, False], [False, True]])
REF = np.array([[2.0, 5.0], [4.0, 7.0], [0.0, 1.0], [1.0, 9.0]])[:, None, :]  # (K=4, V=1, n=2)
TARGET = np.array([[3.0, 8.0]])  # (V=1, n=2)
# record 0: IN {2, 4} -> mean 3, var 2;  OUT {0, 1} -> mean 0.5, var 0.5
# record 1: IN {7, 9} -> mean 8, var 2;  OUT {5, 1} -> mean 3,   var 8


def _log_normal(x, mu, var):
    return -0.5 * math.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)


def test_lira_per_record_variance_by_hand():
    fit = fit_gaussians(REF, MASK, global_variance=False, shared_shift=False)
    np.testing.assert_allclose(fit.mu_in, [[3.0, 8.0]])
    np.testing.assert_allclose(fit.var_in, [[2.0, 2.0]])
    np.testing.assert_allclose(fit.mu_out, [[0.5, 3.0]])
    np.testing.assert_allclose(fit.var_out, [[0.5, 8.0]])
    # log N(3; 3, 2) - log N(3; 0.5, 0.5) = -0.5 log 2 + 0.5 log 0.5 + 2.5^2 / 1 = 6.25 - log 2
    # log N(8; 8, 2) - log N(8; 3, 8) = 0.5 log 4 + 5^2 / 16 = log 2 + 1.5625
    np.testing.assert_allclose(lira_online(TARGET, fit), [6.25 - math.log(2), math.log(2) + 1.5625], rtol=1e-12)
    # offline: -log Pr[Z > x] with z = (x - mu_out) / s_out: 2.5 / sqrt(0.5) and 5 / sqrt(8);
    # Pr[Z > z] = erfc(z / sqrt 2) / 2, and z / sqrt 2 = 2.5 and 1.25
    expected = [-math.log(0.5 * math.erfc(2.5)), -math.log(0.5 * math.erfc(1.25))]
    np.testing.assert_allclose(lira_offline(TARGET, fit), expected, rtol=1e-12)


def test_lira_global_variance_by_hand_and_auto():
    fit = fit_gaussians(REF, MASK, global_variance=True, shared_shift=False)
    # squared deviations from the group means: IN (1 + 1) + (1 + 1), OUT (0.25 + 0.25) + (4 + 4);
    # 12.5 over 8 values - 4 group means = 4 degrees of freedom: 3.125, shared by IN and OUT
    np.testing.assert_allclose(fit.var_in, [[3.125, 3.125]])
    np.testing.assert_allclose(fit.var_out, [[3.125, 3.125]])
    online = lira_online(TARGET, fit)
    expected0 = _log_normal(3, 3, 3.125) - _log_normal(3, 0.5, 3.125)  # = 2.5^2 / 6.25 = 1
    expected1 = _log_normal(8, 8, 3.125) - _log_normal(8, 3, 3.125)  # = 5^2 / 6.25 = 4
    np.testing.assert_allclose(online, [expected0, expected1], rtol=1e-12)
    np.testing.assert_allclose(online, [1.0, 4.0], rtol=1e-12)
    auto = fit_gaussians(REF, MASK, shared_shift=False)  # K = 4 < 16: global
    assert auto.global_variance and not fit_gaussians(REF, MASK, global_variance=False).global_variance
    np.testing.assert_allclose(lira_online(TARGET, auto), online)


def test_lira_shared_shift_by_hand():
    # group means: record 0 IN 3, OUT 0.5; record 1 IN 8, OUT 3; average shift ((3 - 0.5) + (8 - 3)) / 2 = 3.75
    fit = fit_gaussians(REF, MASK, shared_shift=True)
    # record 0: OUT values 0, 1 and IN values 2, 4 moved by -3.75: (0 + 1 - 1.75 + 0.25) / 4 = -0.125
    # record 1: (5 + 1 + 3.25 + 5.25) / 4 = 3.625
    np.testing.assert_allclose(fit.mu_out, [[-0.125, 3.625]])
    np.testing.assert_allclose(fit.mu_in, [[3.625, 7.375]])
    np.testing.assert_allclose(fit_gaussians(REF, MASK).mu_out, fit.mu_out)  # K = 4 < 16: shared by default
    assert not np.allclose(fit_gaussians(REF, MASK, shared_shift=False).mu_out, fit.mu_out)


def test_lira_shrunk_shift_by_hand():
    # REF: record shifts 2.5 and 5 around their average 3.75: mean squared deviation 1.5625, below what the
    # noise of two-model means explains (pooled within-record variance 3.125 x (1/2 + 1/2)): tau^2 = 0, and
    # the shrunk means are the fully shared ones
    shared = fit_gaussians(REF, MASK, shared_shift=True)
    shrunk = fit_gaussians(REF, MASK, shared_shift=True, shrink=True)
    np.testing.assert_allclose(shrunk.mu_out, shared.mu_out)
    np.testing.assert_allclose(shrunk.mu_in, shared.mu_in)
    # record 1's IN models at 27 and 29 (mean 28): shifts 2.5 and 25, average 13.75, squared deviations
    # 11.25^2; tau^2 = 126.5625 - 3.125 = 123.4375, ratio r = tau^2 / 3.125 = 39.5, so the other group's
    # shifted mean weighs n / (1 + n r) = 2 / 80 = 0.025 against the record's own 2 models
    far = REF.copy()
    far[[1, 3], 0, 1] = [27.0, 29.0]
    fit = fit_gaussians(far, MASK, shared_shift=True, shrink=True)
    w = 0.025
    mu_out = [(2 * 0.5 + w * (3 - 13.75)) / (2 + w), (2 * 3 + w * (28 - 13.75)) / (2 + w)]
    mu_in = [(2 * 3 + w * (0.5 + 13.75)) / (2 + w), (2 * 28 + w * (3 + 13.75)) / (2 + w)]
    np.testing.assert_allclose(fit.mu_out, [mu_out], rtol=1e-12)
    np.testing.assert_allclose(fit.mu_in, [mu_in], rtol=1e-12)
    # one model per group (no within-record variance): full sharing
    two = np.array([[True, False], [False, True]])
    np.testing.assert_allclose(fit_gaussians(REF[:2], two, shared_shift=True, shrink=True).mu_out,
                               fit_gaussians(REF[:2], two, shared_shift=True).mu_out)


def test_lira_sums_over_views():
    single = fit_gaussians(REF, MASK, global_variance=False)
    two = fit_gaussians(np.concatenate([REF, REF + 10.0], axis=1), MASK, global_variance=False)
    target = np.concatenate([TARGET, TARGET + 10.0])
    np.testing.assert_allclose(lira_online(target, two), 2 * lira_online(TARGET, single))
    np.testing.assert_allclose(lira_offline(target, two), 2 * lira_offline(TARGET, single))


def test_lira_uses_only_each_records_own_in_and_out_models():
    changed = REF.copy()
    changed[2, 0, 1] = 100.0  # model 2 is OUT for record 1: only record 1's OUT fit may move
    changed[0, 0, 1] = -50.0  # model 0 is OUT for record 1 too
    a = fit_gaussians(REF, MASK, global_variance=False, shared_shift=False)
    b = fit_gaussians(changed, MASK, global_variance=False, shared_shift=False)
    np.testing.assert_array_equal(a.mu_in, b.mu_in)
    assert a.mu_out[0, 0] == b.mu_out[0, 0] and a.mu_out[0, 1] != b.mu_out[0, 1]


def test_lira_orientation_and_missing_group():
    fit = fit_gaussians(REF, MASK, global_variance=False)
    assert lira_offline(TARGET + 1.0, fit)[0] > lira_offline(TARGET, fit)[0]
    # a third record that only OUT models saw gets mu_in = mu_out + mean IN-OUT shift of the others
    mask = np.concatenate([MASK, np.zeros((4, 1), bool)], axis=1)
    ref = np.concatenate([REF, np.array([1.0, 2.0, 3.0, 6.0])[:, None, None]], axis=2)
    fit3 = fit_gaussians(ref, mask, global_variance=False)
    shift = ((3.0 - 0.5) + (8.0 - 3.0)) / 2
    assert fit3.mu_out[0, 2] == 3.0 and fit3.mu_in[0, 2] == pytest.approx(3.0 + shift)
    # no IN model: the pooled variance; record 2's OUT values 1, 2, 3, 6 (mean 3) add
    # 4 + 1 + 0 + 9 = 14 to the 12.5 above and 3 degrees of freedom to the 4
    assert fit3.var_in[0, 2] == pytest.approx((12.5 + 14.0) / 7)


def test_lira_with_one_reference_model_by_hand():
    # K = 1: records 0 and 1 are IN for the model (phi 4 and 6), records 2 and 3 OUT (phi 1 and 3)
    ref = np.array([[[4.0, 6.0, 1.0, 3.0]]])
    mask = np.array([[True, True, False, False]])
    fit = fit_gaussians(ref, mask)
    shift = (4.0 + 6.0) / 2 - (1.0 + 3.0) / 2  # mean over IN records - mean over OUT records = 3
    np.testing.assert_allclose(fit.mu_in, [[4.0, 6.0, 1.0 + shift, 3.0 + shift]])
    np.testing.assert_allclose(fit.mu_out, [[4.0 - shift, 6.0 - shift, 1.0, 3.0]])
    # no degrees of freedom within a record: the spread of all four values (population variance 3.25)
    np.testing.assert_allclose(fit.var_out, np.full((1, 4), 3.25))
    assert np.isfinite(lira_online(np.zeros((1, 4)), fit)).all()
    with pytest.raises(ValueError, match="every record is IN"):
        fit_gaussians(ref, np.ones((1, 4), bool))


def test_references_that_trained_on_no_record_fit_offline_gaussians():
    # distilled references: every record OUT for both models; the IN means are the OUT means (shift 0)
    ref = np.array([[[1.0, 4.0, 2.0]], [[3.0, 6.0, 2.0]]])  # (K=2, V=1, n=3)
    fit = fit_gaussians(ref, np.zeros((2, 3), bool), global_variance=True)
    np.testing.assert_allclose(fit.mu_out, [[2.0, 5.0, 2.0]])
    np.testing.assert_allclose(fit.mu_in, fit.mu_out)
    # within-record squared deviations 2 + 2 + 0 over 3 degrees of freedom
    np.testing.assert_allclose(fit.var_out, np.full((1, 3), 4.0 / 3))
    np.testing.assert_allclose(lira_online(np.array([[0.0, 9.0, 2.0]]), fit), 0.0)  # carries nothing
    offline = lira_offline(np.array([[2.0, 5.0, 4.0]]), fit)  # record 2 sits 2 above its OUT mean
    assert offline[2] > offline[0] == pytest.approx(offline[1])


def test_lira_rejects_bad_shapes():
    with pytest.raises(ValueError, match="in_mask"):
        fit_gaussians(REF, MASK.T)
    with pytest.raises(ValueError, match="target"):
        lira_online(TARGET[:, :1], fit_gaussians(REF, MASK))


# --------------------------------------------------------------------------------------------- RMIA


def test_rmia_ratio_by_hand():
    # victim p = 0.9; OUT models p = 0.4 and 0.6 (mean 0.5); IN model p = 0.99 (ignored offline)
    target = np.log([[0.9]])
    ref = np.log(np.array([0.4, 0.99, 0.6]))[:, None, None]
    mask = np.array([[False], [True], [False]])
    # offline: p(x) = (1 + 0.3) / 2 * 0.5 + (1 - 0.3) / 2 = 0.675;  r = 0.9 / 0.675 = 4/3
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=0.3, online=False)), [0.9 / 0.675])
    # a = 1: p(x) = mean OUT = 0.5
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=1.0, online=False)), [1.8])
    # online (the default), the record has IN and OUT models: p(x) = (0.99 + 0.5) / 2 = 0.745, whatever a
    for a in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=a)), [0.9 / 0.745])
    # two views: probabilities averaged over views first: victim (0.8 + 0.6) / 2 = 0.7
    target2 = np.log([[0.8], [0.6]])
    ref2 = np.log(np.array([[0.3, 0.5], [0.99, 0.99], [0.7, 0.5]]))[:, :, None]  # per-model view means 0.4, 0.6
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target2, ref2, mask, a=0.3, online=False)), [0.7 / 0.675])
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target2, ref2, mask)), [0.7 / 0.745])


def test_rmia_online_and_offline_records_side_by_side():
    # record 0: IN and OUT models (online); record 1: OUT only (offline); record 2: IN only (inverted)
    target = np.log([[0.8, 0.6, 0.9]])
    ref = np.log(np.array([[0.9, 0.4, 0.93], [0.5, 0.6, 0.93]]))[:, None, :]
    mask = np.array([[True, False, True], [False, False, True]])
    p_ref = [(0.9 + 0.5) / 2, 0.65 * 0.5 + 0.35, (0.93 + (0.93 - 0.7) / 0.3) / 2]
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=0.3)), np.array([0.8, 0.6, 0.9]) / p_ref)
    # offline: record 0 uses its one OUT model (0.5) through a
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=0.3, online=False))[0], 0.8 / 0.675)


def test_rmia_record_without_out_model_inverts_the_offline_model():
    # one IN model with p_IN = 0.93; a = 0.3: p_OUT = (0.93 - 0.7) / 0.3 = 0.7666..., p(x) = (0.93 + p_OUT) / 2
    target, ref, mask = np.log([[0.9]]), np.log([[[0.93]]]), np.array([[True]])
    p_out = (0.93 - 0.7) / 0.3
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=0.3)), [0.9 / ((0.93 + p_out) / 2)])
    # p_IN below 1 - a: p_OUT clips to 0; a = 0 says nothing of p_OUT: 0 too; a = 1: p_OUT = p_IN
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, np.log([[[0.5]]]), mask, a=0.3)), [0.9 / 0.25])
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=0.0)), [0.9 / 0.465])
    np.testing.assert_allclose(np.exp(rmia_log_ratios(target, ref, mask, a=1.0)), [0.9 / 0.93])


def test_rmia_dominance_on_five_records_by_hand():
    r = np.log([1.0, 2.0, 0.5, 4.0, 2.0])
    # gamma = 1: other records with a strictly smaller ratio, out of 4 (the tie 2.0 vs 2.0 does not count)
    np.testing.assert_allclose(rmia_dominance(r, r, x_in_z=True), [1 / 4, 2 / 4, 0, 4 / 4, 2 / 4])
    # gamma = 2: r(z) < r(x) / 2
    np.testing.assert_allclose(rmia_dominance(r, r, gamma=2.0, x_in_z=True), [0, 1 / 4, 0, 2 / 4, 1 / 4])
    # gamma = 0.5: r(z) < 2 r(x), the record itself excluded although it satisfies the inequality
    np.testing.assert_allclose(rmia_dominance(r, r, gamma=0.5, x_in_z=True), [1 / 4, 3 / 4, 0, 4 / 4, 3 / 4])
    # a separate population of 5: no exclusion
    np.testing.assert_allclose(rmia_dominance(np.log([3.0]), r), [4 / 5])


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_rmia_ranking_does_not_depend_on_the_population(gamma):
    # for a fixed gamma the score is the population's distribution function at log r(x) - log gamma: records
    # are ordered by their own ratio, so a population of 7 or of 5,000 (and which one) ranks them alike
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    members = (x + rng.normal(size=300) > 0).astype(np.int64)
    for z in (rng.normal(size=7), rng.normal(1.0, 2.0, size=5000)):
        s = rmia_dominance(x, z, gamma=gamma)
        assert np.all(np.diff(s[np.argsort(x)]) >= 0)
    big = rmia_dominance(x, rng.normal(size=5000), gamma=gamma)
    assert auc(big, members) == pytest.approx(auc(x, members), abs=0.01)  # exact up to ties of the coarse CDF

def test_rmia_scores_use_the_other_records_as_population():
    target = np.log([[0.9, 0.5, 0.2]])
    ref = np.log(np.full((2, 1, 3), 0.5))
    mask = np.array([[True, False, True], [False, True, False]])
    # every p(x) = (0.5 + 0.5) / 2 (online; offline 0.65 * 0.5 + 0.35): the order of r is the victim's p's
    np.testing.assert_allclose(rmia_scores(target, ref, mask), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(rmia_scores(target, ref, mask, online=False), [1.0, 0.5, 0.0])


def test_rmia_memory_is_linear():
    rng = np.random.default_rng(0)
    n = 20000
    target = np.log(rng.uniform(0.01, 1.0, (2, n)))
    ref = np.log(rng.uniform(0.01, 1.0, (4, 2, n)))
    mask = np.zeros((4, n), bool)
    mask[:2] = True
    tracemalloc.start()
    try:
        scores = rmia_scores(target, ref, mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scores.shape == (n,) and 0.0 <= scores.min() and scores.max() <= 1.0
    assert peak < 20 * n * 8 * 4  # a handful of (K, V, n) arrays; an n x n bool matrix would be 400 MB


# --------------------------------------------------------------------------------------------- label-only


def test_calibrated_aug_count_by_hand():
    labels = np.array([1, 2])
    victim = np.array([[1, 2], [1, 0], [1, 2]])  # correct views: record 0: 3, record 1: 2
    refs = np.array([
        [[1, 2], [0, 2], [0, 2]],  # model 0: correct counts 1, 3
        [[1, 0], [1, 0], [1, 0]],  # model 1: 3, 0
        [[0, 2], [0, 2], [0, 0]],  # model 2: 0, 2
    ])
    mask = np.array([[True, False], [False, True], [False, False]])
    # record 0: OUT models 1, 2 -> mean (3 + 0) / 2 = 1.5 -> 3 - 1.5
    # record 1: OUT models 0, 2 -> mean (3 + 2) / 2 = 2.5 -> 2 - 2.5
    np.testing.assert_allclose(calibrated_aug_count(victim, refs, labels, mask), [1.5, -0.5])
    with pytest.raises(TypeError, match="integer predicted labels"):
        calibrated_aug_count(victim.astype(float), refs, labels, mask)


# --------------------------------------------------------------------------------------------- from a bundle


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The shared tiny demo bundle's VGG victim (read only: references go under tmp folders)."""
    return discover(tiny_bundle, victims=["vgg16_fashionmnist"])


def _victim_logits(bundle):
    victim = bundle.victims[0]
    model, info = load_victim_model(victim.arch, victim.checkpoint, bundle.arch_dirs)
    ev = load_records(victim.eval_path, with_membership=True)
    te = load_records(victim.test_path, with_membership=False)
    views = (IDENTITY, FLIP)
    return (compute_logits(model, ev.images, views, device="cpu"), compute_logits(model, te.images, views, device="cpu"),
            ev.labels, te.labels, [v.name for v in views])


def _answers(ev_logits, te_logits, ev_labels, te_labels, names, noisy=None, queries=None):
    return VictimAnswers(ev_logits, te_logits, ev_labels, te_labels, tuple(names),
                         *(noisy if noisy is not None else (None, None)),
                         None if queries is None else tuple(q.name for q in queries))


def test_reference_features_none_without_references(bundle, tmp_path):
    answers = _answers(*_victim_logits(bundle))
    assert victim_reference_features(bundle.root, bundle.victims[0], answers,
                                     ReferenceOptions(references_root=tmp_path)) is None


def test_reference_features_end_to_end(bundle, tmp_path):
    victim = bundle.victims[0]
    train_references(bundle.root, victim, ReferenceRecipe(k=4, epochs=1, batch_size=16, device="cpu"),
                     progress=False, references_root=tmp_path)
    ev_logits, te_logits, ev_labels, te_labels, names = _victim_logits(bundle)
    answers = _answers(ev_logits, te_logits, ev_labels, te_labels, names)
    options = ReferenceOptions(device="cpu", references_root=tmp_path)
    assert victim_reference_features(bundle.root, victim, answers,
                                     dataclasses.replace(options, min_models=5)) is None  # only 4 models
    both = victim_reference_features(bundle.root, victim, answers, options)
    assert both.k == 4
    feats, label_only = both.posterior, both.label_only
    assert set(feats) == {"eval", "test"}
    for split, n in (("eval", 32), ("test", 32)):
        assert set(feats[split]) == {"lira_online", "lira_offline", "rmia", "bmia", "bmia_online", "ref_out_lsc"}
        for values in feats[split].values():
            assert values.shape == (n,) and values.dtype == np.float64 and np.isfinite(values).all()
        assert (0 <= feats[split]["rmia"]).all() and (feats[split]["rmia"] <= 1).all()
    assert set(label_only["eval"]) == {"calibrated_aug_count", "label_lira"}
    # four balanced models: every record has IN and OUT models, RMIA is online and a plays no part; no check
    # of the references without the eval membership
    assert both.rmia.online and both.rmia.a is None and both.sanity == []
    assert both.laplace_prior == PRIOR_SCALES[0]  # ... and the first prior scale
    membership = load_records(victim.eval_path, with_membership=True).membership
    tuned = victim_reference_features(bundle.root, victim, dataclasses.replace(answers, eval_membership=membership),
                                      options)
    assert tuned.rmia.online is not None and [r["model"] for r in tuned.sanity] == [0, 1, 2, 3]
    assert tuned.laplace_prior in PRIOR_SCALES
    one = victim_reference_features(bundle.root, victim, answers, dataclasses.replace(options, max_models=1))
    assert one.k == 1 and all(np.isfinite(v).all() for v in one.posterior["test"].values())
    assert one.rmia.a == 0.3 and one.rmia.online is None  # one model, no eval membership: the paper's a
    one_tuned = victim_reference_features(bundle.root, victim, dataclasses.replace(answers, eval_membership=membership),
                                          dataclasses.replace(options, max_models=1))
    assert 0.0 <= one_tuned.rmia.a <= 1.0
    without = victim_reference_features(bundle.root, victim, answers, dataclasses.replace(options, laplace=False))
    assert set(without.posterior["eval"]) == {"lira_online", "lira_offline", "rmia", "ref_out_lsc"} and without.laplace_prior is None
    assert all(0 <= r["reference_accuracy"] <= 1 and r["records"] > 0 for r in tuned.sanity)
    np.testing.assert_array_equal(tuned.posterior["eval"]["lira_online"], feats["eval"]["lira_online"])
    assert label_only["eval"]["calibrated_aug_count"].shape == (32,)
    assert np.abs(label_only["test"]["calibrated_aug_count"]).max() <= 2  # two views
    # the label-only values come from the victim's predicted labels only: the same from any logits with that argmax
    onehot = np.eye(ev_logits.shape[-1], dtype=np.float32)
    same_labels = _answers(onehot[ev_logits.argmax(-1)], onehot[te_logits.argmax(-1)], ev_labels, te_labels, names)
    for split in ("eval", "test"):
        for name, values in victim_reference_features(bundle.root, victim, same_labels, options).label_only[split].items():
            np.testing.assert_array_equal(values, label_only[split][name])
    # noisy label-only queries: the references answer the same queries (labels only)
    model, _ = load_victim_model(victim.arch, victim.checkpoint, bundle.arch_dirs)
    queries = noise_views((0.5, 1.0), 2)
    ev_images = load_records(victim.eval_path, with_membership=True).images
    te_images = load_records(victim.test_path, with_membership=False).images
    noisy = (compute_logits(model, ev_images, queries, device="cpu", labels_only=True),
             compute_logits(model, te_images, queries, device="cpu", labels_only=True))
    with_noise = victim_reference_features(bundle.root, victim, _answers(ev_logits, te_logits, ev_labels, te_labels,
                                                                         names, noisy, queries), options)
    ref_set = load_reference_set(bundle.root, victim, references_root=tmp_path)
    ref_noisy = reference_logits(ref_set, queries, device="cpu", labels_only=True)
    assert ref_noisy.shape == (4, 8, 64) and ref_noisy.dtype == np.int64
    labels = np.concatenate([ev_labels, te_labels])
    victim_noisy = np.concatenate(noisy, axis=1)
    masks = ref_set.complete_masks()[:, :64]
    expected_lira = label_lira(victim_noisy, ref_noisy, labels, masks)
    expected_cal = calibrated_aug_count(victim_noisy, ref_noisy, labels, masks) / 8
    for split, sl in (("eval", slice(0, 32)), ("test", slice(32, 64))):
        np.testing.assert_array_equal(with_noise.label_only[split]["noise_lira"], expected_lira[sl])
        np.testing.assert_array_equal(with_noise.label_only[split]["calibrated_noise_correct"], expected_cal[sl])
        assert np.abs(with_noise.label_only[split]["calibrated_noise_correct"]).max() <= 1
        for name, values in label_only[split].items():  # the other features do not change
            np.testing.assert_array_equal(with_noise.label_only[split][name], values)
    with pytest.raises(ValueError, match="together"):
        victim_reference_features(bundle.root, victim, _answers(ev_logits, te_logits, ev_labels, te_labels, names,
                                                                noisy), options)
    with pytest.raises(TypeError):  # label-only inputs are integer labels, never scores
        victim_reference_features(bundle.root, victim, _answers(ev_logits, te_logits, ev_labels, te_labels, names,
                                                                (noisy[0].astype(float), noisy[1]), queries), options)


def test_run_uses_references_for_every_task(tiny_bundle, copy_bundle, tmp_path):
    from mia.config import RunConfig
    from mia.pipeline import run
    from mia.submission import build_result_json

    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    victim = discover(root, victims=["vgg16_fashionmnist"]).victims[0]
    train_references(root, victim, ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu"), progress=False)
    config = RunConfig(plots=False, victims=("vgg16_fashionmnist",),  # 10 views; references see image + flip
                       cache_dir=str(tmp_path / "cache"))
    result = run(root, config, progress=False, log=lambda *a: None)
    cached = [np.load(p)["array"] for p in sorted((tmp_path / "cache" / "logits").glob("reference-vgg16_fashionmnist-*.npz"))]
    queries = 2 * config.label_noise_draws * len(config.label_noise)
    assert sorted(a.shape[:2] for a in cached) == [(2, 64)] * 2 + [(queries, 64)] * 2  # views; noisy queries
    names = {o.task.access: {c.name for c in o.used.candidates} for o in result.outcomes}
    assert {"lira_online", "lira_offline", "rmia", "rmia@class"} <= names["posterior"]
    assert {"calibrated_aug_count", "calibrated_aug_count@class", "label_lira", "label_lira@class", "noise_lira",
            "calibrated_noise_correct"} <= names["label"]
    label = next(o for o in result.outcomes if o.task.access == "label")
    assert "calibrated_aug_count" in next(c for c in label.used.fitted_all.values()
                                          if c.candidate.name == "logreg").candidate.features
    doc = build_result_json(result)
    assert doc["victims"]["vgg16_fashionmnist"]["reference_models"] == 2
    without = run(root, RunConfig(plots=False, victims=("vgg16_fashionmnist",), references=False),
                  progress=False, log=lambda *a: None)
    for o in without.outcomes:
        assert not any(c.name.startswith(("lira", "rmia", "calibrated")) for c in o.used.candidates)
    from mia import report

    table = report.reference_table(result)
    assert table is not None and "lira_offline" in table and "calibrated_aug_count" in table
    assert "seed: " in table and "ours: " in table
    assert report.reference_table(without) is None


def test_label_lira_by_hand():
    labels = np.array([1, 2])
    victim = np.array([[1, 0]])  # one view: record 0 correct, record 1 wrong
    refs = np.array([[[1, 2]], [[0, 2]], [[1, 0]]])  # (K=3, V=1, n=2)
    mask = np.array([[True, False], [False, True], [False, True]])
    # record 0: IN = model 0 (correct): (1 + .5) / 2 = .75; OUT = models 1, 2 (wrong, correct): (1 + .5) / 3 = .5
    #   victim correct -> log .75 - log .5
    # record 1: IN = models 1, 2 (correct, wrong): 1.5 / 3 = .5; OUT = model 0 (correct): .75
    #   victim wrong -> log(1 - .5) - log(1 - .75)
    np.testing.assert_allclose(label_lira(victim, refs, labels, mask), [math.log(1.5), math.log(2.0)], rtol=1e-12)
    # a group without models counts as 1/2; views add up
    two_views = np.concatenate([victim, victim])
    np.testing.assert_allclose(label_lira(two_views, np.concatenate([refs, refs], axis=1), labels, mask),
                               [2 * math.log(1.5), 2 * math.log(2.0)], rtol=1e-12)
    no_in = np.zeros((3, 2), bool)
    assert label_lira(victim, refs, labels, no_in)[0] == pytest.approx(math.log(0.5) - math.log(2.5 / 4))
    with pytest.raises(TypeError, match="integer predicted labels"):
        label_lira(victim.astype(float), refs, labels, mask)


def test_rmia_setting_keeps_only_what_acts_on_the_masks():
    from mia.references.attacks import RmiaSetting, rmia_setting

    balanced = make_masks(2, 10, 0)  # every record IN for one model, OUT for the other
    assert rmia_setting(balanced, True, 0.3) == RmiaSetting(online=True, a=None)
    assert rmia_setting(balanced, False, 0.4) == RmiaSetting(online=False, a=0.4)
    one = make_masks(1, 10, 0)  # no record has both groups: online or not is the same
    assert rmia_setting(one, True, 0.2) == RmiaSetting(online=None, a=0.2)
    partial = np.array([[True, False, True], [False, True, True]])  # record 2 is IN for both models
    assert rmia_setting(partial, True, 0.3) == RmiaSetting(online=True, a=0.3)


def test_rmia_is_tuned_on_eval_auc():
    from mia.references.attacks import RMIA_A_GRID, tune_rmia

    rng = np.random.default_rng(3)
    k, v, n, n_eval = 1, 2, 120, 80
    masks = make_masks(k, n, 0)  # one model: every record lacks IN or OUT models, so a matters
    ref = np.log(rng.uniform(0.05, 1.0, size=(k, v, n)))
    member = rng.integers(0, 2, n)
    target = np.log(np.clip(np.exp(ref.mean(axis=0)) + 0.3 * member[None] * rng.uniform(size=(v, n)), 1e-6, 1.0))
    setting, scores = tune_rmia(target, ref, masks, member[:n_eval])
    assert setting.online is None and setting.a in RMIA_A_GRID
    np.testing.assert_array_equal(scores, rmia_scores(target, ref, masks, a=setting.a))
    best = max(auc(rmia_scores(target, ref, masks, a=x)[:n_eval], member[:n_eval]) for x in RMIA_A_GRID)
    assert auc(scores[:n_eval], member[:n_eval]) == best
    # every record with IN and OUT models: online (a plays no part) against offline with each a
    balanced = make_masks(2, n, 0)
    ref2 = np.log(np.clip(np.exp(np.concatenate([ref, ref])) + 0.4 * balanced[:, None, :], 1e-6, 1.0))
    setting2, scores2 = tune_rmia(target, ref2, balanced, member[:n_eval])
    every = [auc(rmia_scores(target, ref2, balanced)[:n_eval], member[:n_eval])]
    every += [auc(rmia_scores(target, ref2, balanced, a=x, online=False)[:n_eval], member[:n_eval]) for x in RMIA_A_GRID]
    assert auc(scores2[:n_eval], member[:n_eval]) == max(every)
    if setting2.online:
        assert setting2.a is None
        np.testing.assert_array_equal(scores2, rmia_scores(target, ref2, balanced))
    else:
        np.testing.assert_array_equal(scores2, rmia_scores(target, ref2, balanced, a=setting2.a, online=False))


def test_reference_sanity_compares_on_the_same_held_out_records():
    from mia.references.attacks import reference_sanity

    labels = np.array([0, 1, 2, 3, 0, 1])
    victim = np.array([0, 1, 2, 0, 0, 0])  # right on records 0, 1, 2, 4
    refs = np.array([[0, 0, 2, 3, 1, 1],  # model 0: right on 0, 2, 3, 5
                     [0, 1, 2, 3, 0, 1]])  # model 1: right everywhere
    masks = np.array([[False, True, False, False, True, False],
                      [True, False, False, False, False, True]])
    membership = np.array([0, 0, 0, 0, 1])  # the first 5 records are eval; record 4 a member
    rows = reference_sanity(victim, refs, masks, labels, membership)
    # model 0 held out: eval non-members it did not train on = records 0, 2, 3 -> ref 3/3, victim 2/3
    # model 1 held out: records 1, 2, 3 -> ref 3/3, victim 2/3
    assert [r["records"] for r in rows] == [3, 3]
    assert rows[0]["reference_accuracy"] == 1.0 and rows[0]["victim_accuracy"] == pytest.approx(2 / 3)
    assert all(r["mismatched"] for r in rows)  # 33 points apart


def test_grouped_rate_llr_by_hand():
    from mia.core.reference_stats import grouped_rate_llr

    labels = np.array([3])
    groups = np.array([0, 0])
    # model 0 (IN) answers both noisy copies correctly: rate (2 + 0.5) / 3 = 5/6; model 1 (OUT) neither: 1/6
    ref = np.array([[[3], [3]], [[1], [2]]])
    mask = np.array([[True], [False]])
    one_right = grouped_rate_llr(np.array([[3], [0]]), ref, labels, mask, groups)
    both_right = grouped_rate_llr(np.array([[3], [3]]), ref, labels, mask, groups)
    np.testing.assert_allclose(one_right, [0.0], atol=1e-12)  # log 5 - log 5
    np.testing.assert_allclose(both_right, [2 * math.log(5)], rtol=1e-12)
    # one model, IN for record 0 (rate 5/6), OUT for record 1 (rate 1/6): each record's missing group is
    # the other's rate, through the average IN - OUT difference of the logits
    ref1 = np.array([[[3, 0], [3, 0]]])  # (K=1, Q=2, n=2): record 0 right twice, record 1 never
    llr = grouped_rate_llr(np.array([[3, 3], [3, 3]]), ref1, np.array([3, 3]), np.array([[True, False]]), groups)
    np.testing.assert_allclose(llr, [2 * math.log(5), 2 * math.log(5)], rtol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        grouped_rate_llr(np.array([[3], [3]]), ref, labels, mask, np.array([0.0, 1.0]))


def test_grouped_rate_offline_by_hand():
    from mia.core.reference_stats import grouped_rate_offline

    labels = np.array([3, 3])
    groups = np.array([0, 0, 0, 0])
    # one model right on 2 of record 0's 4 queries: rate (2 + 0.5) / (4 + 1) = 1/2; never on record 1's: 1/10
    ref = np.array([[[3, 0], [3, 0], [1, 0], [1, 0]]])  # (K=1, Q=4, n=2)
    victim = np.array([[3, 3], [3, 0], [3, 0], [3, 0]])  # record 0: 4 of 4 right, record 1: 1 of 4
    np.testing.assert_allclose(grouped_rate_offline(victim, ref, labels, groups),
                               [math.log(16), -math.log(1 - 0.9**4)], rtol=1e-12)  # -log Pr[X >= c]
    np.testing.assert_allclose(grouped_rate_offline(np.full((4, 2), 1), ref, labels, groups), [0.0, 0.0], atol=0)
    # two groups add up; two models average their rates
    two = grouped_rate_offline(victim, ref, labels, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(two[0], -math.log(25 / 36) - math.log(1 / 36))  # rates 5/6 and 1/6, 2 of 2 right
    ref2 = np.concatenate([ref, np.full_like(ref, 3)])  # a second model always right: mean rate (1/2 + 9/10) / 2
    p = (0.5 + 0.9) / 2
    np.testing.assert_allclose(grouped_rate_offline(victim, ref2, labels, groups)[0], -4 * math.log(p), rtol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        grouped_rate_offline(victim, ref, labels, np.array([0.0, 0.0, 1.0, 1.0]))


def test_label_distilled_references_feed_every_task(bundle, tmp_path):
    """`mia references --k 1 --distill labels`: a model trained on the victim's predicted labels only, which a
    label-only attacker may ask for: it feeds the offline posterior attacks and the label-only ones (with the
    offline binomial test over noisy queries, since no record is IN for it)."""
    victim = bundle.victims[0]
    population = tmp_path / "population.p"
    write_population_like(victim, population, n=24)
    recipe = ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu", distill="labels")
    ref_set = train_references(bundle.root, victim, recipe, population=population, progress=False,
                               references_root=tmp_path / "refs")
    assert ref_set.folder.name == f"{victim.name}-distilled-labels" and ref_set.recipe.distill is Distill.LABELS
    # the attacks query the scored records only, not the population the model trained on
    full = reference_logits(ref_set, (IDENTITY,), device="cpu")
    scored = reference_logits(ref_set, (IDENTITY,), device="cpu", scored_only=True)
    assert full.shape == (1, 1, 64 + 24, 10) and scored.shape == (1, 1, 64, 10)
    np.testing.assert_array_equal(scored, full[:, :, :64])
    # the Laplace fit reads the population it trained on under the identity view only
    feats, fit, weight, _ = reference_features(ref_set, 0, (IDENTITY, FLIP), device="cpu")
    assert feats.shape[:2] == (2, 64) and fit.shape == (24, weight.shape[1])
    direct = penultimate_features(ref_set.load_model(0), ref_set.load_pool().images[64:], (IDENTITY,), device="cpu")
    np.testing.assert_allclose(fit, direct[0], rtol=1e-5, atol=1e-5)
    ev_logits, te_logits, ev_labels, te_labels, names = _victim_logits(bundle)
    membership = load_records(victim.eval_path, with_membership=True).membership
    queries = noise_views((0.1, 0.2), 2)
    rng = np.random.default_rng(0)
    ev_noisy, te_noisy = (rng.integers(0, 10, (len(queries), len(x))) for x in (ev_labels, te_labels))
    answers = VictimAnswers(ev_logits, te_logits, ev_labels, te_labels, names, ev_noisy, te_noisy,
                            tuple(q.name for q in queries), eval_membership=membership)
    feats = victim_reference_features(bundle.root, victim, answers,
                                      ReferenceOptions(device="cpu", references_root=tmp_path / "refs"))
    assert feats.k == 1 and [row["distill"] for row in feats.sanity] == ["labels"]
    for split in ("eval", "test"):
        assert set(feats.posterior[split]) == {"lira_offline", "rmia", "ref_out_lsc", "bmia"}
        assert set(feats.label_only[split]) == {"calibrated_aug_count", "noise_rate_offline",
                                                "calibrated_noise_correct"}  # no IN model: no IN rates
        assert all(np.isfinite(v).all() for v in feats.label_only[split].values())


def test_distilled_references_feed_the_offline_posterior_attacks_only(bundle, tmp_path):
    """`mia references --k 1 --distill`: a model that trained on no scored record; no online test (its IN
    and OUT Gaussians would coincide) and nothing for the label-only task (it learned the posteriors)."""
    victim = bundle.victims[0]
    population = tmp_path / "population.p"
    write_population_like(victim, population, n=24)
    train_references(bundle.root, victim, ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu", distill=True),
                     population=population, progress=False, references_root=tmp_path / "refs")
    ev_logits, te_logits, ev_labels, te_labels, names = _victim_logits(bundle)
    membership = load_records(victim.eval_path, with_membership=True).membership
    answers = dataclasses.replace(_answers(ev_logits, te_logits, ev_labels, te_labels, names),
                                  eval_membership=membership)
    feats = victim_reference_features(bundle.root, victim, answers,
                                      ReferenceOptions(device="cpu", references_root=tmp_path / "refs"))
    assert feats.k == 1 and feats.rmia.online is None and len(feats.sanity) == 1
    assert feats.sanity[0]["records"] == int((membership == 0).sum())  # every eval non-member is held out
    for split in ("eval", "test"):
        assert set(feats.posterior[split]) == {"lira_offline", "rmia", "ref_out_lsc", "bmia"}
        assert feats.label_only[split] == {}
        assert all(np.isfinite(v).all() and np.ptp(v) > 0 for v in feats.posterior[split].values())
    # a model trained on half the records beside it (its own folder): both feed the posterior attacks, the
    # label-only ones see the other model only; the distilled model counts first
    train_references(bundle.root, victim, ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu"),
                     progress=False, references_root=tmp_path / "refs")
    assert sorted(p.name for p in (tmp_path / "refs").iterdir()) == [victim.name, f"{victim.name}-distilled"]
    options = ReferenceOptions(device="cpu", references_root=tmp_path / "refs")
    both = victim_reference_features(bundle.root, victim, answers, options)
    alone = victim_reference_features(bundle.root, victim, answers, dataclasses.replace(options, max_models=1))
    np.testing.assert_array_equal(alone.posterior["test"]["rmia"], feats.posterior["test"]["rmia"])
    assert both.k == 2 and {"lira_online", "bmia_online"} <= set(both.posterior["test"])
    assert [row["distill"] for row in both.sanity] == ["posteriors", "off"]  # as result.json reports them
    ref_set = load_reference_set(bundle.root, victim, references_root=tmp_path / "refs")
    mixed_only = np.asarray(ref_set.masks[0, :64])[None]
    plain = reference_logits(ref_set, (IDENTITY, FLIP), device="cpu")[:, :, :64]
    expected = label_lira(np.concatenate([ev_logits, te_logits], axis=1).argmax(-1), plain.argmax(-1),
                          np.concatenate([ev_labels, te_labels]), mixed_only)
    np.testing.assert_allclose(np.concatenate([both.label_only["eval"]["label_lira"],
                                               both.label_only["test"]["label_lira"]]), expected)


def write_population_like(victim, path, n):
    """n records [image, label] that look like the victim's test records but are none of them."""
    te = load_records(victim.test_path, with_membership=False)
    images = np.clip(te.images[np.arange(n) % len(te)] + 0.05 * np.arange(1, n + 1)[:, None, None, None], -3, 3)
    save_records(path, images, te.labels[np.arange(n) % len(te)])


def test_one_reference_model_end_to_end(bundle, tmp_path):
    """`mia references --k 1`: one model on a random half of the pool feeds every reference attack."""
    victim = bundle.victims[0]
    train_references(bundle.root, victim, ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu"),
                     progress=False, references_root=tmp_path)
    ref_set = load_reference_set(bundle.root, victim, references_root=tmp_path)
    assert ref_set.complete == (0,) and ref_set.masks.sum() == 32  # 64 pool records, half of them IN
    ev_logits, te_logits, ev_labels, te_labels, names = _victim_logits(bundle)
    membership = load_records(victim.eval_path, with_membership=True).membership
    answers = dataclasses.replace(_answers(ev_logits, te_logits, ev_labels, te_labels, names),
                                  eval_membership=membership)
    one = victim_reference_features(bundle.root, victim, answers, ReferenceOptions(device="cpu", references_root=tmp_path))
    assert one.k == 1 and len(one.sanity) == 1
    for split in ("eval", "test"):
        assert {"lira_offline", "rmia", "bmia", "ref_out_lsc"} <= set(one.posterior[split])
        for values in (*one.posterior[split].values(), *one.label_only[split].values()):
            assert values.shape == (32,) and np.isfinite(values).all()
