"""Threshold attacks: choose the cut on a score that best separates members from non-members.

Rule everywhere: a record is predicted a member  <=>  ``score >= threshold``.

``sweep`` is exact and O(n log n): it sorts the scores once, counts members and non-members per
distinct value and evaluates every possible cut. The candidate thresholds are

* ``-inf``                 (everyone is a member),
* one cut between each pair of consecutive distinct scores u_k < u_{k+1}: the midpoint
  ``u_k/2 + u_{k+1}/2``, or ``u_{k+1}`` itself when the midpoint is not strictly above ``u_k``
  (adjacent floats, u_k = -inf),
* ``+inf``                 (no one is a member),

so records with equal scores always land on the same side, and every achievable split is tried.
Scores may be +-inf (NaN is rejected). A score of +inf is a member under every threshold, so when
one is present the last candidate (``+inf``, "no one") is left out: it would repeat a split.

Ties in accuracy: the best threshold is the FIRST maximum, i.e. the smallest candidate threshold
reaching the best accuracy (so between equally good cuts the one predicting more members wins).

``sweep_per_class`` can shrink each class's threshold towards the global one (``shrinkage``), and
``choose_shrinkage`` picks that strength by cross-validation.

``consistent_ranking`` makes one attack's scores give another's predictions at one threshold.

``grid_sweep`` (the usual 100-point grid) and ``brute_force_sweep`` (O(n^2) reference) are public
baselines for tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mia.core.arrays import to_numpy
from mia.core.folds import stratified_folds

__all__ = [
    "ClassThresholds",
    "consistent_ranking",
    "choose_shrinkage",
    "Sweep",
    "brute_force_sweep",
    "grid_sweep",
    "predict",
    "predict_per_class",
    "sweep",
    "sweep_per_class",
]


@dataclass
class Sweep:
    """Accuracy of the rule ``score >= t`` for every candidate threshold t (k candidates)."""

    thresholds: np.ndarray  # (k,) float64, strictly increasing; sweep(): -inf first, +inf last
    accuracies: np.ndarray  # (k,) float64, accuracy on the swept records at each threshold
    best_threshold: float  # smallest threshold reaching the best accuracy
    best_accuracy: float  # max(accuracies)


@dataclass
class ClassThresholds:
    """Thresholds chosen per true label (Song & Mittal 2021), with a global fallback."""

    global_threshold: float  # best threshold over all records; used for unseen / fallback labels
    per_class: dict[int, float]  # label -> threshold, for every label seen while fitting
    fallback_classes: list[int] = field(default_factory=list)  # labels that use global_threshold
    shrinkage: float = 0.0  # pseudo-records of the global rule per class, in units of the mean class size

    def for_labels(self, labels) -> np.ndarray:
        """(n,) float64: the threshold of each record's label (the global one for unseen labels)."""
        lab = np.asarray(labels, dtype=np.int64)
        classes, inverse = np.unique(lab, return_inverse=True)
        per_label = [self.per_class.get(c, self.global_threshold) for c in classes.tolist()]
        return np.asarray(per_label, dtype=np.float64)[inverse.reshape(lab.shape)]


