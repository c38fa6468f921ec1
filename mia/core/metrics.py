"""Attack quality: accuracy, exact ROC with ties, AUC, and TPR at low FPR.

Scores follow the project's orientation (larger = more likely member); membership is 0/1 with
1 = member (the positive class). Scores may be +-inf (NaN is rejected). ROC, AUC and TPR@FPR need at
least one member and one non-member.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mia.core.thresholds import _as_binary, _as_scores

__all__ = ["AttackMetrics", "BootstrapIntervals", "accuracy", "attack_metrics", "auc", "bootstrap_intervals", "roc_curve",
           "tpr_at_fpr"]

#: The low-FPR operating points reported everywhere: AttackMetrics field -> FPR.
FPR_POINTS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_01pct_fpr": 0.001}
#: A TPR at FPR f on N non-members allows floor(f N) false positives; fewer than this many makes it coarse.
MIN_NEGATIVES = 10


@dataclass
class AttackMetrics:
    """Summary of one attack on records with known membership."""

    accuracy: float  # fraction of records whose predicted membership is right
    auc: float  # ROC AUC of the scores (NaN when only one membership class is present)
    tpr_at_1pct_fpr: float  # largest TPR with FPR <= 1% (NaN when one class only)
    tpr_at_01pct_fpr: float  # largest TPR with FPR <= 0.1% (NaN when one class only)
    n: int  # number of records
    n_members: int  # number of members among them

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain, JSON-safe dict; NaN values become None."""
        out: dict[str, float | int | None] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
            else:
                out[key] = value
        return out


def _scores_and_membership(scores, membership) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    n_pos = int(m.sum())
    if n_pos == 0 or n_pos == m.shape[0]:
        raise ValueError("ROC/AUC need at least one member and one non-member")
    return s, m


def accuracy(pred, membership) -> float:
    """Fraction of equal entries. pred (n,) 0/1, membership (n,) 0/1, n >= 1."""
    p = _as_binary(pred, None, "pred")
    m = _as_binary(membership, p.shape[0], "membership")
    if p.shape[0] == 0:
        raise ValueError("accuracy of zero records is undefined")
    return float(np.count_nonzero(p == m) / p.shape[0])


def roc_curve(scores, membership) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC of the rule ``score >= t``: one point per distinct score, plus the origin.

    scores (n,), membership (n,) 0/1 -> (fpr, tpr), each (d + 1,) float64 for d distinct scores,
    non-decreasing, starting at (0, 0) and ending at (1, 1). Tied records move together, so a tie
    between a member and a non-member gives a diagonal segment.
    """
    s, m = _scores_and_membership(scores, membership)
    values, inverse = np.unique(s, return_inverse=True)  # ascending
    pos_at = np.bincount(inverse, weights=m, minlength=values.size).astype(np.int64)[::-1]
    neg_at = np.bincount(inverse, minlength=values.size)[::-1] - pos_at
    tp = np.concatenate(([0], np.cumsum(pos_at)))
    fp = np.concatenate(([0], np.cumsum(neg_at)))
    return fp / fp[-1], tp / tp[-1]


def auc(scores, membership) -> float:
    """ROC AUC = P(member score > non-member score) + 1/2 P(equal) (Mann-Whitney U / (P N)).

    Computed exactly in integers from per-value counts (average ranks), O(n log n).
    """
    s, m = _scores_and_membership(scores, membership)
    values, inverse = np.unique(s, return_inverse=True)
    pos_at = np.bincount(inverse, weights=m, minlength=values.size).astype(np.int64)
    neg_at = np.bincount(inverse, minlength=values.size) - pos_at
    neg_below = np.concatenate(([0], np.cumsum(neg_at)[:-1]))
    # 2U = sum over members of (2 * non-members strictly below + non-members tied).
    two_u = int(np.sum(pos_at * (2 * neg_below + neg_at)))
    n_pos, n_neg = int(pos_at.sum()), int(neg_at.sum())
    return two_u / (2 * n_pos * n_neg)


def tpr_at_fpr(scores, membership, fpr: float) -> float:
    """Largest TPR among the ``roc_curve`` points whose FPR is <= ``fpr`` (0 <= fpr <= 1)."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    fprs, tprs = roc_curve(scores, membership)
    return float(tprs[fprs <= fpr].max())  # (0, 0) always qualifies


def attack_metrics(scores, pred, membership) -> AttackMetrics:
    """Accuracy of ``pred`` and the ranking metrics of ``scores`` against ``membership``.

    scores (n,) float, pred (n,) 0/1, membership (n,) 0/1. With a single membership class the
    ranking metrics are undefined and reported as NaN (``to_dict`` turns them into None).
    """
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    p = _as_binary(pred, s.shape[0], "pred")
    n_members = int(m.sum())
    if 0 < n_members < m.shape[0]:
        roc_auc = auc(s, m)
        tpr1 = tpr_at_fpr(s, m, 0.01)
        tpr01 = tpr_at_fpr(s, m, 0.001)
    else:
        roc_auc = tpr1 = tpr01 = float("nan")
    return AttackMetrics(
        accuracy=accuracy(p, m),
        auc=roc_auc,
        tpr_at_1pct_fpr=tpr1,
        tpr_at_01pct_fpr=tpr01,
        n=int(m.shape[0]),
        n_members=n_members,
    )


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals


