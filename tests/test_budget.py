"""mia.references.budget and a run's handling of a victim without reference models."""
from __future__ import annotations

import pytest

import mia.pipeline
from mia.bundle import discover
from mia.config import RunConfig
from mia.errors import MIAError
from mia.references import ReferenceRecipe
from mia.references.budget import TRAIN_FORWARD_RATIO, ReferenceCost, affordable_k, reference_cost


def test_reference_cost_by_hand():
    recipe = ReferenceRecipe(epochs=10)
    cost = reference_cost(0.001, n_pool=2000, recipe=recipe, n_views=2)
    # 10 epochs x 1000 images (half the pool) x ratio forward passes x 1 ms; then 2000 records x 2 views x 1 ms
    assert cost.train_seconds == pytest.approx(10 * 1000 * TRAIN_FORWARD_RATIO * 0.001)
    assert cost.query_seconds == pytest.approx(4.0) and cost.seconds == cost.train_seconds + 4.0


@pytest.mark.parametrize(("budget", "k"), [(0, 0), (9.9, 0), (10, 1), (19.9, 1), (20, 2), (39, 2), (59, 4), (60, 6),
                                          (1e9, 16)])
def test_affordable_k_is_one_or_even_and_fits(budget, k):
    assert affordable_k(budget, ReferenceCost(9.0, 1.0)) == k


def test_a_cpu_run_says_what_one_reference_would_cost(tiny_bundle, tmp_path):
    lines = []
    mia.pipeline.run(tiny_bundle, RunConfig(victims=("vgg16_fashionmnist",), plots=False, label_noise=(),
                                            cache_dir=str(tmp_path / "cache")), progress=False, log=lines.append)
    line = next(x for x in lines if "no reference models" in x)
    assert "one would take about" in line and "python -m mia references --k 1 --victims vgg16_fashionmnist" in line
    assert "`--distill labels --population DIR`" in line  # the stronger one-model choice, where records allow


def test_an_accelerated_run_trains_what_the_budget_allows(tiny_bundle, copy_bundle, tmp_path, monkeypatch):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    monkeypatch.setattr(mia.pipeline, "_trains_references", lambda device: True)  # as on CUDA, here on the CPU
    monkeypatch.setattr("mia.references.budget.affordable_k", lambda budget, cost, k_max=16: 2)
    lines = []
    result = mia.pipeline.run(discover(root), RunConfig(victims=("vgg16_fashionmnist",), plots=False,
                                                       label_noise=(), device="cpu",
                                                       cache_dir=str(tmp_path / "cache")),
                              progress=False, log=lines.append)
    assert any("training 2 reference models" in x for x in lines)
    data = result.victims["vgg16_fashionmnist"]
    # two balanced models: every record has IN and OUT models (online or offline, chosen on eval)
    assert data.n_reference_models == 2 and data.rmia_online is not None and len(data.reference_sanity) == 2
    assert (root / "references" / "vgg16_fashionmnist" / "model_001.pth").is_file()


def test_an_accelerated_run_whose_reference_training_fails_goes_on_without(tiny_bundle, copy_bundle, tmp_path,
                                                                          monkeypatch):
    """A folder holding another recipe's unfinished set (an interrupted fan-out) makes train_references
    refuse; on CUDA the run says so and scores the victim without references, as a CPU run would."""
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    monkeypatch.setattr(mia.pipeline, "_trains_references", lambda device: True)
    monkeypatch.setattr("mia.references.budget.affordable_k", lambda budget, cost, k_max=16: 2)

    def refuse(*args, **kwargs):
        raise MIAError("references/vgg16_fashionmnist holds models of another recipe")

    monkeypatch.setattr("mia.references.train_references", refuse)
    lines = []
    result = mia.pipeline.run(discover(root), RunConfig(victims=("vgg16_fashionmnist",), plots=False,
                                                       label_noise=(), device="cpu",
                                                       cache_dir=str(tmp_path / "cache")),
                              progress=False, log=lines.append)
    assert any("no reference models trained (references/vgg16_fashionmnist holds models of another recipe)" in x
               for x in lines)
    assert result.victims["vgg16_fashionmnist"].n_reference_models == 0
