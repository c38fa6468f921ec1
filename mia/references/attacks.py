"""Reference-model attacks on a bundle's victim: its reference models' logits (mia.references) fed to the
statistics of mia.core.reference_stats (LiRA, RMIA, label-only likelihood ratios; formulas there)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mia.bundle import Victim
from mia.core import signals as sig
from mia.core.laplace import PRIOR_SCALES, fit_last_layer_laplace, laplace_fit_gaussians, statistic_moments
from mia.core.metrics import auc
from mia.core.reference_stats import (calibrated_aug_count, fit_gaussians, grouped_rate_llr, grouped_rate_offline,
                                      label_lira, lira_offline, lira_online, rmia_scores)
from mia.core.signals import integer_labels
from mia.errors import MIAError
from mia.io.cache import file_digest
from mia.references.logits import reference_features, reference_logits, views_from_names
from mia.references.recipe import Distill
from mia.references.store import SET_ORDER, ReferenceSet, load_reference_set

__all__ = ["ReferenceFeatures", "ReferenceOptions", "VictimAnswers", "victim_reference_features"]


# --------------------------------------------------------------------------------------------------
# From a bundle


def _usable_set(bundle_root, victim: Victim, n_eval: int, n_test: int, references_root,
                distill: Distill) -> ReferenceSet | None:
    ref_set = load_reference_set(bundle_root, victim, references_root=references_root, rebuild_manifest=False,
                                 distill=distill)
    if ref_set is None or not ref_set.complete:
        return None
    if (ref_set.n_eval, ref_set.n_test) != (n_eval, n_test):
        raise MIAError(f"{ref_set.folder}: references were trained on {ref_set.n_eval} eval + {ref_set.n_test} test "
                       f"records, the victim has {n_eval} + {n_test}; retrain them (delete the folder)")
    for s in ref_set.manifest["pool"]["sources"][:2]:  # eval and test must be the victim's current files
        current = victim.eval_path if s["role"] == "eval" else victim.test_path
        if file_digest(current) != s["sha256"]:
            raise MIAError(f"{current} changed since the reference models in {ref_set.folder} were trained; "
                           "retrain them (delete the folder)")
    return ref_set


def _split(values: dict[str, np.ndarray], n_eval: int) -> dict[str, dict[str, np.ndarray]]:
    return {"eval": {k: v[:n_eval].copy() for k, v in values.items()},
            "test": {k: v[n_eval:].copy() for k, v in values.items()}}


@dataclass
class _Loaded:
    """A victim's reference models as used, their sets in SET_ORDER (the imitations of the victim first)."""

    models: list[tuple[ReferenceSet, int]]  # (set, model index j) of each model, in order
    logits: np.ndarray  # (K, V, n, C) on the victim's eval + test records
    masks: np.ndarray  # (K, n) bool
    distill: list[Distill]  # (K,) each model's set kind: POSTERIORS models saw the victim's posteriors (no
    #   label-only use)
    noisy: np.ndarray | None  # (K_label, Q, n) predicted labels of the models a label-only attack may use, or None

    @property
    def by_labels(self) -> np.ndarray:
        """(K,) bool: the models a label-only attack may use (all but the posterior imitations)."""
        return np.array([d.serves_labels for d in self.distill], dtype=bool)