@dataclass
class BootstrapIntervals:
    """Percentile bootstrap intervals of an attack's test metrics (members and non-members resampled
    separately, so every resample keeps the test set's P members and N non-members)."""

    level: float  # e.g. 0.95
    resamples: int  # B
    intervals: dict[str, tuple[float, float] | None]  # metric -> (low, high); None when undefined
    negatives_at_fpr: dict[str, int]  # TPR metric -> floor(FPR x N): the false positives its cut allows
    few_negatives: list[str]  # TPR metrics whose cut allows fewer than MIN_NEGATIVES false positives

    def to_dict(self) -> dict:
        return {"level": self.level, "resamples": self.resamples, "method": "stratified percentile bootstrap",
                **{k: (list(v) if v is not None else None) for k, v in self.intervals.items()},
                "negatives_at_fpr": dict(self.negatives_at_fpr), "few_negatives": list(self.few_negatives)}


def _resampled_counts(groups: np.ndarray, n_groups: int, draws: np.ndarray) -> np.ndarray:
    """(B, n_groups) how many records of each score group each resample holds; draws (B, m) indices into
    ``groups`` (m,)."""
    b = draws.shape[0]
    flat = (np.arange(b)[:, None] * n_groups + groups[draws]).ravel()
    return np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)


def _ranking_stats(pos_at: np.ndarray, neg_at: np.ndarray) -> dict[str, np.ndarray]:
    """AUC and TPR at FPR_POINTS of each row: pos_at, neg_at (B, d) members / non-members per distinct
    score, ascending. The same formulas as ``auc`` and ``tpr_at_fpr``, one row per resample."""
    n_pos, n_neg = pos_at.sum(axis=1), neg_at.sum(axis=1)
    neg_below = np.cumsum(neg_at, axis=1) - neg_at
    out = {"auc": (pos_at * (2 * neg_below + neg_at)).sum(axis=1) / (2.0 * n_pos * n_neg)}
    tp = np.cumsum(pos_at[:, ::-1], axis=1)  # thresholds from the highest score down
    fp = np.cumsum(neg_at[:, ::-1], axis=1)
    for key, fpr in FPR_POINTS.items():
        ok = fp / n_neg[:, None] <= fpr
        out[key] = np.where(ok, tp, 0).max(axis=1) / n_pos  # the origin (TPR 0) always qualifies
    return out


#: Resamples drawn (and held in memory) at once, each block from its own generator (seed, block index).
BOOTSTRAP_BLOCK = 100


def bootstrap_intervals(scores, pred, membership, *, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> BootstrapIntervals:
    """Percentile bootstrap intervals of accuracy, AUC and TPR at 1% / 0.1% FPR.

    scores (n,) float, pred (n,) 0/1, membership (n,) 0/1. Each of ``n_resamples`` resamples draws the
    P members and the N non-members with replacement, separately (seeded by ``seed``); the interval of a
    metric is the (1 - level)/2 and (1 + level)/2 quantiles of its resampled values. Vectorized: per
    resample, counts per distinct score, ``BOOTSTRAP_BLOCK`` resamples at a time. The ranking metrics
    need members and non-members; without both their intervals are None.
    """
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    p = _as_binary(pred, s.shape[0], "pred")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    _, groups = np.unique(s, return_inverse=True)
    n_groups = int(groups.max()) + 1
    pos, neg = np.flatnonzero(m == 1), np.flatnonzero(m == 0)
    correct = (p == m).astype(np.int64)
    ranking = len(pos) > 0 and len(neg) > 0
    stats: dict[str, list[np.ndarray]] = {"accuracy": [], "auc": [], **{k: [] for k in FPR_POINTS}}
    for start in range(0, n_resamples, BOOTSTRAP_BLOCK):
        b = min(BOOTSTRAP_BLOCK, n_resamples - start)
        rng = np.random.default_rng([seed, start // BOOTSTRAP_BLOCK])
        pos_draw = pos[rng.integers(0, len(pos), (b, len(pos)))] if len(pos) else np.empty((b, 0), np.int64)
        neg_draw = neg[rng.integers(0, len(neg), (b, len(neg)))] if len(neg) else np.empty((b, 0), np.int64)
        stats["accuracy"].append((correct[pos_draw].sum(axis=1) + correct[neg_draw].sum(axis=1)) / len(s))
        if ranking:
            for key, v in _ranking_stats(_resampled_counts(groups, n_groups, pos_draw),
                                         _resampled_counts(groups, n_groups, neg_draw)).items():
                stats[key].append(v)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    intervals = {k: (tuple(float(x) for x in np.percentile(np.concatenate(v), q)) if v else None)
                 for k, v in stats.items()}
    allowed = {k: int(math.floor(f * len(neg) + 1e-9)) for k, f in FPR_POINTS.items()}
    return BootstrapIntervals(level, n_resamples, intervals, allowed,
                              [k for k, a in allowed.items() if a < MIN_NEGATIVES])
