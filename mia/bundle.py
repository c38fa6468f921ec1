"""Find the victims of a challenge bundle.

A bundle is a directory laid out as the Trustworthy ML Challenge 2022 shipped it::

    models/<arch>_<dataset>.pth              victim weights
    models/*.py                              architecture files (optional; see mia.models.registry)
    datasets/eval/<dataset>_<arch>.p         records [image, label, membership]
    datasets/test/<dataset>_<arch>.p         records [image, label]
    answers/<dataset>_<arch>.npy             test membership (optional; the demo bundle has it)

``arch`` is any name (``resnet34``, ``wrn28_2``): a victim is a model ``A_D.pth`` with data files
``D_A.p``, both names may contain ``_``. Every eval file must have its test file and its model;
anything unmatched is an error (or, with ``strict=False``, a problem listed on the Bundle) rather
than a victim silently skipped.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from mia.errors import BundleError
from mia.models.registry import REPO_ARCH_DIR, candidate_files


@dataclass(frozen=True)
class Victim:
    """One victim model with its eval and test records."""

    arch: str  # e.g. "resnet34", "vgg16", "mobilenetv2", or any name a bundle brings
    dataset: str  # e.g. "cifar10", "fashionmnist"
    checkpoint: Path  # models/<arch>_<dataset>.pth
    eval_path: Path  # datasets/eval/<dataset>_<arch>.p
    test_path: Path  # datasets/test/<dataset>_<arch>.p
    answers_path: Path | None  # answers/<dataset>_<arch>.npy when present

    @property
    def name(self) -> str:
        """``<arch>_<dataset>``, as in ``results/task1_<arch>_<dataset>.npy``."""
        return f"{self.arch}_{self.dataset}"


@dataclass
class Bundle:
    """The victims of a bundle and where their architecture files come from."""

    root: Path
    victims: list[Victim]
    arch_dirs: list[Path]  # the bundle's models/, then the repository's architecture files
    problems: list[str] = field(default_factory=list)  # unmatched files (only with strict=False)

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def result_json(self) -> Path:
        return self.root / "result.json"

    def architecture_files(self) -> dict[str, list[Path]]:
        """arch -> the architecture files builder discovery imports for it, in order (code runs!)."""
        return {arch: [path for _, path in candidate_files(arch, self.arch_dirs)]
                for arch in sorted({v.arch for v in self.victims})}


def _regular_files(folder: Path, suffix: str, problems: list[str], root: Path) -> dict[str, Path]:
    """stem -> path of the ``*suffix`` entries of ``folder`` that are regular files (a link to one counts).
    Anything else (a FIFO, a device, a folder) would hang or fail when read: it is a problem, never opened."""
    out = {}
    for p in sorted(folder.glob(f"*{suffix}")):
        if p.is_file():
            out[p.name[:-len(suffix)]] = p
        else:
            problems.append(f"{p.relative_to(root)}: not a regular file; only regular files are read")
    return out


def _splits(stem: str) -> list[tuple[str, str]]:
    """'a_b_c' -> [('a', 'b_c'), ('a_b', 'c')]: every split at an underscore into two non-empty names."""
    return [(stem[:i], stem[i + 1:]) for i, ch in enumerate(stem) if ch == "_" and 0 < i < len(stem) - 1]


def _pair_names(data_stems: set[str], model_stems: set[str], problems: list[str]
                ) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(data stem -> (dataset, arch), model stem -> (dataset, arch)) for every name that parses.

    A model ``A_D`` and a data file ``D_A`` belong together, for any split of the names at an
    underscore. Names without a partner are split at their last (data) or first (model) underscore,
    so that the unmatched victim can be named; names without an underscore do not parse."""
    by_data: dict[str, list[tuple[str, str, str]]] = {}
    for m in model_stems:
        for arch, dataset in _splits(m):
            by_data.setdefault(f"{dataset}_{arch}", []).append((dataset, arch, m))
    data_keys: dict[str, tuple[str, str]] = {}
    paired_models: dict[str, tuple[str, str]] = {}
    for stem in sorted(data_stems):
        found = by_data.get(stem, [])
        if len(found) > 1:
            problems.append(f"{stem}.p matches several models ({', '.join(sorted(f'{m}.pth' for *_, m in found))}); "
                            "rename them so that only one is <arch>_<dataset>.pth for it")
            continue
        if found:
            dataset, arch, m = found[0]
            data_keys[stem] = paired_models[m] = (dataset, arch)
            continue
        dataset, _, arch = stem.rpartition("_")
        if not dataset or not arch:
            problems.append(f"{stem}.p: file name does not parse as <dataset>_<arch>.p")
            continue
        data_keys[stem] = (dataset, arch)
    for m in sorted(model_stems - set(paired_models)):
        arch, _, dataset = m.partition("_")
        if not dataset or not arch:
            problems.append(f"{m}.pth: file name does not parse as <arch>_<dataset>.pth")
            continue
        paired_models[m] = (dataset, arch)
    return data_keys, paired_models


