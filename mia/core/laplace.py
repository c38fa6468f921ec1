"""A last-layer Laplace approximation of a reference model, and the one-reference attack built on it.

BMIA (Liu et al. 2025, "Efficient membership inference attacks by Bayesian neural network") turns one
trained reference model into many: the posterior of its last layer, approximated by a Gaussian around the
trained weights (Laplace), gives for every record a distribution of the reference's membership statistic
instead of one value. A record the reference is unsure about (far from its training features) gets a wide
distribution, so the victim's statistic is weak evidence there; a record in a dense region a narrow one.
This module holds the maths, arrays in and arrays out; mia.references.attacks feeds it.

The last layer is logits f = W x + b on the penultimate features x (the classifier head's input). With
x~ = [x, 1] and the weights [W | b] (C, D+1), the Gauss-Newton Hessian of the training cross-entropy is
sum_n Lambda_n (x) x~_n x~_n^T, Lambda_n = diag(p_n) - p_n p_n^T, and its Kronecker factorisation (K-FAC)
N * G (x) A with G = mean_n Lambda_n (C, C) and A = mean_n x~_n x~_n^T (D+1, D+1). With an isotropic
prior of precision tau, the posterior precision is approximated by the damped factors
(sqrt(N) G + sqrt(tau) I) (x) (sqrt(N) A + sqrt(tau) I), so the weights are matrix-normal with row
covariance U = (sqrt(N) G + sqrt(tau) I)^-1 and column covariance V = (sqrt(N) A + sqrt(tau) I)^-1, and the
logits of a record are Gaussian: mean [W | b] x~, covariance (x~^T V x~) U. The statistic (the
logit-scaled confidence, as LiRA's) is not linear in the logits, so its mean and variance under that
Gaussian are estimated from ``draws`` antithetic samples shared by all records.

The attack: per record and view, the IN and OUT means are those of the reference models' Laplace means
(``fit_gaussians``, which also fills a group a record lacks, as with one reference model), and each
group's variance is the mean Laplace variance of its models: LiRA's offline and online tests with a
per-record variance that one model provides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mia.core.reference_stats import MIN_VARIANCE, GaussianFit, fit_gaussians
from mia.core.signals import logit_scaled_confidence

__all__ = ["DRAWS", "LastLayerLaplace", "PRIOR_SCALES", "fit_last_layer_laplace", "laplace_fit_gaussians",
           "statistic_moments"]

#: Prior strengths tried (tuned by eval AUC): sqrt(tau) = scale * sqrt(N) * trace(A) / (D + 1), i.e. the
#: prior's share of the column factor against the features' mean second moment. Small: the data dominate
#: (variance grows with a record's distance from the training features); large: the prior dominates
#: (variance follows the feature norm).
PRIOR_SCALES = (0.001, 0.01, 0.1, 1.0, 10.0)
DRAWS = 64  # samples of the logits per record (antithetic pairs)


@dataclass(frozen=True)
class LastLayerLaplace:
    """The Gaussian posterior of a classifier head: mean [W | b], covariance U (x) V (matrix normal)."""

    weight: np.ndarray  # (C, D + 1) float64: W with the bias as the last column
    row_cov: np.ndarray  # U (C, C)
    col_cov: np.ndarray  # V (D + 1, D + 1)

    def logit_moments(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean logits (n, C), kappa (n,)): the logits are N(mean, kappa * U) for features (n, D)."""
        x = _augment(features)
        kappa = np.concatenate([((block @ self.col_cov) * block).sum(axis=1)  # blocks: memory O(block * D)
                                for block in np.array_split(x, max(1, -(-len(x) // 2048)))]) if len(x) else np.zeros(0)
        return x @ self.weight.T, np.maximum(kappa, 0.0)


def _augment(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {x.shape}")
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_last_layer_laplace(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                           prior_scale: float) -> LastLayerLaplace:
    """The K-FAC Laplace posterior of the head (weight (C, D), bias (C,) or None) from the penultimate
    features (N, D) of the records the model trained on; sqrt(tau) = prior_scale * sqrt(N) * trace(A) / (D+1)
    (see the module docstring). ValueError on mismatched shapes, no records or a non-positive scale."""
    x = _augment(features)
    weight = np.asarray(weight, dtype=np.float64)
    n, d1 = x.shape
    if weight.ndim != 2 or weight.shape[1] != d1 - 1:
        raise ValueError(f"weight must be (C, D={d1 - 1}), got {weight.shape}")
    if n == 0:
        raise ValueError("the Laplace approximation needs the features of at least one training record")
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be positive, got {prior_scale}")
    b = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    wb = np.concatenate([weight, b[:, None]], axis=1)
    p = _softmax(x @ wb.T)
    a = x.T @ x / n
    g = np.diag(p.mean(axis=0)) - p.T @ p / n
    root_n = np.sqrt(n)
    root_tau = prior_scale * root_n * np.trace(a) / d1
    u = np.linalg.inv(root_n * g + root_tau * np.eye(len(g)))
    v = np.linalg.inv(root_n * a + root_tau * np.eye(d1))
    return LastLayerLaplace(wb, (u + u.T) / 2, (v + v.T) / 2)


def statistic_moments(laplace: LastLayerLaplace, features: np.ndarray, labels: np.ndarray, *, draws: int = DRAWS,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (n,), variance (n,)) of the logit-scaled confidence of the true label under the posterior
    logits of each record, from ``draws`` samples (antithetic pairs, the same standard normal draws for
    every record: differences between records are not sampling noise). float64."""
    if draws < 2 or draws % 2:
        raise ValueError(f"draws must be an even number >= 2, got {draws}")
    labels = np.asarray(labels)
    mean, kappa = laplace.logit_moments(features)
    if len(labels) != len(mean):
        raise ValueError(f"{len(labels)} labels for {len(mean)} records")
    root = np.linalg.cholesky(laplace.row_cov + 1e-12 * np.eye(len(laplace.row_cov)))
    z = np.random.default_rng(seed).standard_normal((draws // 2, len(root)))
    eps = np.concatenate([z, -z]) @ root.T  # (draws, C), covariance U
    scale = np.sqrt(kappa)[:, None]
    total = np.zeros(len(mean))
    total_sq = np.zeros(len(mean))
    for e in eps:
        phi = logit_scaled_confidence(mean + scale * e[None, :], labels)
        total += phi
        total_sq += phi * phi
    m = total / draws
    var = np.maximum(total_sq / draws - m * m, 0.0) * draws / (draws - 1)
    return m, var


def laplace_fit_gaussians(means: np.ndarray, variances: np.ndarray, in_mask: np.ndarray,
                          min_variance: float = MIN_VARIANCE) -> GaussianFit:
    """LiRA's Gaussians with the Laplace moments of K reference models: means (K, V, n), variances
    (K, V, n), in_mask (K, n). The IN and OUT means as ``fit_gaussians`` makes them (a group a record
    lacks is the other shifted by the average difference); each group's variance is the mean Laplace
    variance over the record's models of that group (over all its models when it has none), floored."""
    variances = np.asarray(variances, dtype=np.float64)
    base = fit_gaussians(means, in_mask, global_variance=True)
    if variances.shape != np.shape(means) or not np.isfinite(variances).all():
        raise ValueError(f"variances must be finite and shaped like the means {np.shape(means)}")

    def group_variance(group: np.ndarray) -> np.ndarray:
        group = np.where(group.sum(axis=0) > 0, group, True)  # (K, n): a record without the group uses all
        w = group[:, None, :].astype(np.float64)
        return (variances * w).sum(axis=0) / w.sum(axis=0)

    var_in = group_variance(np.asarray(in_mask, dtype=bool))
    var_out = group_variance(~np.asarray(in_mask, dtype=bool))
    return GaussianFit(base.mu_in, np.maximum(var_in, min_variance), base.mu_out, np.maximum(var_out, min_variance),
                       base.n_in, base.n_out, False)
