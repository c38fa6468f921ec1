"""mia.pipeline + mia.submission on the tiny demo bundle: outcomes, files, schema, reproducibility, failures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mia
from mia import attacks
from mia.check import check_submission
from mia.cli import main
from mia.config import RunConfig
from mia.core import signals as sig
from mia.core import thresholds
from mia.errors import MIAError, SubmissionError
from mia.io.cache import cached_arrays, file_digest
from mia.io.records import RECORDS_CACHE_FORMAT, load_records
from mia.models.loading import load_victim_model
from mia.pipeline import attack_victim, label_noise_queries, run
from mia.scoring import IDENTITY, compute_logits
from mia.submission import build_result_json, write_run

VICTIMS = ["mobilenetv2_fashionmnist", "resnet34_fashionmnist", "vgg16_fashionmnist"]
TASKS = [1, 2, 3]


def _quiet(*_args) -> None:
    pass


def _outputs(root: Path) -> dict[str, bytes]:
    """Bytes of everything a run wrote (result.json and results/**), by relative path."""
    files = [root / "result.json"] + sorted(p for p in (root / "results").rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def _outcome(result, task: int, victim: str):
    return next(o for o in result.outcomes if o.task.task == task and o.victim == victim)


@pytest.fixture(scope="module")
def two_runs(tiny_bundle, copy_bundle, tmp_path_factory):
    """The default (strong) run twice on one copy of the tiny bundle, written after each run.

    The first run computes the logits, the second finds them in the cache (a folder of its own, so other
    tests' entries for the same content never make the first run warm)."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("pipeline") / "bundle")
    config = RunConfig(plots=False, cache_dir=str(tmp_path_factory.mktemp("pipeline-cache")))
    first = run(root, config, progress=False, log=_quiet)
    write_run(first)
    first_files = _outputs(root)
    second = run(root, config, progress=False, log=_quiet)
    write_run(second)
    second_files = _outputs(root)
    return SimpleNamespace(root=root, config=config, first=first, second=second, first_files=first_files,
                           second_files=second_files)


# ---------------------------------------------------------------------------------------------
# One run and its files


def test_outcomes_for_every_task_and_victim(two_runs):
    result = two_runs.first
    assert result.failures == {}
    assert sorted(result.victims) == VICTIMS
    assert sorted((o.task.task, o.victim) for o in result.outcomes) == [(t, v) for t in TASKS for v in VICTIMS]
    for o in result.outcomes:
        data = result.victims[o.victim]
        assert o.task.access == ("label" if o.task.task == 3 else "posterior")
        assert o.used.selection == "cv" and o.seed.selection == "in_sample"
        assert o.used.test_predictions.shape == (len(data.test),)
        assert set(np.unique(o.used.test_predictions)) <= {0, 1}
        assert o.file_name == f"task{o.task.task}_{o.victim}.npy"
    data = result.victims["vgg16_fashionmnist"]
    assert data.eval_logits.shape == (10, 32, 10) and data.test_logits.shape == (10, 32, 10)
    assert data.view_names[:2] == ["id", "flip"]


def test_write_run_writes_int_predictions(two_runs):
    root = two_runs.root
    files = sorted(p.name for p in (root / "results").glob("*.npy"))
    assert files == sorted(f"task{t}_{v}.npy" for t in TASKS for v in VICTIMS)
    for t in TASKS:
        for v in VICTIMS:
            arr = np.load(root / "results" / f"task{t}_{v}.npy", allow_pickle=False)
            arch = v.split("_")[0]
            n_test = len(load_records(root / "datasets" / "test" / f"fashionmnist_{arch}.p", with_membership=False))
            assert arr.shape == (n_test,)
            assert np.issubdtype(arr.dtype, np.integer)
            assert set(np.unique(arr).tolist()) <= {0, 1}
            np.testing.assert_array_equal(arr, _outcome(two_runs.second, t, v).used.test_predictions)
    assert not (root / "results" / "plots").exists()  # plots=False


def test_result_json_schema(two_runs):
    text = (two_runs.root / "result.json").read_text()

    def no_constants(name):
        raise AssertionError(f"result.json holds {name}: not strict JSON")

    doc = json.loads(text, parse_constant=no_constants)
    assert {"schema_version", "package_version", "config", "victims", "tasks", "failures"} <= set(doc)
    assert doc["schema_version"] == 1 and doc["package_version"] == mia.__version__
    assert doc["config"] == json.loads(json.dumps(two_runs.config.to_dict()))
    assert doc["config"]["tasks"] == [{"task": 1, "access": "posterior"}, {"task": 2, "access": "posterior"},
                                      {"task": 3, "access": "label"}]
    assert doc["failures"] == {}
    assert sorted(doc["victims"]) == VICTIMS
    for name, v in doc["victims"].items():
        assert v["n_eval"] == 32 and v["n_test"] == 32 and v["num_classes"] == 10
        assert v["has_answers"] is True
        assert v["architecture_file"].startswith("models/")  # the bundle's own architecture file
    assert sorted(doc["tasks"]) == ["task1", "task2", "task3"]
    for t in TASKS:
        entries = doc["tasks"][f"task{t}"]
        assert sorted(entries) == VICTIMS
        for v, e in entries.items():
            assert {"access", "file", "attack", "fit", "eval", "cv", "test", "seed_method", "candidates",
                    "expected_test_accuracy"} <= set(e)
            assert e["access"] == ("label" if t == 3 else "posterior")
            assert e["file"] == f"results/task{t}_{v}.npy"
            assert e["expected_test_accuracy"] == e["cv"]["accuracy"]
            assert 0.0 <= e["test"]["accuracy"] <= 1.0  # the demo bundle has an answer key
            assert e["attack"] in [c["name"] for c in e["candidates"]]
            assert {"attack", "fit", "eval", "test"} <= set(e["seed_method"])
            seed_names = [c.name for c in (attacks.SEED_LABEL_ONLY if t == 3 else attacks.SEED_POSTERIOR)]
            assert e["seed_method"]["attack"] in seed_names
            assert e["n_test"] == 32


def test_check_submission_accepts_the_run(two_runs):
    report = check_submission(two_runs.root)
    assert len(report.ok) == 18 and report.errors == []  # 9 prediction files and their 9 scores files
    doc = json.loads((two_runs.root / "result.json").read_text())
    for task, victims in doc["tasks"].items():
        for name, entry in victims.items():
            scores = np.load(two_runs.root / entry["scores_file"])
            predictions = np.load(two_runs.root / entry["file"])
            assert scores.dtype == np.float64 and scores.shape == predictions.shape
            np.testing.assert_array_equal((scores >= float(entry["score_threshold"])).astype(np.int64), predictions)


def test_check_submission_detects_scores_that_do_not_give_the_predictions(two_runs, tmp_path):
    root = _submission_copy(two_runs.root, tmp_path / "b")
    path = root / "results" / "scores" / "task1_vgg16_fashionmnist.npy"
    scores = np.load(path)
    np.save(path, -scores)  # scores of another run (or edited): ranking reversed
    with pytest.raises(SubmissionError, match=r"task1_vgg16_fashionmnist.npy: scores >= .* do not give the predictions"):
        check_submission(root)
    np.save(path, scores.astype(np.int64))
    with pytest.raises(SubmissionError, match="expected float64"):
        check_submission(root)


def _submission_copy(src: Path, dst: Path) -> Path:
    """Just what check_submission reads: test files, results/ and result.json."""
    shutil.copytree(src / "datasets" / "test", dst / "datasets" / "test")
    shutil.copytree(src / "results", dst / "results")
    shutil.copyfile(src / "result.json", dst / "result.json")
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        (None, "missing"),
        (np.zeros(31, dtype=np.int64), "31 predictions for 32 test records"),
        (np.zeros(32, dtype=np.float64), "dtype float64"),
        (np.r_[np.zeros(31, np.int64), 2], "values other than 0 and 1"),
        (np.zeros((32, 1), dtype=np.int64), "shape (32, 1)"),
    ],
    ids=["missing", "length", "float", "value-2", "2d"],
)
def test_check_submission_rejects(two_runs, tmp_path, damage, message):
    root = _submission_copy(two_runs.root, tmp_path / "b")
    target = root / "results" / "task2_resnet34_fashionmnist.npy"
    if damage is None:
        target.unlink()
    else:
        np.save(target, damage)
    with pytest.raises(SubmissionError) as err:
        check_submission(root)
    lines = [line for line in str(err.value).splitlines() if "task" in line]
    assert len(lines) == 1  # only the damaged file is reported
    assert "results/task2_resnet34_fashionmnist.npy" in lines[0] and message in lines[0]


def test_check_submission_without_result_json(two_runs, tmp_path):
    root = _submission_copy(two_runs.root, tmp_path / "b")
    (root / "result.json").unlink()
    with pytest.raises(SubmissionError, match="result.json: missing"):
        check_submission(root)
    assert len(check_submission(root, tasks=(1, 2, 3)).ok) == 9


# ---------------------------------------------------------------------------------------------
# Cache and reproducibility


def test_second_run_uses_the_cache(two_runs):
    assert {n: d.cache_hits for n, d in two_runs.first.victims.items()} == {n: 0 for n in VICTIMS}
    assert {n: d.cache_hits for n, d in two_runs.second.victims.items()} == {n: 2 for n in VICTIMS}
    for a in two_runs.first.outcomes:
        b = _outcome(two_runs.second, a.task.task, a.victim)
        assert a.used.chosen == b.used.chosen
        np.testing.assert_array_equal(a.used.test_predictions, b.used.test_predictions)
    for name, data in two_runs.first.victims.items():
        np.testing.assert_array_equal(data.eval_logits, two_runs.second.victims[name].eval_logits)


def test_a_bundles_own_cache_is_never_read(two_runs, copy_bundle, tmp_path):
    """Issue 16: a bundle shipping ``.cache/records/`` entries (16 records for each 32-record file, zeroed
    images, described as genuine entries would be) changes nothing: the run scores 32 records of the real
    images and writes 32 predictions, and check counts 32."""
    root = copy_bundle(two_runs.root, tmp_path / "bundle")
    for kind in ("eval", "test"):
        for path in sorted((root / "datasets" / kind).glob("*.p")):
            recs = load_records(path, with_membership=kind == "eval")
            arrays = {"images": np.zeros_like(recs.images[:16]), "labels": recs.labels[:16]}
            if kind == "eval":
                arrays["membership"] = np.tile([0, 1], 8).astype(np.int64)
            claims = {"source_sha256": file_digest(path), "kind": kind, "format": RECORDS_CACHE_FORMAT}
            for version in (1, RECORDS_CACHE_FORMAT):  # the name the audit used, and today's
                entry = root / ".cache" / "records" / f"{file_digest(path)[:32]}-{kind}-v{version}.npz"
                cached_arrays(entry, lambda: arrays, lambda a: True, claims)
    config = RunConfig(method="seed", plots=False, victims=("vgg16_fashionmnist",), cache_dir=two_runs.config.cache_dir)
    result = run(root, config, progress=False, log=_quiet)
    data = result.victims["vgg16_fashionmnist"]
    assert len(data.eval) == len(data.test) == 32 and np.abs(data.eval.images).sum() > 0
    np.testing.assert_array_equal(data.eval.images, load_records(data.victim.eval_path, with_membership=True).images)
    assert {o.used.test_predictions.shape for o in result.outcomes} == {(32,)}
    write_run(result)
    report = check_submission(root, victims={"vgg16_fashionmnist"})
    assert report.n_predictions == 3 and all("32 predictions" in line for line in report.ok if "scores" not in line)
    short = root / "results" / "task1_vgg16_fashionmnist.npy"
    np.save(short, np.load(short)[:16])
    with pytest.raises(SubmissionError, match="16 predictions for 32 test records"):
        check_submission(root, victims={"vgg16_fashionmnist"})


def test_runs_write_identical_bytes(two_runs):
    first, second = two_runs.first_files, two_runs.second_files
    assert sorted(first) == sorted(second) and len(first) == 19  # result.json + 9 predictions + 9 scores
    for rel in first:
        assert first[rel] == second[rel], rel
    # and the document does not depend on the run either
    assert build_result_json(two_runs.first) == build_result_json(two_runs.second)


def test_logits_match_a_fresh_forward_pass(two_runs):
    bundle = two_runs.first.bundle
    data = two_runs.first.victims["resnet34_fashionmnist"]
    model, _ = load_victim_model(data.victim.arch, data.victim.checkpoint, bundle.arch_dirs)
    fresh = compute_logits(model, data.test.images, (IDENTITY,), device="cpu", batch_size=7)
    np.testing.assert_allclose(fresh[0], data.test_logits[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The seed's method and the access levels


def test_seed_method_reproduced_by_hand(two_runs):
    result = run(two_runs.root, RunConfig(method="seed", plots=False, cache_dir=two_runs.config.cache_dir), progress=False, log=_quiet)
    assert {d.cache_hits for d in result.victims.values()} == {2}
    for name, data in result.victims.items():
        m, ev, te = data.eval.membership, data.eval_logits[0], data.test_logits[0]
        # task 1: the best of the four seed signals by in-sample eval accuracy (first one on ties),
        # its best global threshold on eval, applied to test
        best = None
        for s in sig.SEED_SIGNALS:
            sw = thresholds.sweep(sig.SIGNALS[s](ev, data.eval.labels), m)
            if best is None or sw.best_accuracy > best[1]:
                best = (s, sw.best_accuracy, sw.best_threshold)
        expected = thresholds.predict(sig.SIGNALS[best[0]](te, data.test.labels), best[2])
        task1 = _outcome(result, 1, name).used
        assert task1.chosen == best[0]
        assert task1.chosen_report.eval["accuracy"] == pytest.approx(best[1])
        np.testing.assert_array_equal(task1.test_predictions, expected)
        np.testing.assert_array_equal(_outcome(result, 2, name).used.test_predictions, expected)
        # task 3: member exactly when the identity view is classified correctly
        task3 = _outcome(result, 3, name).used
        np.testing.assert_array_equal(task3.test_predictions, (te.argmax(-1) == data.test.labels).astype(np.int64))
        # in the strong run the seed's method is kept as the baseline, with the same predictions
        baseline = _outcome(two_runs.first, 1, name).seed
        np.testing.assert_array_equal(baseline.test_predictions, expected)


def test_label_task_sees_only_integer_labels(two_runs, monkeypatch):
    data = two_runs.first.victims["vgg16_fashionmnist"]
    seen = []
    real = attacks.label_only_features

    def recording(predicted, labels, noise_predicted=None, noise_levels=None):
        seen.append((np.asarray(predicted), np.asarray(noise_predicted)))
        return real(predicted, labels, noise_predicted, noise_levels)

    def no_posteriors(*_args, **_kwargs):
        raise AssertionError("a label-only task computed posterior features")

    monkeypatch.setattr(attacks, "label_only_features", recording)
    monkeypatch.setattr(attacks, "posterior_features", no_posteriors)
    (outcome,) = attack_victim(data, RunConfig.with_tasks({3: "label"}))
    assert len(seen) == 2  # eval and test
    queries = 2 * RunConfig().label_noise_draws * len(RunConfig().label_noise)
    for predicted, noisy in seen:
        assert np.issubdtype(predicted.dtype, np.integer) and np.issubdtype(noisy.dtype, np.integer)
        assert predicted.ndim == 2 and predicted.shape[0] == len(data.view_names)
        assert noisy.shape == (queries, predicted.shape[1])
    assert set(outcome.eval_features) == {"correctness", "aug_correct_count", "noise_correct", "sigma0.1_correct",
                                          "sigma0.15_correct"}
    assert outcome.used.chosen in {c.name for c in attacks.strong_label_only_candidates(list(outcome.eval_features))}


def test_noisy_queries_match_a_fresh_forward_pass(two_runs):
    bundle = two_runs.first.bundle
    data = two_runs.first.victims["mobilenetv2_fashionmnist"]
    config = RunConfig()
    queries, levels = label_noise_queries(data.eval.images, config)
    assert levels == data.noise_levels and len(queries) == data.test_noise_labels.shape[0]
    scale = float(np.std(data.eval.images, dtype=np.float64))
    assert [v.noise for v in queries[:: 2 * config.label_noise_draws]] == pytest.approx(
        [s * scale for s in config.label_noise], rel=1e-3)
    assert data.noise_levels == [s for s in config.label_noise for _ in range(2 * config.label_noise_draws)]
    model, _ = load_victim_model(data.victim.arch, data.victim.checkpoint, bundle.arch_dirs)
    logits = compute_logits(model, data.test.images, queries, device="cpu", batch_size=5)
    agree = (logits.argmax(-1) == data.test_noise_labels).mean()
    assert agree > 0.999  # another batch size: float rounding may flip a near-tie, rarely
    # the second run read them from the cache
    np.testing.assert_array_equal(two_runs.second.victims[data.victim.name].test_noise_labels, data.test_noise_labels)


def test_noisy_queries_only_for_label_tasks(two_runs):
    config = RunConfig.with_tasks({1: "posterior"}, plots=False, victims=("vgg16_fashionmnist",),
                                  cache_dir=two_runs.config.cache_dir)
    result = run(two_runs.root, config, progress=False, log=_quiet)
    data = result.victims["vgg16_fashionmnist"]
    assert data.eval_noise_labels is None and data.noise_levels == []
    config = RunConfig.with_tasks({3: "label"}, plots=False, victims=("vgg16_fashionmnist",), label_noise=(),
                                  cache_dir=two_runs.config.cache_dir)
    result = run(two_runs.root, config, progress=False, log=_quiet)
    (outcome,) = result.outcomes
    assert "noise_correct" not in outcome.eval_features and result.victims["vgg16_fashionmnist"].test_noise_labels is None


def test_task_access_can_be_changed(two_runs):
    config = RunConfig.with_tasks({1: "posterior", 3: "posterior"}, plots=False, victims=("vgg16_fashionmnist",),
                                  cache_dir=two_runs.config.cache_dir)
    result = run(two_runs.root, config, progress=False, log=_quiet)
    assert sorted(result.victims) == ["vgg16_fashionmnist"]
    t1, t3 = _outcome(result, 1, "vgg16_fashionmnist"), _outcome(result, 3, "vgg16_fashionmnist")
    assert t3.task.access == "posterior"
    assert "logreg" in [c.name for c in t3.used.candidates]
    assert t3.seed.chosen in sig.SEED_SIGNALS
    np.testing.assert_array_equal(t3.used.test_predictions, t1.used.test_predictions)
    doc = build_result_json(result)
    assert doc["tasks"]["task3"]["vgg16_fashionmnist"]["access"] == "posterior"
    assert sorted(doc["tasks"]) == ["task1", "task3"]


def test_run_config_validation():
    with pytest.raises(ValueError):
        RunConfig.with_tasks({3: "probabilities"})
    with pytest.raises(ValueError):
        RunConfig(method="best")
    with pytest.raises(ValueError):
        RunConfig(folds=1)
    with pytest.raises(ValueError, match="reference_views"):
        RunConfig(reference_views="all")
    with pytest.raises(ValueError, match="label_noise"):
        RunConfig(label_noise=(0.1, 0.0))
    with pytest.raises(ValueError, match="label_noise_draws"):
        RunConfig(label_noise_draws=0)
    assert RunConfig(label_noise=[0.2]).to_dict()["label_noise"] == [0.2]


# ---------------------------------------------------------------------------------------------
# Failures


@pytest.mark.slow
def test_failing_victim_leaves_earlier_results_untouched(tiny_bundle, copy_bundle, tmp_path, capsys):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    args = ["run", "--bundle", str(root), "--quiet", "--no-plots", "--method", "seed"]
    assert main(args) == 0
    before = _outputs(root)
    assert len(before) == 19  # result.json, 9 predictions, 9 scores
    capsys.readouterr()

    bad = root / "datasets" / "eval" / "fashionmnist_vgg16.p"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(MIAError, match="fashionmnist_vgg16.p"):
        run(root, RunConfig(method="seed", plots=False), progress=False, log=_quiet)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fashionmnist_vgg16.p" in err
    assert _outputs(root) == before  # nothing written: not even the victims that did succeed

    # --keep-going: the other victims are written, the failure is listed, and the failed victim's
    # predictions from the earlier run are removed rather than left to mix with this run's
    assert (root / "results" / "task1_vgg16_fashionmnist.npy").is_file()
    assert main(args + ["--keep-going"]) == 1
    err = capsys.readouterr().err
    assert "vgg16_fashionmnist" in err
    doc = json.loads((root / "result.json").read_text())
    assert list(doc["failures"]) == ["vgg16_fashionmnist"]
    assert "fashionmnist_vgg16.p" in doc["failures"]["vgg16_fashionmnist"]
    assert sorted(doc["victims"]) == VICTIMS[:2]
    written = sorted(p.name for p in (root / "results").glob("*.npy"))
    assert written == sorted(f"task{t}_{v}.npy" for t in TASKS for v in VICTIMS[:2])
    with pytest.raises(SubmissionError, match="task1_vgg16_fashionmnist.npy: missing"):
        check_submission(root)


def test_run_config_selection_fields_are_validated_and_json_safe():
    import json

    d = RunConfig().to_dict()
    assert d["cv_repeats"] == 5 and d["class_shrinkage"][-1] == "inf" and d["bootstrap_resamples"] == 1000
    json.dumps(d, allow_nan=False)
    assert RunConfig(class_shrinkage=d["class_shrinkage"]).class_shrinkage == RunConfig().class_shrinkage
    for bad in (dict(cv_repeats=0), dict(class_shrinkage=()), dict(class_shrinkage=(-1.0,)),
                dict(bootstrap_resamples=-1)):
        with pytest.raises(ValueError):
            RunConfig(**bad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reference_models_answer_in_the_runs_precision(tiny_bundle, tmp_path, monkeypatch, precision):
    # the reference models' logits are computed (and cached) in the precision the victim is scored in
    import mia.references.attacks as reference_attacks

    seen = []
    monkeypatch.setattr(reference_attacks, "victim_reference_features",
                        lambda root, victim, answers, options: seen.append(options) or None)
    monkeypatch.setattr("mia.references.auto.train_missing_references", lambda *args, **kwargs: False)
    run(tiny_bundle, RunConfig(victims=("vgg16_fashionmnist",), plots=False, label_noise=(), views="identity",
                               precision=precision, cache_dir=str(tmp_path / "cache")), progress=False, log=None)
    assert [o.precision for o in seen] == [precision]
