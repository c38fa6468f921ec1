"""Figures. Each function returns a matplotlib Figure; saving is separate (``save_figure``).

* ``accuracy_vs_threshold``: the seed's figure, eval accuracy of "member iff signal >= t" against t,
  one panel per signal, the chosen threshold marked.
* ``roc``: ROC curves of the candidates on linear and log-log axes (TPR at low FPR is what matters).
* ``histogram``: the chosen attack's scores on eval, members against non-members.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mia.io.atomic import atomic_write
from mia.io.cache import cached_file
from mia.core.metrics import roc_curve
from mia.core.thresholds import Sweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_KINDS = ("accuracy_vs_threshold", "roc", "histogram")  # the figures of one victim and access level

# Figures are built with matplotlib's object API (no pyplot): no GUI backend, no global figure
# registry to leak into, the same output headless and in a notebook (``display(fig)`` there).


def _subplots(rows: int = 1, cols: int = 1, figsize=(6, 4), squeeze: bool = True):
    from matplotlib.figure import Figure  # here: importing matplotlib costs ~0.8 s, and a warm re-run draws nothing

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _finite_curve(s: Sweep) -> tuple[np.ndarray, np.ndarray]:
    """The sweep without its +-inf end points (they are 'all members' / 'no members')."""
    keep = np.isfinite(s.thresholds)
    return s.thresholds[keep], s.accuracies[keep]


def accuracy_vs_threshold(curves: dict[str, Sweep], title: str = "", chosen: str | None = None) -> Figure:
    """One panel per signal: eval accuracy against threshold; the best threshold marked."""
    names = list(curves)
    cols = min(4, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = _subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = curves[name]
        t, a = _finite_curve(s)
        if len(t) > 1:
            ax.plot(t, a, lw=1.2, color="C0")
        elif len(t) == 1:
            ax.plot(t, a, "o", color="C0")
        if math.isfinite(s.best_threshold):
            ax.axvline(s.best_threshold, color="C3", ls="--", lw=0.8)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        bold = "bold" if name == chosen else "normal"
        ax.set_title(f"{name}\nbest {s.best_accuracy:.3f} at {s.best_threshold:.3g}", fontsize=8, fontweight=bold)
        ax.set_xlabel("threshold (member if signal >= t)", fontsize=7)
        ax.set_ylabel("eval accuracy", fontsize=7)
        ax.tick_params(labelsize=7)
        if name.endswith("lsc") or name in ("logit_scaled_confidence", "hinge", "neg_loss"):
            ax.set_xscale("symlog", linthresh=1.0)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    # fixed margins in inches (tight_layout measures every text and was half of a run's plotting time)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.55 / w, right=1 - 0.15 / w, bottom=0.45 / h, top=1 - 0.75 / h,
                        wspace=0.34, hspace=0.6)
    return fig


def roc(scores: dict[str, np.ndarray], membership: np.ndarray, title: str = "", chosen: str | None = None) -> Figure:
    """ROC of each scored attack, linear axes left, log-log right (the diagonal is chance)."""
    fig, (lin, log) = _subplots(1, 2, figsize=(10, 4.2))
    n_neg = int((np.asarray(membership) == 0).sum())
    for i, (name, s) in enumerate(scores.items()):
        fpr, tpr = roc_curve(s, membership)
        lw, z = (2.0, 3) if name == chosen else (1.0, 2)
        for ax in (lin, log):
            ax.plot(fpr, tpr, lw=lw, zorder=z, label=name if ax is lin else None, color=f"C{i % 10}")
    for ax in (lin, log):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    floor = 1.0 / max(n_neg, 1)
    log.set_xscale("log")
    log.set_yscale("log")
    log.set_xlim(floor / 2, 1)
    log.set_ylim(floor / 2, 1)
    log.set_title("log-log: the low-FPR regime")
    lin.set_title("linear")
    lin.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.84, wspace=0.22)
    return fig


def histogram(scores: np.ndarray, membership: np.ndarray, threshold: float | None = None, title: str = "",
              bins: int = 50) -> Figure:
    """Members against non-members on one score; the decision threshold as a dashed line."""
    scores = np.asarray(scores, dtype=np.float64)
    membership = np.asarray(membership)
    finite = np.isfinite(scores)
    fig, ax = _subplots(figsize=(5.5, 3.6))
    if finite.any():
        edges = np.histogram_bin_edges(scores[finite], bins=bins)
        for cls, label, color in ((0, "non-members", "C0"), (1, "members", "C3")):
            ax.hist(scores[finite & (membership == cls)], bins=edges, alpha=0.55, label=label, color=color)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1, label="threshold")
    ax.set_xlabel("attack score (larger = more likely member)")
    ax.set_ylabel("eval records")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save as PNG atomically (no 'Software' metadata: the bytes depend on the figure alone)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, metadata={"Software": None}))


@dataclass
class FigureSpec:
    """A figure before it is drawn: ``build(**kwargs)`` makes it. ``digest`` names its content."""

    kind: str  # "accuracy_vs_threshold" | "roc" | "histogram"
    build: Callable[..., Figure]
    kwargs: dict

    def digest(self, dpi: int) -> str:
        """sha256 over the plotting code, matplotlib's version, dpi, the builder and its inputs."""
        h = hashlib.sha256(_SOURCE_DIGEST.encode())
        h.update(f"matplotlib={_matplotlib_version()};dpi={dpi};{self.build.__name__}".encode())
        _hash_value(h, self.kwargs)
        return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _matplotlib_version() -> str:
    """From the package metadata: importing matplotlib itself costs ~0.8 s."""
    from importlib.metadata import version

    return version("matplotlib")


