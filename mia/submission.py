"""The submission: ``results/task{K}_<arch>_<dataset>.npy`` and ``result.json``, and their check.

Files are written atomically (temp file in the same folder, then rename), and only after every
victim was scored: a run that fails leaves an earlier ``results/`` and ``result.json`` untouched.
``result.json`` holds no timestamps or timings, so two runs on the same bundle write identical bytes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mia.errors import MIAError, SubmissionError
from mia.io.atomic import atomic_save_npy, atomic_write_text

SCHEMA_VERSION = 1


def package_version() -> str:
    from mia import __version__

    return __version__


def _json_safe(obj):
    """Non-finite floats -> "inf" / "-inf" / "nan" strings; numpy scalars -> python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isfinite(f):
            return f
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _selection_summary(sel) -> dict:
    rep = sel.chosen_report
    return {"attack": sel.chosen, "description": rep.description, "fit": rep.fit, "eval": rep.eval,
            "cv": rep.cv, "test": rep.test,
            "test_intervals": sel.test_intervals}  # bootstrap 95% intervals on test (None without answer key)


def build_result_json(result) -> dict:
    """The result.json document of a RunResult (see README.md for the schema)."""
    root = result.bundle.root
    victims = {}
    for name, data in result.victims.items():
        info = data.info
        if info.architecture_file is None:
            arch_file_shown = info.builder  # a torchvision constructor
        else:
            arch_file = Path(info.architecture_file)
            try:
                arch_file_shown = str(arch_file.relative_to(root))
            except ValueError:
                arch_file_shown = f"<repository>/mia/models/{arch_file.name}"
        victims[name] = {
            "arch": data.victim.arch,
            "dataset": data.victim.dataset,
            "num_classes": info.num_classes,
            "width": info.width,
            "architecture_file": arch_file_shown,
            "builder": info.builder,
            "n_parameters": info.n_parameters,
            "checkpoint_acc": info.checkpoint_acc,
            "checkpoint_epoch": info.epoch,
            "model_accuracy_on_eval": data.model_accuracy(),
            "n_eval": len(data.eval),
            "n_eval_members": int(data.eval.membership.sum()),
            "n_test": len(data.test),
            "has_answers": data.answers is not None,
            "views": data.view_names,
            "label_noise_queries": len(data.noise_levels),  # noisy queries per record for the label-only task
            "reference_models": data.n_reference_models,
        }
    tasks: dict[str, dict] = {}
    for o in result.outcomes:
        sel = o.used
        entry = {
            "access": o.task.access,
            "file": f"results/{o.file_name}",
            "scores_file": f"results/scores/{o.file_name}",  # float64, larger = more likely member
            "score_threshold": sel.score_threshold,  # member exactly when score >= it ("inf"/"-inf" in JSON)
            **_selection_summary(sel),
            "selection": sel.selection,
            "folds": sel.folds,
            "cv_repeats": sel.repeats,
            "expected_test_accuracy": (sel.chosen_report.cv or sel.chosen_report.eval)["accuracy"],
            "n_test": int(len(sel.test_predictions)),
            "n_test_predicted_members": int(sel.test_predictions.sum()),
            "seed_method": _selection_summary(o.seed),
            "candidates": [c.to_dict() for c in sel.candidates],
        }
        tasks.setdefault(f"task{o.task.task}", {})[o.victim] = entry
    return _json_safe({
        "schema_version": SCHEMA_VERSION,
        "package_version": package_version(),
        "bundle": root.name,
        "config": result.config.to_dict(),
        "victims": victims,
        "tasks": tasks,
        "failures": dict(sorted(result.failures.items())),
    })


def chosen_test_scores(selection) -> np.ndarray:
    """The chosen attack's float64 test scores, checked to give exactly its predictions at its threshold."""
    scores = np.asarray(selection.test_scores, dtype=np.float64)
    if not np.array_equal((scores >= selection.score_threshold).astype(np.int64), selection.test_predictions):
        raise SubmissionError(f"internal error: the scores of {selection.chosen} do not give its predictions "
                              f"at threshold {selection.score_threshold}")
    return scores


def write_run(result, *, plots: bool | None = None) -> dict[str, Path]:
    """Write predictions, result.json and (optionally) plots next to the bundle. Returns what was written."""
    from mia import plots as plotting  # matplotlib only when writing

    root = result.bundle.root
    results_dir = root / "results"
    doc = build_result_json(result)
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    written: dict[str, Path] = {}
    if plots if plots is not None else result.config.plots:  # figures first: a plotting error writes nothing else
        cache = root / ".cache" if result.config.cache else None
        written.update(plotting.save_run_plots(result, results_dir / "plots", cache_dir=cache))
    for o in result.outcomes:
        path = results_dir / o.file_name
        atomic_save_npy(path, o.used.test_predictions.astype(np.int64))
        written[o.file_name] = path
        scores_path = results_dir / "scores" / o.file_name
        atomic_save_npy(scores_path, chosen_test_scores(o.used))
        written[f"scores/{o.file_name}"] = scores_path
    # A victim that failed this time (--keep-going) must not keep an earlier run's predictions or figures:
    # the submission would mix runs without saying so. result.json lists the failure.
    for name in result.failures:
        if name in {v.name for v in result.bundle.victims}:
            for t in result.config.tasks:
                (results_dir / f"task{t.task}_{name}.npy").unlink(missing_ok=True)
                (results_dir / "scores" / f"task{t.task}_{name}.npy").unlink(missing_ok=True)
            for png in (results_dir / "plots").glob(f"{name}_*.png"):
                png.unlink(missing_ok=True)
    atomic_write_text(root / "result.json", text, durable=True)
    written["result.json"] = root / "result.json"
    return written


