"""Find the victims of a challenge bundle.

A bundle is a directory laid out as the Trustworthy ML Challenge 2022 shipped it::

    models/<arch>_<dataset>.pth              victim weights
    models/{resnet34,vgg,mobilenetv2}.py     architecture files (optional; the repository's are the fallback)
    datasets/eval/<dataset>_<arch>.p         records [image, label, membership]
    datasets/test/<dataset>_<arch>.p         records [image, label]
    answers/<dataset>_<arch>.npy             test membership (optional; the demo bundle has it)

Every eval file must have its test file and its model; anything unmatched is an error (or, with
``strict=False``, a problem listed on the Bundle) rather than a victim silently skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mia.checkpoints import ARCHITECTURES
from mia.errors import BundleError

REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class Victim:
    """One victim model with its eval and test records."""

    arch: str  # "resnet34" | "vgg16" | "mobilenetv2"
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
    arch_dirs: list[Path]  # searched in order for resnet34.py, vgg.py, mobilenetv2.py
    problems: list[str] = field(default_factory=list)  # unmatched files (only with strict=False)

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def result_json(self) -> Path:
        return self.root / "result.json"

    def architecture_files(self) -> dict[str, Path]:
        """arch -> the architecture file that will be imported for it (code from the bundle runs!)."""
        used: dict[str, Path] = {}
        for arch in sorted({v.arch for v in self.victims}):
            spec = ARCHITECTURES[arch]
            for d in self.arch_dirs:
                if (d / spec.file).is_file():
                    used[arch] = d / spec.file
                    break
        return used


def parse_data_name(path: Path) -> tuple[str, str]:
    """``cifar10_resnet34.p`` -> ("cifar10", "resnet34"); the arch is the last ``_`` field."""
    stem = path.stem
    dataset, sep, arch = stem.rpartition("_")
    if not sep or not dataset or arch not in ARCHITECTURES:
        raise BundleError(
            f"{path}: file name does not parse as <dataset>_<arch>.p with arch in "
            f"{sorted(ARCHITECTURES)}"
        )
    return dataset, arch


def parse_model_name(path: Path) -> tuple[str, str]:
    """``resnet34_cifar10.pth`` -> ("resnet34", "cifar10"); the arch is the first ``_`` field."""
    arch, sep, dataset = path.stem.partition("_")
    if not sep or not dataset or arch not in ARCHITECTURES:
        raise BundleError(
            f"{path}: file name does not parse as <arch>_<dataset>.pth with arch in "
            f"{sorted(ARCHITECTURES)}"
        )
    return arch, dataset


def discover(root: str | Path, *, strict: bool = True, victims: list[str] | None = None) -> Bundle:
    """Find every victim of the bundle at ``root``.

    ``victims`` keeps only those names (``<arch>_<dataset>``). With ``strict`` (the default), any eval
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

    def parse_all(paths, parse):
        out = {}
        for p in sorted(paths):
            try:
                out[parse(p)] = p
            except BundleError as e:
                problems.append(str(e))
        return out

    evals = parse_all(eval_dir.glob("*.p"), parse_data_name)  # (dataset, arch) -> path
    tests = parse_all(test_dir.glob("*.p"), parse_data_name)
    models = {(d, a): p for (a, d), p in parse_all(models_dir.glob("*.pth"), parse_model_name).items()}

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
        names = {v.name for v in found}
        unknown = sorted(set(victims) - names)
        if unknown:
            raise BundleError(f"{root}: no victim named {', '.join(unknown)} (found: {', '.join(sorted(names)) or 'none'})")
        found = [v for v in found if v.name in set(victims)]
    if strict and problems:
        raise BundleError(f"{root}: " + "; ".join(problems))
    if not found:
        raise BundleError(f"{root}: no complete victim (model + eval + test) found" + (f"; {'; '.join(problems)}" if problems else ""))
    arch_dirs = [models_dir] if models_dir.resolve() != REPO_MODELS_DIR else []
    arch_dirs.append(REPO_MODELS_DIR)
    return Bundle(root=root, victims=found, arch_dirs=arch_dirs, problems=problems)