def _load_references(bundle_root, victim: Victim, n_eval: int, n_test: int, view_names: list[str], *, min_models: int,
                     references_root, device: str, batch_size: int, progress: bool,
                     noise_view_names: list[str] | None = None, cache: bool = True,
                     cache_dir: str | Path | None = None, max_models: int | None = None,
                     precision: str = "auto") -> _Loaded | None:
    """The victim's reference models (its sets in SET_ORDER, at most ``max_models`` in all) with their
    logits on the eval + test records under ``view_names`` and, for the models a label-only attack may use,
    their predicted labels under the noisy queries ``noise_view_names``; None with fewer than
    ``min_models``. Reads (or computes) each model's logits once."""
    n = n_eval + n_test
    sets = [s for s in (_usable_set(bundle_root, victim, n_eval, n_test, references_root, distill)
                        for distill in SET_ORDER) if s is not None]
    models = [(ref_set, j) for ref_set in sets for j in ref_set.complete][:max_models]
    if not models or len(models) < min_models:
        return None
    logits, masks, noisy = [], [], []
    for ref_set in sets:
        used = [j for s, j in models if s is ref_set]
        if not used:
            continue
        subset = dataclasses.replace(ref_set, complete=tuple(used))
        logits.append(reference_logits(subset, views_from_names(view_names), device=device, batch_size=batch_size,
                                       progress=progress, cache=cache, cache_dir=cache_dir, precision=precision,
                                       scored_only=True))
        masks.append(subset.complete_masks()[:, :n])
        if noise_view_names is not None and ref_set.recipe.distill.serves_labels:
            noisy.append(reference_logits(subset, views_from_names(noise_view_names), device=device,
                                          batch_size=batch_size, progress=progress, labels_only=True, cache=cache,
                                          cache_dir=cache_dir, precision=precision, scored_only=True))
    return _Loaded(models, np.concatenate(logits), np.concatenate(masks),
                   [ref_set.recipe.distill for ref_set, _ in models], np.concatenate(noisy) if noisy else None)


#: RMIA's offline parameter a is chosen from these by eval AUC when ReferenceOptions.rmia_a is "auto".
RMIA_A_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class RmiaSetting:
    """How RMIA estimated p(x): ``online`` (records with IN and OUT models use their average; None: no
    record has both) and the offline a (None where no record needs it: every one has IN and OUT models
    and ``online``)."""

    online: bool | None
    a: float | None


def _groups(masks: np.ndarray) -> tuple[bool, bool]:
    """(some record has IN and OUT models, some record lacks one of the groups)."""
    masks = np.asarray(masks, dtype=bool)
    both = masks.any(axis=0) & (~masks).any(axis=0)
    return bool(both.any()), bool(not both.all())


def rmia_setting(masks: np.ndarray, online: bool, a: float) -> RmiaSetting:
    """The setting as it acts on these masks: the parts that play no part are None."""
    has_both, lacks_one = _groups(masks)
    return RmiaSetting(online=online if has_both else None,
                       a=a if lacks_one or not (online and has_both) else None)


def tune_rmia(target_log_p: np.ndarray, reference_log_p: np.ndarray, masks: np.ndarray,
              eval_membership: np.ndarray, grid: tuple[float, ...] = RMIA_A_GRID) -> tuple[RmiaSetting, np.ndarray]:
    """(setting, RMIA scores (n,)): online or offline p(x) for the records with IN and OUT models, and the
    offline a of ``grid``, whichever ranks the eval records (the first ``len(eval_membership)``) best by AUC;
    ties go to online, then to the a nearest the paper's 0.3. Online wins when the references match the
    victim's training; references that fit their IN records far better than the victim fits its members
    make the IN average too large, and the offline estimate with a fitted a is then the better one
    (measured in docs/results.md). A couple of parameters fitted on about a thousand labelled records: the
    cross-validated choice among candidates that follows sees these scores like any other feature."""
    has_both, lacks_one = _groups(masks)
    by_distance = sorted(grid, key=lambda v: abs(v - 0.3))
    tried = [(True, a) for a in (by_distance if lacks_one else (0.3,))] if has_both else []
    tried += [(False, a) for a in by_distance]
    n_eval = len(eval_membership)
    best = None
    for online, a in tried:
        scores = rmia_scores(target_log_p, reference_log_p, masks, a=a, online=online)
        value = auc(scores[:n_eval], eval_membership)
        if best is None or value > best[0] + 1e-12:
            best = (value, rmia_setting(masks, online, a), scores)
    assert best is not None
    return best[1], best[2]