@dataclass
class CheckReport:
    """What ``check_submission`` found."""

    ok: list[str] = field(default_factory=list)  # one line per valid file
    errors: list[str] = field(default_factory=list)
    n_predictions: int = 0  # valid results/task*.npy files
    n_scores: int = 0  # valid results/scores/task*.npy files (their threshold gives the predictions)


def check_submission(root: str | Path, tasks: tuple[int, ...] | None = None,
                     victims: set[str] | None = None, *, cache: bool = True) -> CheckReport:
    """Validate ``results/*.npy`` against the bundle's test files.

    For every test file ``datasets/test/<dataset>_<arch>.p`` and every task (from result.json's config
    when present, else 1, 2, 3) the file ``results/task{K}_<arch>_<dataset>.npy`` must exist and hold
    a 1-d integer array of 0/1 with one value per test record. ``victims`` (names ``<arch>_<dataset>``)
    limits the check to those. With ``cache``, test files are read through the records cache under
    ``<root>/.cache`` (the run that wrote the predictions left them there). Raises SubmissionError listing every problem; returns the report when
    all is well.
    """
    from mia.bundle import test_file_victims
    from mia.io.records import load_records

    root = Path(root)
    report = CheckReport()
    rj = root / "result.json"
    doc: dict = {}
    if rj.is_file():
        try:
            doc = json.loads(rj.read_text())
        except ValueError as e:
            report.errors.append(f"{rj}: not a valid result.json ({e})")
    if tasks is None:
        tasks = (1, 2, 3)
        if rj.is_file():
            try:
                tasks = tuple(int(t["task"]) for t in doc["config"]["tasks"])
            except (KeyError, TypeError) as e:
                report.errors.append(f"{rj}: not a valid result.json ({e})")
        else:
            report.errors.append(f"{rj}: missing")
    test_files, problems = test_file_victims(root)
    report.errors += problems
    if not test_files:
        report.errors.append(f"{root / 'datasets' / 'test'}: no test files to check against")
    for tf, (dataset, arch) in test_files.items():
        name = f"{arch}_{dataset}"
        if victims is not None and name not in victims:
            continue
        try:
            n = len(load_records(tf, with_membership=False, cache_dir=root / ".cache" if cache else None))
        except MIAError as e:
            report.errors.append(str(e))
            continue
        for k in tasks:
            path = root / "results" / f"task{k}_{name}.npy"
            if not path.is_file():
                report.errors.append(f"{path.relative_to(root)}: missing")
                continue
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                report.errors.append(f"{path.relative_to(root)}: unreadable ({e})")
                continue
            problems = []
            if arr.ndim != 1:
                problems.append(f"shape {arr.shape}, expected ({n},)")
            elif len(arr) != n:
                problems.append(f"{len(arr)} predictions for {n} test records")
            if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                problems.append(f"dtype {arr.dtype}, expected integers")
            if arr.size and not np.isin(arr, (0, 1)).all():
                problems.append("values other than 0 and 1")
            if problems:
                report.errors.append(f"{path.relative_to(root)}: " + "; ".join(problems))
                continue
            report.ok.append(f"{path.relative_to(root)}: {n} predictions, {int(arr.sum())} members")
            report.n_predictions += 1
            entry = doc.get("tasks", {}).get(f"task{k}", {}).get(name) if isinstance(doc.get("tasks"), dict) else None
            if isinstance(entry, dict) and "scores_file" in entry:
                line = _check_scores(root, entry, arr)
                if line.startswith("error: "):
                    report.errors.append(line.removeprefix("error: "))
                else:
                    report.ok.append(line)
                    report.n_scores += 1
    if report.errors:
        raise SubmissionError("submission check failed:\n  " + "\n  ".join(report.errors))
    return report


def _check_scores(root: Path, entry: dict, predictions: np.ndarray) -> str:
    """One line on a task's scores file: float scores, one per test record, whose threshold in result.json
    gives exactly the predictions ("error: ..." when not)."""
    path = root / str(entry["scores_file"])
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        threshold = float(entry["score_threshold"])
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"error: {shown}: unreadable scores or threshold ({type(e).__name__}: {e})"
    if scores.shape != predictions.shape or not np.issubdtype(scores.dtype, np.floating):
        return f"error: {shown}: {scores.dtype} {scores.shape}, expected float64 {predictions.shape}"
    if np.isnan(scores).any():
        return f"error: {shown}: NaN scores"
    if not np.array_equal((scores >= threshold).astype(np.int64), predictions.astype(np.int64)):
        return f"error: {shown}: scores >= {threshold:g} do not give the predictions (a mixed or edited submission)"
    return f"{shown}: {len(scores)} scores, >= {threshold:g} gives the predictions"
