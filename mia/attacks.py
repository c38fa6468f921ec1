"""Attacks per access level: features, candidates, and fitting a candidate (choosing one: mia.selection).

An attack maps a record's features to a score (larger = more likely member) and a 0/1 prediction.
Features come in two kinds, and the label-only kind is built from predicted labels alone:

* posterior access (tasks 1, 2): float64 signals from the logits of every query view
  (``posterior_features``);
* label-only access (task 3): ``label_only_features`` takes integer predicted labels and refuses
  anything else, so the task-3 path never sees probabilities or logits.

Candidates are fitted on eval and chosen by stratified k-fold cross-validation (mia.selection): each
candidate's thresholds (or learned model) are fitted on k-1 folds and measured on the held-out fold;
the candidate with the best cross-validated accuracy is refitted on all of eval and applied to test.
The seed's method (best in-sample eval accuracy among four global thresholds) is ``selection.select`` with
``selection="in_sample"`` over ``SEED_POSTERIOR`` / ``SEED_LABEL_ONLY``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from mia.config import RunConfig
from mia.core import signals as sig
from mia.core.signals import integer_labels
from mia.core.logistic import fit_logistic
from mia.core.thresholds import (ClassThresholds, choose_shrinkage, predict, predict_per_class, sweep,
                                 sweep_per_class)

# ----------------------------------------------------------------------------------------------
# Features


def posterior_features(logits: np.ndarray, labels: np.ndarray, view_names: list[str]) -> dict[str, np.ndarray]:
    """Signals for posterior access.

    logits: (V, n, C) for V query views, view 0 being the image itself; labels: (n,) int.
    Returns name -> (n,) float64: every signal of ``mia.core.signals`` on the image itself, plus
    ``aug_flip_lsc`` (mean logit-scaled confidence over the image and its flip) and ``aug_mean_lsc``
    (mean over all views) when those views exist, and ``view{v}_lsc`` (the logit-scaled confidence of
    view v >= 1 alone: inputs of the learned attacks, which weigh the views, not thresholded alone).
    """
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[0] != len(view_names):
        raise ValueError(f"logits must be (V={len(view_names)}, n, C), got {logits.shape}")
    feats = dict(sig.all_signals(logits[0], labels))
    lsc = np.stack([sig.logit_scaled_confidence(z, labels) for z in logits])  # (V, n)
    if "flip" in view_names:
        feats["aug_flip_lsc"] = lsc[[0, view_names.index("flip")]].mean(axis=0)
    if len(view_names) > 2:
        feats["aug_mean_lsc"] = lsc.mean(axis=0)
    for v in range(1, len(view_names)):
        feats[f"view{v}_lsc"] = lsc[v]
    return feats


def is_view_input(name: str) -> bool:
    """A per-view or per-noise-level feature (``view{v}_lsc``, ``sigma{s}_correct``) or a reference
    model's expectation (``ref_out_lsc``): an input of the learned attacks only, never thresholded alone."""
    return name.startswith(("view", "sigma", "ref_"))


def _integer_predictions(predicted, n: int, what: str) -> np.ndarray:
    predicted = integer_labels(predicted, what)
    if predicted.ndim != 2 or predicted.shape[1] != n:
        raise ValueError(f"{what} must be (V, n={n}) predicted labels, got {predicted.shape}")
    return predicted


