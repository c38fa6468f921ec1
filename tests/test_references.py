"""mia.references: masks, training layout, resume, shards, recipe checks, reference logits, CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

import mia.references.logits as ref_logits
import mia.references.train as ref_train
from mia.bundle import discover
from mia.errors import MIAError
from mia.references import (
    Distill,
    ReferenceRecipe,
    distill_masks,
    load_pool,
    load_reference_set,
    make_masks,
    parse_shard,
    reference_logits,
    train_references,
    views_from_names,
)
from mia.cli.references import add_parser, run_cli
from mia.scoring import FLIP, IDENTITY, STANDARD_VIEWS, View, noise_views
from mia.training import augment_batch

RECIPE = ReferenceRecipe(k=4, epochs=1, batch_size=16, device="cpu")


VICTIM = "vgg16_fashionmnist"  # the fastest of the tiny bundle's victims on a CPU


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The shared tiny demo bundle (read only: references go under tmp folders)."""
    return discover(tiny_bundle, victims=[VICTIM])


@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory):
    """k=4 references trained once (shared by the read-only tests)."""
    root = tmp_path_factory.mktemp("trained")
    ref_set = train_references(bundle.root, bundle.victims[0], RECIPE, progress=False, references_root=root)
    return root, ref_set


def _manifest(folder):
    data = json.loads((folder / "manifest.json").read_text())
    for meta in data["models"].values():
        meta.pop("seconds")
    return data


# --------------------------------------------------------------------------------------------- masks


def test_masks_balanced_and_deterministic():
    m = make_masks(8, 1000, seed=3)
    assert m.shape == (8, 1000) and m.dtype == bool
    assert (m.sum(axis=0) == 4).all()  # every record IN for exactly k/2 models
    assert abs(m.sum(axis=1).mean() - 500) < 1e-9  # k * n / 2 INs in all
    assert 400 < m.sum(axis=1).min() and m.sum(axis=1).max() < 600  # roughly half the pool per model
    np.testing.assert_array_equal(m, make_masks(8, 1000, seed=3))
    assert not np.array_equal(m, make_masks(8, 1000, seed=4))


def test_one_model_trains_on_a_random_half():
    m = make_masks(1, 1001, seed=3)
    assert m.shape == (1, 1001) and m.sum() == 500  # n // 2 records IN
    np.testing.assert_array_equal(m, make_masks(1, 1001, seed=3))
    assert not np.array_equal(m, make_masks(1, 1001, seed=4))
    assert m[0, :500].sum() not in (0, 500)  # a random half, not the first records


@pytest.mark.parametrize("k", [0, 3, -2])
def test_masks_need_one_or_even_k(k):
    with pytest.raises(MIAError, match="even"):
        make_masks(k, 10, 0)


def test_optimizer_is_in_the_fingerprint_only_when_not_sgd():
    assert "optimizer" not in ReferenceRecipe().to_dict()  # sets trained before the option keep their fingerprint
    adam = ReferenceRecipe(optimizer="adam", lr=0.002)
    assert adam.to_dict()["optimizer"] == "adam" and ReferenceRecipe.from_dict(adam.to_dict()) == adam
    assert ReferenceRecipe.from_dict(ReferenceRecipe().to_dict()).optimizer == "sgd"
    assert adam.train_recipe().optimizer == "adam"
    with pytest.raises(MIAError, match="optimizer"):
        ReferenceRecipe(optimizer="rmsprop").validate()


