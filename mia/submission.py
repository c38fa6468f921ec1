"""The submission: ``results/task{K}_<arch>_<dataset>.npy``, ``results/scores/``, ``results/plots/`` and
``result.json``, and their check.

Nothing is written before every victim was scored, and then the whole submission changes at once
(``mia.io.publish``: the new ``results/`` and result.json are staged inside the bundle, then swapped in
by renames; an interrupted write is completed or undone by the next one). Outputs go only to real
folders inside the bundle. ``result.json`` records the sha256 of every file it vouches for, which
``check_submission`` verifies, and holds no timestamps or timings: two runs on the same bundle write
identical bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from mia.config import ACCESS_LEVELS
from mia.errors import MIAError, SubmissionError
from mia.io import publish
from mia.io.atomic import atomic_save_npy
from mia.io.cache import cache_root
from mia.plots import FIGURE_KINDS

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
            "rmia_a": data.rmia_a,  # RMIA's offline a, tuned on eval (null without references)
            "reference_sanity": data.reference_sanity,  # each reference's held-out accuracy next to the victim's
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


def _own_outputs(name: str) -> re.Pattern:
    """The results/ paths (relative, with '/') of one victim's files, matched by its exact name: predictions
    and scores of any task, and its figures (``<name>_<access>_<kind>.png``)."""
    n = re.escape(name)
    kinds = "|".join(FIGURE_KINDS)
    access = "|".join(ACCESS_LEVELS)
    return re.compile(rf"(scores/)?task\d+_{n}\.npy|plots/{n}_({access})_({kinds})\.png")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _vouched_files(path: Path) -> dict:
    """The "files" map of an existing result.json ({} when there is none or it is unreadable)."""
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _stage_files(result, staging: Path, plots: bool) -> dict[str, Path]:
    """Write this run's figures, predictions and scores into ``staging`` (the future results/); returns
    them by path relative to results/."""
    from mia import plots as plotting  # matplotlib only when writing

    written: dict[str, Path] = {}
    if plots:
        cache = cache_root(result.config.cache_dir) if result.config.cache else None
        written.update(plotting.save_run_plots(result, staging / "plots", cache_dir=cache))
    for o in result.outcomes:
        written[o.file_name] = atomic_save_npy(staging / o.file_name, o.used.test_predictions.astype(np.int64))
        written[f"scores/{o.file_name}"] = atomic_save_npy(staging / "scores" / o.file_name,
                                                           chosen_test_scores(o.used))
    return written


def write_run(result, *, plots: bool | None = None) -> dict[str, Path]:
    """Write predictions, scores, plots and result.json into the bundle, all at once or not at all.

    The new ``results/`` tree is staged inside the bundle and swapped in (``mia.io.publish``): whatever
    stops the write leaves the earlier submission or the complete new one. Files of victims this run
    did not score are kept from the earlier ``results/``; a victim that failed this time (``--keep-going``)
    keeps none of its earlier files (matched by its exact name), since result.json lists the failure.
    result.json's ``files`` maps every file it vouches for to its sha256: all this run wrote, and the kept
    files whose sha256 the earlier result.json recorded. Returns the files this run wrote (not those kept).
    Raises SubmissionError when the results cannot be written (a link, a read-only folder, a full disk).
    """
    root = result.bundle.root
    doc = build_result_json(result)
    names = {v.name for v in result.bundle.victims}
    failed = [_own_outputs(name) for name in result.failures if name in names]
    try:
        with publish.lock(root):
            publish.recover(root)
            publish.check_targets(root)
            earlier = _vouched_files(root / "result.json")
            staging = publish.stage(root)
            try:
                written = _stage_files(result, staging, plots if plots is not None else result.config.plots)
                carried = publish.carry(root, staging, lambda rel: not any(p.fullmatch(rel) for p in failed))
                files = {f"results/{rel}": _sha256(staging / rel) for rel in written}
                for rel in carried:
                    digest = _sha256(staging / rel)
                    if earlier.get(f"results/{rel}") == digest:
                        files[f"results/{rel}"] = digest
                doc["files"] = dict(sorted(files.items()))
                text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
                publish.commit(root, staging, text.encode("utf-8"))
            except BaseException:
                with contextlib.suppress(Exception):  # what the next write would do: the old submission, or
                    publish.recover(root)            # the new one complete
                raise
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise SubmissionError(f"{root}: cannot write the submission: {e.strerror or e}{where}") from e
    results = root / "results"
    return {**{rel: results / rel for rel in written}, "result.json": root / "result.json"}


@dataclass
class CheckReport:
    """What ``check_submission`` found."""

    ok: list[str] = field(default_factory=list)  # one line per valid file
    errors: list[str] = field(default_factory=list)
    n_predictions: int = 0  # valid results/task*.npy files
    n_scores: int = 0  # valid results/scores/task*.npy files (their threshold gives the predictions)
    n_verified: int = 0  # files whose sha256 matches result.json's "files"


def _inside_results(rel) -> bool:
    """A "files" key that names a file under results/ (no absolute path, no '..')."""
    if not isinstance(rel, str) or "\\" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return len(parts) > 1 and parts[0] == "results" and ".." not in parts


def _verify_files(root: Path, files: dict) -> tuple[dict[str, str], int]:
    """(relative path -> problem, for every file of result.json's "files" that is missing or whose
    sha256 differs; how many match)."""
    problems, n_ok = {}, 0
    for rel, digest in files.items():
        path = root / str(rel)
        if not _inside_results(rel):
            problems[str(rel)] = "listed in result.json's files but not a path under results/"
        elif path.is_symlink() or not path.is_file():
            problems[rel] = "missing (result.json lists it)"
        elif _sha256(path) != digest:
            problems[rel] = "sha256 differs from result.json's (edited, or written by another run)"
        else:
            n_ok += 1
    return problems, n_ok


def _interrupted_write(root: Path) -> str | None:
    """A line on a write that was cut short in the middle of the swap (see mia.io.publish), or None."""
    results = root / "results"
    if (results / publish.PENDING).is_file():
        return (f"{results / publish.PENDING}: a write was interrupted while results/ and result.json were "
                "swapped; the next `mia run` completes it")
    if (root.is_dir() and not os.path.lexists(results)
            and any(p.name.startswith(publish.OLD_PREFIX) for p in root.iterdir())):
        return f"{results}: missing, a write was interrupted; the next `mia run` restores the earlier results/"
    return None


def check_submission(root: str | Path, tasks: tuple[int, ...] | None = None,
                     victims: set[str] | None = None, *, cache: bool = True,
                     cache_dir: str | Path | None = None) -> CheckReport:
    """Validate ``results/*.npy`` against the bundle's test files and result.json.

    For every test file ``datasets/test/<dataset>_<arch>.p`` and every task (from result.json's config
    when present, else 1, 2, 3) the file ``results/task{K}_<arch>_<dataset>.npy`` must exist and hold
    a 1-d integer array of 0/1 with one value per test record. ``victims`` (names ``<arch>_<dataset>``)
    limits the check to those. When result.json has a "files" map, every file it lists must have that
    sha256 and every prediction or scores file checked must be listed: a submission that mixes runs, or
    an edited file, is one error line per file. With ``cache``, test files are read through the records
    cache under ``cache_root(cache_dir)`` (mia.io.cache). Raises SubmissionError listing every problem;
    returns the report when
    all is well.
    """
    from mia.bundle import test_file_victims
    from mia.io.records import load_records

    root = Path(root)
    report = CheckReport()
    interrupted = _interrupted_write(root)
    if interrupted:
        report.errors.append(interrupted)
    for rel in (*publish.OUTPUT_FOLDERS, "result.json"):
        if (root / rel).is_symlink():
            report.errors.append(f"{rel}: a symbolic link; a submission holds only real files and folders")
    rj = root / "result.json"
    doc: dict = {}
    if rj.is_file():
        try:
            doc = json.loads(rj.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            doc = {}
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
    files = doc.get("files")
    if files is not None and not isinstance(files, dict):
        report.errors.append(f"{rj}: \"files\" is not a map of path to sha256")
        files = None
    integrity, report.n_verified = _verify_files(root, files) if files is not None else ({}, 0)

    def vouched(rel: str) -> list[str]:
        """The integrity problem of one file, taken from ``integrity`` so that it is reported once."""
        if files is not None and rel not in files:
            return ["not listed in result.json's files (written by another run?)"]
        return [integrity.pop(rel)] if rel in integrity else []

    test_files, problems = test_file_victims(root)
    report.errors += problems
    if not test_files:
        report.errors.append(f"{root / 'datasets' / 'test'}: no test files to check against")
    for tf, (dataset, arch) in test_files.items():
        name = f"{arch}_{dataset}"
        if victims is not None and name not in victims:
            continue
        try:
            n = len(load_records(tf, with_membership=False, cache_dir=cache_root(cache_dir) if cache else None))
        except MIAError as e:
            report.errors.append(str(e))
            continue
        for k in tasks:
            rel = f"results/task{k}_{name}.npy"
            path = root / rel
            if not path.is_file():
                integrity.pop(rel, None)
                report.errors.append(f"{rel}: missing")
                continue
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                report.errors.append("; ".join([f"{rel}: unreadable ({e})", *vouched(rel)]))
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
            problems += vouched(rel)
            if problems:
                report.errors.append(f"{rel}: " + "; ".join(problems))
                continue
            report.ok.append(f"{rel}: {n} predictions, {int(arr.sum())} members")
            report.n_predictions += 1
            entry = doc.get("tasks", {}).get(f"task{k}", {}).get(name) if isinstance(doc.get("tasks"), dict) else None
            if isinstance(entry, dict) and "scores_file" in entry:
                line = _check_scores(root, entry, arr)
                extra = vouched(str(entry["scores_file"]))
                if line.startswith("error: ") or extra:
                    report.errors.append("; ".join([line.removeprefix("error: "), *extra]))
                else:
                    report.ok.append(line)
                    report.n_scores += 1
            elif (root / f"results/scores/task{k}_{name}.npy").is_file():  # scores result.json has no task for
                rel = f"results/scores/task{k}_{name}.npy"
                report.errors += [f"{rel}: {problem}" for problem in vouched(rel)]
    report.errors += [f"{rel}: {problem}" for rel, problem in integrity.items()]
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
