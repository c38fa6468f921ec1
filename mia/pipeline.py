"""The challenge workflow: load -> score -> choose -> predict, per victim and task.

``run`` does all of it for a bundle and returns a RunResult; ``mia.submission.write_run`` writes it.
The notebook calls the same steps one by one (``score_victim``, ``attack_victim``).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mia import attacks
from mia.selection import Selection, select
from mia.bundle import Bundle, Victim, discover, select_victims
from mia.config import RunConfig, TaskConfig
from mia.io.cache import cache_root
from mia.io.records import Records
from mia.errors import DataError, MIAError
from mia.inspection import load_victim, summarize_victim
from mia.models.loading import VictimModelInfo, builder_key
from mia.models.registry import REPO_ARCH_DIR
from mia.scoring import VIEW_SETS, View, cached_logits, compute_logits, logits_cache_path, noise_views, precision_tag
from mia.core.thresholds import Sweep, sweep


@dataclass
class VictimData:
    """A victim's records and the logits of its model on them under every query view."""

    victim: Victim
    info: VictimModelInfo
    eval: Records
    test: Records
    answers: np.ndarray | None  # (n_test,) int64 test membership when the bundle has an answer key
    view_names: list[str]
    eval_logits: np.ndarray  # (V, n_eval, classes) float32
    test_logits: np.ndarray  # (V, n_test, classes) float32
    cache_hits: int  # how many of the two logit arrays came from the cache
    seconds: float  # wall time of loading and scoring
    reference: dict[str, dict[str, np.ndarray]] | None = None  # LiRA/RMIA features per split, if any
    reference_label: dict[str, dict[str, np.ndarray]] | None = None  # label-only reference features per split
    n_reference_models: int = 0
    rmia_a: float | None = None  # RMIA's offline a as used (tuned on eval); None when unused or no references
    rmia_online: bool | None = None  # RMIA's p(x) from the IN and OUT models' average (tuned on eval); None: no
    #                                  record has both, or no references
    laplace_prior: float | None = None  # the last-layer Laplace attack's prior scale as used (tuned on eval)
    reference_sanity: list[dict] = field(default_factory=list)  # per reference: its held-out accuracy and the
    #   victim's on the same records (mia.references.attacks.reference_sanity)
    noise_levels: list[float] = field(default_factory=list)  # noise level (config.label_noise units) of each noisy query
    noise_view_names: list[str] = field(default_factory=list)  # View.name of each noisy query
    eval_noise_labels: np.ndarray | None = None  # (Q, n_eval) int64 predicted labels of the noisy queries
    test_noise_labels: np.ndarray | None = None  # (Q, n_test)

    def posterior(self, split: str) -> dict[str, np.ndarray]:
        """Signals for posterior access on 'eval' or 'test' (with LiRA/RMIA when references exist)."""
        recs, logits = (self.eval, self.eval_logits) if split == "eval" else (self.test, self.test_logits)
        feats = attacks.posterior_features(logits, recs.labels, self.view_names)
        if self.reference is not None:
            feats.update(self.reference[split])
        return feats

    def predicted_labels(self, split: str) -> np.ndarray:
        """(V, n) int64 predicted labels: all that a label-only attacker gets to see."""
        logits = self.eval_logits if split == "eval" else self.test_logits
        return logits.argmax(axis=-1).astype(np.int64)

    def label_only(self, split: str) -> dict[str, np.ndarray]:
        """Features for label-only access: from the victim's predicted labels (and reference models)."""
        recs = self.eval if split == "eval" else self.test
        noisy = self.eval_noise_labels if split == "eval" else self.test_noise_labels
        feats = attacks.label_only_features(self.predicted_labels(split), recs.labels, noisy,
                                            self.noise_levels if noisy is not None else None)
        if self.reference_label is not None:
            feats.update(self.reference_label[split])
        return feats

    def model_accuracy(self) -> dict:
        """The victim's classification accuracy on eval members / non-members (identity view)."""
        pred = self.eval_logits[0].argmax(-1)
        correct = pred == self.eval.labels
        m = self.eval.membership == 1
        return {"members": float(correct[m].mean()), "non_members": float(correct[~m].mean())}


