"""mia.core.laplace: the last-layer Laplace posterior and the one-reference attack, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mia.core.laplace import LastLayerLaplace, fit_last_layer_laplace, laplace_fit_gaussians, statistic_moments
from mia.core.reference_stats import lira_offline
from mia.core.signals import logit_scaled_confidence


def test_logit_moments_by_hand():
    # W = [[1, 0], [0, 1]], b = [0, 1]; V = I (3 x 3): kappa = |[x, 1]|^2
    lap = LastLayerLaplace(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), np.eye(2), np.eye(3))
    mean, kappa = lap.logit_moments(np.array([[1.0, 2.0], [0.0, 0.0]]))
    np.testing.assert_allclose(mean, [[1.0, 3.0], [0.0, 1.0]])
    np.testing.assert_allclose(kappa, [1 + 4 + 1, 1])


def test_kappa_in_blocks_equals_the_direct_formula():
    rng = np.random.default_rng(3)
    v = np.cov(rng.standard_normal((4, 50)))  # (4, 4) positive definite
    lap = LastLayerLaplace(np.zeros((2, 4)), np.eye(2), v)
    x = rng.standard_normal((5000, 3))  # more records than one block
    xt = np.concatenate([x, np.ones((5000, 1))], axis=1)
    np.testing.assert_allclose(lap.logit_moments(x)[1], np.einsum("nd,de,ne->n", xt, v, xt), rtol=1e-12)


def test_logit_covariance_is_kappa_times_row_covariance():
    # sample W from the matrix normal (row covariance U, column covariance V) and compare the logits' covariance
    rng = np.random.default_rng(0)
    u = np.array([[2.0, 0.5], [0.5, 1.0]])
    v = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.3]])
    lap = LastLayerLaplace(np.zeros((2, 3)), u, v)
    x = np.array([[1.0, -2.0]])
    _, kappa = lap.logit_moments(x)
    xt = np.array([1.0, -2.0, 1.0])
    assert kappa[0] == pytest.approx(xt @ v @ xt)
    z = rng.standard_normal((200_000, 2, 3))
    w = np.linalg.cholesky(u) @ z @ np.linalg.cholesky(v).T  # (S, 2, 3) ~ MN(0, U, V)
    logits = w @ xt
    np.testing.assert_allclose(np.cov(logits.T), kappa[0] * u, rtol=0.02, atol=0.02)


def test_fit_by_hand_on_one_feature():
    # two classes, one feature x in {1, -1}, W = 0, b = 0: p = (1/2, 1/2) for both records
    feats = np.array([[1.0], [-1.0]])
    lap = fit_last_layer_laplace(feats, np.zeros((2, 1)), np.zeros(2), prior_scale=1.0)
    a = np.array([[1.0, 0.0], [0.0, 1.0]])  # mean of [x, 1][x, 1]^T: x^2 = 1, x = 0 on average, 1
    g = np.array([[0.25, -0.25], [-0.25, 0.25]])  # diag(p) - p p^T
    root_n = math.sqrt(2)
    root_tau = 1.0 * root_n * np.trace(a) / 2  # prior_scale * sqrt(N) * trace(A) / (D + 1)
    np.testing.assert_allclose(lap.col_cov, np.linalg.inv(root_n * a + root_tau * np.eye(2)))
    np.testing.assert_allclose(lap.row_cov, np.linalg.inv(root_n * g + root_tau * np.eye(2)))
    np.testing.assert_allclose(lap.weight, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="weight"):
        fit_last_layer_laplace(feats, np.zeros((2, 3)), None, 1.0)
    with pytest.raises(ValueError, match="prior_scale"):
        fit_last_layer_laplace(feats, np.zeros((2, 1)), None, 0.0)


def test_records_far_from_the_training_features_are_less_certain():
    rng = np.random.default_rng(1)
    train = rng.standard_normal((500, 4))
    weight = rng.standard_normal((3, 4))
    lap = fit_last_layer_laplace(train, weight, None, prior_scale=0.01)
    near, far = np.zeros((1, 4)), np.full((1, 4), 5.0)
    (_, v_near), (_, v_far) = (statistic_moments(lap, x, np.array([0])) for x in (near, far))
    assert v_far[0] > 10 * v_near[0]
    # vanishing posterior width: the mean is the statistic of the mean logits and the variance 0
    sharp = LastLayerLaplace(lap.weight, 1e-12 * np.eye(3), lap.col_cov)
    m, v = statistic_moments(sharp, far, np.array([2]))
    expected = logit_scaled_confidence(far @ weight.T, np.array([2]))
    np.testing.assert_allclose(m, expected, rtol=1e-6) and np.testing.assert_allclose(v, 0.0, atol=1e-8)
    with pytest.raises(ValueError, match="draws"):
        statistic_moments(lap, near, np.array([0]), draws=3)


def test_statistic_moments_match_many_draws_of_the_logits():
    lap = LastLayerLaplace(np.array([[1.0, 0.5], [-1.0, 0.0], [0.0, 0.2]]), np.diag([0.5, 1.0, 0.2]), np.eye(2))
    x, y = np.array([[0.7]]), np.array([0])
    m, v = statistic_moments(lap, x, y, draws=20_000, seed=3)
    mean, kappa = lap.logit_moments(x)
    rng = np.random.default_rng(4)
    logits = mean + math.sqrt(kappa[0]) * rng.standard_normal((200_000, 3)) * np.sqrt([0.5, 1.0, 0.2])
    phi = logit_scaled_confidence(logits, np.zeros(len(logits), dtype=np.int64))
    assert m[0] == pytest.approx(phi.mean(), abs=0.02) and v[0] == pytest.approx(phi.var(), rel=0.03)


def test_laplace_gaussians_by_hand():
    # K = 2 models, one view, 2 records; model 0 trains on record 0, model 1 on record 1
    means = np.array([[[3.0, 1.0]], [[0.0, 4.0]]])
    variances = np.array([[[1.0, 2.0]], [[3.0, 5.0]]])
    mask = np.array([[True, False], [False, True]])
    fit = laplace_fit_gaussians(means, variances, mask)
    np.testing.assert_allclose(fit.mu_in, [[3.0, 4.0]]) and np.testing.assert_allclose(fit.mu_out, [[0.0, 1.0]])
    np.testing.assert_allclose(fit.var_in, [[1.0, 5.0]]) and np.testing.assert_allclose(fit.var_out, [[3.0, 2.0]])
    # offline: -log Pr[Z > x], Z ~ N(mu_out, var_out); x = 2 for record 0: z = 2 / sqrt(3)
    got = lira_offline(np.array([[2.0, 2.0]]), fit)
    expected = [-math.log(0.5 * math.erfc(2 / math.sqrt(3) / math.sqrt(2))),
                -math.log(0.5 * math.erfc(1 / math.sqrt(2) / math.sqrt(2)))]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # one model (K = 1): the OUT mean of an IN record is its IN mean minus the IN - OUT difference of the means
    one = laplace_fit_gaussians(means[:1], variances[:1], mask[:1])
    assert one.mu_out[0, 0] == pytest.approx(3.0 - (3.0 - 1.0)) and one.var_out[0, 0] == 1.0
    with pytest.raises(ValueError, match="variances"):
        laplace_fit_gaussians(means, variances[:, :, :1], mask)
