"""Tables for people: what was chosen, and how it compares with the seed's method on test.

Tables are Markdown: readable in a terminal, and rendered by the notebook and README.
"""
from __future__ import annotations

import numpy as np


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def summary_table(result) -> str:
    """Per task and victim: the attack used, its expected (CV) accuracy, and test accuracy if known."""
    rows = []
    for o in result.outcomes:
        rep = o.used.chosen_report
        expected = (rep.cv or rep.eval)["accuracy"]
        rows.append([f"task{o.task.task}", o.victim, o.task.access, o.used.chosen, _pct(expected),
                     _pct(rep.eval["auc"]), str(int(o.used.test_predictions.sum())) + f"/{len(o.used.test_predictions)}",
                     _pct(rep.test["accuracy"]) if rep.test else "-"])
    return _markdown(["task", "victim", "access", "attack", "expected acc % (CV)", "eval AUC %",
                      "test members predicted", "test acc %"], rows)


def comparison_rows(result) -> list[dict]:
    """Seed's method against the used attack on test, per task and victim (needs an answer key), with
    their bootstrap intervals (None when not computed)."""
    rows = []
    for o in result.outcomes:
        if o.used.test_metrics is None:
            continue
        rows.append({"task": o.task.task, "victim": o.victim, "seed_attack": o.seed.chosen, "attack": o.used.chosen,
                     "seed": o.seed.test_metrics, "ours": o.used.test_metrics, "seed_intervals": o.seed.test_intervals,
                     "intervals": o.used.test_intervals})
    return rows


def _with_interval(value, intervals: dict | None, key: str) -> str:
    """'63.8 [61.7-65.9]' (percent), '*' appended when the figure rests on fewer than 10 negatives."""
    text = _pct(value)
    if intervals is None or intervals.get(key) is None:
        return text
    lo, hi = intervals[key]
    flag = "*" if key in intervals.get("few_negatives", ()) else ""
    return f"{text} [{_pct(lo)}-{_pct(hi)}]{flag}"


def comparison_table(result) -> str:
    """Markdown: test accuracy, AUC and TPR at 1% / 0.1% FPR, seed vs ours, with bootstrap 95% intervals
    [low-high] per victim, means per access level, and a note under the table when a TPR figure rests
    on fewer than 10 test non-members below its FPR cut (marked *)."""
    rows = comparison_rows(result)
    if not rows:
        return "(no answer key in this bundle: nothing to compare on test)"
    keys = [("accuracy", "acc"), ("auc", "AUC"), ("tpr_at_1pct_fpr", "TPR@1%"), ("tpr_at_01pct_fpr", "TPR@0.1%")]
    out = []
    for r in rows:
        cells = [f"task{r['task']}", r["victim"], f"{r['seed_attack']} -> {r['attack']}"]
        for k, _ in keys:
            cells.append(f"{_with_interval(r['seed'][k], r['seed_intervals'], k)} -> "
                         f"{_with_interval(r['ours'][k], r['intervals'], k)}")
        out.append(cells)
    access = {o.task.task: o.task.access for o in result.outcomes}
    for level in ("posterior", "label"):
        sub = [r for r in rows if access[r["task"]] == level]
        if not sub:
            continue
        cells = ["mean", f"{len(sub)} ({level})", ""]
        for k, _ in keys:
            s = np.mean([r["seed"][k] for r in sub])
            u = np.mean([r["ours"][k] for r in sub])
            cells.append(f"{_pct(s)} -> {_pct(u)}")
        out.append(cells)
    table = _markdown(["task", "victim", "attack (seed -> ours)"] + [f"test {n} %" for _, n in keys], out)
    notes = []
    if any(r["intervals"] for r in rows):
        first = next(r["intervals"] for r in rows if r["intervals"])
        notes.append(f"[low-high]: {100 * first['level']:.0f}% {first['method']} intervals ({first['resamples']} "
                     "resamples); the means have none.")
    coarse = sorted({(k, n) for r in rows for iv in (r["intervals"], r["seed_intervals"]) if iv
                     for k in iv["few_negatives"] for n in [iv["negatives_at_fpr"][k]]})
    for k, n in coarse:
        notes.append(f"* {dict(keys)[k]}: the FPR cut allows only {n} false positive(s) among the test "
                     "non-members (fewer than 10): a coarse figure.")
    return "\n".join([table] + notes)


REFERENCE_ATTACKS = ("lira_online", "lira_offline", "rmia", "bmia", "bmia_online", "calibrated_aug_count", "label_lira", "calibrated_noise_correct",
                     "noise_lira", "noise_rate_lr", "noise_rate_offline")


def reference_table(result) -> str | None:
    """Markdown: on test, the seed's method, each reference-model attack (one global threshold) and the
    attack used, per victim and access level; None when no victim has reference models or no answer key."""
    out = []
    done = set()
    for o in result.outcomes:
        data = result.victims.get(o.victim)
        key = (o.victim, o.task.access)
        if key in done or data is None or not data.n_reference_models or o.used.chosen_report.test is None:
            continue
        done.add(key)
        by_name = {c.name: c for c in o.used.candidates}
        entries = [(f"seed: {o.seed.chosen}", o.seed.chosen_report.test)]
        entries += [(n, by_name[n].test) for n in REFERENCE_ATTACKS if n in by_name]
        entries.append((f"ours: {o.used.chosen}", o.used.test_metrics))
        for name, m in entries:
            out.append([o.victim, o.task.access, str(data.n_reference_models), name, _pct(m["accuracy"]),
                        _pct(m["auc"]), _pct(m["tpr_at_1pct_fpr"]), _pct(m["tpr_at_01pct_fpr"])])
    if not out:
        return None
    return _markdown(["victim", "access", "K", "attack", "test acc %", "test AUC %", "test TPR@1% %",
                      "test TPR@0.1% %"], out)
