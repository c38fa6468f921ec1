"""Precision: does scoring in bf16 (as on a GPU) change the attacks' choices and test figures?

For every victim of a bundle with an answer key, the pipeline scores eval and test in each precision
(``RunConfig.precision``: "fp32", and "bf16" = bf16 autocast with the classifier head in fp32, which
is what a CUDA run uses; on the CPU, autocast emulates it), chooses the attacks the same way, and
compares per task: the chosen attack and its test accuracy, AUC and TPR at 1% FPR. It also reports
how far the logits moved (identity view) and, on a sample, how far they move when the head is left
in bf16 too (``fp32_head=False``), the variant the fp32 head replaced.

CPU autocast is slow (5-20x fp32 on a CPU without bf16 units), so by default the records are scored
under the identity and flip views only and without the label-only noisy queries; the selection then
sees fewer features than a default run, on both precisions alike.

``budgets``: the reference models used, per comparison (0: none; None: every complete one). With
references, their logits are computed in the same precision as the victim's (as a run does), and the
comparison covers LiRA, RMIA and the label-only ratios through the chosen attacks.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import BenchResult, Check, markdown_table, timed
from mia.bundle import discover
from mia.config import RunConfig
from mia.inspection import load_victim
from mia.pipeline import attack_victim, score_victim
from mia.scoring import IDENTITY, compute_logits

AGREEMENT_POINTS = 0.2  # the bound on |delta| of test AUC and TPR@1%FPR, in percentage points


@dataclass
class PrecisionConfig:
    """What the precision comparison runs on."""

    bundle: Path  # a bundle with an answer key (answers/)
    device: str = "cpu"  # where both precisions run ("bf16" on the CPU emulates a GPU run)
    views: str = "flip"  # query views of both runs (RunConfig.views)
    label_noise: tuple[float, ...] = ()  # label-only noisy queries of both runs (RunConfig.label_noise)
    head_sample: int = 256  # eval records scored with the head in bf16 too (logit deltas only)
    victims: tuple[str, ...] | None = None  # only these victims; None = all
    budgets: tuple[int | None, ...] = (0,)  # reference models used (0: none, None: all), one comparison each


def _row(victim: str, task: str, outcome) -> dict:
    sel = outcome.used
    test = sel.chosen_report.test or {}
    return {"victim": victim, "task": task, "attack": sel.chosen, "accuracy": test.get("accuracy"),
            "auc": test.get("auc"), "tpr_1pct": test.get("tpr_at_1pct_fpr")}


def _compare(victim, bundle, base: RunConfig, budget: int | None, seconds: dict, log) -> tuple[list[dict], dict]:
    """(one row per task: the attack chosen and its test figures in fp32 and in bf16, with ``budget``
    reference models (0: none, None: all); {precision: VictimData}). Scoring seconds go to ``seconds`` (the
    first budget's: later ones read the victim's logits from the cache)."""
    per = {}
    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(base, precision=precision, references=budget != 0,
                                     reference_models=budget or None)
        s, data = timed(functools.partial(score_victim, victim, bundle, config, progress=False))
        seconds.setdefault((victim.name, precision), s)
        if data.answers is None:
            raise SystemExit(f"{victim.name}: the precision benchmark needs an answer key (answers/)")
        if budget != 0 and data.n_reference_models == 0:
            raise SystemExit(f"{victim.name}: no reference models under the bundle's references/ (budget {budget})")
        per[precision] = data, attack_victim(data, config)
        log(f"precision: {victim.name} K={data.n_reference_models} {precision} scored in {s:.0f}s")
    (d32, o32), (d16, o16) = per["fp32"], per["bf16"]
    rows = []
    for a, b in zip(o32, o16):
        r32, r16 = _row(victim.name, f"task{a.task.task}", a), _row(victim.name, f"task{b.task.task}", b)
        rows.append({"victim": victim.name, "k": d32.n_reference_models, "task": r32["task"], "fp32": r32,
                     "bf16": r16, "same_attack": r32["attack"] == r16["attack"],
                     "d_auc_points": 100 * (r16["auc"] - r32["auc"]),
                     "d_tpr_points": 100 * (r16["tpr_1pct"] - r32["tpr_1pct"]),
                     "d_acc_points": 100 * (r16["accuracy"] - r32["accuracy"])})
    return rows, {"fp32": d32, "bf16": d16}


def run(cfg: PrecisionConfig, log=print) -> BenchResult:
    bundle = discover(cfg.bundle, victims=list(cfg.victims) if cfg.victims else None)
    base = RunConfig(device=cfg.device, views=cfg.views, label_noise=cfg.label_noise, plots=False,
                     references=False)
    rows, deltas, seconds = [], [], {}
    for victim in bundle.victims:
        for budget in cfg.budgets:
            budget_rows, data = _compare(victim, bundle, base, budget, seconds, log)
            rows += budget_rows
        d32, d16 = data["fp32"], data["bf16"]  # the victim's own logits: the same at every budget
        moved = np.abs(d16.eval_logits[0].astype(np.float64) - d32.eval_logits[0])
        model, _, ev, _ = load_victim(victim, bundle, base)
        sample = ev.images[: cfg.head_sample]
        with_head = compute_logits(model, sample, (IDENTITY,), device=cfg.device, precision="bf16")[0]
        all_bf16 = compute_logits(model, sample, (IDENTITY,), device=cfg.device, precision="bf16", fp32_head=False)[0]
        fp32 = d32.eval_logits[0][: cfg.head_sample].astype(np.float64)
        deltas.append({"victim": victim.name, "max_abs_logit_delta": float(moved.max()),
                       "mean_abs_logit_delta": float(moved.mean()),
                       "argmax_agreement": float((d16.eval_logits[0].argmax(-1) == d32.eval_logits[0].argmax(-1)).mean()),
                       "sample_max_delta_fp32_head": float(np.abs(with_head - fp32).max()),
                       "sample_max_delta_bf16_head": float(np.abs(all_bf16 - fp32).max()),
                       "seconds_fp32": seconds[(victim.name, "fp32")], "seconds_bf16": seconds[(victim.name, "bf16")]})
    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    table = markdown_table(
        ["victim", "K", "task", "attack fp32", "attack bf16", "AUC fp32", "AUC bf16", "TPR@1% fp32", "TPR@1% bf16",
         "acc fp32", "acc bf16"],
        [[r["victim"], r["k"], r["task"], r["fp32"]["attack"], "same" if r["same_attack"] else r["bf16"]["attack"],
          *(pct(r[p][key]) for key in ("auc", "tpr_1pct", "accuracy") for p in ("fp32", "bf16"))] for r in rows])
    logit_table = markdown_table(
        ["victim", "max abs logit delta", "mean abs delta", "argmax agreement %", "sample max delta, fp32 head",
         "sample max delta, bf16 head", "s fp32", "s bf16"],
        [[d["victim"], f"{d['max_abs_logit_delta']:.4f}", f"{d['mean_abs_logit_delta']:.4f}",
          pct(d["argmax_agreement"]), f"{d['sample_max_delta_fp32_head']:.4f}",
          f"{d['sample_max_delta_bf16_head']:.4f}", f"{d['seconds_fp32']:.0f}", f"{d['seconds_bf16']:.0f}"]
         for d in deltas])
    worst_auc = max(abs(r["d_auc_points"]) for r in rows)
    worst_tpr = max(abs(r["d_tpr_points"]) for r in rows)
    same = sum(r["same_attack"] for r in rows)
    checks = [
        Check("bf16 and fp32 choose the same attacks", f"{same} of {len(rows)} tasks", same == len(rows)),
        Check(f"test AUC moves <= {AGREEMENT_POINTS} points", f"worst {worst_auc:.3f} points",
              worst_auc <= AGREEMENT_POINTS),
        Check(f"test TPR@1%FPR moves <= {AGREEMENT_POINTS} points", f"worst {worst_tpr:.3f} points",
              worst_tpr <= AGREEMENT_POINTS),
    ]
    return BenchResult(
        "precision", rows + deltas,
        ["### bf16 (fp32 head) against fp32 scoring: chosen attacks and test figures (%)\n\n" + table,
         "### How far the logits move (identity view, eval records)\n\n" + logit_table],
        checks,
        notes=[(f"device {cfg.device}; views {cfg.views}; label-only noisy queries "
                f"{'off' if not cfg.label_noise else cfg.label_noise}; K = reference models used, computed "
                "in the victim's precision")],
        settings={k: str(v) for k, v in dataclasses.asdict(cfg).items()},
    )