def label_only_features(predicted: np.ndarray, labels: np.ndarray, noise_predicted: np.ndarray | None = None,
                        noise_levels: list[float] | tuple[float, ...] | None = None) -> dict[str, np.ndarray]:
    """Features for label-only access from predicted labels only.

    predicted: (V, n) integer predicted labels for V query views (view 0 = the image itself);
    labels: (n,) int. Returns ``correctness`` (view 0) and ``aug_correct_count`` (how many views are
    still classified correctly; Choquette-Choo et al. 2021), as float64.
    noise_predicted: (Q, n) integer predicted labels of Q noisy queries, query q made at noise level
    ``noise_levels[q]``: adds ``noise_correct`` (the fraction of noisy queries classified correctly;
    robustness to noise, Choquette-Choo et al.'s noise attack) and, with more than one level,
    ``sigma{s}_correct`` (the fraction at level s; inputs of the learned attacks).
    Raises TypeError for anything but integer labels: probabilities and logits are refused.
    """
    labels = np.asarray(labels)
    predicted = _integer_predictions(predicted, len(labels), "predicted")
    correct = predicted == labels[None, :]
    feats = {"correctness": correct[0].astype(np.float64)}
    if predicted.shape[0] > 1:
        feats["aug_correct_count"] = correct.sum(axis=0).astype(np.float64)
    if noise_predicted is not None:
        noise_predicted = _integer_predictions(noise_predicted, len(labels), "noise_predicted")
        levels = np.asarray(noise_levels if noise_levels is not None else [], dtype=np.float64)
        if levels.shape != (noise_predicted.shape[0],) or len(levels) == 0:
            raise ValueError(f"noise_levels must give the level of each of the {noise_predicted.shape[0]} noisy "
                             f"queries, got {None if noise_levels is None else len(levels)}")
        noisy_correct = noise_predicted == labels[None, :]
        feats["noise_correct"] = noisy_correct.mean(axis=0, dtype=np.float64)
        distinct = list(dict.fromkeys(levels.tolist()))
        if len(distinct) > 1:
            for s in distinct:
                feats[f"sigma{s:g}_correct"] = noisy_correct[levels == s].mean(axis=0, dtype=np.float64)
    return feats


# ----------------------------------------------------------------------------------------------
# Candidates


class AttackKind(StrEnum):
    """How a candidate turns features into membership scores and predictions."""

    GLOBAL = "global"  # one threshold on a signal
    CLASS = "class"  # one threshold per true class on a signal (Song & Mittal 2021)
    FIXED = "fixed"  # a given threshold, not fitted (the seed's task 3: correctness >= 0.5)
    LOGREG = "logreg"  # logistic regression over several features, threshold swept
    LOGREG_CLASS = "logreg_class"  # the same, each input also standardized within its true class
    BOOSTING = "boosting"  # gradient boosting (available, not a default candidate)
    SEED = "seed"  # the seed's whole procedure: the best of its signals, one global threshold


@dataclass(frozen=True)
class Candidate:
    """One attack: a threshold on a signal (global or per class) or a learned combination."""

    kind: AttackKind  # (plain strings with the same values are accepted)
    signal: str | None = None  # the feature thresholded (global/class/fixed); None for learned ones
    features: tuple[str, ...] = ()  # inputs of a learned combination
    fixed_threshold: float | None = None  # kind "fixed": the threshold used as is, never fitted

    def __post_init__(self):
        object.__setattr__(self, "kind", AttackKind(self.kind))

    @property
    def name(self) -> str:
        if self.kind == "global":
            return f"{self.signal}"
        if self.kind == "class":
            return f"{self.signal}@class"
        if self.kind == "fixed":
            return f"{self.signal}>={self.fixed_threshold:g}"
        if self.kind == "seed":
            return "seed_method"
        return self.kind

    def describe(self) -> str:
        if self.kind == "global":
            return f"one global threshold on {self.signal}"
        if self.kind == "class":
            return f"a threshold per true class on {self.signal} (Song & Mittal 2021)"
        if self.kind == "fixed":
            return f"member when {self.signal} >= {self.fixed_threshold:g} (fixed, not fitted)"
        if self.kind == "seed":
            return (f"the seed's method: of {', '.join(self.features)}, the signal with the best accuracy on the "
                    "records it is fitted on, with its best global threshold")
        model = {"logreg": "logistic regression", "logreg_class": "logistic regression (each input also "
                 "standardized within its true class)", "boosting": "gradient boosting"}[self.kind]
        return f"{model} over {', '.join(self.features)}, trained on eval, threshold swept"


