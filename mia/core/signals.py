"""Membership signals computed from a model's logits.

Every signal takes ``logits`` of shape (n, C) (numpy array or torch tensor, any float dtype) and
``labels`` of shape (n,) (integers in ``[0, C)``) and returns an (n,) float64 array oriented so that
LARGER means MORE LIKELY A MEMBER (models are more confident, and more often right, on the records
they were trained on).

Signals (p = softmax(z), y = true label):

==========================  ============================================================
confidence                  p_y
neg_entropy                 -H(p) = sum_i p_i log p_i
neg_modified_entropy        -Mentr(p, y), Song & Mittal 2021, "Systematic evaluation of
                            privacy risks of machine learning models":
                            Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
neg_loss                    log p_y (minus the cross-entropy loss)
logit_scaled_confidence     z_y - logsumexp_{j != y} z_j = log(p_y / (1 - p_y))
hinge                       z_y - max_{j != y} z_j
correctness                 1.0 if argmax_j z_j == y else 0.0 (ties: the first maximal index,
                            as ``numpy.argmax``)
==========================  ============================================================

Numerics: everything is computed in float64 from log-softmax. Let a be the argmax class, z2 the
largest of the other logits and ``ls = log sum_{j != a} exp(z_j - z_a)`` (computed as
``(z2 - z_a) + log sum_{j != a} exp(z_j - z2)``, so it never underflows). Then

* ``log p_i = (z_i - z_a) - softplus(ls)``  (exact for the argmax class even when p_a rounds to 1);
* ``log(1 - p_i) = log1p(-p_i)`` for i != a (there p_i <= 1/2, so this is accurate);
* ``log(1 - p_a) = ls - softplus(ls) = -softplus(-ls)``, i.e. the other classes' logsumexp minus
  the full logsumexp, with no ``1 - p`` anywhere;
* logit-scaled confidence is ``-ls`` when y = a, else
  ``(z_y - z_a) - log1p(sum_{j != y, a} e^(z_j - z_a))`` (two non-positive terms: no cancellation).

All of this is O(n C). The results are finite and accurate for extreme logits such as
``[1000, 0, 0]`` or ``[0, -1000]`` (as long as logit differences are representable, |z| < ~1e307).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "SEED_SIGNALS",
    "SIGNALS",
    "all_signals",
    "confidence",
    "correctness",
    "hinge",
    "logit_scaled_confidence",
    "neg_entropy",
    "neg_loss",
    "neg_modified_entropy",
]


@dataclass(frozen=True)
class _Prepared:
    """Per-record quantities shared by all signals (n records, C classes)."""

    logits: np.ndarray  # (n, C) float64
    labels: np.ndarray  # (n,) int64 in [0, C)
    rows: np.ndarray  # (n,) int64, 0..n-1 (for fancy indexing)
    argmax: np.ndarray  # (n,) int64, first maximal class
    second: np.ndarray  # (n,) float64, largest logit among the classes other than argmax
    ls: np.ndarray  # (n,) float64, log sum_{j != argmax} exp(z_j - z_argmax)  (<= log(C - 1))
    log_p: np.ndarray  # (n, C) float64, log-softmax
    log_1mp: np.ndarray  # (n, C) float64, log(1 - p_i)


def _to_float64(x: object, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested list to a float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor (also bfloat16 / on GPU)
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _to_labels(x: object) -> np.ndarray:
    """Convert labels (numpy array, torch tensor, list) to an int64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for any finite x."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _prepare(logits: object, labels: object) -> _Prepared:
    """Validate inputs and compute log-softmax and log(1 - p) stably (see module docstring)."""
    z = _to_float64(logits, "logits")
    y = _to_labels(labels)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (n, C), got shape {z.shape}")
    n, c = z.shape
    if c < 2:
        raise ValueError(f"logits need at least 2 classes, got shape {z.shape}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match logits {z.shape}, got {y.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    if n and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")

    rows = np.arange(n)
    a = np.argmax(z, axis=1) if n else np.zeros(0, dtype=np.int64)
    za = z[rows, a]
    others = z.copy()
    others[rows, a] = -np.inf
    z2 = others.max(axis=1) if n else np.zeros(0)
    # ls = log sum_{j != a} exp(z_j - z_a); the inner sum is in [1, C - 1], so no underflow.
    ls = (z2 - za) + np.log(np.exp(others - z2[:, None]).sum(axis=1))
    sp = _softplus(ls)  # log sum_j exp(z_j - z_a) = logsumexp(z) - z_a
    log_p = (z - za[:, None]) - sp[:, None]
    # Non-argmax classes have p_i <= 1/2, so log1p(-p_i) is accurate there.
    p_others = np.exp(log_p)
    p_others[rows, a] = 0.0  # overwritten below; avoids log1p(-1) when p_a rounds to 1
    log_1mp = np.log1p(-p_others)
    # Argmax class: log(1 - p_a) = logsumexp_{j != a} - logsumexp = ls - softplus(ls).
    log_1mp[rows, a] = -_softplus(-ls)
    return _Prepared(z, y, rows, a, z2, ls, log_p, log_1mp)


def _confidence(q: _Prepared) -> np.ndarray:
    return np.exp(q.log_p[q.rows, q.labels])