def test_distillation_is_in_the_fingerprint_only_when_on():
    assert "distill" not in ReferenceRecipe().to_dict()
    distilled = ReferenceRecipe(k=3, distill=True)
    distilled.validate()  # any k: no record is split between models
    assert distilled.to_dict()["distill"] is True and ReferenceRecipe.from_dict(distilled.to_dict()) == distilled
    with pytest.raises(MIAError, match="positive"):
        ReferenceRecipe(k=0, distill=True).validate()
    # the posterior imitations are written as `true`, as before the label imitations existed (same fingerprint)
    assert distilled.distill is Distill.POSTERIORS and ReferenceRecipe(distill="posteriors") == distilled.__class__(
        k=8, distill=True)
    labels = ReferenceRecipe(k=1, distill="labels")
    assert labels.to_dict()["distill"] == "labels" and ReferenceRecipe.from_dict(labels.to_dict()) == labels
    assert labels.distilled and not ReferenceRecipe().distilled and ReferenceRecipe(distill=False).distill is Distill.OFF
    assert labels.train_recipe().hard_teacher and not distilled.train_recipe().hard_teacher
    assert [d.suffix for d in Distill] == ["", "-distilled", "-distilled-labels"]
    with pytest.raises(MIAError, match="distill must be one of"):
        ReferenceRecipe(distill="logits")


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(MIAError, match="shard"):
            parse_shard(bad)


def test_recipe_validation():
    with pytest.raises(MIAError, match="even"):
        ReferenceRecipe(k=5).validate()
    with pytest.raises(MIAError, match="pad"):
        ReferenceRecipe(pad=-1).validate()
    assert RECIPE.train_recipe().pad == 4 and RECIPE.train_recipe().epochs == 1
    assert ReferenceRecipe.from_dict(RECIPE.to_dict()) == RECIPE


# --------------------------------------------------------------------------------------------- augmentation
# (mia.training.augment_batch: the augmentation every reference model is trained with)


def test_augment_batch_flips_and_crops():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1.0
    g = torch.Generator().manual_seed(0)
    flipped_only = augment_batch(x, g, pad=0)
    for b in range(2):
        assert torch.equal(flipped_only[b], x[b]) or torch.equal(flipped_only[b], x[b].flip(-1))
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape
    for b in range(2):
        # each output is one of the 2 x 25 crops of the (possibly flipped) zero-padded image
        crops = [torch.nn.functional.pad(img, (2, 2, 2, 2))[:, r:r + 5, c:c + 6]
                 for img in (x[b], x[b].flip(-1)) for r in range(5) for c in range(5)]
        assert any(torch.equal(out[b], crop) for crop in crops)


def test_augment_batch_is_reproducible():
    x = torch.randn(8, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(5), pad=4)
    b = augment_batch(x, torch.Generator().manual_seed(5), pad=4)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------- training


def test_training_writes_models_masks_and_manifest(bundle, trained):
    root, ref_set = trained
    folder = root / bundle.victims[0].name
    assert ref_set.folder == folder and ref_set.complete == (0, 1, 2, 3) and ref_set.trained == (0, 1, 2, 3)
    masks = np.load(folder / "masks.npy")
    np.testing.assert_array_equal(masks, make_masks(4, 64, 0))
    assert (masks.sum(axis=0) == 2).all()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] == [0, 1, 2, 3] and manifest["missing"] == []
    assert manifest["pool"]["n_eval"] == 32 and manifest["pool"]["n_test"] == 32 and manifest["pool"]["n"] == 64
    assert [s["role"] for s in manifest["pool"]["sources"]] == ["eval", "test"]
    assert all(len(s["sha256"]) == 64 for s in manifest["pool"]["sources"])
    assert len(manifest["victim_checkpoint"]["sha256"]) == 64
    assert manifest["recipe"]["epochs"] == 1 and manifest["recipe"]["width"] == 4 and manifest["width"] == 4
    for j in range(4):
        meta = json.loads((folder / f"model_{j:03d}.json").read_text())
        assert meta["n_in"] == masks[j].sum() and meta["n_in"] + meta["n_out"] == 64
        assert 0.0 <= meta["out_accuracy"] <= 1.0 and meta["seconds"] > 0
        assert manifest["models"][f"{j:03d}"]["out_accuracy"] == meta["out_accuracy"]
        model = ref_set.load_model(j)
        assert model.features[0].weight.shape[0] == 4  # the victim's width
    assert not list(folder.glob(".*.tmp"))


