# size: one idea, the statistics of reference-model attacks: LiRA's Gaussian fits, RMIA and the label-only
# ratios share their shape checks and group means; splitting them would spread one notation over three files.
"""The statistics of reference-model attacks, as arrays in and arrays out: LiRA, RMIA, label-only ratios.

mia.references.attacks feeds them from a bundle's reference models.

A record's membership signal means little on its own: some records are easy (every model is
confident on them) and some hard. Reference models (mia.references) trained with and without the
record tell what the victim's signal would look like in either case.

Notation: V query views, K reference models, n records. ``in_mask`` (K, n) bool is True where
reference model k trained on record i (IN), False where it did not (OUT). Only a record's own IN
models feed its IN statistics and only its OUT models its OUT statistics.

Features (each (n,) float64, larger = more likely member):

============  ===================================================================================
lira_online   LiRA (Carlini et al. 2022, "Membership inference attacks from first principles").
              Statistic: logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` per view.
              Per record and view, Gaussians N(mu_in, s_in^2) and N(mu_out, s_out^2) are fitted
              to the IN and the OUT references' phi; the score is the log-likelihood ratio
              summed over views: sum_v [log N(phi_v; mu_in, s_in^2) - log N(phi_v; mu_out, s_out^2)].
lira_offline  LiRA's offline variant: only the OUT Gaussian, one-sided (a member's phi is
              larger): -sum_v log Pr[Z_v > phi_v], Z_v ~ N(mu_out, s_out^2) (``-norm.logsf``, which
              keeps its resolution far in the tail where ``Pr[Z < phi]`` rounds to 1).
rmia          RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks").
              p(x|theta) = p_y averaged over views. Ratio r(x) = p(x|victim) / p(x) with
              p(x) = (mean_IN + mean_OUT) / 2 of p(x|theta_k) over the record's IN and OUT models
              (online), or (1 + a)/2 * mean_OUT + (1 - a)/2 (the paper's offline estimate of that
              average) for a record without IN models (inverted for one without OUT models).
              Score = fraction of population records z with r(x) / r(z) > gamma; the population
              is the other eval and test records (the record itself excluded). Computed by sorting
              the population ratios once and binary search: O((n + m) log m) time, O(n + m) memory.
              For a fixed gamma that fraction is non-decreasing in r(x) alone, so records rank
              as their own ratios do whatever the population: its size sets no attack's AUC or TPR.
============  ===================================================================================

Variances (LiRA): the mean and unbiased variance of each group per record and view, or one global
variance per view shared by IN and OUT (the within-record deviations of both groups pooled over all
records) when few models are available: ``global_variance=None`` chooses global when K < 16
(Carlini et al. fix the variance for small K too). With a shared variance the online score is
linear in the victim's statistic, so it cannot turn against a record the victim fits far better
than any reference (which separate IN and OUT variances do when IN is the narrower one: weakly
trained references). A record whose group has fewer than two models uses the global variance;
variances are floored at MIN_VARIANCE. A record with no IN (or no OUT) model, which happens with one
reference model (K = 1: each record is IN or OUT for it) or an incomplete reference set, gets that
group's mean as the other group's mean shifted by the average IN - OUT difference (of the records that
have both; with K = 1, of the IN records' means against the OUT records'). With few models (K < 16,
``shared_shift``) every model informs both of a record's means: mu_out is the mean of its OUT models'
statistics and its IN models' statistics moved down by that average shift, mu_in = mu_out + shift. On
the demo bundle with K = 2 this raised LiRA offline's test AUC from 58.9 to 63.5 % (resnet34) and
61.2 to 62.5 % (vgg16): one model per group is a noisy mean. With ``shrink`` (LiRA's posterior fit) the
shared shift is weighed against the record's own means by empirical Bayes (see ``fit_gaussians``).

Label-only (task 3): ``calibrated_aug_count`` = the victim's number of views still classified
correctly minus the mean of that number over the record's OUT references; ``label_lira`` = the
log-likelihood ratio of the victim's per-view correctness under the record's IN and OUT references'
correctness rates (LiRA's online test with Bernoulli instead of Gaussian statistics). When the run
makes noisy label-only queries the references answer them too: ``noise_lira`` and
``calibrated_noise_correct`` are the same two statistics over those queries. The victim enters only
through integer predicted labels (the caller passes argmax arrays); the reference models are the
attacker's own, so their predictions are free to use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mia.core.signals import integer_labels

__all__ = [
    "AUTO_GLOBAL_BELOW",
    "FEATURES",
    "GaussianFit",
    "LABEL_ONLY_FEATURES",
    "MIN_VARIANCE",
    "calibrated_aug_count",
    "fit_gaussians",
    "grouped_rate_llr",
    "grouped_rate_offline",
    "label_lira",
    "lira_offline",
    "lira_online",
    "rmia_dominance",
    "rmia_log_ratios",
    "rmia_scores",
]

AUTO_GLOBAL_BELOW = 16  # global_variance=None: global variance when fewer reference models than this
MIN_VARIANCE = 1e-6  # floor of every fitted variance (phi units squared)

FEATURES = {
    "lira_online": "LiRA online: log-likelihood ratio of IN vs OUT Gaussians of logit-scaled confidence, summed over views",
    "lira_offline": "LiRA offline: -log Pr[OUT Gaussian > victim's logit-scaled confidence], summed over views",
    "rmia": "RMIA: fraction of other eval/test records z with r(x)/r(z) > 1, r = victim p_y / reference p_y",
    "bmia": "LiRA offline with each reference's last-layer Laplace mean and per-record variance (mia.core.laplace)",
    "bmia_online": "LiRA online with each reference's last-layer Laplace means and per-record variances",
}
LABEL_ONLY_FEATURES = {
    "calibrated_aug_count": "views classified correctly by the victim minus the mean over the record's OUT references",
    "label_lira": "log-likelihood ratio of the victim's per-view correctness under IN vs OUT reference correctness rates",
    "noise_lira": "label_lira over the noisy label-only queries",
    "calibrated_noise_correct": "fraction of noisy queries correct for the victim minus the mean over the OUT references",
    "noise_rate_lr": "binomial log-likelihood ratio of the victim's correct noisy answers per noise level under the "
                     "record's IN vs OUT references' rates (works with one reference model)",
    "noise_rate_offline": "-log Pr[as many correct noisy answers as the victim's, or more, at the record's OUT "
                          "references' rates], summed over noise levels (references that trained on no record)",
}


# --------------------------------------------------------------------------------------------------
# LiRA


@dataclass
class GaussianFit:
    """Per record and view Gaussians of the IN and OUT reference statistics."""

    mu_in: np.ndarray  # (V, n) float64
    var_in: np.ndarray  # (V, n) float64, > 0
    mu_out: np.ndarray  # (V, n)
    var_out: np.ndarray  # (V, n)
    n_in: np.ndarray  # (n,) int64, IN models per record
    n_out: np.ndarray  # (n,) int64
    global_variance: bool  # True when one variance per view and group was used for every record


def _check_shapes(reference: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference, dtype=np.float64)
    in_mask = np.asarray(in_mask)
    if reference.ndim != 3:
        raise ValueError(f"reference statistics must be (K, V, n), got shape {reference.shape}")
    if in_mask.dtype != bool or in_mask.shape != (reference.shape[0], reference.shape[2]):
        raise ValueError(f"in_mask must be ({reference.shape[0]}, {reference.shape[2]}) bool, "
                         f"got {in_mask.dtype} {in_mask.shape}")
    if not np.isfinite(reference).all():
        raise ValueError("reference statistics contain NaN or inf")
    return reference, in_mask


def _group(reference: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (V, n) with NaN where a record has no model, sum of squared deviations (V, n), count (n,))."""
    w = mask[:, None, :].astype(np.float64)  # (K, 1, n)
    count = mask.sum(axis=0).astype(np.int64)
    total = (reference * w).sum(axis=0)
    mean = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
    centred = reference - np.nan_to_num(mean)[None]
    ss = (centred**2 * w).sum(axis=0)
    return mean, ss, count