def _neg_entropy(q: _Prepared) -> np.ndarray:
    p = np.exp(q.log_p)
    # p log p -> 0 as p -> 0; guard so an underflowed p never meets a -inf log.
    terms = np.where(p > 0.0, p * q.log_p, 0.0)
    return terms.sum(axis=1)


def _neg_modified_entropy(q: _Prepared) -> np.ndarray:
    log_py = q.log_p[q.rows, q.labels]
    one_minus_py = np.exp(q.log_1mp[q.rows, q.labels])
    p = np.exp(q.log_p)
    # Every term of Mentr is >= 0, so the sum has no cancellation.
    others = np.where(p > 0.0, p * q.log_1mp, 0.0)  # p_i log(1 - p_i) <= 0
    others[q.rows, q.labels] = 0.0
    mentr = -one_minus_py * log_py - others.sum(axis=1)
    return -mentr


def _neg_loss(q: _Prepared) -> np.ndarray:
    return q.log_p[q.rows, q.labels].copy()


def _logit_scaled_confidence(q: _Prepared) -> np.ndarray:
    # y = argmax: z_a - logsumexp_{j != a} z_j = -ls exactly.
    # y != argmax: z_y - logsumexp_{j != y} z_j
    #              = (z_y - z_a) - log1p(sum_{j != y, a} e^{z_j - z_a});
    # both terms are <= 0, so the difference is accurate to a few ulps even near 0.
    za = q.logits[q.rows, q.argmax]
    e = np.exp(q.logits - za[:, None])
    e[q.rows, q.argmax] = 0.0
    e[q.rows, q.labels] = 0.0
    other = (q.logits[q.rows, q.labels] - za) - np.log1p(e.sum(axis=1))
    return np.where(q.labels == q.argmax, -q.ls, other) + 0.0  # + 0.0 turns -0.0 into 0.0


def _hinge(q: _Prepared) -> np.ndarray:
    zy = q.logits[q.rows, q.labels]
    za = q.logits[q.rows, q.argmax]
    return np.where(q.labels == q.argmax, za - q.second, zy - za)


def _correctness(q: _Prepared) -> np.ndarray:
    return (q.argmax == q.labels).astype(np.float64)


_IMPLS: dict[str, Callable[[_Prepared], np.ndarray]] = {
    "confidence": _confidence,
    "neg_entropy": _neg_entropy,
    "neg_modified_entropy": _neg_modified_entropy,
    "neg_loss": _neg_loss,
    "logit_scaled_confidence": _logit_scaled_confidence,
    "hinge": _hinge,
    "correctness": _correctness,
}


def confidence(logits, labels) -> np.ndarray:
    """p_y, the softmax probability of the true label. (n, C), (n,) -> (n,) float64."""
    return _confidence(_prepare(logits, labels))


def neg_entropy(logits, labels) -> np.ndarray:
    """-H(softmax(z)) = sum_i p_i log p_i; labels are checked but unused. (n, C), (n,) -> (n,)."""
    return _neg_entropy(_prepare(logits, labels))


def neg_modified_entropy(logits, labels) -> np.ndarray:
    """-Mentr (Song & Mittal 2021): (1 - p_y) log p_y + sum_{i != y} p_i log(1 - p_i).

    logits (n, C), labels (n,) -> (n,) float64, always <= 0.
    """
    return _neg_modified_entropy(_prepare(logits, labels))


def neg_loss(logits, labels) -> np.ndarray:
    """log p_y = minus the cross-entropy loss. logits (n, C), labels (n,) -> (n,) float64."""
    return _neg_loss(_prepare(logits, labels))


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """z_y - logsumexp_{j != y} z_j = log(p_y / (1 - p_y)). (n, C), (n,) -> (n,) float64."""
    return _logit_scaled_confidence(_prepare(logits, labels))


def hinge(logits, labels) -> np.ndarray:
    """z_y - max_{j != y} z_j (Carlini et al.'s margin). (n, C), (n,) -> (n,) float64."""
    return _hinge(_prepare(logits, labels))


def correctness(logits, labels) -> np.ndarray:
    """1.0 where argmax_j z_j == y (first maximal index on ties), else 0.0. (n, C), (n,) -> (n,)."""
    return _correctness(_prepare(logits, labels))


SIGNALS: dict[str, Callable[..., np.ndarray]] = {
    "confidence": confidence,
    "neg_entropy": neg_entropy,
    "neg_modified_entropy": neg_modified_entropy,
    "neg_loss": neg_loss,
    "logit_scaled_confidence": logit_scaled_confidence,
    "hinge": hinge,
    "correctness": correctness,
}
"""Signal name -> function(logits, labels) -> (n,) float64."""

SEED_SIGNALS: tuple[str, ...] = ("confidence", "neg_entropy", "neg_modified_entropy", "neg_loss")
"""The four signals of the seed attack."""


def all_signals(logits, labels) -> dict[str, np.ndarray]:
    """Every signal in ``SIGNALS`` (same key order), sharing one log-softmax pass.

    logits (n, C), labels (n,) -> {name: (n,) float64}.
    """
    q = _prepare(logits, labels)
    return {name: _IMPLS[name](q) for name in SIGNALS}


def integer_labels(array, what: str) -> np.ndarray:
    """``array`` as an integer array; TypeError for anything else: probabilities or logits must never
    reach a label-only attack (the one check behind every label-only entry point)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must be integer predicted labels, got dtype {array.dtype}: probabilities or logits "
                        "must not reach a label-only attack")
    return array
