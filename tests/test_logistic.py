"""mia.core.logistic: Newton's method against a hand-derived optimum and against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest

from mia.core.logistic import fit_logistic


def test_two_points_match_the_hand_derived_optimum():
    # x = [-1, 1] standardizes to z = [-1, 1]; by symmetry b = 0, and the objective
    # 2 C log(1 + exp(-w)) + w^2 / 2 is stationary where w = 2 C / (1 + exp(w)).
    m = fit_logistic(np.array([[-1.0], [1.0]]), np.array([0, 1]), c=1.0)
    w = m.coef[0]
    assert m.converged and abs(m.intercept) < 1e-12
    assert w == pytest.approx(2.0 / (1.0 + np.exp(w)), abs=1e-12)
    assert w == pytest.approx(0.6748, abs=1e-3)
    # the raw scale is undone: x = 1 is z = 1 (population std of [-1, 1] is 1)
    assert m.decision_function(np.array([[1.0]]))[0] == pytest.approx(w)
    p = m.predict_proba(np.array([[1.0], [-1.0]]))
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(-w))) and np.allclose(p.sum(1), 1)


def test_gradient_is_zero_at_the_solution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) * [1, 10, 100, 0.01, 1] + [0, 5, -3, 0, 1]
    y = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(size=300) > 0).astype(int)
    c = 0.3
    m = fit_logistic(x, y, c=c)
    z = (x - x.mean(0)) / x.std(0)
    t = z @ m.coef + m.intercept
    p = 1 / (1 + np.exp(-t))
    assert np.abs(c * z.T @ (p - y) + m.coef).max() < 1e-7
    assert abs(c * (p - y).sum()) < 1e-7  # intercept: not penalized


def test_matches_scikit_learn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    n, d = 800, 12
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, size=d)
    x[:, 3] = 2 * x[:, 2] + 1e-3 * rng.normal(size=n)  # nearly collinear columns
    x[:, 7] = 4.0  # a constant column: scale 1, weight 0
    y = (x[:, 0] / x[:, 0].std() - x[:, 5] / x[:, 5].std() + rng.normal(size=n) > 0).astype(int)
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-12, max_iter=10000)).fit(x, y)
    m = fit_logistic(x, y, c=1.0)
    assert np.abs(sk.decision_function(x) - m.decision_function(x)).max() < 1e-5
    assert abs(m.coef[7]) < 1e-12


def test_separable_data_stays_finite():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 0, 1, 1])
    m = fit_logistic(x, y, c=100.0)
    assert m.converged and np.isfinite(m.coef).all()
    assert (m.decision_function(x) > 0).tolist() == [False, False, True, True]


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((3, 2)), np.array([0, 1]), "must be"),
    (np.zeros((2, 2)), np.array([0, 2]), "0 and 1"),
    (np.array([[np.nan], [0.0]]), np.array([0, 1]), "finite"),
])
def test_bad_input_raises(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_logistic(x, y)