def _pooled(ss: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(V,) within-record variance pooled over records: sum of squares / degrees of freedom (NaN if none)."""
    dof = np.clip(count - 1, 0, None).sum()
    return ss.sum(axis=1) / dof if dof > 0 else np.full(ss.shape[0], np.nan)


def _shift_spread(mu_in: np.ndarray, mu_out: np.ndarray, n_in: np.ndarray, n_out: np.ndarray, both: np.ndarray,
                  shift: np.ndarray, within: np.ndarray) -> np.ndarray:
    """(V, 1) tau^2 / s^2: the variance of the records' own IN - OUT shifts around the average beyond what
    their models' noise explains, relative to the within-record variance s^2 (0 where s^2 is unknown)."""
    if not both.any():  # one model: no record has its own shift
        return np.zeros_like(within)
    d = mu_in[:, both] - mu_out[:, both] - shift
    noise = within * (1 / n_in[both] + 1 / n_out[both]).mean()
    tau2 = np.maximum((d**2).mean(axis=1, keepdims=True) - noise, 0.0)
    known = within > 0  # False where s^2 is NaN (no record has two models in a group) or 0
    return np.where(known, tau2 / np.where(known, within, 1.0), 0.0)


def fit_gaussians(reference: np.ndarray, in_mask: np.ndarray, *, global_variance: bool | None = None,
                  min_variance: float = MIN_VARIANCE, shared_shift: bool | None = None,
                  shrink: bool = False) -> GaussianFit:
    """Fit the IN and OUT Gaussians of every record and view.

    reference: (K, V, n) statistic of each reference model; in_mask: (K, n) bool.
    global_variance: True / False forces it; None means global when K < AUTO_GLOBAL_BELOW.
    Means are the group means; variances the unbiased per-record ones (ddof=1) or the within-record
    variance of both groups pooled per view (see the module docstring). A record without an IN (OUT)
    model gets its other mean shifted by the average IN - OUT difference: over the records that have both,
    or with one model (no record has both) the mean over IN records minus the mean over OUT records.
    With every record OUT for every model (references that trained on none of them) the shift is 0: the
    IN means equal the OUT means, only the offline test says anything. ValueError when every record is IN.
    shared_shift: every model informs both means of a record, IN models through that average shift:
    mu_out = the mean over the record's models of (statistic - shift if IN), mu_in = mu_out + shift (the
    maximum-likelihood means when membership moves every record's statistic by the same amount). With
    few models this halves the noise of each mean; None means shared when K < AUTO_GLOBAL_BELOW.
    shrink (with the shared shift): weigh a record's own group mean (variance s^2 / n_own) against the
    other group's shifted mean (s^2 / n_other + tau^2) by inverse variance, s^2 the pooled within-record
    variance and tau^2 the spread of the records' own shifts beyond their noise: records whose shift
    differs from the average keep more of their own means as models accumulate. Full sharing where no
    record has two models in a group (s^2 unknown) or tau^2 = 0; own means as tau^2 grows.
    """
    reference, in_mask = _check_shapes(reference, in_mask)
    use_shared = reference.shape[0] < AUTO_GLOBAL_BELOW if shared_shift is None else bool(shared_shift)
    use_global = reference.shape[0] < AUTO_GLOBAL_BELOW if global_variance is None else bool(global_variance)
    mu_in, ss_in, n_in = _group(reference, in_mask)
    mu_out, ss_out, n_out = _group(reference, ~in_mask)
    both = (n_in > 0) & (n_out > 0)
    if both.any():
        shift = (mu_in[:, both] - mu_out[:, both]).mean(axis=1, keepdims=True)  # (V, 1)
    elif (n_in > 0).any() and (n_out > 0).any():  # one model (K = 1): records are IN or OUT at random, so the
        # mean over the IN records minus the mean over the OUT records estimates the same average shift
        shift = (mu_in[:, n_in > 0].mean(axis=1) - mu_out[:, n_out > 0].mean(axis=1))[:, None]
    elif not (n_in > 0).any():  # every record OUT for every model (distilled references): offline only
        shift = np.zeros((reference.shape[1], 1))
    else:
        raise ValueError("every record is IN for every reference model: there is nothing to compare them with")
    within = _pooled(np.concatenate([ss_in, ss_out], axis=1), np.concatenate([n_in, n_out]))[:, None]  # (V, 1)
    if use_shared:
        # a group without models adds 0: its count is 0 and its NaN mean becomes 0
        own_in, own_out = np.nan_to_num(mu_in), np.nan_to_num(mu_out)
        ratio = _shift_spread(own_in, own_out, n_in, n_out, both, shift, within) if shrink else 0.0
        other_in, other_out = n_in / (1 + n_in * ratio), n_out / (1 + n_out * ratio)  # the other group's weights
        mu_out = (n_out * own_out + other_in * (own_in - shift)) / np.maximum(n_out + other_in, 1e-300)
        mu_in = (n_in * own_in + other_out * (own_out + shift)) / np.maximum(n_in + other_out, 1e-300)
    else:
        mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
        mu_out = np.where(n_out > 0, mu_out, mu_in - shift)

    # One variance per view shared by both groups: the within-record deviations of IN and OUT pooled.
    spread = reference.var(axis=(0, 2))[:, None]  # no degrees of freedom at all: the spread of every statistic
    pooled = np.where(np.isnan(within), spread, within)  # (V, 1)

    shape = mu_in.shape
    if use_global:
        var_in = np.broadcast_to(pooled, shape).copy()
        var_out = var_in.copy()
    else:
        var_in = np.where(n_in >= 2, ss_in / np.maximum(n_in - 1, 1), pooled)
        var_out = np.where(n_out >= 2, ss_out / np.maximum(n_out - 1, 1), pooled)
    return GaussianFit(mu_in, np.maximum(var_in, min_variance), mu_out, np.maximum(var_out, min_variance),
                       n_in, n_out, use_global)


def _check_target(target: np.ndarray, fit: GaussianFit) -> np.ndarray:
    target = np.asarray(target, dtype=np.float64)
    if target.shape != fit.mu_in.shape:
        raise ValueError(f"target statistics must be (V, n) = {fit.mu_in.shape}, got {target.shape}")
    if not np.isfinite(target).all():
        raise ValueError("target statistics contain NaN or inf")
    return target


def lira_online(target: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """sum_v [log N(x_v; mu_in, var_in) - log N(x_v; mu_out, var_out)]. target (V, n) -> (n,) float64."""
    x = _check_target(target, fit)
    llr = (0.5 * (np.log(fit.var_out) - np.log(fit.var_in))
           - (x - fit.mu_in) ** 2 / (2 * fit.var_in)
           + (x - fit.mu_out) ** 2 / (2 * fit.var_out))
    return llr.sum(axis=0)


def lira_offline(target: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """-sum_v log Pr[Z_v > x_v], Z_v ~ N(mu_out, var_out). target (V, n) -> (n,) float64, >= 0."""
    from scipy.special import log_ndtr  # here: scipy costs 0.4 s to import
    x = _check_target(target, fit)
    z = (x - fit.mu_out) / np.sqrt(fit.var_out)
    return -log_ndtr(-z).sum(axis=0)


# --------------------------------------------------------------------------------------------------
# RMIA


def rmia_log_ratios(target_log_p: np.ndarray, reference_log_p: np.ndarray, in_mask: np.ndarray, *,
                    a: float = 0.3, online: bool = True) -> np.ndarray:
    """log r(x) = log p(x|victim) - log p(x), RMIA's likelihood ratio. -> (n,) float64.

    target_log_p: (V, n) log p_y of the victim per view; reference_log_p: (K, V, n); in_mask (K, n).
    p(x|theta) is p_y averaged over the views (in probability space); m_IN, m_OUT its means over the
    record's IN and OUT models. p(x), x's probability under a model that trained on x with probability 1/2:
    * ``online`` and IN and OUT models: p(x) = (m_IN + m_OUT) / 2 (RMIA online);
    * OUT models only (or not ``online``): RMIA's offline p_IN = a p_OUT + (1 - a), p(x) = (1+a)/2 m_OUT + (1-a)/2;
    * IN models only (K = 1, an incomplete set): the same inverted, p_OUT = (m_IN - (1 - a)) / a clipped to
      [0, m_IN] (0 when a = 0), p(x) = (m_IN + p_OUT) / 2. 0 <= a <= 1 matters only in these two cases.
    """
    from scipy.special import logsumexp  # here: scipy costs 0.4 s to import
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"RMIA's a must lie in [0, 1], got {a}")
    reference_log_p, in_mask = _check_shapes(reference_log_p, in_mask)
    target_log_p = np.asarray(target_log_p, dtype=np.float64)
    if target_log_p.shape != reference_log_p.shape[1:]:
        raise ValueError(f"target log-probabilities must be (V, n) = {reference_log_p.shape[1:]}, "
                         f"got {target_log_p.shape}")
    n_views = target_log_p.shape[0]
    log_px = logsumexp(target_log_p, axis=0) - np.log(n_views)  # (n,)
    per_model = logsumexp(reference_log_p, axis=1) - np.log(n_views)  # (K, n)

    def log_group_mean(mask: np.ndarray) -> np.ndarray:  # log of the mean p over the masked models (-inf: none)
        count = mask.sum(axis=0)
        with np.errstate(divide="ignore"):
            return logsumexp(np.where(mask, per_model, -np.inf), axis=0) - np.log(np.maximum(count, 1))

    out = ~in_mask
    has_in, has_out = in_mask.any(axis=0), out.any(axis=0)
    log_in, log_out = log_group_mean(in_mask), log_group_mean(out)
    with np.errstate(divide="ignore"):  # a = 1: the constant term is log 0 = -inf, which logaddexp absorbs
        log_p_ref = np.logaddexp(np.log((1 + a) / 2) + log_out, np.log((1 - a) / 2))
    if online:
        both = has_in & has_out
        log_p_ref[both] = np.logaddexp(log_in[both], log_out[both]) - np.log(2)
    only_in = has_in & ~has_out
    if only_in.any():
        p_in = np.exp(log_in[only_in])
        p_out = np.clip((p_in - (1 - a)) / a, 0.0, p_in) if a > 0 else np.zeros_like(p_in)
        log_p_ref[only_in] = np.log((p_in + p_out) / 2)
    return log_px - log_p_ref


def rmia_dominance(log_ratio_x: np.ndarray, log_ratio_z: np.ndarray, *, gamma: float = 1.0,
                   x_in_z: bool = False) -> np.ndarray:
    """Fraction of population records z with r(x) / r(z) > gamma, for every x. -> (n,) float64.

    log_ratio_x (n,), log_ratio_z (m,): log r. With ``x_in_z`` the two arrays are the same records
    (x_i is z_i) and each x is compared with the m - 1 others only. Sorts z once and counts with
    np.searchsorted: memory O(n + m).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    x = np.asarray(log_ratio_x, dtype=np.float64)
    z = np.sort(np.asarray(log_ratio_z, dtype=np.float64))
    if x_in_z and x.shape != z.shape:
        raise ValueError("x_in_z needs log_ratio_x and log_ratio_z of the same records")
    threshold = x - np.log(gamma)  # r(x)/r(z) > gamma  <=>  log r(z) < log r(x) - log gamma
    counts = np.searchsorted(z, threshold, side="left").astype(np.float64)
    m = len(z)
    if x_in_z:
        counts -= x < threshold  # x itself was counted (only when gamma < 1)
        m -= 1
    if m < 1:
        raise ValueError("RMIA needs at least one population record")
    return counts / m


def rmia_scores(target_log_p: np.ndarray, reference_log_p: np.ndarray, in_mask: np.ndarray, *, a: float = 0.3,
                gamma: float = 1.0, online: bool = True) -> np.ndarray:
    """RMIA with the records themselves as the population (each compared with the others). -> (n,)."""
    ratios = rmia_log_ratios(target_log_p, reference_log_p, in_mask, a=a, online=online)
    return rmia_dominance(ratios, ratios, gamma=gamma, x_in_z=True)


# --------------------------------------------------------------------------------------------------
# Label-only calibration


def _label_only_inputs(victim_predicted, reference_predicted, labels, in_mask):
    """Validated (victim (V, n) int, references (K, V, n) int, labels (n,), in_mask (K, n) bool or None where
    the caller has no masks)."""
    victim_predicted = integer_labels(victim_predicted, "victim_predicted")
    reference_predicted = integer_labels(reference_predicted, "reference_predicted")
    labels = np.asarray(labels)
    if reference_predicted.ndim != 3 or reference_predicted.shape[1:] != victim_predicted.shape:
        raise ValueError(f"reference_predicted must be (K, V, n) with (V, n) = {victim_predicted.shape}, "
                         f"got {reference_predicted.shape}")
    if in_mask is None:
        return victim_predicted, reference_predicted, labels, None
    in_mask = np.asarray(in_mask, dtype=bool)
    if in_mask.shape != (reference_predicted.shape[0], reference_predicted.shape[2]):
        raise ValueError(f"in_mask must be (K, n) = {(reference_predicted.shape[0], reference_predicted.shape[2])}")
    return victim_predicted, reference_predicted, labels, in_mask


def calibrated_aug_count(victim_predicted: np.ndarray, reference_predicted: np.ndarray, labels: np.ndarray,
                         in_mask: np.ndarray) -> np.ndarray:
    """Victim's correct-view count minus the mean count of the record's OUT references. -> (n,) float64.

    victim_predicted (V, n) int (argmax of the victim per view); reference_predicted (K, V, n) int;
    labels (n,); in_mask (K, n) bool. A record with no OUT model is calibrated with all its models.
    TypeError for non-integer predictions.
    """
    victim_predicted, reference_predicted, labels, in_mask = _label_only_inputs(
        victim_predicted, reference_predicted, labels, in_mask)
    victim_count = (victim_predicted == labels[None]).sum(axis=0).astype(np.float64)
    ref_count = (reference_predicted == labels[None, None]).sum(axis=1).astype(np.float64)  # (K, n)
    out = ~in_mask
    group = np.where(out.sum(axis=0) > 0, out, True)
    baseline = (ref_count * group).sum(axis=0) / group.sum(axis=0)
    return victim_count - baseline


def label_lira(victim_predicted: np.ndarray, reference_predicted: np.ndarray, labels: np.ndarray,
               in_mask: np.ndarray, prior: float = 0.5) -> np.ndarray:
    """Label-only likelihood ratio, LiRA's online test on 'classified correctly' per view -> (n,) float64.

    Per record and view, the rate at which its IN references and its OUT references classify it
    correctly, smoothed: (correct + prior) / (models + 2 prior) (a group without models gets 1/2).
    Score = sum_v log Pr[c_v | IN] - log Pr[c_v | OUT] for the victim's correctness c_v: a record the
    OUT models get wrong but the victim gets right is strong evidence of membership; a record every
    model gets right is none. Shapes and TypeError as for ``calibrated_aug_count``.
    """
    victim_predicted, reference_predicted, labels, in_mask = _label_only_inputs(
        victim_predicted, reference_predicted, labels, in_mask)
    if not prior > 0:
        raise ValueError(f"prior must be positive, got {prior}")
    ref_correct = reference_predicted == labels[None, None]  # (K, V, n)
    rates = []
    for group in (in_mask, ~in_mask):
        g = group[:, None, :]
        rates.append(((ref_correct & g).sum(axis=0) + prior) / (g.sum(axis=0) + 2 * prior))  # (V, n)
    in_rate, out_rate = rates
    correct = victim_predicted == labels[None]
    llr = np.where(correct, np.log(in_rate) - np.log(out_rate), np.log1p(-in_rate) - np.log1p(-out_rate))
    return llr.sum(axis=0).astype(np.float64)


def _group_rates(victim_predicted, reference_predicted, labels, groups, prior: float):
    """(group sizes (G, 1), smoothed correct rates (K, G, n), the victim's correct counts (G, n))."""
    groups = np.asarray(groups)
    if groups.shape != (victim_predicted.shape[0],) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be ({victim_predicted.shape[0]},) integers, got {groups.dtype} {groups.shape}")
    if not prior > 0:
        raise ValueError(f"prior must be positive, got {prior}")
    ids = np.unique(groups)
    onehot = (groups[None, :] == ids[:, None]).astype(np.float64)  # (G, Q)
    sizes = onehot.sum(axis=1)[:, None]  # (G, 1)
    ref_correct = (reference_predicted == labels[None, None]).astype(np.float64)  # (K, Q, n)
    rates = (np.einsum("gq,kqn->kgn", onehot, ref_correct) + prior) / (sizes[None] + 2 * prior)  # (K, G, n)
    correct = onehot @ (victim_predicted == labels[None]).astype(np.float64)  # (G, n)
    return sizes, rates, correct


def grouped_rate_offline(victim_predicted: np.ndarray, reference_predicted: np.ndarray, labels: np.ndarray,
                         groups: np.ndarray, prior: float = 0.5) -> np.ndarray:
    """Label-only offline test over groups of exchangeable queries, for reference models that trained on none
    of the records (distilled ones). -> (n,) float64, >= 0.

    Per record and group, p = the mean over the models of their smoothed correct-answer rates
    (correct + prior) / (queries + 2 prior); score = -sum over groups of log Pr[Binomial(m, p) >= c] for the
    victim's c correct answers of m queries: a member stays correct under more noise than a model that did not
    train on it. Shapes as for ``grouped_rate_llr`` (no in_mask: every model is OUT)."""
    from scipy.stats import binom  # here: scipy costs 0.4 s to import
    victim_predicted, reference_predicted, labels, _ = _label_only_inputs(
        victim_predicted, reference_predicted, labels, None)
    sizes, rates, correct = _group_rates(victim_predicted, reference_predicted, labels, groups, prior)
    log_tail = binom.logsf(correct - 1, np.broadcast_to(sizes, correct.shape), rates.mean(axis=0))  # Pr[X >= c]
    return -np.minimum(log_tail, 0.0).sum(axis=0)


def grouped_rate_llr(victim_predicted: np.ndarray, reference_predicted: np.ndarray, labels: np.ndarray,
                     in_mask: np.ndarray, groups: np.ndarray, prior: float = 0.5) -> np.ndarray:
    """Label-only likelihood ratio over groups of exchangeable queries (the noisy copies of one image at one
    noise level): binomial, not one Bernoulli per query. -> (n,) float64.

    victim_predicted (Q, n) and reference_predicted (K, Q, n) integer labels, labels (n,), in_mask (K, n),
    groups (Q,) int: the group of each query. Per model, record and group, the rate of correct answers
    (correct + prior) / (queries + 2 prior); its logit's IN and OUT means per record come from
    ``fit_gaussians`` (so a record lacking a group, as with one reference model, gets the other's mean
    shifted by the average IN - OUT difference); p_in, p_out their sigmoids. Score = sum over groups of
    c log(p_in / p_out) + (m - c) log((1 - p_in) / (1 - p_out)) for the victim's c correct of m queries."""
    victim_predicted, reference_predicted, labels, in_mask = _label_only_inputs(
        victim_predicted, reference_predicted, labels, in_mask)
    sizes, rates, correct = _group_rates(victim_predicted, reference_predicted, labels, groups, prior)
    fit = fit_gaussians(np.log(rates) - np.log1p(-rates), in_mask, global_variance=True)
    log_in, log_out = -np.logaddexp(0.0, -fit.mu_in), -np.logaddexp(0.0, -fit.mu_out)  # log sigmoid
    log_not_in, log_not_out = -np.logaddexp(0.0, fit.mu_in), -np.logaddexp(0.0, fit.mu_out)
    llr = correct * (log_in - log_out) + (sizes - correct) * (log_not_in - log_not_out)
    return llr.sum(axis=0)