def test_resume_after_interruption_trains_only_missing(bundle, tmp_path, monkeypatch):
    victim = bundle.victims[0]
    fit = ref_train._fit_model
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[5])  # the model seed
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(ref_train, "_fit_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_references(bundle.root, victim, RECIPE, progress=False, references_root=tmp_path)
    folder = tmp_path / victim.name
    partial = load_reference_set(bundle.root, victim, references_root=tmp_path)
    assert partial.complete == (0, 1)
    assert json.loads((folder / "manifest.json").read_text())["missing"] == [2, 3]
    assert not list(folder.glob(".*.tmp"))
    stamp = (folder / "model_000.pth").stat().st_mtime_ns

    monkeypatch.setattr(ref_train, "_fit_model", fit)
    done = train_references(bundle.root, victim, RECIPE, progress=False, references_root=tmp_path)
    assert done.trained == (2, 3) and done.complete == (0, 1, 2, 3)
    assert (folder / "model_000.pth").stat().st_mtime_ns == stamp  # kept, not retrained

    (folder / "model_001.json").unlink()  # a model whose .json never got written is incomplete
    again = train_references(bundle.root, victim, RECIPE, progress=False, references_root=tmp_path)
    assert again.trained == (1,)


def test_a_time_budget_stops_before_the_model_that_would_pass_it(bundle, tmp_path):
    """With a budget of 0 s the first model is trained (nothing is known of the cost before it) and no
    other; a later call without a budget resumes with the rest."""
    victim = bundle.victims[0]
    lines = []
    first = train_references(bundle.root, victim, RECIPE, progress=False, references_root=tmp_path, time_budget=0.0,
                             log=lines.append)
    assert first.trained == (0,) and first.complete == (0,)
    assert any("stopped after 1 reference model(s)" in x and "0 s budget" in x for x in lines)
    rest = train_references(bundle.root, victim, RECIPE, progress=False, references_root=tmp_path)
    assert rest.trained == (1, 2, 3)


def test_shards_merge_to_the_single_run(bundle, trained, tmp_path):
    victim = bundle.victims[0]
    single_root, single = trained
    first = train_references(bundle.root, victim, RECIPE, shard=(0, 2), progress=False, references_root=tmp_path)
    assert first.trained == (0, 2) and first.complete == (0, 2)
    second = train_references(bundle.root, victim, RECIPE, shard=(1, 2), progress=False, references_root=tmp_path)
    assert second.trained == (1, 3) and second.complete == (0, 1, 2, 3)  # any shard's call merges
    merged = load_reference_set(bundle.root, victim, references_root=tmp_path)
    assert merged.complete == (0, 1, 2, 3)
    assert _manifest(tmp_path / victim.name) == _manifest(single_root / victim.name)
    for j in range(4):
        a = torch.load(merged.model_path(j), weights_only=True)["net"]
        b = torch.load(single.model_path(j), weights_only=True)["net"]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_recipe_or_pool_mismatch_is_refused(bundle, trained, tmp_path):
    root, _ = trained
    victim = bundle.victims[0]
    with pytest.raises(MIAError, match=r"epochs 1 -> 2"):
        train_references(bundle.root, victim, ReferenceRecipe(k=4, epochs=2, batch_size=16, device="cpu"),
                         progress=False, references_root=root)
    with pytest.raises(MIAError, match=r"k 4 -> 6"):
        train_references(bundle.root, victim, ReferenceRecipe(k=6, epochs=1, batch_size=16, device="cpu"),
                         progress=False, references_root=root)
    population = tmp_path / "population"
    _write_population(population / "extra.p", n=3)
    with pytest.raises(MIAError, match="pool"):
        train_references(bundle.root, victim, RECIPE, population=population, progress=False, references_root=root)
    assert load_reference_set(bundle.root, victim, references_root=root).complete == (0, 1, 2, 3)  # untouched


def _write_population(path, n, with_membership=True):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        image = torch.from_numpy(rng.standard_normal((3, 32, 32)).astype(np.float32))
        records.append([image, i % 10, 0] if with_membership else [image, i % 10])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(records, protocol=4))