def _posterior_values(target: np.ndarray, ref_logits: np.ndarray, masks: np.ndarray, labels: np.ndarray, *,
                      rmia_a: float | str, global_variance: bool | None,
                      eval_membership: np.ndarray | None) -> tuple[dict[str, np.ndarray], RmiaSetting]:
    """(LiRA online / offline, RMIA and 'ref_out_lsc', RMIA's a) from victim logits (V, n, C) and reference
    logits (K, V, n, C). 'ref_out_lsc' is the record's expected logit-scaled confidence when OUT (LiRA's
    OUT mean, averaged over the views): an input of the learned attacks, which weigh it against the
    victim's own (difficulty calibration with a fitted weight; Watson et al. 2022), never thresholded alone.
    ``rmia_a="auto"`` tunes RMIA's setting on the eval records (``eval_membership``, the first records);
    a fixed a is used online."""
    def per_view(fn, logits):  # (..., V, n, C) -> (..., V, n)
        flat = logits.reshape(-1, *logits.shape[-2:])
        return np.stack([fn(z, labels) for z in flat]).reshape(logits.shape[:-1])

    target_phi = per_view(sig.logit_scaled_confidence, target)
    fit = fit_gaussians(per_view(sig.logit_scaled_confidence, ref_logits), masks, global_variance=global_variance,
                        shrink=True)
    target_log_p, ref_log_p = per_view(sig.neg_loss, target), per_view(sig.neg_loss, ref_logits)
    if rmia_a == "auto":
        if eval_membership is None:
            raise ValueError('rmia_a="auto" needs the eval membership')
        setting, rmia = tune_rmia(target_log_p, ref_log_p, masks, eval_membership)
    else:
        setting = rmia_setting(masks, True, float(rmia_a))
        rmia = rmia_scores(target_log_p, ref_log_p, masks, a=float(rmia_a))
    return {"lira_online": lira_online(target_phi, fit), "lira_offline": lira_offline(target_phi, fit),
            "rmia": rmia, "ref_out_lsc": fit.mu_out.mean(axis=0)}, setting


def _laplace_values(models: list[tuple[ReferenceSet, int]], views: tuple, target: np.ndarray, labels: np.ndarray,
                    masks: np.ndarray, eval_membership: np.ndarray | None,
                    o: ReferenceOptions) -> tuple[dict[str, np.ndarray], float]:
    """({'bmia', 'bmia_online'}, the prior scale used): LiRA's offline and online tests of the victim's
    logit-scaled confidence (target logits (V, n, C)) against Gaussians whose means and per-record variances
    come from each reference model's last-layer Laplace posterior (mia.core.laplace), fitted on the pool
    records it trained on (identity view). ``models``: (reference set, model index) of each model, the rows
    of ``masks``. The prior scale is the one of PRIOR_SCALES whose offline scores rank the eval records best
    by AUC (the first of them without the eval membership)."""
    n = len(labels)
    scales = PRIOR_SCALES if eval_membership is not None else PRIOR_SCALES[:1]
    means = np.empty((len(scales), len(models), len(views), n))
    variances = np.empty_like(means)
    for k, (ref_set, j) in enumerate(models):
        feats, trained, weight, bias = reference_features(ref_set, j, views, device=o.device,
                                                          batch_size=o.batch_size, cache=o.cache, cache_dir=o.cache_dir)
        for t, scale in enumerate(scales):
            laplace = fit_last_layer_laplace(trained, weight, bias, scale)
            for v in range(len(views)):
                means[t, k, v], variances[t, k, v] = statistic_moments(laplace, feats[v], labels)
    target_phi = np.stack([sig.logit_scaled_confidence(z, labels) for z in target])  # (V, n)
    best = None
    for t, scale in enumerate(scales):
        fit = laplace_fit_gaussians(means[t], variances[t], masks)
        offline = lira_offline(target_phi, fit)
        value = auc(offline[:len(eval_membership)], eval_membership) if eval_membership is not None else 0.0
        if best is None or value > best[0] + 1e-12:
            best = (value, scale, offline, lira_online(target_phi, fit))
    assert best is not None
    return {"bmia": best[2], "bmia_online": best[3]}, best[1]


