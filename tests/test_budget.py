"""mia.references.budget and a run's handling of a victim without reference models."""
from __future__ import annotations

import pytest

import mia.pipeline
import mia.references.auto
from mia import demo
from mia.bundle import discover
from mia.config import RunConfig
from mia.errors import MIAError
from mia.io.records import load_records
from mia.references import Distill, ReferenceRecipe
from mia.references.budget import (
    DISTILLED_TRAIN_FACTOR,
    TRAIN_FORWARD_RATIO,
    ReferenceCost,
    affordable_k,
    distilled_epochs,
    reference_cost,
)


def test_reference_cost_by_hand():
    recipe = ReferenceRecipe(epochs=10)
    cost = reference_cost(0.001, n_pool=2000, recipe=recipe, n_views=2)
    # 10 epochs x 1000 images (half the pool) x ratio forward passes x 1 ms; then 2000 records x 2 views x 1 ms
    assert cost.train_seconds == pytest.approx(10 * 1000 * TRAIN_FORWARD_RATIO * 0.001)
    assert cost.query_seconds == pytest.approx(4.0) and cost.seconds == cost.train_seconds + 4.0


def test_a_distilled_reference_trains_on_the_population_for_as_long_as_a_standard_one():
    # 15 epochs x 1,000 images (half of 2,000 scored records) = 15,000 images: 24,000 records -> 0.6 epoch,
    # raised to the floor of 2; 4,000 records -> 3.75 -> 4; 500 records -> 30
    assert [distilled_epochs(15, 2000, n) for n in (24000, 4000, 500)] == [2, 4, 30]
    with pytest.raises(ValueError, match="population"):
        distilled_epochs(15, 2000, 0)
    recipe = ReferenceRecipe(epochs=4, distill=Distill.LABELS)
    cost = reference_cost(0.001, n_pool=2000, recipe=recipe, n_views=2, n_population=4000)
    # 4 epochs x 4,000 population records x ratio x the teacher's share x 1 ms; the queries: the 2,000
    # scored records x 2 views
    assert cost.train_seconds == pytest.approx(4 * 4000 * TRAIN_FORWARD_RATIO * DISTILLED_TRAIN_FACTOR * 0.001)
    assert cost.query_seconds == pytest.approx(4.0)


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


def test_a_cpu_run_with_a_population_names_the_distilled_reference(tiny_bundle, copy_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    population = demo.write_population(root, 40, seed=1)
    lines = []
    mia.pipeline.run(discover(root), RunConfig(victims=("vgg16_fashionmnist",), plots=False, label_noise=(),
                                               population=population, cache_dir=str(tmp_path / "cache")),
                     progress=False, log=lines.append)
    line = next(x for x in lines if "no reference models" in x)
    victim = next(v for v in discover(root).victims if v.name == "vgg16_fashionmnist")
    n_scored = len(load_records(victim.eval_path, with_membership=True)) + len(load_records(victim.test_path, with_membership=False))
    epochs = distilled_epochs(ReferenceRecipe.epochs, n_scored, 40)
    assert "one distilled from its predicted labels" in line and "would take about" in line
    assert (f"python -m mia references --k 1 --distill labels --population {population} --epochs {epochs} "
            f"--victims vgg16_fashionmnist") in line


def test_an_accelerated_run_with_a_population_trains_a_label_distilled_reference_first(tiny_bundle, copy_bundle,
                                                                                     tmp_path, monkeypatch):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    population = demo.write_population(root, 40, seed=1)
    monkeypatch.setattr(mia.references.auto, "trains_references", lambda device: True)  # as on CUDA
    monkeypatch.setattr("mia.references.budget.affordable_k", lambda budget, cost, k_max=16: 0)  # no standard one
    lines = []
    result = mia.pipeline.run(discover(root), RunConfig(victims=("vgg16_fashionmnist",), plots=False,
                                                       label_noise=(), device="cpu", population=population,
                                                       cache_dir=str(tmp_path / "cache")),
                              progress=False, log=lines.append)
    assert any("training 1 reference model distilled from its predicted labels on 40 population records" in x
               for x in lines)
    assert not any("no reference models;" in x for x in lines)  # one was trained: no hint about the others
    data = result.victims["vgg16_fashionmnist"]
    assert data.n_reference_models == 1 and [row["distill"] for row in data.reference_sanity] == ["labels"]
    assert data.reference_label is not None  # a label imitation serves the label-only task too
    assert (root / "references" / "vgg16_fashionmnist-distilled-labels" / "model_000.pth").is_file()
    assert result.config.population == str(population)


def test_an_accelerated_run_trains_what_the_budget_allows(tiny_bundle, copy_bundle, tmp_path, monkeypatch):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    monkeypatch.setattr(mia.references.auto, "trains_references", lambda device: True)  # as on CUDA, here on the CPU
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
    monkeypatch.setattr(mia.references.auto, "trains_references", lambda device: True)
    monkeypatch.setattr("mia.references.budget.affordable_k", lambda budget, cost, k_max=16: 2)

    def refuse(*args, **kwargs):
        raise MIAError("references/vgg16_fashionmnist holds models of another recipe")

    monkeypatch.setattr(mia.references.auto, "train_references", refuse)
    lines = []
    result = mia.pipeline.run(discover(root), RunConfig(victims=("vgg16_fashionmnist",), plots=False,
                                                       label_noise=(), device="cpu",
                                                       cache_dir=str(tmp_path / "cache")),
                              progress=False, log=lines.append)
    assert any("no reference models trained (references/vgg16_fashionmnist holds models of another recipe)" in x
               for x in lines)
    assert result.victims["vgg16_fashionmnist"].n_reference_models == 0
