"""Attack quality at each reference budget: the seed's method, ours without references, and with the
reference models the bundle holds (ours and each reference attack alone), on test against the answer key.

Runs the pipeline on a bundle with an answer key (``answers/``): references off (K = 0), then on with at
most K of each victim's complete reference models for every K of ``budgets`` (None: all it has; see
``mia references`` and ``RunConfig.reference_models``), the attack always chosen on eval. Prints per
victim and access level: test accuracy, AUC, TPR at 1% and 0.1% FPR, and the training time the models
used cost (from their ``model_*.json``). Noisy label-only queries are off by default: the references
would have to answer 32 per record, which on a CPU costs as much as the rest together (their answers are
cached, so a second run is quick).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from benchmarks import BenchResult, markdown_table
from mia.config import RunConfig
from mia.pipeline import run as run_pipeline
from mia.references.store import SET_ORDER
from mia.report import REFERENCE_ATTACKS

METRICS = ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr")


@dataclass
class AttacksConfig:
    """What the attack benchmark runs on."""

    bundle: Path  # with answers/ and, for K > 0, references/<victim>/
    device: str = "auto"
    label_noise: tuple[float, ...] = ()  # RunConfig.label_noise of every run
    victims: tuple[str, ...] | None = None
    budgets: tuple[int | None, ...] = (1, None)  # reference models used per victim after K = 0 (None: all)


def _training_seconds(bundle: Path, victim: str, k: int) -> float:
    """Seconds the victim's first k complete reference models took to train (their model_*.json), its sets
    in SET_ORDER (as a run takes them)."""
    total = 0.0
    folders = [bundle / "references" / (victim + distill.suffix) for distill in SET_ORDER]
    for meta in [m for folder in folders for m in sorted(folder.glob("model_*.json"))][:k]:
        try:
            total += float(json.loads(meta.read_text()).get("seconds") or 0.0)
        except (OSError, ValueError):
            continue
    return total


def _row(victim: str, access: str, k: int, attack: str, test: dict, seconds: float) -> dict:
    return {"victim": victim, "access": access, "k": k, "attack": attack, "training_s": seconds,
            **{m: test[m] for m in METRICS}}


def run(cfg: AttacksConfig, log=print) -> BenchResult:
    base = RunConfig(device=cfg.device, label_noise=cfg.label_noise, plots=False, victims=cfg.victims,
                     reference_budget=0.0)
    rows = []
    done: set[tuple[str, int]] = set()  # (victim, K) already reported: a budget above what a victim has repeats it
    for budget in (0, *cfg.budgets):
        references = budget != 0
        result = run_pipeline(cfg.bundle, dataclasses.replace(base, references=references,
                                                              reference_models=budget if references else None),
                              progress=False, log=lambda _: None)
        seen = set()
        for o in result.outcomes:
            data = result.victims[o.victim]
            key = (o.victim, o.task.access)
            k = data.n_reference_models
            if key in seen or o.used.chosen_report.test is None or (references and (k == 0 or (o.victim, k) in done)):
                continue  # no references: the K = 0 row says it all
            seen.add(key)
            seconds = _training_seconds(Path(cfg.bundle), o.victim, k) if k else 0.0
            if not references:
                rows.append(_row(o.victim, o.task.access, 0, f"seed: {o.seed.chosen}", o.seed.test_metrics, 0.0))
            order = f" (scores: {o.used.ranking})" if o.used.ranking else ""
            rows.append(_row(o.victim, o.task.access, k, f"ours: {o.used.chosen}{order}", o.used.test_metrics, seconds))
            if references:
                by_name = {c.name: c for c in o.used.candidates}
                rows += [_row(o.victim, o.task.access, k, name, by_name[name].test, seconds)
                         for name in REFERENCE_ATTACKS if name in by_name and by_name[name].test is not None]
        done |= {(victim, data.n_reference_models) for victim, data in result.victims.items()}
        log(f"attacks: references {'off' if not references else budget or 'all'} done")
    table = markdown_table(
        ["victim", "access", "K", "attack", "test acc %", "AUC %", "TPR@1% %", "TPR@0.1% %", "training s"],
        [[r["victim"], r["access"], str(r["k"]), r["attack"], *(f"{100 * r[m]:.1f}" for m in METRICS),
          f"{r['training_s']:.0f}"] for r in rows])
    return BenchResult("attacks", rows, ["### Attacks by reference budget (test set, answer key)\n\n" + table],
                       notes=[(f"label-only noisy queries {'off' if not cfg.label_noise else cfg.label_noise}; "
                               "K = the reference models used: the first K complete ones under references/")],
                       settings={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