def test_population_copies_of_scored_records_are_dropped(bundle, tmp_path):
    victim = bundle.victims[0]
    _write_population(tmp_path / "pop" / "a.p", n=4, with_membership=False)
    records = pickle.loads((tmp_path / "pop" / "a.p").read_bytes())
    test = load_pool(victim).images[40]  # the 9th test record
    records[1][0] = torch.from_numpy(test.copy())  # a public population holds the scored records too
    (tmp_path / "pop" / "a.p").write_bytes(pickle.dumps(records, protocol=4))
    pool = load_pool(victim, tmp_path / "pop", num_classes=10, bundle_root=bundle.root)
    assert pool.n_population == 3 and pool.labels[64:].tolist() == [0, 2, 3]
    assert pool.sources[2]["n"] == 3 and pool.sources[2]["dropped_duplicates"] == 1
    with pytest.raises(MIAError, match="population records"):
        distill_masks(2, load_pool(victim))
    masks = distill_masks(2, pool)
    assert masks.shape == (2, 67) and not masks[:, :64].any() and masks[:, 64:].all()


def test_distilled_references_train_on_the_population_only(bundle, tmp_path):
    victim = bundle.victims[0]
    _write_population(tmp_path / "pop.p", n=20, with_membership=False)
    recipe = ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu", distill=True)
    with pytest.raises(MIAError, match="population records"):
        train_references(bundle.root, victim, recipe, progress=False, references_root=tmp_path / "none")
    ref_set = train_references(bundle.root, victim, recipe, population=tmp_path / "pop.p", progress=False,
                               references_root=tmp_path / "refs")
    assert ref_set.complete == (0,) and ref_set.recipe.distill
    assert not ref_set.masks[:, :64].any() and ref_set.masks[:, 64:].all()
    meta = json.loads((ref_set.folder / "model_000.json").read_text())
    assert (meta["n_in"], meta["n_out"]) == (20, 64)
    assert ref_set.load_pool().n_population == 20  # the pool is read back as it was trained on


def test_a_distilled_set_grows_and_keeps_its_models(bundle, tmp_path):
    victim = bundle.victims[0]
    _write_population(tmp_path / "pop.p", n=20, with_membership=False)
    recipe = ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu", distill=True)
    grow = {"population": tmp_path / "pop.p", "progress": False, "references_root": tmp_path / "refs"}
    one = train_references(bundle.root, victim, recipe, **grow)
    first = (one.folder / "model_000.pth").read_bytes()
    two = train_references(bundle.root, victim, ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu",
                                                                distill=True), **grow)
    assert two.trained == (1,) and two.complete == (0, 1) and two.k == 2 and two.fingerprint == one.fingerprint
    assert (two.folder / "model_000.pth").read_bytes() == first  # model 0 is not trained again
    assert two.masks.shape == (2, 84) and not two.masks[:, :64].any() and two.masks[:, 64:].all()
    at_once = train_references(bundle.root, victim, ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu",
                                                                    distill=True), **{**grow, "references_root": tmp_path})
    assert _manifest(at_once.folder) == _manifest(two.folder)  # grown = trained at once
    for j in range(2):
        a = torch.load(two.model_path(j), weights_only=True)["net"]
        b = torch.load(at_once.model_path(j), weights_only=True)["net"]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    back = train_references(bundle.root, victim, recipe, **grow)  # a smaller k trains nothing, keeps both
    assert back.trained == () and back.complete == (0, 1) and back.k == 2
    assert _manifest(back.folder)["k"] == 2 and _manifest(back.folder)["missing"] == []
    with pytest.raises(MIAError, match=r"epochs 1 -> 2"):  # any other change is still another recipe
        train_references(bundle.root, victim, ReferenceRecipe(k=3, epochs=2, batch_size=16, device="cpu",
                                                              distill=True), **grow)