def test_file_victims(root: str | Path) -> tuple[dict[Path, tuple[str, str]], list[str]]:
    """``datasets/test/*.p`` -> (dataset, arch), named as ``discover`` names them (paired with the
    models in ``models/`` where there are any), and the names that do not parse. For checking a
    submission, which needs only the test files."""
    root = Path(root)
    problems: list[str] = []
    tests = _regular_files(root / "datasets" / "test", ".p", problems, root)
    models = set(_regular_files(root / "models", ".pth", problems, root)) if (root / "models").is_dir() else set()
    keys, _ = _pair_names(set(tests), models, problems)
    return {tests[s]: keys[s] for s in sorted(keys)}, problems


def select_victims(names: list[str], wanted: list[str], root: str | Path = "") -> list[str]:
    """The names of ``names`` that ``wanted`` asks for, in the order of ``names``.

    A wanted name without ``*``, ``?`` or ``[`` must equal a victim's name exactly; one with them is a
    glob (``resnet34_*``), expanded here once against ``names``. A name or pattern that matches nothing
    is a BundleError naming it and the victims found."""
    chosen: set[str] = set()
    unmatched = []
    for want in wanted:
        glob = any(c in want for c in "*?[")
        hits = [n for n in names if (fnmatch.fnmatchcase(n, want) if glob else n == want)]
        if not hits:
            unmatched.append(want)
        chosen.update(hits)
    if unmatched:
        raise BundleError(f"{root}: no victim named or matching {', '.join(unmatched)} "
                          f"(found: {', '.join(sorted(names)) or 'none'})")
    return [n for n in names if n in chosen]


def discover(root: str | Path, *, strict: bool = True, victims: list[str] | None = None) -> Bundle:
    """Find every victim of the bundle at ``root``.

    ``victims`` keeps only those names (``<arch>_<dataset>``, or globs: see ``select_victims``). With ``strict`` (the default), any eval
    file without its test file or model, any test file or model without its eval file, and any file
    name that does not parse raise a BundleError listing all of them; otherwise they are kept in
    ``Bundle.problems`` and the complete victims are returned.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    eval_dir, test_dir, models_dir = root / "datasets" / "eval", root / "datasets" / "test", root / "models"
    for d in (eval_dir, test_dir, models_dir):
        if not d.is_dir():
            raise BundleError(f"{root}: missing {d.relative_to(root)}/ (expected the challenge layout)")

    problems: list[str] = []

    eval_files, test_files, model_files = (_regular_files(eval_dir, ".p", problems, root),
                                           _regular_files(test_dir, ".p", problems, root),
                                           _regular_files(models_dir, ".pth", problems, root))
    data_keys, model_keys = _pair_names(set(eval_files) | set(test_files), set(model_files), problems)
    evals = {data_keys[s]: p for s, p in eval_files.items() if s in data_keys}  # (dataset, arch) -> path
    tests = {data_keys[s]: p for s, p in test_files.items() if s in data_keys}
    models = {model_keys[s]: p for s, p in model_files.items() if s in model_keys}

    found: list[Victim] = []
    for key in sorted(set(evals) | set(tests) | set(models)):
        dataset, arch = key
        missing = [what for what, table in (("eval file", evals), ("test file", tests), ("model", models)) if key not in table]
        if missing:
            have = [str(t[key].relative_to(root)) for t in (evals, tests, models) if key in t]
            problems.append(f"{arch}_{dataset}: {', '.join(have)} without its {' and '.join(missing)}")
            continue
        answers = root / "answers" / f"{dataset}_{arch}.npy"
        found.append(
            Victim(arch, dataset, models[key], evals[key], tests[key], answers if answers.is_file() else None)
        )

    if victims is not None:
        keep = set(select_victims([v.name for v in found], list(victims), root))
        found = [v for v in found if v.name in keep]
    if strict and problems:
        raise BundleError(f"{root}: " + "; ".join(problems))
    if not found:
        raise BundleError(f"{root}: no complete victim (model + eval + test) found" + (f"; {'; '.join(problems)}" if problems else ""))
    arch_dirs = [models_dir] if models_dir.resolve() != REPO_ARCH_DIR else []
    arch_dirs.append(REPO_ARCH_DIR)
    return Bundle(root=root, victims=found, arch_dirs=arch_dirs, problems=problems)