#: The posterior features that compare a record's IN and OUT models: dropped where no record has an IN model
#: (distilled references), since their IN Gaussians are then the OUT ones and their scores constant.
ONLINE_FEATURES = ("lira_online", "bmia_online")
#: The label-only features that weigh a record's IN models' correctness against its OUT models': dropped
#: where no record has an IN model among the models a label-only attack may use (label imitations alone),
#: since their IN rate is then the prior's 1/2 for every record, no evidence at all (test AUC 47.9-51.3 % on
#: the demo); 'noise_rate_offline' asks the offline question instead.
LABEL_ONLINE_FEATURES = ("label_lira", "noise_lira")


#: A reference model whose accuracy differs from the victim's by more than this (on the same held-out
#: records) is reported as mismatched: reference attacks assume references trained like the victim.
SANITY_GAP = 0.05


def reference_sanity(victim_predicted: np.ndarray, ref_predicted: np.ndarray, masks: np.ndarray,
                     labels: np.ndarray, eval_membership: np.ndarray) -> list[dict]:
    """Per reference model: its accuracy and the victim's on the same held-out records (eval non-members
    the reference did not train on), identity view. victim_predicted (n,), ref_predicted (K, n) int,
    masks (K, n), labels (n,), eval_membership (n_eval,) for the first n_eval records."""
    n_eval = len(eval_membership)
    rows = []
    for k in range(ref_predicted.shape[0]):
        held_out = np.zeros(len(labels), dtype=bool)
        held_out[:n_eval] = (eval_membership == 0) & ~masks[k, :n_eval]
        if not held_out.any():
            continue
        ref_acc = float((ref_predicted[k, held_out] == labels[held_out]).mean())
        vic_acc = float((victim_predicted[held_out] == labels[held_out]).mean())
        rows.append({"model": k, "records": int(held_out.sum()), "reference_accuracy": ref_acc,
                     "victim_accuracy": vic_acc, "mismatched": abs(ref_acc - vic_acc) > SANITY_GAP})
    return rows


def _label_only_values(victim_predicted: np.ndarray, ref_logits: np.ndarray, masks: np.ndarray,
                       labels: np.ndarray) -> dict[str, np.ndarray]:
    """calibrated_aug_count and label_lira from the victim's integer predictions (V, n)."""
    ref_predicted = ref_logits.argmax(axis=-1)
    return {"calibrated_aug_count": calibrated_aug_count(victim_predicted, ref_predicted, labels, masks),
            "label_lira": label_lira(victim_predicted, ref_predicted, labels, masks)}


def _victim_logits(eval_logits, test_logits, n_views: int, n: int) -> np.ndarray:
    target = np.concatenate([np.asarray(eval_logits), np.asarray(test_logits)], axis=1)  # (V, n, C)
    if target.shape[:2] != (n_views, n):
        raise ValueError(f"victim logits must be (V={n_views}, n_eval + n_test, C), got {target.shape}")
    return target


@dataclass
class ReferenceFeatures:
    """Everything the reference models add to one victim's run (``victim_reference_features``)."""

    k: int  # complete reference models used
    posterior: dict[str, dict[str, np.ndarray]]  # split -> lira_online, lira_offline, rmia, ref_out_lsc (+ bmia,
    #   bmia_online with ReferenceOptions.laplace)
    label_only: dict[str, dict[str, np.ndarray]]  # split -> calibrated_aug_count, label_lira (+ noise_lira,
    #   noise_rate_lr or noise_rate_offline, calibrated_noise_correct with noisy queries)
    rmia: RmiaSetting = RmiaSetting(online=True, a=None)  # RMIA's p(x) as used (tuned on eval: rmia_a="auto")
    sanity: list[dict] = field(default_factory=list)  # reference_sanity: each model's accuracy next to the
    #   victim's on the same held-out eval records (needs the eval membership)
    laplace_prior: float | None = None  # the last-layer Laplace prior scale as used (tuned on eval; None: off)