def test_a_distilled_set_fingerprinted_with_its_k_is_adopted(bundle, tmp_path):
    """Distilled sets written before they could grow had k in their fingerprint; they grow all the same."""
    victim = bundle.victims[0]
    _write_population(tmp_path / "pop.p", n=20, with_membership=False)
    grow = {"population": tmp_path / "pop.p", "progress": False, "references_root": tmp_path / "refs"}
    one = train_references(bundle.root, victim, ReferenceRecipe(k=1, epochs=1, batch_size=16, device="cpu",
                                                                distill="labels"), **grow)
    manifest = json.loads((one.folder / "manifest.json").read_text())
    recipe = dict(manifest["recipe"])
    key = {"format": manifest["format"], "recipe": recipe, "arch": manifest["arch"],
           "num_classes": manifest["num_classes"], "victim_sha256": manifest["victim_checkpoint"]["sha256"],
           "pool": [[s["role"], s["sha256"], s["n"]] for s in manifest["pool"]["sources"]]}
    earlier = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()  # with "k": 1, as written then
    assert recipe["k"] == 1 and earlier != one.fingerprint
    for name in ("manifest.json", "model_000.json"):
        data = json.loads((one.folder / name).read_text())
        (one.folder / name).write_text(json.dumps({**data, "fingerprint": earlier}))
    assert load_reference_set(bundle.root, victim, references_root=tmp_path / "refs",
                              distill="labels").complete == (0,)  # a run reads it as it is
    two = train_references(bundle.root, victim, ReferenceRecipe(k=2, epochs=1, batch_size=16, device="cpu",
                                                                distill="labels"), **grow)
    assert two.trained == (1,) and two.complete == (0, 1) and two.fingerprint == one.fingerprint
    assert json.loads((one.folder / "model_000.json").read_text())["fingerprint"] == one.fingerprint


def test_cli_distill_needs_a_population(bundle, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["references", "--bundle", str(bundle.root), "--k", "1", "--distill", "--quiet"])
    assert args.distill == "posteriors"
    with pytest.raises(MIAError, match="--population"):
        run_cli(args)
    args = parser.parse_args(["references", "--bundle", str(bundle.root), "--k", "1", "--distill", "labels"])
    assert args.distill == "labels"
    with pytest.raises(MIAError, match="--population"):
        run_cli(args)
    assert parser.parse_args(["references"]).distill == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["references", "--distill", "off"])


