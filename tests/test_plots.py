"""mia.plots: the figures of a run, and the content-keyed figure cache."""
from __future__ import annotations

import numpy as np
import pytest

from mia import plots
from mia.config import RunConfig
from mia.pipeline import run
from mia.core.thresholds import sweep


@pytest.fixture(scope="module")
def one_victim_run(tiny_bundle, copy_bundle, tmp_path_factory):
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("plots") / "bundle")
    return run(root, RunConfig(plots=False, victims=("vgg16_fashionmnist",)), progress=False, log=lambda *a: None)


def _count_drawings(monkeypatch) -> list:
    drawn = []
    real = plots.save_figure

    def counting(fig, path, dpi=110):
        drawn.append(path.name)
        return real(fig, path, dpi=dpi)

    monkeypatch.setattr(plots, "save_figure", counting)
    return drawn


@pytest.mark.slow
def test_cached_figures_are_copied_not_drawn(one_victim_run, tmp_path, monkeypatch):
    drawn = _count_drawings(monkeypatch)
    first = plots.save_run_plots(one_victim_run, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert len(first) == len(drawn) == 6  # 2 access levels x 3 kinds
    assert len(list((tmp_path / "cache" / "plots").glob("*.png"))) == 6
    second = plots.save_run_plots(one_victim_run, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert len(drawn) == 6  # nothing drawn the second time
    uncached = plots.save_run_plots(one_victim_run, tmp_path / "c")
    assert len(drawn) == 12
    for rel in first:
        assert first[rel].read_bytes() == second[rel].read_bytes() == uncached[rel].read_bytes(), rel


def test_digest_follows_every_input():
    s = sweep(np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]))
    spec = plots.FigureSpec("accuracy_vs_threshold", plots.accuracy_vs_threshold,
                            dict(curves={"a": s}, title="t", chosen="a"))
    base = spec.digest(110)
    assert base == plots.FigureSpec(spec.kind, spec.build, dict(spec.kwargs)).digest(110)
    assert spec.digest(100) != base
    other = sweep(np.array([0.1, 0.5, 0.95]), np.array([0, 1, 1]))
    changed = [dict(curves={"a": other}, title="t", chosen="a"), dict(curves={"b": s}, title="t", chosen="a"),
               dict(curves={"a": s}, title="u", chosen="a"), dict(curves={"a": s}, title="t", chosen=None)]
    digests = {plots.FigureSpec(spec.kind, spec.build, kw).digest(110) for kw in changed}
    assert len(digests) == 4 and base not in digests
    hist = dict(scores=np.array([1.0, 2.0]), membership=np.array([0, 1]), threshold=1.5, title="")
    h1 = plots.FigureSpec("histogram", plots.histogram, hist).digest(110)
    h2 = plots.FigureSpec("histogram", plots.histogram, dict(hist, membership=np.array([1, 0]))).digest(110)
    assert h1 != h2
    with pytest.raises(TypeError):
        plots.FigureSpec("histogram", plots.histogram, dict(hist, title=object())).digest(110)