@dataclass
class Fitted:
    """A candidate fitted on some records; ``score`` and ``predict`` apply it to others."""

    candidate: Candidate
    threshold: float | None = None
    class_thresholds: ClassThresholds | None = None
    model: object = None
    class_stats: dict | None = None  # logreg_class: label -> (mean, std) of each input on the fit records
    inner: Fitted | None = None  # kind "seed": the global-threshold fit of the signal it picked

    def score(self, feats: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        c = self.candidate
        if self.inner is not None:
            return self.inner.score(feats, labels)
        if c.kind in ("global", "fixed"):
            return np.asarray(feats[c.signal], dtype=np.float64)
        if c.kind == "class":
            return _shift(feats[c.signal], self.class_thresholds.for_labels(labels))
        return _learned_score(self.model, _learned_inputs(c, feats, labels, self.class_stats))

    def predict(self, feats: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        c = self.candidate
        if self.inner is not None:
            return self.inner.predict(feats, labels)
        if c.kind in ("global", "fixed"):
            return predict(feats[c.signal], self.threshold)
        if c.kind == "class":
            return predict_per_class(feats[c.signal], labels, self.class_thresholds)
        return predict(self.score(feats, labels), self.threshold)

    def describe_fit(self) -> dict:
        """JSON-ready parameters of the fit."""
        if self.inner is not None:
            return {"signal": self.inner.candidate.signal, **self.inner.describe_fit()}
        if self.candidate.kind == "class":
            ct = self.class_thresholds
            return {
                "global_threshold": ct.global_threshold,
                "class_thresholds": {str(k): v for k, v in sorted(ct.per_class.items())},
                "fallback_classes": sorted(int(k) for k in ct.fallback_classes),
                "shrinkage": ct.shrinkage,
            }
        return {"threshold": self.threshold}


def _shift(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """values - thresholds: >= 0 exactly where the per-class rule predicts a member.

    A class whose threshold is -inf (every record a member) or +inf (none) gets a finite stand-in
    just outside these values, so scores stay finite and keep their order within the class.
    """
    values = np.asarray(values, dtype=np.float64)
    t = np.array(thresholds, dtype=np.float64)
    if len(values):
        t[np.isneginf(t)] = values.min() - 1.0
        t[np.isposinf(t)] = values.max() + 1.0
    return values - t


def _matrix(feats: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    x = np.stack([np.asarray(feats[n], dtype=np.float64) for n in names], axis=1)
    # logit-scaled signals can reach +-1e3 on extreme logits; clip so the scaler stays meaningful
    return np.clip(x, -1e4, 1e4)


def _class_stats(x: np.ndarray, labels: np.ndarray) -> dict:
    """label -> (mean (d,), std (d,)) of the rows of x with that label; 'all' for unseen labels."""
    stats = {"all": (x.mean(axis=0), x.std(axis=0) + 1e-9)}
    for y in np.unique(labels):
        rows = x[labels == y]
        if len(rows) >= 2:
            stats[int(y)] = (rows.mean(axis=0), rows.std(axis=0) + 1e-9)
    return stats


def _learned_inputs(c: Candidate, feats: dict[str, np.ndarray], labels: np.ndarray, class_stats: dict | None,
                    x: np.ndarray | None = None) -> np.ndarray:
    """The matrix a learned candidate sees: its features (``x`` if already built), plus (logreg_class)
    their per-class z-scores."""
    x = _matrix(feats, c.features) if x is None else x
    if c.kind != "logreg_class":
        return x
    z = np.empty_like(x)
    for y in np.unique(labels):
        mean, std = class_stats.get(int(y), class_stats["all"])
        rows = labels == y
        z[rows] = (x[rows] - mean) / std
    return np.concatenate([x, z], axis=1)


def _learned_score(model, x: np.ndarray) -> np.ndarray:
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(x), dtype=np.float64)
    p = model.predict_proba(x)[:, 1]
    return np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(1.0 - p, 1e-300, None))


def fit(candidate: Candidate, feats: dict[str, np.ndarray], labels: np.ndarray, membership: np.ndarray,
        *, min_class_count: int = RunConfig.min_class_count, seed: int = RunConfig.seed,
        class_priors: tuple[float, ...] = RunConfig.class_shrinkage, inner_folds: int = RunConfig.folds) -> Fitted:
    """Fit ``candidate`` on these records (features, true labels, 0/1 membership).

    Per-class thresholds (kind "class") are shrunk towards the global one with the strength of
    ``class_priors`` (``mia.core.thresholds.sweep_per_class``'s ``shrinkage``) that an ``inner_folds``-fold
    cross-validation on these records prefers: chosen inside the fit, so an outer cross-validation of
    the candidate measures the choice too."""
    c = candidate
    if c.kind == "fixed":
        return Fitted(c, threshold=float(c.fixed_threshold))
    if c.kind == "global":
        return Fitted(c, threshold=sweep(feats[c.signal], membership).best_threshold)
    if c.kind == "seed":  # the seed's whole procedure, so that cross-validation measures it honestly
        best, best_acc = None, -np.inf
        for name in c.features:
            sw = sweep(feats[name], membership)
            if sw.best_accuracy > best_acc + 1e-12:
                best, best_acc = Fitted(Candidate("global", name), threshold=sw.best_threshold), sw.best_accuracy
        return Fitted(c, threshold=best.threshold, inner=best)
    if c.kind == "class":
        lam = choose_shrinkage(feats[c.signal], membership, labels, tuple(class_priors), min_count=min_class_count,
                               k=inner_folds, seed=seed)
        return Fitted(c, class_thresholds=sweep_per_class(feats[c.signal], membership, labels, min_count=min_class_count,
                                                          shrinkage=lam))
    x = _matrix(feats, c.features)
    class_stats = _class_stats(x, np.asarray(labels)) if c.kind == "logreg_class" else None
    x = _learned_inputs(c, feats, labels, class_stats, x)
    if c.kind in ("logreg", "logreg_class"):
        # StandardScaler + LogisticRegression(C=1) of scikit-learn, solved by Newton's method (mia.core.logistic)
        model = fit_logistic(x, membership, c=1.0)
    elif c.kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        model = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.05,
                                               l2_regularization=1.0, random_state=seed)
        model.fit(x, membership)
    else:
        raise ValueError(f"unknown candidate kind {c.kind!r}")
    fitted = Fitted(c, model=model, class_stats=class_stats)
    fitted.threshold = sweep(fitted.score(feats, labels), membership).best_threshold
    return fitted


SEED_POSTERIOR = tuple(Candidate("global", s) for s in sig.SEED_SIGNALS)
#: The seed's task 3: member exactly when the record is classified correctly.
SEED_LABEL_ONLY = (Candidate("fixed", "correctness", fixed_threshold=0.5),)
#: The seed's method as one candidate among ours (its signal choice inside each fit): its cross-validated
#: accuracy is the floor no chosen attack may fall below (see select's ``floor``).
SEED_POSTERIOR_CANDIDATE = Candidate("seed", features=tuple(sig.SEED_SIGNALS))
SEED_LABEL_ONLY_CANDIDATE = SEED_LABEL_ONLY[0]


def strong_posterior_candidates(feature_names: list[str]) -> tuple[Candidate, ...]:
    """Every signal with a global and a per-class threshold, plus learned combinations of them all and
    of the per-view logit-scaled confidences.

    (Gradient boosting, kind "boosting", is available but not a default candidate: on the demo
    bundle it was no better than logistic regression on test and costs 20x the time.)"""
    names = [n for n in feature_names if n != "correctness" and not is_view_input(n)]
    learned = tuple(names + [n for n in feature_names if is_view_input(n)])
    out = [Candidate("global", n) for n in names] + [Candidate("class", n) for n in names]
    out.append(Candidate("logreg", features=learned))
    out.append(Candidate("logreg_class", features=learned))
    if all(n in feature_names for n in SEED_POSTERIOR_CANDIDATE.features):
        out.append(SEED_POSTERIOR_CANDIDATE)
    return tuple(out)


#: Label-only signals thresholded alone (those a run has), in this order.
LABEL_ONLY_SIGNALS = ("correctness", "aug_correct_count", "noise_correct", "calibrated_aug_count", "label_lira",
                      "calibrated_noise_correct", "noise_lira", "noise_rate_lr", "noise_rate_offline")


def strong_label_only_candidates(feature_names: list[str]) -> tuple[Candidate, ...]:
    """Correctness, the augmentation count, the noise robustness (and, with reference models, the
    calibrated count and the label-only likelihood ratio) with global and per-class thresholds, and
    logistic regressions over them: the noise robustness per noise level instead of pooled, and
    without the image's own correctness when there are noisy queries (they subsume it).

    (The correctness of each augmented view as separate inputs is not a candidate any more: with the
    noisy queries the compact inputs did as well in cross-validation on the demo bundle's eval, with
    fewer inputs to overfit.)"""
    base = [n for n in LABEL_ONLY_SIGNALS if n in feature_names]
    out = [Candidate("global", n) for n in base] + [Candidate("class", n) for n in base]
    learned = [n for n in base if n != "correctness"] if "noise_correct" in base else list(base)  # subsumed
    levels = [n for n in feature_names if n.startswith("sigma")]
    if levels:  # the per-level fractions instead of their mean
        learned = [n for n in learned if n != "noise_correct"] + levels
    if len(learned) > 1:
        out.append(Candidate("logreg", features=tuple(learned)))
        out.append(Candidate("logreg_class", features=tuple(learned)))
    if "correctness" in feature_names:
        out.append(SEED_LABEL_ONLY_CANDIDATE)
    return tuple(out)