def _hash_value(h, value) -> None:
    """Feed ``value`` (dicts in order, sequences, arrays, Sweeps, scalars) into hash ``h`` unambiguously."""
    if isinstance(value, dict):
        h.update(f"dict{len(value)}(".encode())
        for k, v in value.items():
            _hash_value(h, k)
            _hash_value(h, v)
        h.update(b")")
    elif isinstance(value, Sweep):
        h.update(b"Sweep(")
        for v in (value.thresholds, value.accuracies, value.best_threshold, value.best_accuracy):
            _hash_value(h, v)
        h.update(b")")
    elif isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        h.update(f"array{arr.dtype.str}{arr.shape}(".encode())
        h.update(arr.tobytes())
        h.update(b")")
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}(".encode())
        for v in value:
            _hash_value(h, v)
        h.update(b")")
    elif value is None or isinstance(value, (str, bool, int, float, np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot hash a figure input of type {type(value).__name__}")


def _source_digest() -> str:
    """This module's code and that of the ROC it draws: a change to either redraws every figure."""
    import mia.core.metrics

    h = hashlib.sha256()
    for path in (Path(__file__), Path(mia.core.metrics.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


_SOURCE_DIGEST = _source_digest()


def outcome_figure_specs(outcome, max_roc_lines: int = 6) -> list[FigureSpec]:
    """The three figures of one task on one victim (a TaskOutcome), computed on eval, not yet drawn."""
    sel = outcome.used
    label = f"task {outcome.task.task} ({outcome.task.access}) - {outcome.victim}"
    specs = [FigureSpec("accuracy_vs_threshold", accuracy_vs_threshold, dict(
        curves=outcome.curves, title=f"{label}: eval accuracy vs threshold", chosen=(sel.fitted.inner or sel.fitted).candidate.signal))]
    # ROC: the chosen attack, the seed's, and the best other candidates by (CV) accuracy
    ranked = sorted(sel.candidates, key=lambda c: -(c.cv or c.eval)["accuracy"])
    names = [sel.chosen] + [c.name for c in ranked if c.name != sel.chosen][: max_roc_lines - 2]
    scores = {n: sel.fitted_all[n].score(outcome.eval_features, outcome.eval_labels) for n in names}
    scores[f"seed: {outcome.seed.chosen}"] = outcome.seed.eval_scores
    specs.append(FigureSpec("roc", roc, dict(scores=scores, membership=outcome.eval_membership,
                                             title=f"{label}: ROC on eval (in-sample fits)", chosen=sel.chosen)))
    threshold = 0.0 if sel.fitted.candidate.kind == "class" else sel.fitted.threshold
    specs.append(FigureSpec("histogram", histogram, dict(scores=sel.eval_scores, membership=outcome.eval_membership,
                                                         threshold=threshold, title=f"{label}: {sel.chosen} on eval")))
    return specs


def outcome_figures(outcome, max_roc_lines: int = 6) -> dict[str, Figure]:
    """The three figures of one task on one victim (a TaskOutcome), computed on eval."""
    return {spec.kind: spec.build(**spec.kwargs) for spec in outcome_figure_specs(outcome, max_roc_lines)}


def save_run_plots(result, folder: str | Path, cache_dir: str | Path | None = None, dpi: int = 110) -> dict[str, Path]:
    """Write the figures of every victim and access level as ``<folder>/<victim>_<access>_<kind>.png``.

    Tasks with the same access level get the same attack on the same records, so they share figures.
    cache_dir: PNGs are also kept under ``<cache_dir>/plots/`` named by ``FigureSpec.digest``; a figure
    whose inputs, code and matplotlib version are unchanged is copied from there instead of drawn
    (drawing is ~0.5 s of CPU per figure, most of a warm re-run otherwise).
    """
    folder = Path(folder)
    cache = Path(cache_dir) / "plots" if cache_dir is not None else None
    written = {}
    done = set()
    for o in result.outcomes:
        key = (o.victim, o.task.access)
        if key in done:
            continue
        done.add(key)
        for spec in outcome_figure_specs(o):
            name = f"{o.victim}_{o.task.access}_{spec.kind}.png"
            path = folder / name
            entry = cache / f"{spec.digest(dpi)}.png" if cache is not None else None
            cached_file(entry, path, lambda target, spec=spec: save_figure(spec.build(**spec.kwargs), target, dpi=dpi))
            written[f"plots/{name}"] = path
    return written