def test_pool_with_population_folder(bundle, tmp_path):
    _write_population(tmp_path / "pop" / "a.p", n=3)  # [image, label, membership], all non-members
    _write_population(tmp_path / "pop" / "b.p", n=2, with_membership=False)
    pool = load_pool(bundle.victims[0], tmp_path / "pop", num_classes=10, bundle_root=bundle.root)
    assert (pool.n, pool.n_eval, pool.n_test, pool.n_population) == (69, 32, 32, 5)
    assert [s["role"] for s in pool.sources] == ["eval", "test", "population", "population"]
    assert pool.labels[64:].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(MIAError, match="not found"):
        load_pool(bundle.victims[0], tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------- logits


def test_views_from_names_round_trip():
    assert views_from_names([v.name for v in STANDARD_VIEWS]) == STANDARD_VIEWS
    noisy = noise_views((0.125, 0.3), 2) + (View(flip=True, dx=-1, dy=2, noise=0.5, draw=9),)
    assert views_from_names([v.name for v in noisy]) == noisy
    for bad in ("identity", "id:dx1", "flip:dx+1dy+x", "id:dx+0dy+0", "id:noise0.1", "id:noise#1", "id:noisex#1",
                "id:noise0.1#1:dx+1dy+0", "id:noise0#0", "id:noise0.1#-1", "id:dx+1dy+0:noise0.1#1:x"):
        with pytest.raises(ValueError):
            views_from_names([bad])


def test_reference_logits_shape_and_cache(trained, monkeypatch):
    _, ref_set = trained
    logits = reference_logits(ref_set, (IDENTITY, FLIP), device="cpu")
    assert logits.shape == (4, 2, 64, 10) and logits.dtype == np.float32
    pool = ref_set.load_pool()
    model = ref_set.load_model(2)
    with torch.no_grad():
        direct = model(torch.from_numpy(pool.images[:5])).numpy()
    np.testing.assert_allclose(logits[2, 0, :5], direct, rtol=1e-4, atol=1e-5)

    def refuse(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(ref_logits, "compute_logits", refuse)
    np.testing.assert_array_equal(reference_logits(ref_set, (IDENTITY, FLIP), device="cpu"), logits)



def test_reference_logits_are_cached_per_precision(trained, monkeypatch):
    # a bf16 run's reference logits are never served to an fp32 run (or the other way round): both are
    # computed once, each under its own key, and come back from the cache as computed
    _, ref_set = trained
    fp32 = reference_logits(ref_set, (IDENTITY,), device="cpu", precision="fp32")
    bf16 = reference_logits(ref_set, (IDENTITY,), device="cpu", precision="bf16")
    assert 0 < np.abs(bf16 - fp32).max() < 0.5  # bf16 arithmetic: close, not equal
    np.testing.assert_array_equal(reference_logits(ref_set, (IDENTITY,), device="cpu"), fp32)  # auto = fp32 on CPU

    def refuse(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(ref_logits, "compute_logits", refuse)
    np.testing.assert_array_equal(reference_logits(ref_set, (IDENTITY,), device="cpu", precision="bf16"), bf16)
    np.testing.assert_array_equal(reference_logits(ref_set, (IDENTITY,), device="cpu", precision="fp32"), fp32)

def test_reference_features_are_the_heads_input_and_cached_when_small(trained, tmp_path, monkeypatch):
    _, ref_set = trained
    feats, fit, weight, bias = ref_logits.reference_features(ref_set, 1, (IDENTITY, FLIP), device="cpu",
                                                             cache_dir=tmp_path)
    assert feats.shape == (2, 64, weight.shape[1]) and feats.dtype == np.float32 and bias.shape == (10,)
    logits = reference_logits(ref_set, (IDENTITY, FLIP), device="cpu", cache_dir=tmp_path)[1]
    np.testing.assert_allclose(feats @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)  # the head's input
    np.testing.assert_array_equal(fit, feats[0][ref_set.masks[1]])  # the records it trained on, identity view
    assert len(list((tmp_path / "logits").glob("reference-features-*.npz"))) == 1  # no population: one array
    monkeypatch.setattr(ref_logits, "FEATURES_CACHE_BYTES", 0)  # too large to keep: recomputed, not cached
    again, _, _, _ = ref_logits.reference_features(ref_set, 2, (FLIP,), device="cpu", cache_dir=tmp_path)
    assert again.shape == (1, 64, weight.shape[1])
    assert len(list((tmp_path / "logits").glob("reference-features-*.npz"))) == 1


# --------------------------------------------------------------------------------------------- CLI


def test_cli_shard_then_merge(tiny_bundle, copy_bundle, tmp_path, capsys):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    common = ["references", "--bundle", str(root), "--victims", VICTIM, "--k", "2", "--epochs", "1",
              "--batch-size", "16", "--device", "cpu", "--quiet"]
    assert run_cli(parser.parse_args(common + ["--shard", "1/2"])) == 0
    out = capsys.readouterr().out
    assert "1 of 2 reference models complete" in out and "model 001: OUT accuracy" in out and "missing: [0]" in out
    assert run_cli(parser.parse_args(common + ["--merge-only"])) == 0
    assert "1 of 2 reference models complete" in capsys.readouterr().out
    assert run_cli(parser.parse_args(common)) == 0
    assert "2 of 2 reference models complete" in capsys.readouterr().out
    assert (root / "references" / VICTIM / "manifest.json").is_file()
    assert not (root / "references" / "resnet34_fashionmnist").exists()  # --victims


def test_population_size_reads_each_file_once_until_it_changes(tmp_path, monkeypatch):
    import mia.references.pool as pool_module

    _write_population(tmp_path / "pop" / "a.p", n=3)
    _write_population(tmp_path / "pop" / "b.p", n=2, with_membership=False)
    reads = []
    real = pool_module.load_population_file
    monkeypatch.setattr(pool_module, "load_population_file", lambda path, n: reads.append(path.name) or real(path, n))
    assert pool_module.population_size(tmp_path / "pop") == 5
    assert pool_module.population_size(tmp_path / "pop") == 5 and sorted(reads) == ["a.p", "b.p"]  # once each
    _write_population(tmp_path / "pop" / "b.p", n=4, with_membership=False)  # a new file: read again
    assert pool_module.population_size(tmp_path / "pop") == 7 and sorted(reads) == ["a.p", "b.p", "b.p"]
