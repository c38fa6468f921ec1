"""Choosing an attack: stratified cross-validation on eval, the one-standard-error rule with the seed's
method as a floor, and the chosen candidate refitted on all of eval to predict test."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mia.attacks import Candidate, Fitted, fit
from mia.core.metrics import attack_metrics

__all__ = ["CandidateReport", "Selection", "cross_validate", "select", "stratified_folds"]


# ----------------------------------------------------------------------------------------------
# Selection


def stratified_folds(membership: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(n,) fold index in [0, k), members and non-members spread evenly, deterministic for ``seed``."""
    membership = np.asarray(membership)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(membership), dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(membership == cls)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = np.arange(len(idx)) % k
    return folds


def _subset(feats: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in feats.items()}


@dataclass
class CandidateReport:
    """How one candidate did: cross-validated on eval, in-sample on eval, and on test if known."""

    name: str
    description: str
    cv: dict | None  # AttackMetrics of the pooled out-of-fold scores/predictions (None: in-sample selection)
    eval: dict  # in-sample AttackMetrics after fitting on all of eval
    fit: dict  # thresholds of the fit on all of eval
    test: dict | None = None  # AttackMetrics on test when an answer key exists

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "cv": self.cv, "eval": self.eval,
                "fit": self.fit, "test": self.test}


@dataclass
class Selection:
    """The outcome of choosing an attack for one victim and task."""

    chosen: str
    selection: str  # "cv" | "in_sample"
    folds: int | None
    candidates: list[CandidateReport]
    fitted: Fitted  # the chosen candidate refitted on all of eval
    eval_scores: np.ndarray  # (n_eval,) chosen attack's scores on eval (in-sample)
    test_scores: np.ndarray  # (n_test,)
    test_predictions: np.ndarray  # (n_test,) int64 0/1
    fitted_all: dict[str, Fitted] = field(default_factory=dict)

    @property
    def chosen_report(self) -> CandidateReport:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def score_threshold(self) -> float:
        """The threshold on ``test_scores`` that gives ``test_predictions``: member exactly when score >= it
        (0 for per-class thresholds, whose scores are already shifted by their class's threshold)."""
        return 0.0 if self.fitted.candidate.kind == "class" else float(self.fitted.threshold)


def _one_standard_error_choice(reports: list[CandidateReport], n: int, floor: str | None = None) -> str:
    """The highest-CV-AUC candidate among those within one standard error of the best CV accuracy and,
    with ``floor`` (a candidate's name), whose CV accuracy is at least that candidate's."""
    best = max(r.cv["accuracy"] for r in reports)
    se = float(np.sqrt(best * (1 - best) / max(n, 1)))
    least = next((r.cv["accuracy"] for r in reports if r.name == floor), -np.inf)
    near = [r for r in reports if r.cv["accuracy"] >= max(best - se, least) - 1e-12]
    auc = lambda r: r.cv["auc"] if r.cv["auc"] is not None else -np.inf  # noqa: E731
    return max(near, key=lambda r: (auc(r), -reports.index(r))).name


def cross_validate(candidate: Candidate, feats: dict[str, np.ndarray], labels: np.ndarray, membership: np.ndarray,
                   *, k: int = 5, seed: int = 0, min_class_count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (scores, predictions), each (n,): every record scored by a fit that never saw it."""
    folds = stratified_folds(membership, k, seed)
    scores = np.empty(len(membership), dtype=np.float64)
    preds = np.empty(len(membership), dtype=np.int64)
    for f in range(k):
        held = folds == f
        if not held.any():
            continue
        train = ~held
        fitted = fit(candidate, _subset(feats, train), labels[train], membership[train],
                     min_class_count=min_class_count, seed=seed)
        held_feats = _subset(feats, held)
        scores[held] = fitted.score(held_feats, labels[held])
        preds[held] = fitted.predict(held_feats, labels[held])
    return scores, preds


def select(
    candidates: tuple[Candidate, ...],
    eval_feats: dict[str, np.ndarray],
    eval_labels: np.ndarray,
    eval_membership: np.ndarray,
    test_feats: dict[str, np.ndarray],
    test_labels: np.ndarray,
    *,
    selection: str = "cv",
    k: int = 5,
    seed: int = 0,
    min_class_count: int = 20,
    test_membership: np.ndarray | None = None,
    floor: str | None = None,
) -> Selection:
    """Fit every candidate, choose one, and predict test membership with it refitted on all of eval.

    selection="cv": among the candidates whose cross-validated accuracy is within one standard error
    of the best (sqrt(acc (1 - acc) / n): differences smaller than that are noise), the one with the
    highest cross-validated AUC, a steadier statistic than accuracy; remaining ties go to the earlier,
    simpler candidate. ``floor`` names a candidate (the seed's method) whose cross-validated accuracy
    no chosen candidate may fall below: it is always eligible itself, so the choice is never worse
    than it by its own honest estimate. selection="in_sample": highest accuracy on eval itself.
    """
    eval_membership = np.asarray(eval_membership, dtype=np.int64)
    if selection not in ("cv", "in_sample"):
        raise ValueError(f"selection must be 'cv' or 'in_sample', got {selection!r}")
    reports: list[CandidateReport] = []
    fitted_all: dict[str, Fitted] = {}
    best_name, best_key = None, -np.inf
    for c in candidates:
        fitted = fit(c, eval_feats, eval_labels, eval_membership, min_class_count=min_class_count, seed=seed)
        fitted_all[c.name] = fitted
        in_scores = fitted.score(eval_feats, eval_labels)
        in_metrics = attack_metrics(in_scores, fitted.predict(eval_feats, eval_labels), eval_membership)
        cv = None
        if selection == "cv":
            oof_scores, oof_preds = cross_validate(c, eval_feats, eval_labels, eval_membership, k=k, seed=seed,
                                                   min_class_count=min_class_count)
            cv = attack_metrics(oof_scores, oof_preds, eval_membership)
        test = None
        if test_membership is not None:
            test = attack_metrics(fitted.score(test_feats, test_labels), fitted.predict(test_feats, test_labels),
                                  np.asarray(test_membership, dtype=np.int64)).to_dict()
        reports.append(CandidateReport(c.name, c.describe(), cv.to_dict() if cv else None, in_metrics.to_dict(),
                                       fitted.describe_fit(), test))
        key = (cv or in_metrics).accuracy
        if key > best_key + 1e-12:
            best_name, best_key = c.name, key
    if selection == "cv":
        best_name = _one_standard_error_choice(reports, len(eval_membership), floor)
    chosen = fitted_all[best_name]
    return Selection(
        chosen=best_name,
        selection=selection,
        folds=k if selection == "cv" else None,
        candidates=reports,
        fitted=chosen,
        eval_scores=chosen.score(eval_feats, eval_labels),
        test_scores=chosen.score(test_feats, test_labels),
        test_predictions=chosen.predict(test_feats, test_labels).astype(np.int64),
        fitted_all=fitted_all,
    )
