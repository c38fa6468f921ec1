"""Threshold sweep: ``mia.core.thresholds.sweep`` (exact, O(n log n)) against its two baselines.

* ``brute_force_sweep``: the same candidate thresholds, each scored by comparing every record,
  O(n k) for k distinct scores (O(n^2) without ties). It is timed in full when its projected time
  is under ``brute_force_cap_s``; otherwise it is timed on an evenly spaced subset of the candidates
  (always including the sweep's best one) and the time is extrapolated to all k candidates; such
  rows are marked "extrapolated". Where it ran in full, its accuracies must equal the sweep's at
  every candidate; where extrapolated, at every candidate of the subset, and its best accuracy on
  the subset must equal the sweep's best.
* ``grid_sweep``: 100 evenly spaced thresholds; usually misses the best cut by a little, so its
  accuracy loss (in percentage points) is printed.

Scores have ties, like real signals: a member-shifted normal rounded to 4 decimals, with 20% of
the members saturated at one value (an overfitted model's p_y = 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from benchmarks import (BenchResult, Check, calls_per_sample, fmt, interleaved, markdown_table, median, pair_ratio,
                        timed_cpu)
from mia.core.thresholds import Sweep, brute_force_sweep, grid_sweep, sweep

SATURATED = 3.0  # the score shared by saturated members


@dataclass
class SweepConfig:
    """Sizes of the sweep benchmark."""

    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # record counts n
    repeat: int = 3  # timed repetitions (sweep and grid are timed around every brute-force run)
    brute_force_cap_s: float = 20.0  # projected brute-force time above this: time a subset, extrapolate
    subset: int = 200  # candidate thresholds timed when extrapolating
    grid_points: int = 100
    seed: int = 0


def tied_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n,) float64 with ties, membership (n,) int64, half members)."""
    rng = np.random.default_rng(seed)
    membership = rng.permutation(np.arange(n) < n // 2).astype(np.int64)
    x = rng.normal(0.6 * membership, 1.0)
    x[(membership == 1) & (rng.random(n) < 0.2)] = SATURATED
    return np.round(x, 4), membership


def _brute_force_accuracies(scores: np.ndarray, membership: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The per-candidate step of ``mia.core.thresholds.brute_force_sweep`` (same expression), on given candidates."""
    correct = [np.count_nonzero((scores >= t).astype(np.int64) == membership) for t in thresholds]
    return np.asarray(correct, dtype=np.int64) / scores.shape[0]


def _subset_indices(k: int, size: int, must: int) -> np.ndarray:
    return np.unique(np.concatenate([np.linspace(0, k - 1, min(size, k)).round().astype(np.int64), [must]]))


def _measure(n: int, cfg: SweepConfig) -> dict:
    scores, membership = tied_scores(n, cfg.seed)
    exact: Sweep = sweep(scores, membership)  # also warms up numpy
    grid: Sweep = grid_sweep(scores, membership, cfg.grid_points)
    k = exact.thresholds.size
    best_index = int(np.argmax(exact.accuracies))

    # Projection: set-up (sorted distinct values) + per-candidate cost measured on a subset.
    sub = _subset_indices(k, cfg.subset, best_index)
    setup_wall, setup_cpu, _ = timed_cpu(lambda: sorted(set(scores.tolist())))
    setup = {"wall": setup_wall, "cpu": setup_cpu}
    t_sub, _, acc_sub = timed_cpu(lambda: _brute_force_accuracies(scores, membership, exact.thresholds[sub]))
    projected = setup_wall + t_sub * k / sub.size  # wall: decides whether brute force runs in full
    full = projected <= cfg.brute_force_cap_s

    fns = {
        "sweep": lambda: sweep(scores, membership),
        "grid": lambda: grid_sweep(scores, membership, cfg.grid_points),
    }
    brute: list[Sweep] = []
    if full:
        fns["brute"] = lambda: brute.append(brute_force_sweep(scores, membership))
    else:
        fns["brute"] = lambda: _brute_force_accuracies(scores, membership, exact.thresholds[sub])
    calls = {name: calls_per_sample(fn) for name, fn in fns.items() if name != "brute"}
    times = interleaved(fns, cfg.repeat if full else 1, calls)
    if not full:  # scale the subset's time to all k candidates, add the set-up
        for clock in ("wall", "cpu"):
            times["brute"][clock] = [setup[clock] + t * k / sub.size for t in times["brute"][clock]]
        # one brute-force sample: compare it with the median exact / grid time of extra samples
        extra = interleaved({k_: fns[k_] for k_ in ("sweep", "grid")}, max(0, cfg.repeat - 1), calls)
        for name in ("sweep", "grid"):
            for clock in ("wall", "cpu"):
                times[name][clock] = [median(times[name][clock] + extra[name][clock])]

    if full:
        b = brute[-1]
        same_best = b.best_accuracy == exact.best_accuracy and b.best_threshold == exact.best_threshold
        same_all = bool(np.array_equal(b.thresholds, exact.thresholds) and np.array_equal(b.accuracies, exact.accuracies))
        brute_best = b.best_accuracy
    else:
        brute_best = float(acc_sub.max())
        same_best = brute_best == exact.best_accuracy
        same_all = bool(np.array_equal(acc_sub, exact.accuracies[sub]))
    if not (same_best and same_all):
        raise AssertionError(f"n={n}: sweep disagrees with brute force (best {exact.best_accuracy} vs {brute_best})")
    row = {
        "n": n,
        "distinct_scores": int(np.unique(scores).size),
        "candidates": k,
        "brute_force_extrapolated": not full,
        "brute_force_projected_seconds": projected,
        "brute_force_candidates_timed": int(k if full else sub.size),
        "best_accuracy": exact.best_accuracy,
        "brute_force_best_accuracy": brute_best,
        "same_best_accuracy": same_best,
        "same_accuracy_at_every_candidate_checked": same_all,
        "grid_best_accuracy": grid.best_accuracy,
        "grid_accuracy_loss_pp": 100 * (exact.best_accuracy - grid.best_accuracy),
    }
    for clock in ("wall", "cpu"):
        for name, key in (("sweep", "sweep"), ("brute", "brute_force"), ("grid", "grid")):
            row[f"{key}_{clock}_seconds"] = median(times[name][clock])
        row[f"speedup_vs_brute_force_{clock}"] = pair_ratio(times, "brute", "sweep", clock)
        row[f"speedup_vs_grid_{clock}"] = pair_ratio(times, "grid", "sweep", clock)
    return row


def run(config: SweepConfig | None = None, log=print) -> BenchResult:
    """Time sweep / brute force / grid at every size; checks the n = 10^4 target when measured."""
    cfg = config or SweepConfig()
    rows = []
    for n in cfg.sizes:
        log(f"sweep: n={n}")
        rows.append(_measure(n, cfg))
    table_rows = []
    for r in rows:
        brute = fmt(r["brute_force_cpu_seconds"] * 1e3)
        if r["brute_force_extrapolated"]:
            brute += f" (extrapolated from {r['brute_force_candidates_timed']} of {fmt(r['candidates'])} candidates)"
        table_rows.append([
            fmt(r["n"]), fmt(r["distinct_scores"]), fmt(r["sweep_cpu_seconds"] * 1e3), brute,
            f"{r['speedup_vs_brute_force_cpu']:,.0f}x ({r['speedup_vs_brute_force_wall']:,.0f}x)",
            fmt(r["grid_cpu_seconds"] * 1e3), f"{r['speedup_vs_grid_cpu']:.1f}x",
            f"{r['best_accuracy']:.4f}", "yes" if r["same_best_accuracy"] else "NO",
            f"{r['grid_best_accuracy']:.4f} (-{r['grid_accuracy_loss_pp']:.2f} pp)",
        ])
    table = (
        f"### Threshold sweep (tied scores; CPU ms per call, median of {cfg.repeat} interleaved runs; "
        "wall-clock speedup in parentheses)\n\n"
        + markdown_table(
            ["n", "distinct scores", "sweep ms", "brute force ms", "sweep speedup vs brute", f"grid ({cfg.grid_points}) ms",
             "sweep speedup vs grid", "best acc", "brute force: same best", "grid best acc (loss)"],
            table_rows,
        )
    )
    checks = []
    at_1e4 = [r for r in rows if r["n"] == 10_000]
    if at_1e4:
        r = at_1e4[0]
        ok = min(r["speedup_vs_brute_force_cpu"], r["speedup_vs_brute_force_wall"]) >= 100 and r["same_best_accuracy"]
        measured = (f"{r['speedup_vs_brute_force_cpu']:,.0f}x CPU time, {r['speedup_vs_brute_force_wall']:,.0f}x wall; "
                    f"best accuracy {r['best_accuracy']:.4f} {'==' if r['same_best_accuracy'] else '!='} brute force"
                    + (" (brute force extrapolated)" if r["brute_force_extrapolated"] else ""))
        checks.append(Check("exact sweep >= 100x faster than brute force at n=1e4, same results", measured, ok))
    notes = ["Times are this process's CPU time (single-threaded numpy, so robust to other jobs on the machine); "
             "very short calls are repeated back to back and averaged. Brute force (`brute_force_sweep`) is "
             "O(n k) for k distinct scores. Its projection (set-up + per-candidate time on a subset x k) against "
             "the full run where it ran: "
             + ", ".join(f"n={r['n']}: projected {fmt(r['brute_force_projected_seconds'] * 1e3)} ms"
                         + ("" if r["brute_force_extrapolated"] else
                            f", measured {fmt(r['brute_force_wall_seconds'] * 1e3)} ms (wall)") for r in rows)]
    return BenchResult("sweep", rows, [table], checks, notes, settings=asdict(cfg))
