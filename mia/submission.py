"""The submission: ``results/task{K}_<arch>_<dataset>.npy``, ``results/scores/``, ``results/plots/`` and
``result.json`` (their check: mia.check).

Nothing is written before every victim was scored, and then the whole submission changes at once
(``mia.io.publish``: the new ``results/`` and result.json are staged inside the bundle, then swapped in
by renames; an interrupted write is completed or undone by the next one). Outputs go only to real
folders inside the bundle. ``result.json`` records the sha256 of every file it vouches for, which
``mia.check.check_submission`` verifies, and holds no timestamps or timings: two runs on the same bundle write
identical bytes.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np

from mia.config import ACCESS_LEVELS
from mia.errors import SubmissionError
from mia.io import publish
from mia.io.atomic import atomic_save_npy
from mia.io.cache import cache_root, file_digest
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
            "cv": rep.cv, "test": sel.test_metrics,  # the submission's predictions and scores (None without a key)
            "scores_order": sel.ranking or sel.chosen,  # the candidate whose order the scores follow
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
            "rmia_a": data.rmia_a,  # RMIA's offline a, tuned on eval (null without references or when unused)
            "rmia_online": data.rmia_online,  # RMIA's p(x) from IN and OUT models (null: no record has both)
            "laplace_prior": data.laplace_prior,  # the Laplace attack's prior scale, tuned on eval (null: none)
            "reference_sanity": data.reference_sanity,  # each reference's held-out accuracy next to the victim's
            #   (and its kind: "off", or distilled from the victim's "posteriors" or "labels")
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
                files = {f"results/{rel}": file_digest(staging / rel) for rel in written}
                for rel in carried:
                    digest = file_digest(staging / rel)
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