@dataclass(frozen=True)
class VictimAnswers:
    """The victim's answers on its eval and test records, which its reference models are compared with."""

    eval_logits: np.ndarray  # (V, n_eval, C) under the views named by view_names
    test_logits: np.ndarray  # (V, n_test, C)
    eval_labels: np.ndarray  # (n_eval,) true labels
    test_labels: np.ndarray  # (n_test,)
    view_names: tuple[str, ...]  # View.name of each view: the references are queried under the same views
    eval_noise_labels: np.ndarray | None = None  # (Q, n_eval) integer predicted labels under noisy queries
    test_noise_labels: np.ndarray | None = None  # (Q, n_test)
    noise_view_names: tuple[str, ...] | None = None  # View.name of each noisy query
    eval_membership: np.ndarray | None = None  # (n_eval,) 0/1: tunes RMIA's a and checks the references


@dataclass(frozen=True)
class ReferenceOptions:
    """How the reference models are used."""

    device: str = "auto"  # where the references compute their logits (cached)
    precision: str = "auto"  # their arithmetic (RunConfig.precision: the victim's): "auto", "fp32", "bf16"
    cache: bool = True  # keep the references' logits and the pool's records in the cache (mia.io.cache)
    cache_dir: str | Path | None = None  # the cache's folder; None: mia.io.cache.cache_root's default
    min_models: int = 1  # fewer complete reference models: no reference features
    max_models: int | None = None  # use at most the first this many complete models (None: all)
    rmia_a: float | str = "auto"  # RMIA's offline interpolation parameter (used online), or "auto": online
    #   or offline and the a of RMIA_A_GRID with the best eval AUC (needs answers.eval_membership)
    global_variance: bool | None = None  # LiRA: one variance for all records (None: when K is small)
    laplace: bool = True  # the last-layer Laplace attacks 'bmia' and 'bmia_online' (mia.core.laplace): one more
    #   pass of each reference model over the pool for its penultimate features (cached)
    references_root: Path | None = None  # None: <bundle>/references
    batch_size: int = 256
    progress: bool = False


