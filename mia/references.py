"""Reference models of a victim: same architecture, trained on random halves of a known pool.

Reference-model attacks (LiRA, RMIA; see mia.reference_attacks) compare the victim's behaviour on a
record with that of models known to have trained on it (IN) and models known not to have (OUT).
This module trains those models, keeps track of which record each one saw, and computes their
logits.

The pool is every record whose label is known: the victim's eval records, then its test records,
then (optionally) population records from a folder of ``.p`` files. Record ``i`` of the eval file is
pool index ``i``; record ``i`` of the test file is pool index ``n_eval + i``.

Masks: ``masks[j, i]`` is True when model ``j`` trains on pool record ``i``. As in LiRA (Carlini et
al. 2022), every record is IN for exactly ``k/2`` models, a uniformly random subset drawn per record,
so each record has ``k/2`` IN and ``k/2`` OUT models. The masks depend only on (seed, k, pool size).

Layout, under ``<bundle>/references/<victim.name>/``::

    manifest.json        recipe, pool (sizes, sha256 of every source file and of the victim
                         checkpoint), fingerprint, per-model accuracy, complete and missing models
    masks.npy            (k, N_pool) bool
    model_{j:03d}.pth    {'net', 'acc', 'epoch'} (mia.io.checkpoints.save_checkpoint; 'acc' = OUT accuracy %)
    model_{j:03d}.json   accuracy on its IN and OUT records, seconds, device, fingerprint
    logits/              cached reference logits (.npy), keyed by content

A model is complete when its ``.pth`` and its ``.json`` (written second, both atomically) exist and
the ``.json`` carries the folder's fingerprint. The folder, not the manifest, is the truth: every
call rebuilds ``manifest.json`` from the per-model files. Hence

* resume: a run stopped after 5 of 8 models keeps those 5; the next call trains the other 3;
* shards: ``shard=(i, n)`` trains only models ``j`` with ``j % n == i``, so n processes (a job array,
  several GPUs) can fill one folder, separately or at the same time; any later call merges;
* a call whose recipe or pool differs from the folder's (other epochs, other k, changed eval file,
  ...) raises MIAError instead of mixing models of different recipes.

Model ``j`` is seeded from (seed, j) alone, so on the CPU a model's weights do not depend on which
shard or which run trained it (bitwise, for one torch version and thread count: parallel float
reductions differ with the number of threads). On CUDA training runs in bf16 autocast (not bitwise reproducible).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mia.io.atomic import atomic_save_npy, atomic_write_text
from mia.bundle import Victim
from mia.io.checkpoints import load_state_dict, save_checkpoint
from mia.io.records import Records, load_records, records_from_objects
from mia.io.unpickler import safe_load_pickle
from mia.errors import MIAError
from mia.models.loading import load_into
from mia.models.discovery import Architecture, discover_architecture
from mia.models.registry import REPO_ARCH_DIR
from mia.io.cache import file_digest
from mia.devices import resolve_device
from mia.scoring import IDENTITY, View, compute_logits
from mia.training import TrainRecipe, train_classifier

__all__ = [
    "REFERENCES_FORMAT",
    "Pool",
    "ReferenceRecipe",
    "ReferenceSet",
    "add_parser",
    "default_arch_dirs",
    "load_pool",
    "load_reference_set",
    "make_masks",
    "parse_shard",
    "reference_logits",
    "references_folder",
    "run_cli",
    "train_references",
    "views_from_names",
]

REFERENCES_FORMAT = 1  # bump when a change makes existing reference folders incompatible
LOGITS_FORMAT = 1  # bump when cached reference logits would change
_MASK_TAG = 0x6D61736B  # "mask": separates the mask stream from the model seeds
_MODEL_TAG = 0x6D6F646C  # "modl"


# --------------------------------------------------------------------------------------------------
# Recipe


@dataclass(frozen=True)
class ReferenceRecipe:
    """How reference models are trained. Every field but ``device`` is part of the fingerprint."""

    k: int = 8  # number of reference models; even, each record is IN for exactly k/2 of them
    epochs: int = 15  # training epochs per model
    batch_size: int = 128  # SGD batch size
    lr: float = 0.05  # peak learning rate; cosine decay to 0 per step over all epochs
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    augment: bool = True  # random horizontal flip + random crop of the image zero-padded by `pad`
    pad: int = 4  # padding (pixels) of the random crop; 0 = flips only
    seed: int = 0  # masks and every model's initialisation, batch order and augmentation
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"; not fingerprinted
    width: int | None = None  # model width; None: the victim's width (read from its weights)

    def validate(self) -> None:
        """Raise MIAError on a recipe that cannot be trained."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2 or self.k % 2:
            raise MIAError(f"k must be an even number >= 2 (each record is IN for exactly k/2 models), got {self.k!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise MIAError(f"epochs >= 1 and batch_size >= 2 are required, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise MIAError("lr > 0, weight_decay >= 0 and 0 <= momentum < 1 are required")
        if self.pad < 0:
            raise MIAError(f"pad must be >= 0, got {self.pad}")
        if self.width is not None and self.width < 1:
            raise MIAError(f"width must be positive, got {self.width}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def train_recipe(self) -> TrainRecipe:
        """The mia.training recipe of one model."""
        return TrainRecipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, augment=self.augment, pad=self.pad)

    @classmethod
    def from_dict(cls, data: dict) -> ReferenceRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------
# Pool


@dataclass
class Pool:
    """The records reference models are trained on: eval, then test, then population."""

    images: np.ndarray  # (N, C, H, W) float32
    labels: np.ndarray  # (N,) int64
    n_eval: int  # pool[0:n_eval] are the eval records, in file order
    n_test: int  # pool[n_eval:n_eval + n_test] are the test records, in file order
    sources: list[dict]  # [{"role": "eval"|"test"|"population", "path", "sha256", "n"}] in pool order

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def n_population(self) -> int:
        return self.n - self.n_eval - self.n_test


def _population_files(population: Path) -> list[Path]:
    population = Path(population)
    if population.is_file():
        return [population]
    if population.is_dir():
        files = sorted(population.glob("*.p"))
        if files:
            return files
        raise MIAError(f"{population}: no .p files in the population folder")
    raise MIAError(f"{population}: population folder or file not found")


def _load_population_file(path: Path, num_classes: int | None) -> Records:
    """Records ``[image, label]`` or ``[image, label, membership]`` (membership ignored)."""
    obj = safe_load_pickle(path)
    if isinstance(obj, (list, tuple)):
        obj = [r[:2] if isinstance(r, (list, tuple)) and len(r) == 3 else r for r in obj]
    return records_from_objects(obj, path=path, with_membership=False, num_classes=num_classes)


def _rel(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` when inside it (bundles can move), else absolute."""
    path = Path(path).resolve()
    if root is not None:
        try:
            return str(path.relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


def load_pool(victim: Victim, population: str | Path | None = None, *, num_classes: int | None = None,
              bundle_root: str | Path | None = None) -> Pool:
    """Load the pool of ``victim``: its eval records, its test records, then population records.

    population: a ``.p`` file or a folder of them (sorted by name), records ``[image, label]`` or
    ``[image, label, membership]``. Raises DataError for a bad file and MIAError when image shapes
    differ between the files.
    """
    cache = Path(bundle_root) / ".cache" if bundle_root is not None else None  # the run's records cache
    parts: list[tuple[str, Records]] = [
        ("eval", load_records(victim.eval_path, with_membership=True, num_classes=num_classes, cache_dir=cache)),
        ("test", load_records(victim.test_path, with_membership=False, num_classes=num_classes, cache_dir=cache)),
    ]
    if population is not None:
        parts += [("population", _load_population_file(p, num_classes)) for p in _population_files(Path(population))]
    shape = parts[0][1].images.shape[1:]
    for role, recs in parts[1:]:
        if recs.images.shape[1:] != shape:
            raise MIAError(f"{recs.path}: {role} images are {recs.images.shape[1:]}, eval images are {shape}")
    sources = [{"role": role, "path": _rel(recs.path, bundle_root), "sha256": file_digest(recs.path), "n": len(recs)}
               for role, recs in parts]
    return Pool(
        images=np.concatenate([r.images for _, r in parts]),
        labels=np.concatenate([r.labels for _, r in parts]),
        n_eval=len(parts[0][1]),
        n_test=len(parts[1][1]),
        sources=sources,
    )


def make_masks(k: int, n: int, seed: int) -> np.ndarray:
    """(k, n) bool: ``masks[j, i]`` = model j trains on record i.

    Every column has exactly k/2 True entries: a uniformly random k/2-subset of the models per
    record (LiRA's balanced split). Deterministic for (k, n, seed).
    """
    if k < 2 or k % 2:
        raise MIAError(f"k must be an even number >= 2, got {k}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _MASK_TAG, int(k), int(n)]))
    order = np.argsort(rng.random((n, k)), axis=1, kind="stable")  # a random permutation of models per record
    masks = np.zeros((n, k), dtype=bool)
    masks[np.arange(n)[:, None], order[:, : k // 2]] = True
    return np.ascontiguousarray(masks.T)


def _model_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([int(seed), _MODEL_TAG, int(j)]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Training


def _fit_model(architecture: Architecture, width: int | None, images: np.ndarray,
               labels: np.ndarray, recipe: ReferenceRecipe, seed: int, device: torch.device,
               desc: str, progress: bool) -> torch.nn.Module:
    """A model initialised from ``seed`` and trained on images (n, C, H, W) / labels (n,) with
    mia.training.train_classifier (the demo victims' loop); returned on the CPU in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architecture.build(width)
    train_classifier(model, images, labels, recipe.train_recipe(), seed=seed, device=device, desc=desc,
                     progress=progress)
    return model.cpu().float().eval()


def _accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float | None:
    if len(labels) == 0:
        return None
    logits = compute_logits(model, images, (IDENTITY,), device=device, batch_size=512)[0]
    return float((logits.argmax(-1) == labels).mean())


# --------------------------------------------------------------------------------------------------
# Folder, manifest, reference set


def references_folder(bundle_root: str | Path, victim: Victim, references_root: str | Path | None = None) -> Path:
    """``<references_root or <bundle>/references>/<victim.name>``."""
    root = Path(references_root) if references_root is not None else Path(bundle_root) / "references"
    return root / victim.name


def default_arch_dirs(bundle_root: str | Path) -> list[Path]:
    """The bundle's models/ first, then the repository's architecture files (as mia.bundle does)."""
    dirs = [Path(bundle_root).resolve() / "models"]
    if REPO_ARCH_DIR != dirs[0]:
        dirs.append(REPO_ARCH_DIR)
    return dirs


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _header(victim: Victim, recipe: ReferenceRecipe, pool: Pool, num_classes: int, width: int | None,
            architecture: Architecture, bundle_root: Path) -> dict:
    """What the folder's models were trained from; ``fingerprint`` covers all of it but paths and device."""
    training = {k: v for k, v in recipe.to_dict().items() if k != "device"}
    training["width"] = None if width is None else int(width)
    key = {
        "format": REFERENCES_FORMAT,
        "recipe": training,
        "arch": victim.arch,
        "num_classes": int(num_classes),
        "pool": [[s["role"], s["sha256"], s["n"]] for s in pool.sources],
        "victim_sha256": file_digest(victim.checkpoint),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return {
        "format": REFERENCES_FORMAT,
        "fingerprint": fingerprint,
        "victim": victim.name,
        "arch": victim.arch,
        "num_classes": int(num_classes),
        "width": training["width"],
        "k": recipe.k,
        "seed": recipe.seed,
        "recipe": training,
        "pool": {
            "order": "eval records, then test records, then population records (file order)",
            "n": pool.n,
            "n_eval": pool.n_eval,
            "n_test": pool.n_test,
            "n_population": pool.n_population,
            "sources": pool.sources,
        },
        "victim_checkpoint": {"path": _rel(victim.checkpoint, bundle_root), "sha256": key["victim_sha256"]},
        "architecture_file": _architecture_source(architecture, bundle_root),
        "masks_file": "masks.npy",
    }


def _architecture_source(architecture: Architecture, bundle_root: Path) -> dict:
    """Where the reference models' code comes from: the architecture file and its digest, or the
    torchvision constructor and torchvision's version."""
    b = architecture.builder
    if b.file is None:
        import torchvision

        return {"path": b.label, "sha256": f"torchvision-{torchvision.__version__}"}
    return {"path": _rel(b.file, bundle_root), "sha256": file_digest(b.file)}


_HEADER_KEYS = ("format", "fingerprint", "victim", "arch", "num_classes", "width", "k", "seed", "recipe", "pool",
                "victim_checkpoint", "architecture_file", "masks_file")


def _model_files(folder: Path, j: int) -> tuple[Path, Path]:
    return folder / f"model_{j:03d}.pth", folder / f"model_{j:03d}.json"


def _scan_models(folder: Path, k: int, fingerprint: str) -> tuple[dict[int, dict], dict[int, str]]:
    """(complete models j -> their json, foreign models j -> fingerprint of another recipe)."""
    complete, foreign = {}, {}
    for j in range(k):
        pth, meta_path = _model_files(folder, j)
        meta = _read_json(meta_path)
        if meta is None or not pth.is_file():
            continue
        if meta.get("fingerprint") != fingerprint:
            foreign[j] = str(meta.get("fingerprint"))
            continue
        complete[j] = meta
    for path in folder.glob("model_*.json"):  # models beyond k belong to another recipe (other k)
        meta = _read_json(path)
        if meta is not None and isinstance(meta.get("index"), int) and meta["index"] >= k:
            foreign[meta["index"]] = str(meta.get("fingerprint"))
    return complete, foreign


def _write_manifest(folder: Path, header: dict, complete: dict[int, dict]) -> dict:
    manifest = _build_manifest(header, complete)
    _write_json(folder / "manifest.json", manifest)
    return manifest


def _build_manifest(header: dict, complete: dict[int, dict]) -> dict:
    """The header plus what the complete models' .json files say."""
    k = header["k"]
    models = {f"{j:03d}": {key: meta.get(key) for key in ("in_accuracy", "out_accuracy", "seconds", "device",
                                                           "n_in", "n_out")}
              for j, meta in sorted(complete.items())}
    manifest = dict(header)
    manifest.update({
        "complete": sorted(complete),
        "missing": [j for j in range(k) if j not in complete],
        "models": models,
        "mean_out_accuracy": (float(np.mean([m["out_accuracy"] for m in complete.values()]))
                              if complete and all(m.get("out_accuracy") is not None for m in complete.values())
                              else None),
    })
    return manifest


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old.get("recipe", {})) | set(new["recipe"])):
        a, b = old.get("recipe", {}).get(key), new["recipe"].get(key)
        if a != b:
            diffs.append(f"{key} {a!r} -> {b!r}")
    old_pool = [(s.get("role"), s.get("sha256"), s.get("n")) for s in old.get("pool", {}).get("sources", [])]
    new_pool = [(s["role"], s["sha256"], s["n"]) for s in new["pool"]["sources"]]
    if old_pool != new_pool:
        diffs.append("pool files (eval/test/population contents) differ")
    if old.get("victim_checkpoint", {}).get("sha256") != new["victim_checkpoint"]["sha256"]:
        diffs.append("victim checkpoint differs")
    for key in ("arch", "num_classes", "format"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(diffs) or "fingerprints differ"


def _check_compatible(folder: Path, header: dict, masks: np.ndarray) -> None:
    """Raise MIAError when ``folder`` holds models or masks of another recipe or pool."""
    old = _read_json(folder / "manifest.json")
    if old is not None and old.get("fingerprint") != header["fingerprint"]:
        raise MIAError(
            f"{folder} holds reference models of another recipe or pool ({_describe_difference(old, header)}); "
            "train with the same settings, or delete the folder (or pass another references root) to start over"
        )
    _, foreign = _scan_models(folder, header["k"], header["fingerprint"])
    if foreign:
        raise MIAError(
            f"{folder}: models {sorted(foreign)} were trained with another recipe or pool; delete them or the "
            "folder to start over"
        )
    masks_path = folder / "masks.npy"
    if masks_path.is_file():
        try:
            existing = np.load(masks_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MIAError(f"{masks_path}: unreadable ({e}); delete the folder to start over") from e
        if existing.shape != masks.shape or not np.array_equal(existing, masks):
            raise MIAError(f"{masks_path}: masks differ from those of this recipe and pool; delete the folder "
                           "to start over")


@dataclass
class ReferenceSet:
    """The reference models of one victim as found on disk."""

    folder: Path  # <references root>/<victim.name>
    bundle_root: Path  # relative pool paths are resolved against it
    manifest: dict  # manifest.json as rebuilt from the folder
    masks: np.ndarray  # (k, N_pool) bool, all k models (complete or not)
    complete: tuple[int, ...]  # indices j of the complete models, increasing
    arch_dirs: list[Path]  # where the architecture file is looked up
    trained: tuple[int, ...] = ()  # models trained by the call that returned this set
    models: dict[int, dict] = field(default_factory=dict)  # j -> model_{j}.json of the complete models
    _architecture: Architecture | None = field(default=None, repr=False)  # found by the first load_model

    @property
    def k(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_pool(self) -> int:
        return int(self.masks.shape[1])

    @property
    def n_eval(self) -> int:
        return int(self.manifest["pool"]["n_eval"])

    @property
    def n_test(self) -> int:
        return int(self.manifest["pool"]["n_test"])

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def recipe(self) -> ReferenceRecipe:
        return ReferenceRecipe.from_dict(self.manifest["recipe"])

    def complete_masks(self) -> np.ndarray:
        """(K, N_pool) bool masks of the complete models only (K = len(complete))."""
        return self.masks[list(self.complete)]

    def model_path(self, j: int) -> Path:
        return _model_files(self.folder, j)[0]

    def load_pool(self) -> Pool:
        """The pool images, from the files recorded in the manifest; MIAError when one changed."""
        parts, sources = [], self.manifest["pool"]["sources"]
        for s in sources:
            path = Path(s["path"])
            if not path.is_absolute():
                path = self.bundle_root / path
            if not path.is_file():
                raise MIAError(f"{self.folder}: pool file {path} is gone; the references cannot be used")
            if file_digest(path) != s["sha256"]:
                raise MIAError(f"{path} changed since the reference models in {self.folder} were trained on it; "
                               "retrain them (delete the folder)")
            if s["role"] == "population":
                recs = _load_population_file(path, self.manifest["num_classes"])
            else:
                recs = load_records(path, with_membership=s["role"] == "eval", num_classes=self.manifest["num_classes"],
                                    cache_dir=self.bundle_root / ".cache")
            parts.append(recs)
        return Pool(images=np.concatenate([r.images for r in parts]), labels=np.concatenate([r.labels for r in parts]),
                    n_eval=self.n_eval, n_test=self.n_test, sources=sources)

    def load_model(self, j: int) -> torch.nn.Module:
        """Reference model j on the CPU, eval mode (its builder is found once, from the first model)."""
        path = self.model_path(j)
        state_dict, _ = load_state_dict(path)
        if self._architecture is None:
            self._architecture = discover_architecture(self.arch, state_dict, self.arch_dirs, what=str(path))
        return load_into(self._architecture, state_dict, path)


def load_reference_set(bundle_root: str | Path, victim: Victim, *, references_root: str | Path | None = None,
                       arch_dirs: list[Path] | None = None, rebuild_manifest: bool = True) -> ReferenceSet | None:
    """The victim's reference set as found on disk, or None when there is none.

    Merges shards: the complete models are those on disk, whoever trained them, and manifest.json
    is rewritten from them (``rebuild_manifest``). Models of another recipe are ignored here.
    """
    folder = references_folder(bundle_root, victim, references_root)
    header = _read_json(folder / "manifest.json")
    if header is None or header.get("format") != REFERENCES_FORMAT or not (folder / "masks.npy").is_file():
        return None
    header = {k: header[k] for k in _HEADER_KEYS if k in header}
    try:
        masks = np.load(folder / "masks.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MIAError(f"{folder / 'masks.npy'}: unreadable ({e})") from e
    if masks.dtype != bool or masks.shape != (header["k"], header["pool"]["n"]):
        raise MIAError(f"{folder / 'masks.npy'}: expected ({header['k']}, {header['pool']['n']}) bool masks, "
                       f"got {masks.dtype} {masks.shape}")
    complete, _ = _scan_models(folder, header["k"], header["fingerprint"])
    manifest = _write_manifest(folder, header, complete) if rebuild_manifest else _build_manifest(header, complete)
    return ReferenceSet(folder=folder, bundle_root=Path(bundle_root).resolve(), manifest=manifest, masks=masks,
                        complete=tuple(sorted(complete)), arch_dirs=list(arch_dirs or default_arch_dirs(bundle_root)),
                        models=complete)


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4); MIAError unless 0 <= i < n."""
    i, sep, n = str(text).partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise MIAError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(i), int(n)


def train_references(
    bundle_root: str | Path,
    victim: Victim,
    recipe: ReferenceRecipe | None = None,
    *,
    population: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    references_root: str | Path | None = None,
    arch_dirs: list[Path] | None = None,
    trust: bool = False,
    log: Callable[[str], None] | None = None,
) -> ReferenceSet:
    """Train the victim's missing reference models of this shard; return the set found on disk.

    Models j with ``j % n == i`` for ``shard=(i, n)`` that are not complete yet are trained, each on
    the pool records its mask marks IN, and written atomically (``.pth`` then ``.json``); the
    manifest is rebuilt after each one. Architecture, class count and width (unless
    ``recipe.width``) come from the victim's weights; ``trust`` is passed to load_state_dict.
    ``log`` receives one line per trained model. Raises MIAError when the folder holds models of
    another recipe or pool.
    """
    recipe = recipe or ReferenceRecipe()
    recipe.validate()
    i_shard, n_shard = shard
    if not 0 <= i_shard < n_shard:
        raise MIAError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    bundle_root = Path(bundle_root).resolve()
    arch_dirs = list(arch_dirs or default_arch_dirs(bundle_root))
    state_dict, _ = load_state_dict(victim.checkpoint, trust=trust)
    architecture = discover_architecture(victim.arch, state_dict, arch_dirs, what=str(victim.checkpoint))
    del state_dict
    num_classes = architecture.num_classes
    if recipe.width and not architecture.builder.takes_width:
        raise MIAError(f"{victim.name}: a reference width was asked for, but {architecture.builder.label} "
                       f"(from {architecture.builder.where}) takes no width argument")
    width = recipe.width or architecture.width
    pool = load_pool(victim, population, num_classes=num_classes, bundle_root=bundle_root)
    masks = make_masks(recipe.k, pool.n, recipe.seed)
    header = _header(victim, recipe, pool, num_classes, width, architecture, bundle_root)

    folder = references_folder(bundle_root, victim, references_root)
    folder.mkdir(parents=True, exist_ok=True)
    _check_compatible(folder, header, masks)
    if not (folder / "masks.npy").is_file():
        atomic_save_npy(folder / "masks.npy", masks)
    complete, _ = _scan_models(folder, recipe.k, header["fingerprint"])
    _write_manifest(folder, header, complete)

    device = resolve_device(recipe.device)
    todo = [j for j in range(recipe.k) if j % n_shard == i_shard and j not in complete]
    trained = []
    for j in tqdm(todo, desc=f"{victim.name} references", unit="model", disable=not progress or not todo):
        seed = _model_seed(recipe.seed, j)
        inside = masks[j]
        t0 = time.perf_counter()
        model = _fit_model(architecture, width, pool.images[inside], pool.labels[inside],
                           recipe, seed, device, f"model {j:03d}", progress)
        seconds = time.perf_counter() - t0
        in_acc = _accuracy(model, pool.images[inside], pool.labels[inside], device)
        out_acc = _accuracy(model, pool.images[~inside], pool.labels[~inside], device)
        pth, meta_path = _model_files(folder, j)
        save_checkpoint(pth, model, None if out_acc is None else 100.0 * out_acc, recipe.epochs - 1)
        meta = {
            "format": REFERENCES_FORMAT,
            "index": j,
            "fingerprint": header["fingerprint"],
            "seed": seed,
            "n_in": int(inside.sum()),
            "n_out": int((~inside).sum()),
            "in_accuracy": in_acc,
            "out_accuracy": out_acc,
            "seconds": seconds,
            "device": str(device),
            "torch_version": torch.__version__,
        }
        _write_json(meta_path, meta)
        trained.append(j)
        complete, _ = _scan_models(folder, recipe.k, header["fingerprint"])
        _write_manifest(folder, header, complete)
        if log is not None:
            log(f"{victim.name} model {j:03d}: OUT accuracy {_pct(out_acc)}, IN accuracy {_pct(in_acc)}, "
                f"{seconds:.1f}s on {device}")
    ref_set = load_reference_set(bundle_root, victim, references_root=references_root, arch_dirs=arch_dirs)
    assert ref_set is not None
    ref_set.trained = tuple(trained)
    return ref_set


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------------------------------
# Reference logits


def views_from_names(names: list[str] | tuple[str, ...]) -> tuple[View, ...]:
    """Inverse of ``View.name``: ``["id", "flip", "id:dx+1dy+0", "flip:noise0.1#3"]`` -> Views.
    ValueError on a bad name."""
    views = []
    for name in names:
        head, *parts = str(name).split(":")
        if head not in ("id", "flip") or len(parts) > 2:
            raise ValueError(f"not a view name: {name!r}")
        dx = dy = draw = 0
        noise = 0.0
        try:
            for part in parts:
                if part.startswith("dx") and "dy" in part:
                    sx, sy = part[2:].split("dy", 1)
                    dx, dy = int(sx), int(sy)
                elif part.startswith("noise") and "#" in part:
                    sn, sd = part[5:].split("#", 1)
                    noise, draw = float(sn), int(sd)
                else:
                    raise ValueError(part)
            view = View(flip=head == "flip", dx=dx, dy=dy, noise=noise, draw=draw)
        except ValueError:
            raise ValueError(f"not a view name: {name!r}") from None
        if view.name != name:
            raise ValueError(f"not a view name: {name!r}")
        views.append(view)
    return tuple(views)


def _logits_cache_path(ref_set: ReferenceSet, j: int, views: tuple[View, ...], labels_only: bool = False) -> Path:
    h = hashlib.sha256(f"format={LOGITS_FORMAT};views={[v.name for v in views]};"
                       f"pool={ref_set.fingerprint}{';labels' if labels_only else ''}".encode())
    h.update(file_digest(ref_set.model_path(j)).encode())
    arch_file = ref_set.manifest.get("architecture_file", {}).get("sha256", "-")
    h.update(str(arch_file).encode())
    return ref_set.folder / "logits" / f"model_{j:03d}-{h.hexdigest()[:24]}.npy"


def reference_logits(ref_set: ReferenceSet, views: tuple[View, ...] = (IDENTITY,), device: str = "auto",
                     batch_size: int = 256, *, progress: bool = False, cache: bool = True,
                     pool: Pool | None = None, labels_only: bool = False) -> np.ndarray:
    """Logits of every complete reference model on the whole pool -> (K, V, N_pool, C) float32; with
    ``labels_only`` their predicted labels -> (K, V, N_pool) int64 (for the many noisy queries).

    K = len(ref_set.complete), in that order (``ref_set.complete_masks()`` are the matching masks);
    V = len(views). Each model's array is cached under ``<folder>/logits/``, keyed by the model file,
    the pool, the views, the architecture file and ``labels_only``.
    """
    views = tuple(views)
    out = []
    for j in tqdm(ref_set.complete, desc=f"{ref_set.manifest['victim']} reference logits", unit="model",
                  disable=not progress, leave=False):
        path = _logits_cache_path(ref_set, j, views, labels_only) if cache else None
        arr = None
        if path is not None and path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.shape[:2] != (len(views), ref_set.n_pool) or arr.ndim != (2 if labels_only else 3):
                    arr = None
            except (OSError, ValueError):
                arr = None
        if arr is None:
            if pool is None:
                pool = ref_set.load_pool()
            arr = compute_logits(ref_set.load_model(j), pool.images, views, device=device, batch_size=batch_size,
                                 labels_only=labels_only)
            if path is not None:
                try:
                    atomic_save_npy(path, arr)
                except OSError:  # a read-only bundle: no cache, same logits
                    pass
        out.append(arr.astype(np.int64 if labels_only else np.float32, copy=False))
    if not out:
        raise MIAError(f"{ref_set.folder}: no complete reference model")
    return np.stack(out)


# --------------------------------------------------------------------------------------------------
# Command line: python -m mia references ...


def add_parser(subparsers) -> object:
    """Add the ``references`` command to an argparse subparsers object; returns its parser."""
    defaults = ReferenceRecipe()
    p = subparsers.add_parser(
        "references",
        help="train reference models for LiRA / RMIA (resumable; --shard i/n splits the work)",
        description="Train k reference models per victim on random halves of its eval + test (+ population) "
                    "records, under <bundle>/references/<victim>/. Resumes where a previous run stopped.",
    )
    p.add_argument("--bundle", type=Path, default=None,
                   help="challenge bundle folder (default: the repository root if it holds one, else demo/)")
    p.add_argument("--victims", nargs="+", metavar="ARCH_DATASET", help="only these victims, e.g. vgg16_cifar10")
    p.add_argument("--k", type=int, default=defaults.k, help=f"number of reference models, even (default {defaults.k})")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--no-augment", action="store_true", help="no random flip / crop during training")
    p.add_argument("--pad", type=int, default=defaults.pad,
                   help=f"zero padding of the random crop, 0 = flips only (default {defaults.pad})")
    p.add_argument("--width", type=int, default=None, help="model width (default: the victim's)")
    p.add_argument("--population", type=Path, default=None,
                   help="folder (or file) of extra .p records [image, label(, membership)] added to the pool")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="train only models j with j %% N == I (default 0/1)")
    p.add_argument("--merge-only", action="store_true", help="train nothing: rebuild the manifests and report")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="allow victim checkpoints that are whole pickled models: loading them RUNS CODE from the file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_cli(args) -> int:
    """Run ``python -m mia references`` with parsed ``args``; returns the exit status."""
    from mia.bundle import discover
    from mia.paths import default_bundle

    shard = parse_shard(args.shard)
    recipe = ReferenceRecipe(k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, augment=not args.no_augment, pad=args.pad, seed=args.seed,
                             device=args.device, width=args.width)
    recipe.validate()
    bundle_root = args.bundle if args.bundle is not None else default_bundle(progress=not args.quiet)
    bundle = discover(bundle_root, victims=list(args.victims) if args.victims else None)
    t0 = time.perf_counter()
    for victim in bundle.victims:
        if args.merge_only:
            ref_set = load_reference_set(bundle.root, victim, arch_dirs=bundle.arch_dirs)
            if ref_set is None:
                print(f"{victim.name}: no reference models under {references_folder(bundle.root, victim)}")
                continue
        else:
            ref_set = train_references(bundle.root, victim, recipe, population=args.population, shard=shard,
                                       progress=not args.quiet, arch_dirs=bundle.arch_dirs,
                                       trust=args.trust_checkpoints, log=print)
        print(f"{victim.name}: {len(ref_set.complete)} of {ref_set.k} reference models complete in {ref_set.folder}"
              f" ({len(ref_set.trained)} trained now)")
        for j in ref_set.complete:
            meta = ref_set.models[j]
            print(f"  model {j:03d}: OUT accuracy {_pct(meta.get('out_accuracy'))}, "
                  f"IN accuracy {_pct(meta.get('in_accuracy'))}, {meta.get('seconds', float('nan')):.1f}s")
        missing = [j for j in range(ref_set.k) if j not in ref_set.complete]
        if missing:
            print(f"  missing: {missing}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0
