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

__all__ = ["AttackMetrics", "accuracy", "attack_metrics", "auc", "roc_curve", "tpr_at_fpr"]


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