def load_answers(victim: Victim, n_test: int) -> np.ndarray | None:
    """The answer key (test membership) if the bundle has one, validated against the test file."""
    if victim.answers_path is None:
        return None
    try:
        ans = np.load(victim.answers_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable answer key ({e})", victim.answers_path) from e
    if ans.ndim != 1 or len(ans) != n_test:
        raise DataError(f"answer key has shape {ans.shape}, expected ({n_test},) like the test file", victim.answers_path)
    if not np.isin(ans, (0, 1)).all():
        raise DataError("answer key values must be 0 or 1", victim.answers_path)
    return ans.astype(np.int64)


def label_noise_queries(eval_images: np.ndarray, config: RunConfig) -> tuple[tuple[View, ...], list[float]]:
    """The label-only attack's noisy query views and the level (in config.label_noise units) of each.

    Levels are relative to the pixel standard deviation of the eval images (rounded to 4 significant
    digits, so the views' names, and the cache keys made of them, are stable)."""
    scale = float(f"{float(np.std(eval_images, dtype=np.float64)):.4g}") or 1.0
    views = noise_views(tuple(s * scale for s in config.label_noise), config.label_noise_draws)
    return views, [s for s in config.label_noise for _ in range(2 * config.label_noise_draws)]


def score_victim(victim: Victim, bundle: Bundle, config: RunConfig, *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> VictimData:
    """Load the victim's model and records and compute (or fetch from the cache) their logits.
    ``log``, when given, receives the victim's summary (mia.inspection) before scoring starts."""
    t0 = time.perf_counter()
    model, info, eval_recs, test_recs = load_victim(victim, bundle, config)
    answers = load_answers(victim, len(test_recs))
    views = VIEW_SETS[config.views]
    noise_queries, noise_levels = (label_noise_queries(eval_recs.images, config)
                                   if config.label_noise and any(t.access == "label" for t in config.tasks)
                                   else ((), []))
    cache_dir = cache_root(config.cache_dir) if config.cache else None
    key = (info.architecture_file, builder_key(info), precision_tag(config.device, config.precision, config.compile))

    def entry(split: str, recs: Records, queries, suffix: str = "") -> Path | None:
        return logits_cache_path(cache_dir, (victim.checkpoint, recs.path, *key),
                                 f"{victim.name}-{split}{suffix.replace(' ', '-')}", queries)

    if log is not None:  # the cost figures are measured only when something is left to score
        planned = [entry(s, r, views) for s, r in (("eval", eval_recs), ("test", test_recs))]
        if noise_queries:
            planned += [entry(s, r, noise_queries, " noisy") for s, r in (("eval", eval_recs), ("test", test_recs))]
        measure = any(p is None or not p.is_file() for p in planned)
        summary = summarize_victim(victim, model, info, eval_recs, test_recs, config, bundle.root, measure=measure)
        seconds_per_image = summary.seconds_per_image
        log("\n".join(summary.lines()))
    else:
        seconds_per_image = None

    def scores(split: str, recs: Records, queries, suffix: str = "", labels_only: bool = False):
        """(logits (V, n, C), or labels (V, n) with labels_only; cache hit) of the model on these records."""
        def compute():
            try:
                return compute_logits(model, recs.images, queries, device=config.device, batch_size=config.batch_size,
                                      precision=config.precision, compile=config.compile,
                                      progress=f"{victim.name} {split}{suffix}" if progress else False,
                                      labels_only=labels_only)
            except RuntimeError as e:  # shape errors from the model itself
                raise MIAError(f"{victim.name}: the model failed on {split} images of shape "
                               f"{recs.images.shape[1:]}: {e}") from e
        return cached_logits(entry(split, recs, queries, suffix), queries, compute, ndim=2 if labels_only else 3,
                             records=len(recs), classes=None if labels_only else info.num_classes)

    hits = 0
    out = {}
    for split, recs in (("eval", eval_recs), ("test", test_recs)):
        logits, hit = scores(split, recs, views)
        hits += hit
        if logits.shape[-1] != info.num_classes:
            raise MIAError(f"{victim.name}: model outputs {logits.shape[-1]} classes, weights say {info.num_classes}")
        bad = ~np.isfinite(logits).all(axis=(0, 2))
        if bad.any():
            raise MIAError(f"{victim.name}: the model gives non-finite logits (NaN or inf) on {int(bad.sum())} of "
                           f"{len(bad)} {split} records (first: record {int(np.argmax(bad))}); are its weights "
                           f"corrupt? ({victim.checkpoint.name})")
        out[split] = logits
    data = VictimData(victim, info, eval_recs, test_recs, answers, [v.name for v in views], out["eval"], out["test"],
                      hits, 0.0)
    if noise_queries:
        data.noise_levels = noise_levels
        data.noise_view_names = [v.name for v in noise_queries]
        data.eval_noise_labels = scores("eval", eval_recs, noise_queries, " noisy", labels_only=True)[0]
        data.test_noise_labels = scores("test", test_recs, noise_queries, " noisy", labels_only=True)[0]
    if config.references:
        from mia.references.attacks import ReferenceOptions, VictimAnswers, victim_reference_features
        from mia.references.auto import train_missing_references

        # the references are queried on the victim's views that are also in config.reference_views
        allowed = {v.name for v in VIEW_SETS[config.reference_views]}
        idx = [i for i, name in enumerate(data.view_names) if name in allowed]
        noisy = bool(data.noise_view_names)
        answers = VictimAnswers(data.eval_logits[idx], data.test_logits[idx], eval_recs.labels, test_recs.labels,
                                tuple(data.view_names[i] for i in idx),
                                data.eval_noise_labels if noisy else None, data.test_noise_labels if noisy else None,
                                tuple(data.noise_view_names) if noisy else None, eval_membership=eval_recs.membership)
        options = ReferenceOptions(device=config.device, precision=config.precision, batch_size=config.batch_size,
                                   progress=progress, cache=config.cache, cache_dir=config.cache_dir,
                                   max_models=config.reference_models)
        ref = victim_reference_features(bundle.root, victim, answers, options)
        if ref is None and train_missing_references(victim, bundle, config, model, eval_recs.images,
                                                    len(eval_recs) + len(test_recs), len(idx), seconds_per_image,
                                                    progress, log):
            ref = victim_reference_features(bundle.root, victim, answers, options)
        if ref is not None:  # the label-only features come from the victim's predicted labels only
            data.reference, data.reference_label, data.n_reference_models = ref.posterior, ref.label_only, ref.k
            data.rmia_a, data.rmia_online = ref.rmia.a, ref.rmia.online
            data.reference_sanity, data.laplace_prior = ref.sanity, ref.laplace_prior
            for row in ref.sanity:
                if row["mismatched"] and log is not None:
                    log(f"warning: {victim.name}: reference model {row['model']} reaches "
                        f"{100 * row['reference_accuracy']:.1f}% on {row['records']} held-out eval records where the "
                        f"victim reaches {100 * row['victim_accuracy']:.1f}%: references trained unlike the victim "
                        f"weaken LiRA/RMIA (match its epochs, augmentation, width)")
    data.seconds = time.perf_counter() - t0
    return data


@dataclass
class TaskOutcome:
    """The attack used for one task on one victim, and the seed's method as the baseline."""

    task: TaskConfig
    victim: str
    used: Selection  # what the submission's predictions come from
    seed: Selection  # the seed's method on the same records
    curves: dict[str, Sweep]  # accuracy-vs-threshold on eval for each single-signal candidate
    eval_membership: np.ndarray  # (n_eval,)
    eval_labels: np.ndarray  # (n_eval,)
    eval_features: dict[str, np.ndarray]  # the features the attacks saw on eval (for figures)
    answers: np.ndarray | None  # (n_test,) when known

    @property
    def file_name(self) -> str:
        return f"task{self.task.task}_{self.victim}.npy"


def attack_victim(data: VictimData, config: RunConfig) -> list[TaskOutcome]:
    """Choose and apply an attack for every configured task of one victim.

    Tasks with the same access level see the same features of the same records, so the attack is
    chosen once per access level and shared (tasks 1 and 2 of the challenge)."""
    m_eval = data.eval.membership
    outcomes = []
    by_access: dict[str, TaskOutcome] = {}
    for task in config.tasks:
        if task.access in by_access:
            outcomes.append(dataclasses.replace(by_access[task.access], task=task))
            continue
        if task.access == "posterior":
            ev, te = data.posterior("eval"), data.posterior("test")
            seed_cands = attacks.SEED_POSTERIOR
            strong_cands = attacks.strong_posterior_candidates(list(ev))
        else:
            ev, te = data.label_only("eval"), data.label_only("test")
            seed_cands = attacks.SEED_LABEL_ONLY
            strong_cands = attacks.strong_label_only_candidates(list(ev))
        common = dict(k=config.folds, repeats=config.cv_repeats, seed=config.seed,
                      min_class_count=config.min_class_count, class_priors=config.class_shrinkage,
                      test_membership=data.answers, bootstrap_resamples=config.bootstrap_resamples,
                      ranking=config.score_ranking)
        seed_sel = select(seed_cands, ev, data.eval.labels, m_eval, te, data.test.labels,
                                  selection="in_sample", **common)
        used = seed_sel
        if config.method == "strong":
            floor = (attacks.SEED_POSTERIOR_CANDIDATE if task.access == "posterior"
                     else attacks.SEED_LABEL_ONLY_CANDIDATE).name
            used = select(strong_cands, ev, data.eval.labels, m_eval, te, data.test.labels,
                                  selection="cv", floor=floor, **common)
        curves = {name: sweep(values, m_eval) for name, values in ev.items() if not attacks.is_view_input(name)}
        outcomes.append(TaskOutcome(task, data.victim.name, used, seed_sel, curves, m_eval, data.eval.labels, ev,
                                    data.answers))
        by_access[task.access] = outcomes[-1]
    return outcomes


@dataclass
class RunResult:
    """Everything a run produced, before or after it is written."""

    bundle: Bundle
    config: RunConfig
    victims: dict[str, VictimData] = field(default_factory=dict)
    outcomes: list[TaskOutcome] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # victim name -> error message
    seconds: float = 0.0


def run(bundle: Bundle | str | Path, config: RunConfig | None = None, *, progress: bool = True,
        log=print) -> RunResult:
    """Score and attack every victim of ``bundle``. Writes nothing (see mia.submission.write_run).
    ``log`` receives the progress lines (None: silent).

    A failing victim raises, unless ``config.keep_going``: then it is recorded in ``failures`` and
    the other victims are finished.
    """
    config = config or RunConfig()
    log = log if log is not None else (lambda _: None)  # None: silent, like the functions it calls
    t0 = time.perf_counter()
    wanted = list(config.victims) if config.victims is not None else None
    if not isinstance(bundle, Bundle):
        bundle = discover(bundle, strict=not config.keep_going, victims=wanted)
    elif wanted is not None:
        keep = set(select_victims([v.name for v in bundle.victims], wanted, bundle.root))
        bundle = Bundle(bundle.root, [v for v in bundle.victims if v.name in keep], bundle.arch_dirs,
                        bundle.problems)
    result = RunResult(bundle, config)
    for i, problem in enumerate(bundle.problems, 1):
        log(f"warning: {problem}")
        result.failures[f"bundle problem {i}"] = problem
    bundle_code = sorted({p for files in bundle.architecture_files().values() for p in files
                          if p.parent.resolve() != REPO_ARCH_DIR})
    for path in bundle_code:
        log(f"architecture code imported: {path}")
    for victim in bundle.victims:
        try:
            data = score_victim(victim, bundle, config, progress=progress, log=log)
            outcomes = attack_victim(data, config)
        except MIAError as e:
            if not config.keep_going:
                raise
            log(f"error: {victim.name}: {e}")
            result.failures[victim.name] = str(e)
            continue
        result.victims[victim.name] = data
        result.outcomes.extend(outcomes)
        cached = " (logits from cache)" if data.cache_hits == 2 else ""
        if data.reference is not None:
            k = data.n_reference_models
            cached += f", {k} reference model{'s' if k != 1 else ''} (LiRA, RMIA, BMIA)"
        if data.noise_levels:
            cached += f", {len(data.noise_levels)} noisy label-only queries"
        log(f"{victim.name}: {len(data.eval)} eval + {len(data.test)} test records, {len(data.view_names)} views, "
            f"scored in {data.seconds:.1f}s{cached}")
    result.seconds = time.perf_counter() - t0
    return result
