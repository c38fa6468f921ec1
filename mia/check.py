"""``mia check``: a submission validated against the bundle's test files and its own result.json.

Every prediction file must hold one 0/1 per test record, every scores file the float scores whose
threshold in result.json gives exactly those predictions, and every file result.json vouches for must
still have the sha256 it recorded (mia.submission writes them): a submission that mixes two runs, or
an edited file, is reported one line per file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from mia.errors import MIAError, SubmissionError
from mia.io import publish
from mia.io.cache import cache_root, file_digest

__all__ = ["CheckReport", "check_submission"]


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
        elif file_digest(path) != digest:
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
