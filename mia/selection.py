"""Choosing an attack: repeated stratified cross-validation on eval (the same splits for every
candidate), the one-standard-error rule with the seed's method as a floor, and the chosen candidate
refitted on all of eval to predict test."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mia.attacks import Candidate, Fitted, fit
from mia.config import RunConfig
from mia.core.folds import repeated_stratified_folds, stratified_folds
from mia.core.metrics import attack_metrics, bootstrap_intervals
from mia.core.thresholds import consistent_ranking

__all__ = ["CandidateReport", "Selection", "cross_validate", "cross_validate_repeated", "cv_summary", "select",
           "stratified_folds"]


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
    fold_accuracy: np.ndarray | None = None  # (repeats, k) CV accuracy of each held-out fold (not in to_dict)

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
    repeats: int | None = None  # repeats of the k-fold split (selection="cv")
    test_intervals: dict | None = None  # bootstrap intervals of the submission on test (with an answer key)
    ranking: str | None = None  # the candidate whose order test_scores follow (None: the chosen one's own scores)
    threshold: float | None = None  # with ``ranking``: the threshold on test_scores (consistent_ranking)
    test_metrics: dict | None = None  # the submission (test_predictions, test_scores) against the answer key

    @property
    def chosen_report(self) -> CandidateReport:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def score_threshold(self) -> float:
        """The threshold on ``test_scores`` that gives ``test_predictions``: member exactly when score >= it
        (0 for per-class thresholds, whose scores are already shifted by their class's threshold)."""
        if self.threshold is not None:
            return float(self.threshold)
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


def cross_validate_repeated(candidate: Candidate, feats: dict[str, np.ndarray], labels: np.ndarray,
                            membership: np.ndarray, folds: np.ndarray, *, seed: int = 0, min_class_count: int = 20,
                            **fit_options) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (scores, predictions), each (R, n), for the (R, n) fold indices ``folds`` (R repeated
    splits): in every row each record is scored by a fit that never saw it."""
    folds = np.atleast_2d(folds)
    scores = np.empty(folds.shape, dtype=np.float64)
    preds = np.empty(folds.shape, dtype=np.int64)
    for r, split in enumerate(folds):
        for f in np.unique(split):
            held = split == f
            train = ~held
            fitted = fit(candidate, _subset(feats, train), labels[train], membership[train],
                         min_class_count=min_class_count, seed=seed, **fit_options)
            held_feats = _subset(feats, held)
            scores[r, held] = fitted.score(held_feats, labels[held])
            preds[r, held] = fitted.predict(held_feats, labels[held])
    return scores, preds


def cross_validate(candidate: Candidate, feats: dict[str, np.ndarray], labels: np.ndarray, membership: np.ndarray,
                   *, k: int = 5, seed: int = 0, min_class_count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (scores, predictions), each (n,), of one stratified k-fold split: every record scored by
    a fit that never saw it."""
    folds = stratified_folds(membership, k, seed)[None, :]
    scores, preds = cross_validate_repeated(candidate, feats, labels, membership, folds, seed=seed,
                                            min_class_count=min_class_count)
    return scores[0], preds[0]


def fold_accuracy(preds: np.ndarray, membership: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """(R, k) accuracy of each held-out fold: preds and folds (R, n), membership (n,)."""
    k = int(folds.max()) + 1
    correct = (preds == membership[None, :]).astype(np.float64)
    out = np.empty((folds.shape[0], k), dtype=np.float64)
    for r in range(folds.shape[0]):
        out[r] = np.bincount(folds[r], weights=correct[r], minlength=k) / np.bincount(folds[r], minlength=k)
    return out


def cv_summary(scores: np.ndarray, preds: np.ndarray, membership: np.ndarray, folds: np.ndarray) -> tuple[dict, np.ndarray]:
    """(the cv dict of a CandidateReport, (R, k) fold accuracies) of out-of-fold scores and predictions (R, n).

    accuracy: the mean over all R k held-out folds; AUC and TPR at low FPR: the mean over repeats of the
    ranking metrics of each repeat's pooled out-of-fold scores (None where undefined)."""
    acc = fold_accuracy(preds, membership, folds)
    per_repeat = [attack_metrics(s, p, membership).to_dict() for s, p in zip(scores, preds)]
    out = dict(per_repeat[0])
    for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr"):
        values = [m[key] for m in per_repeat]
        out[key] = None if any(v is None for v in values) else float(np.mean(values))
    out["accuracy"] = float(acc.mean())
    out["accuracy_sd"] = float(acc.std(ddof=1)) if acc.size > 1 else 0.0  # spread of the fold accuracies
    out["repeats"], out["folds"] = int(folds.shape[0]), int(acc.shape[1])
    return out, acc


def paired_difference(candidate: np.ndarray, floor: np.ndarray) -> dict:
    """Mean and standard error of the per-fold accuracy differences candidate - floor, both (R, k) on the
    same splits. The mean equals the difference of the two CV accuracies; the standard error treats folds
    as independent, which repeated splits of the same records are not: it is descriptive only."""
    d = (np.asarray(candidate) - np.asarray(floor)).ravel()
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return {"mean": float(d.mean()), "se": se}


def select(
    candidates: tuple[Candidate, ...],
    eval_feats: dict[str, np.ndarray],
    eval_labels: np.ndarray,
    eval_membership: np.ndarray,
    test_feats: dict[str, np.ndarray],
    test_labels: np.ndarray,
    *,
    selection: str = "cv",
    k: int = RunConfig.folds,
    repeats: int = RunConfig.cv_repeats,
    seed: int = RunConfig.seed,
    min_class_count: int = RunConfig.min_class_count,
    class_priors: tuple[float, ...] = RunConfig.class_shrinkage,
    test_membership: np.ndarray | None = None,
    floor: str | None = None,
    bootstrap_resamples: int = RunConfig.bootstrap_resamples,
    ranking: bool = RunConfig.score_ranking,
) -> Selection:
    """Fit every candidate, choose one, and predict test membership with it refitted on all of eval.

    selection="cv": ``repeats`` stratified k-fold splits of eval, the same for every candidate; a
    candidate's CV accuracy is the mean over all repeats x k held-out folds. Among the candidates whose
    CV accuracy is within one standard error of the best (sqrt(acc (1 - acc) / n): differences smaller
    than that are noise), the one with the highest CV AUC, a steadier statistic than accuracy; remaining
    ties go to the earlier, simpler candidate. ``floor`` names a candidate (the seed's method) that no
    chosen candidate may fall below: a candidate whose mean paired per-fold accuracy difference to it
    is negative (on the same splits that is exactly a lower CV accuracy) is excluded; the floor itself is
    always eligible, so the choice is never worse than it by its own honest estimate.
    selection="in_sample": highest accuracy on eval itself.
    ``class_priors``: the shrinkage strengths per-class thresholds choose from (``attacks.fit``).
    ``bootstrap_resamples`` > 0 with ``test_membership``: percentile bootstrap intervals of the chosen
    attack on test (``Selection.test_intervals``).
    ``ranking`` (selection="cv"): the predictions are judged by accuracy, the scores by their order (AUC,
    TPR at low FPR), so each follows its own choice: when another candidate has the best CV AUC, the test
    scores follow its order, made to give the chosen candidate's predictions at one threshold
    (``consistent_ranking``: only the records the two disagree on move, to that threshold).
    """
    eval_membership = np.asarray(eval_membership, dtype=np.int64)
    if selection not in ("cv", "in_sample"):
        raise ValueError(f"selection must be 'cv' or 'in_sample', got {selection!r}")
    folds = repeated_stratified_folds(eval_membership, k, repeats, seed) if selection == "cv" else None
    options = dict(min_class_count=min_class_count, seed=seed, class_priors=tuple(class_priors), inner_folds=k)
    reports: list[CandidateReport] = []
    fitted_all: dict[str, Fitted] = {}
    for c in candidates:
        fitted = fit(c, eval_feats, eval_labels, eval_membership, **options)
        fitted_all[c.name] = fitted
        in_scores = fitted.score(eval_feats, eval_labels)
        in_metrics = attack_metrics(in_scores, fitted.predict(eval_feats, eval_labels), eval_membership).to_dict()
        cv, acc = None, None
        if folds is not None:
            oof_scores, oof_preds = cross_validate_repeated(c, eval_feats, eval_labels, eval_membership, folds,
                                                            **options)
            cv, acc = cv_summary(oof_scores, oof_preds, eval_membership, folds)
        test = None
        if test_membership is not None:
            test = attack_metrics(fitted.score(test_feats, test_labels), fitted.predict(test_feats, test_labels),
                                  np.asarray(test_membership, dtype=np.int64)).to_dict()
        reports.append(CandidateReport(c.name, c.describe(), cv, in_metrics, fitted.describe_fit(), test, acc))
    if folds is not None:
        _add_floor_differences(reports, floor)
        best_name = _one_standard_error_choice(reports, len(eval_membership), floor)
    else:
        best_name = _best_accuracy(reports)
    chosen = fitted_all[best_name]
    test_scores = chosen.score(test_feats, test_labels)
    test_predictions = chosen.predict(test_feats, test_labels).astype(np.int64)
    rank_name, threshold = None, None
    if ranking and folds is not None:
        best_auc = _best_auc(reports)
        order = fitted_all[best_auc].score(test_feats, test_labels) if best_auc not in (None, best_name) else None
        if order is not None and np.isfinite(order).all():
            rank_name = best_auc
            test_scores, threshold = consistent_ranking(order, test_predictions)
    intervals, metrics = None, None
    if test_membership is not None:
        truth = np.asarray(test_membership, dtype=np.int64)
        metrics = attack_metrics(test_scores, test_predictions, truth).to_dict()
        if bootstrap_resamples > 0:
            intervals = bootstrap_intervals(test_scores, test_predictions, truth, n_resamples=bootstrap_resamples,
                                            seed=seed).to_dict()
    return Selection(
        chosen=best_name,
        selection=selection,
        folds=k if selection == "cv" else None,
        candidates=reports,
        fitted=chosen,
        eval_scores=chosen.score(eval_feats, eval_labels),
        test_scores=test_scores,
        test_predictions=test_predictions,
        fitted_all=fitted_all,
        repeats=repeats if selection == "cv" else None,
        test_intervals=intervals,
        ranking=rank_name,
        threshold=threshold,
        test_metrics=metrics,
    )


def _best_auc(reports: list[CandidateReport]) -> str | None:
    """The first candidate with the highest CV AUC (None when no candidate has one)."""
    aucs = [r.cv["auc"] for r in reports if r.cv["auc"] is not None]
    if not aucs:
        return None
    return next(r.name for r in reports if r.cv["auc"] is not None and r.cv["auc"] >= max(aucs) - 1e-12)


def _best_accuracy(reports: list[CandidateReport]) -> str:
    """The first candidate with the highest in-sample eval accuracy (the seed's rule)."""
    best = max(r.eval["accuracy"] for r in reports)
    return next(r.name for r in reports if r.eval["accuracy"] >= best - 1e-12)


def _add_floor_differences(reports: list[CandidateReport], floor: str | None) -> None:
    """Each report's cv dict gains ``vs_floor``: the paired per-fold accuracy difference to the floor."""
    base = next((r for r in reports if r.name == floor), None)
    if base is None or base.fold_accuracy is None:
        return
    for r in reports:
        r.cv["vs_floor"] = paired_difference(r.fold_accuracy, base.fold_accuracy)