def _as_scores(scores: object, *, allow_empty: bool = True) -> np.ndarray:
    """Scores as an (n,) float64 array without NaN (+-inf allowed)."""
    s = to_numpy(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must have shape (n,), got shape {s.shape}")
    if s.size and s.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not allow_empty and s.size == 0:
        raise ValueError("cannot choose a threshold from zero records")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    return s


def _as_binary(x: object, n: int | None, name: str) -> np.ndarray:
    """0/1 labels (membership or predictions) as an (n,) int64 array (any length if n is None)."""
    m = to_numpy(x)
    if m.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got shape {m.shape}")
    if n is not None and m.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the scores, got {m.shape}")
    if m.size and m.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be 0/1 numbers, got dtype {m.dtype}")
    if m.size and not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return m.astype(np.int64)


def _as_labels(x: object, n: int) -> np.ndarray:
    lab = to_numpy(x)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the scores, got {lab.shape}")
    if lab.size and lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    return lab.astype(np.int64)


def _cuts(values: np.ndarray) -> np.ndarray:
    """Cut points between consecutive sorted distinct values: t_k with u_k < t_k <= u_{k+1}."""
    return _pair_cuts(values[:-1], values[1:])


def _pair_cuts(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The cut for each pair lo < hi (elementwise): the midpoint, or hi when it is not above lo."""
    with np.errstate(invalid="ignore"):  # -inf/2 + inf/2 is NaN; the where below picks hi then
        mid = lo / 2 + hi / 2  # no overflow, unlike (lo + hi) / 2
    return np.where(mid > lo, mid, hi)


def _candidates(values: np.ndarray) -> np.ndarray:
    """-inf, the cuts between the sorted distinct ``values``, +inf (unless +inf is a value)."""
    last = [np.inf] if values[-1] < np.inf else []
    return np.concatenate(([-np.inf], _cuts(values), last))


def _best(thresholds: np.ndarray, accuracies: np.ndarray) -> Sweep:
    i = int(np.argmax(accuracies))  # first maximum
    return Sweep(thresholds, accuracies, float(thresholds[i]), float(accuracies[i]))


def sweep(scores, membership) -> Sweep:
    """Exact accuracy of every distinct cut of ``scores``; O(n log n).

    scores (n,) float, no NaN; membership (n,) 0/1. Single-class membership is fine; n = 0 raises
    ValueError. Returns a ``Sweep`` whose thresholds are -inf, the cuts between consecutive distinct
    scores, and +inf (m + 1 candidates for m distinct finite scores; see the module docstring).
    """
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    n = s.shape[0]
    values, inverse = np.unique(s, return_inverse=True)  # sorted distinct scores
    members_at = np.bincount(inverse, weights=m, minlength=values.size).astype(np.int64)
    total_at = np.bincount(inverse, minlength=values.size)
    # Candidate k puts the k smallest distinct values on the non-member side.
    members_below = np.concatenate(([0], np.cumsum(members_at)))
    nonmembers_below = np.concatenate(([0], np.cumsum(total_at - members_at)))
    correct = nonmembers_below + (members_below[-1] - members_below)
    thresholds = _candidates(values)
    return _best(thresholds, correct[: thresholds.size] / n)


def brute_force_sweep(scores, membership) -> Sweep:
    """O(n^2) reference for ``sweep``: same candidates, each scored by comparing every record."""
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    values = np.array(sorted(set(s.tolist())), dtype=np.float64)
    thresholds = _candidates(values)
    correct = [np.count_nonzero((s >= t).astype(np.int64) == m) for t in thresholds]
    return _best(thresholds, np.asarray(correct, dtype=np.int64) / s.shape[0])


def grid_sweep(scores, membership, n_points: int = 100) -> Sweep:
    """Baseline: ``n_points`` evenly spaced thresholds from min to max score, O(n * n_points).

    Duplicate grid points (all scores equal) are merged, so thresholds stay strictly increasing.
    May miss the best cut; ``sweep`` never does.
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    s = _as_scores(scores, allow_empty=False)
    if not np.isfinite(s).all():
        raise ValueError("grid_sweep needs finite scores")
    m = _as_binary(membership, s.shape[0], "membership")
    thresholds = np.unique(np.linspace(s.min(), s.max(), n_points))
    correct = [np.count_nonzero((s >= t).astype(np.int64) == m) for t in thresholds]
    return _best(thresholds, np.asarray(correct, dtype=np.int64) / s.shape[0])


def predict(scores, threshold: float) -> np.ndarray:
    """(n,) int64 0/1: 1 where ``score >= threshold``."""
    s = _as_scores(scores)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    return (s >= threshold).astype(np.int64)


def consistent_ranking(rank_scores, predictions) -> tuple[np.ndarray, float]:
    """(scores, threshold): scores in the order of ``rank_scores`` wherever it agrees with ``predictions``,
    such that ``scores >= threshold`` is exactly ``predictions``. -> float64 (n,), float.

    The threshold is the cut on ``rank_scores`` that agrees with the most predictions (``sweep`` with the
    predictions as labels); only the records on the wrong side of it move, to the threshold itself
    (predicted members) or to the float just below it (predicted non-members), so the ranking's top and
    bottom stay as they were: its AUC and its TPR at low FPR are kept up to those few records.
    ValueError for non-finite ``rank_scores``."""
    rank = _as_scores(rank_scores)
    pred = _as_binary(predictions, len(rank), "predictions").astype(bool)
    if not np.isfinite(rank).all():
        raise ValueError("consistent_ranking needs finite scores")
    if len(rank) == 0 or pred.all():
        return rank.copy(), -np.inf
    if not pred.any():
        return rank.copy(), np.inf
    t = float(sweep(rank, pred.astype(np.int64)).best_threshold)
    if t == -np.inf:  # the same split with a finite threshold
        t = float(rank.min())
    elif t == np.inf:
        t = float(np.nextafter(rank.max(), np.inf))
    scores = rank.copy()
    scores[pred & (rank < t)] = t
    scores[~pred & (rank >= t)] = np.nextafter(t, -np.inf)
    return scores, t


def sweep_per_class(scores, membership, labels, min_count: int = 20, shrinkage: float = 0.0) -> ClassThresholds:
    """One threshold per true label, each chosen by an exact ``sweep`` on that label's records.

    A label falls back to the global threshold (the ``sweep`` over all records) when it has fewer
    than ``min_count`` records or only members / only non-members; such labels are listed, sorted,
    in ``fallback_classes`` and also mapped to the global threshold in ``per_class``.
    ``shrinkage`` = lambda >= 0 (inf allowed) pulls each class towards the global rule: its threshold
    maximizes  correct_c(t) + n0 acc(t)  over the global sweep's cuts t, where correct_c counts the
    class's records classified right, acc(t) is the accuracy on all records and n0 = lambda n / C
    (C labels): n0 pseudo-records that behave like the whole set, an empirical-Bayes weight
    n_c / (n_c + n0) on the class's own evidence. lambda = 0: each class free (its own ``sweep``);
    inf: the global threshold for every class.
    scores (n,), membership (n,) 0/1, labels (n,) int.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not shrinkage >= 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    lab = _as_labels(labels, s.shape[0])
    overall = sweep(s, m)
    global_threshold = overall.best_threshold
    classes, best, counts, members = _best_per_class(s, m, lab)
    if shrinkage > 0:
        best = _shrunk_per_class(s, m, lab, classes, overall, shrinkage * len(s) / len(classes))
    per_class: dict[int, float] = {}
    fallback: list[int] = []
    for c, t, count, mem in zip(classes.tolist(), best.tolist(), counts.tolist(), members.tolist()):
        if count < min_count or mem == 0 or mem == count:
            per_class[c] = global_threshold
            fallback.append(c)
        else:
            per_class[c] = t
    return ClassThresholds(global_threshold, per_class, fallback, float(shrinkage))


def _shrunk_per_class(s: np.ndarray, m: np.ndarray, lab: np.ndarray, classes: np.ndarray, overall: Sweep,
                      prior_count: float) -> np.ndarray:
    """(C,) per class, the cut of ``overall`` (the global sweep of s) maximizing correct_c(t) + prior_count acc(t);
    the first maximum (smallest cut) on ties. Inf prior_count: the global threshold for every class."""
    if np.isinf(prior_count):
        return np.full(len(classes), overall.best_threshold)
    values, inverse = np.unique(s, return_inverse=True)
    d, n_cut = len(values), len(overall.thresholds)
    row = np.searchsorted(classes, lab)
    members_at = np.bincount(row * d + inverse, weights=m, minlength=len(classes) * d).reshape(-1, d)
    total_at = np.bincount(row * d + inverse, minlength=len(classes) * d).reshape(-1, d)
    zero = np.zeros((len(classes), 1))
    members_below = np.concatenate([zero, np.cumsum(members_at, axis=1)], axis=1)  # (C, d + 1)
    nonmembers_below = np.concatenate([zero, np.cumsum(total_at - members_at, axis=1)], axis=1)
    correct = (nonmembers_below + members_below[:, -1:] - members_below)[:, :n_cut]
    objective = correct + prior_count * overall.accuracies[None, :]
    return overall.thresholds[np.argmax(objective, axis=1)]


def choose_shrinkage(scores, membership, labels, grid: tuple[float, ...], *, min_count: int = 20, k: int = 5,
                     seed: int = 0) -> float:
    """The shrinkage of ``grid`` whose per-class thresholds classify the most held-out records right in a
    stratified k-fold cross-validation of these records (ties: the stronger shrinkage). One-value grid: it."""
    if len(grid) == 1:
        return float(grid[0])
    s = _as_scores(scores, allow_empty=False)
    m = _as_binary(membership, s.shape[0], "membership")
    lab = _as_labels(labels, s.shape[0])
    folds = stratified_folds(m, k, seed)
    correct = np.zeros(len(grid))
    for f in range(k):
        held, train = folds == f, folds != f
        if not held.any() or not train.any():
            continue
        for i, lam in enumerate(grid):
            ct = sweep_per_class(s[train], m[train], lab[train], min_count=min_count, shrinkage=lam)
            correct[i] += np.count_nonzero(predict_per_class(s[held], lab[held], ct) == m[held])
    best = np.flatnonzero(correct == correct.max())
    return float(max(grid[i] for i in best))


def _best_per_class(s: np.ndarray, m: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, ...]:
    """(classes, best threshold, records, members) per label: the threshold is
    ``sweep(s[lab == c], m[lab == c]).best_threshold`` for every label c, for all labels in one
    O(n log n) pass (one sort by (label, score), no loop over labels).

    Per class the candidates are those of ``sweep`` in the same order (-inf, the cuts, +inf unless
    +inf is a score) and the first maximum wins, so the results are identical.
    """
    order = np.lexsort((s, lab))
    ss, mm, ll = s[order], m[order], lab[order]
    n = len(ss)
    class_start = np.ones(n, dtype=bool)
    class_start[1:] = ll[1:] != ll[:-1]
    new_group = class_start.copy()
    new_group[1:] |= ss[1:] != ss[:-1]
    g_start = np.flatnonzero(new_group)  # each (label, distinct score) group, sorted
    g_members = np.add.reduceat(mm, g_start)
    g_total = np.diff(np.append(g_start, n))
    g_value = ss[g_start]
    g_first = class_start[g_start]
    g_class = np.cumsum(g_first) - 1  # 0 .. C-1
    first_g = np.flatnonzero(g_first)  # first group of each class
    last_g = np.append(first_g[1:], len(g_start)) - 1  # last group of each class
    classes = ll[g_start[first_g]]
    # members / non-members at or below each group, within its class
    cum_m = np.cumsum(g_members)
    cum_n = np.cumsum(g_total - g_members)
    before_m = (cum_m - g_members)[first_g]
    before_n = (cum_n - (g_total - g_members))[first_g]
    class_members = cum_m[last_g] - before_m
    class_records = class_members + cum_n[last_g] - before_n
    below_m = cum_m - before_m[g_class]
    below_n = cum_n - before_n[g_class]
    # candidates per class: "-inf" (everyone a member), then the cut after each group
    n_groups = len(g_start)
    n_cand = n_groups + len(classes)
    start_pos = first_g + np.arange(len(classes))  # position of each class's "-inf" candidate
    after_pos = np.arange(n_groups) + g_class + 1
    correct = np.empty(n_cand, dtype=np.float64)
    thresholds = np.empty(n_cand, dtype=np.float64)
    correct[start_pos] = class_members
    thresholds[start_pos] = -np.inf
    correct[after_pos] = below_n + class_members[g_class] - below_m
    is_last = np.zeros(n_groups, dtype=bool)
    is_last[last_g] = True
    cut = np.full(n_groups, np.inf)
    inner = np.flatnonzero(~is_last)
    if len(inner):
        cut[inner] = _pair_cuts(g_value[inner], g_value[inner + 1])
    thresholds[after_pos] = cut
    # sweep() leaves out "+inf" when +inf is a score: it would repeat a split
    drop = after_pos[is_last & (g_value == np.inf)]
    correct[drop] = -1.0
    best = np.maximum.reduceat(correct, start_pos)
    cand_class = np.repeat(np.arange(len(classes)), np.diff(np.append(start_pos, n_cand)))
    hits = np.flatnonzero(correct == best[cand_class])
    _, first_hit = np.unique(cand_class[hits], return_index=True)
    return classes, thresholds[hits[first_hit]], class_records, class_members


def predict_per_class(scores, labels, ct: ClassThresholds) -> np.ndarray:
    """(n,) int64 0/1 using each record's label threshold; labels never seen use the global one."""
    s = _as_scores(scores)
    lab = _as_labels(labels, s.shape[0])
    return (s >= ct.for_labels(lab)).astype(np.int64)