def victim_reference_features(bundle_root: str | Path, victim: Victim, answers: VictimAnswers,
                              options: ReferenceOptions = ReferenceOptions()) -> ReferenceFeatures | None:
    """LiRA (online, offline), RMIA, the Laplace tests and the label-only likelihood ratios of the victim's
    eval and test records, the reference set and its logits loaded once; None without a usable reference
    set (or with fewer than ``options.min_models`` complete models). MIAError when the references were
    trained on other eval/test files.

    Posterior features: 'lira_online', 'lira_offline', 'rmia', 'ref_out_lsc' (an input of the learned
    attacks only) and, with ``options.laplace``, 'bmia' and 'bmia_online'. Label-only features see only the
    victim's predicted labels (the argmax of its logits): 'calibrated_aug_count', 'label_lira', and with
    noisy queries (``answers.*_noise_labels``, which the references answer too, labels only)
    'noise_lira' (``label_lira`` over the noisy queries: how much likelier the victim's answers are
    under the record's IN models than its OUT models), 'noise_rate_lr' (``grouped_rate_llr``: the same
    question asked of the correct-answer rate per noise level, binomial; works with one model; where no
    record has an IN model, 'noise_rate_offline' instead: ``grouped_rate_offline``'s binomial tail) and
    'calibrated_noise_correct' (the victim's fraction of correct noisy answers minus the mean fraction of
    the record's OUT models).

    The victim's reference sets are taken in SET_ORDER (``ReferenceRecipe.distill``, each in its own folder):
    the posterior imitations, the label imitations, then the others (``options.max_models`` counts them all).
    Distilled models trained on none of the records: with no other models only the offline features are
    returned (no 'lira_online', 'bmia_online', 'label_lira', 'noise_lira'). The label-only features never
    use the posterior imitations (they learned the victim's posteriors, which a label-only attack may not
    see); the label imitations learned only what a label-only attacker can ask for, and serve every task."""
    eval_labels, test_labels = np.asarray(answers.eval_labels), np.asarray(answers.test_labels)
    view_names, noise_view_names = list(answers.view_names), answers.noise_view_names
    noise_predicted = (None if answers.eval_noise_labels is None and answers.test_noise_labels is None
                       else (answers.eval_noise_labels, answers.test_noise_labels))
    noise_view_names = None if noise_view_names is None else list(noise_view_names)
    o = options
    n_eval, n_test = len(eval_labels), len(test_labels)
    if (noise_predicted is None) != (noise_view_names is None):
        raise ValueError("noise_predicted and noise_view_names come together")
    if noise_predicted is not None:  # checked before the references answer the queries (minutes on a CPU)
        victim_noisy = np.concatenate([integer_labels(noise_predicted[0], "noise_predicted"),
                                       integer_labels(noise_predicted[1], "noise_predicted")], axis=1)
        if victim_noisy.shape != (len(noise_view_names), n_eval + n_test):
            raise ValueError(f"noise_predicted must be (Q={len(noise_view_names)}, n_eval) and (Q, n_test), got "
                             f"{[np.shape(a) for a in noise_predicted]}")
    loaded = _load_references(bundle_root, victim, n_eval, n_test, view_names, min_models=o.min_models,
                              references_root=o.references_root, device=o.device, batch_size=o.batch_size,
                              progress=o.progress, noise_view_names=noise_view_names, cache=o.cache,
                              cache_dir=o.cache_dir, max_models=o.max_models, precision=o.precision)
    if loaded is None:
        return None
    ref_logits, masks, ref_noisy = loaded.logits, loaded.masks, loaded.noisy
    by_labels = loaded.by_labels  # the models a label-only attack may use
    label_masks = masks[by_labels]
    label_has_in = bool(label_masks.any())  # else: label imitations alone, only the offline label-only tests
    labels = np.concatenate([eval_labels, test_labels])
    target = _victim_logits(answers.eval_logits, answers.test_logits, len(view_names), n_eval + n_test)
    eval_membership = None if answers.eval_membership is None else np.asarray(answers.eval_membership)
    rmia_a = o.rmia_a if o.rmia_a != "auto" or eval_membership is not None else 0.3
    posterior, rmia = _posterior_values(target, ref_logits, masks, labels, rmia_a=rmia_a,
                                          global_variance=o.global_variance, eval_membership=eval_membership)
    label_only = (_label_only_values(target.argmax(axis=-1), ref_logits[by_labels], masks[by_labels], labels)
                  if by_labels.any() else {})
    sanity = ([] if eval_membership is None else
              reference_sanity(target[0].argmax(-1), ref_logits[:, 0].argmax(-1), masks, labels, eval_membership))
    for row in sanity:
        row["distill"] = loaded.distill[row["model"]].value
    laplace_prior = None
    if o.laplace:
        laplace, laplace_prior = _laplace_values(loaded.models, views_from_names(view_names), target, labels, masks,
                                                 eval_membership, o)
        posterior.update(laplace)
    if not masks.any():  # no record IN for any model (distilled ones): the online tests' Gaussians coincide
        posterior = {k: v for k, v in posterior.items() if k not in ONLINE_FEATURES}
    if noise_view_names is not None and ref_noisy is not None:
        label_only["noise_lira"] = label_lira(victim_noisy, ref_noisy, labels, label_masks)
        keys = [(v.flip, v.noise) for v in views_from_names(noise_view_names)]  # exchangeable: same view and level
        groups = np.array([sorted(set(keys)).index(key) for key in keys])
        if label_has_in:
            label_only["noise_rate_lr"] = grouped_rate_llr(victim_noisy, ref_noisy, labels, label_masks, groups)
        else:  # label-distilled models only: no record has an IN model, the offline test instead
            label_only["noise_rate_offline"] = grouped_rate_offline(victim_noisy, ref_noisy, labels, groups)
        label_only["calibrated_noise_correct"] = (calibrated_aug_count(victim_noisy, ref_noisy, labels, label_masks)
                                                  / len(noise_view_names))
    if by_labels.any() and not label_has_in:
        label_only = {k: v for k, v in label_only.items() if k not in LABEL_ONLINE_FEATURES}
    return ReferenceFeatures(k=ref_logits.shape[0], posterior=_split(posterior, n_eval),
                             label_only=_split(label_only, n_eval), rmia=rmia, sanity=sanity,
                             laplace_prior=laplace_prior)
