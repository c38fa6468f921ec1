"""mia.references.launch: reference models fanned out over local workers and through submitit."""
from __future__ import annotations

import json

import pytest
import torch

from mia.bundle import discover
from mia.errors import MIAError
from mia.references import ReferenceRecipe, train_references
from mia.references.launch import (
    merge,
    parse_devices,
    plan_jobs,
    run_local,
    run_submitit,
)

RECIPE = ReferenceRecipe(k=4, epochs=1, batch_size=16, device="cpu")
VICTIM = "vgg16_fashionmnist"  # the fastest of the tiny bundle's victims on a CPU


def _manifest(root):
    data = json.loads((root / "references" / VICTIM / "manifest.json").read_text())
    for meta in data["models"].values():
        meta.pop("seconds")
    return data


def _weights(root, j):
    return torch.load(root / "references" / VICTIM / f"model_{j:03d}.pth", weights_only=True)["net"]


@pytest.fixture(scope="module")
def serial(tiny_bundle, copy_bundle, tmp_path_factory):
    """A copy of the tiny bundle whose victim has its 4 references trained by one serial call."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("serial") / "bundle")
    bundle = discover(root, victims=[VICTIM])
    train_references(bundle.root, bundle.victims[0], RECIPE, progress=False)
    return root


def test_parse_devices():
    assert parse_devices("0,1, 3") == ["cuda:0", "cuda:1", "cuda:3"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"] and parse_devices("cuda:2") == ["cuda:2"]
    with pytest.raises(MIAError, match="--devices"):
        parse_devices("gpu0")


@pytest.mark.slow
def test_two_local_workers_give_the_serial_run(serial, tiny_bundle, copy_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    bundle = discover(root, victims=[VICTIM])
    jobs = plan_jobs(bundle, RECIPE)
    assert [(j.victim, j.index) for j in jobs] == [(VICTIM, i) for i in range(4)]
    results, failures = run_local(jobs, ["cpu", "cpu"], threads=1, log=lambda _: None)
    assert not failures and sorted(r["index"] for r in results) == [0, 1, 2, 3] and all(r["trained"] for r in results)
    (ref_set,) = merge(bundle, RECIPE)
    assert ref_set.complete == (0, 1, 2, 3)
    assert _manifest(root) == _manifest(serial)
    for j in range(4):  # same seeds, one thread each: the same weights, bit for bit
        a, b = _weights(root, j), _weights(serial, j)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert plan_jobs(bundle, RECIPE) == []

    # an interrupted fan-out resumes: a model whose .json never got written is the only job left
    (root / "references" / VICTIM / "model_002.json").unlink()
    assert [j.index for j in plan_jobs(bundle, RECIPE)] == [2]


@pytest.mark.slow
def test_submitit_local_executor_trains_the_jobs(tiny_bundle, copy_bundle, tmp_path):
    pytest.importorskip("submitit")
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    bundle = discover(root, victims=[VICTIM])
    recipe = ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu")
    jobs = plan_jobs(bundle, recipe)
    results, failures = run_submitit(jobs, tmp_path / "submitit", cluster="local", log=lambda _: None)
    assert not failures, failures
    assert sorted(r["index"] for r in results) == [0, 1]
    (ref_set,) = merge(bundle, recipe)
    assert ref_set.complete == (0, 1)


def test_a_recipe_mismatch_fails_before_anything_is_launched(serial, tmp_path):
    bundle = discover(serial, victims=[VICTIM])
    other = ReferenceRecipe(k=4, epochs=2, batch_size=16, device="cpu")
    with pytest.raises(MIAError, match="epochs 1 -> 2"):
        plan_jobs(bundle, other)
