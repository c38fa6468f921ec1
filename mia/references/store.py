"""Reference folders on disk: manifest, per-model files, and the ReferenceSet found there (the folder is the truth)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mia.bundle import Victim
from mia.errors import MIAError
from mia.io.atomic import atomic_write_text
from mia.io.cache import file_digest
from mia.io.checkpoints import load_state_dict
from mia.io.records import load_records
from mia.models.discovery import Architecture, discover_architecture
from mia.models.loading import load_into
from mia.models.registry import REPO_ARCH_DIR
from mia.references.pool import (
    Pool,
    load_population_file,
    relative_path,
    without_scored_copies,
)
from mia.references.recipe import Distill, ReferenceRecipe

REFERENCES_FORMAT = 1  # bump when a change makes existing reference folders incompatible


# --------------------------------------------------------------------------------------------------
# Folder, manifest, reference set


#: The order in which a run takes a victim's reference sets (each in its own folder, Distill.suffix): the
#: imitations of the victim first, then the models trained on the records' labels.
SET_ORDER = (Distill.POSTERIORS, Distill.LABELS, Distill.OFF)


def references_folder(bundle_root: str | Path, victim: Victim, references_root: str | Path | None = None, *,
                      distill: Distill | str | bool = Distill.OFF) -> Path:
    """``<references_root or <bundle>/references>/<victim.name>`` + the suffix of the set's kind
    (Distill.suffix: "", "-distilled", "-distilled-labels"; a bool is read as Distill.of reads it)."""
    root = Path(references_root) if references_root is not None else Path(bundle_root) / "references"
    return root / (victim.name + Distill.of(distill).suffix)


def default_arch_dirs(bundle_root: str | Path) -> list[Path]:
    """The bundle's models/ first, then the repository's architecture files (as mia.bundle does)."""
    dirs = [Path(bundle_root).resolve() / "models"]
    if REPO_ARCH_DIR != dirs[0]:
        dirs.append(REPO_ARCH_DIR)
    return dirs


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def make_header(victim: Victim, recipe: ReferenceRecipe, pool: Pool, num_classes: int, width: int | None,
            architecture: Architecture, bundle_root: Path) -> dict:
    """What the folder's models were trained from; ``fingerprint`` covers all of it but paths and device (and,
    for a distilled set, ``k``: its models are alike whatever their number, so the set can grow)."""
    training = {k: v for k, v in recipe.to_dict().items() if k != "device"}
    training["width"] = None if width is None else int(width)
    header = {
        "format": REFERENCES_FORMAT,
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
        "victim_checkpoint": {"path": relative_path(victim.checkpoint, bundle_root),
                              "sha256": file_digest(victim.checkpoint)},
        "architecture_file": _architecture_source(architecture, bundle_root),
        "masks_file": "masks.npy",
    }
    header["fingerprint"] = _fingerprint(header, with_k=not recipe.distilled)
    return header


def _fingerprint(header: dict, *, with_k: bool) -> str:
    """The digest of the recipe (without ``k`` unless ``with_k``), architecture, class count, pool files and
    victim checkpoint of ``header``."""
    recipe = {name: value for name, value in header["recipe"].items() if with_k or name != "k"}
    key = {
        "format": header["format"],
        "recipe": recipe,
        "arch": header["arch"],
        "num_classes": header["num_classes"],
        "pool": [[s["role"], s["sha256"], s["n"]] for s in header["pool"]["sources"]],
        "victim_sha256": header["victim_checkpoint"]["sha256"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def adopt_earlier_distilled(folder: Path, header: dict) -> None:
    """A distilled set written before distilled sets could grow has ``k`` in its fingerprint: when that is its
    only difference from ``header`` (a distilled recipe's), its models' .json files and manifest take
    ``header``'s fingerprint, so that the set is this recipe's and can grow. Idempotent; anything else is
    left for check_compatible to judge."""
    old = _read_json(folder / "manifest.json")
    if old is None or old.get("fingerprint") == header["fingerprint"] or not isinstance(old.get("k"), int):
        return
    earlier = _fingerprint({**header, "recipe": {**header["recipe"], "k": old["k"]}}, with_k=True)
    if old["fingerprint"] != earlier:
        return
    for path in sorted(folder.glob("model_*.json")):  # the models first: an interrupted adoption resumes
        meta = _read_json(path)
        if meta is not None and meta.get("fingerprint") == earlier:
            write_json(path, {**meta, "fingerprint": header["fingerprint"]})
    write_json(folder / "manifest.json", {**old, "fingerprint": header["fingerprint"]})


def grown_size(folder: Path, k: int, fingerprint: str) -> int:
    """The size of a distilled set asked for with ``k`` models: ``k``, or more where the folder already holds
    models of this fingerprint beyond k-1 (a smaller --k keeps them)."""
    indices = [meta.get("index") for meta in map(_read_json, folder.glob("model_*.json"))
               if meta is not None and meta.get("fingerprint") == fingerprint]
    return max([k] + [j + 1 for j in indices if isinstance(j, int) and j >= 0])


def _architecture_source(architecture: Architecture, bundle_root: Path) -> dict:
    """Where the reference models' code comes from: the architecture file and its digest, or the
    torchvision constructor and torchvision's version."""
    b = architecture.builder
    if b.file is None:
        import torchvision

        return {"path": b.label, "sha256": f"torchvision-{torchvision.__version__}"}
    return {"path": relative_path(b.file, bundle_root), "sha256": file_digest(b.file)}


_HEADER_KEYS = ("format", "fingerprint", "victim", "arch", "num_classes", "width", "k", "seed", "recipe", "pool",
                "victim_checkpoint", "architecture_file", "masks_file")


def model_files(folder: Path, j: int) -> tuple[Path, Path]:
    return folder / f"model_{j:03d}.pth", folder / f"model_{j:03d}.json"


def scan_models(folder: Path, k: int, fingerprint: str) -> tuple[dict[int, dict], dict[int, str]]:
    """(complete models j -> their json, foreign models j -> fingerprint of another recipe)."""
    complete, foreign = {}, {}
    for j in range(k):
        pth, meta_path = model_files(folder, j)
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


def write_manifest(folder: Path, header: dict, complete: dict[int, dict]) -> dict:
    manifest = _build_manifest(header, complete)
    write_json(folder / "manifest.json", manifest)
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


def check_compatible(folder: Path, header: dict, masks: np.ndarray) -> bool:
    """Raise MIAError when ``folder`` holds models or masks of another recipe or pool; else whether its masks
    file is to be written (none yet, or a distilled set's of another size)."""
    old = _read_json(folder / "manifest.json")
    if old is not None and old.get("fingerprint") != header["fingerprint"]:
        raise MIAError(
            f"{folder} holds reference models of another recipe or pool ({_describe_difference(old, header)}); "
            "train with the same settings, or delete the folder (or pass another references root) to start over"
        )
    _, foreign = scan_models(folder, header["k"], header["fingerprint"])
    if foreign:
        raise MIAError(
            f"{folder}: models {sorted(foreign)} were trained with another recipe or pool; delete them or the "
            "folder to start over"
        )
    masks_path = folder / "masks.npy"
    if not masks_path.is_file():
        return True
    try:
        existing = np.load(masks_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MIAError(f"{masks_path}: unreadable ({e}); delete the folder to start over") from e
    same = (existing.shape[1:] == masks.shape[1:] and bool((existing == masks[:1]).all())
            if header["recipe"].get("distill") else  # every row alike, whatever k (distill_masks)
            existing.shape == masks.shape and np.array_equal(existing, masks))
    if not same:
        raise MIAError(f"{masks_path}: masks differ from those of this recipe and pool; delete the folder "
                       "to start over")
    return existing.shape != masks.shape


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
    _pool: Pool | None = field(default=None, repr=False)  # read by the first load_pool

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
        return model_files(self.folder, j)[0]

    def load_pool(self, cache_dir: Path | None = None) -> Pool:
        """The pool images, from the files recorded in the manifest (read once per set: every model's logits
        and features come from the same pool); MIAError when one changed. ``cache_dir``: the cache root the
        eval and test records are read through (None: no cache)."""
        if self._pool is not None:
            return self._pool
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
                recs = load_population_file(path, self.manifest["num_classes"])
            else:
                recs = load_records(path, with_membership=s["role"] == "eval", num_classes=self.manifest["num_classes"],
                                    cache_dir=cache_dir)
            parts.append(recs)
        parts[2:] = [recs for recs, _ in without_scored_copies(parts[:2], parts[2:])]
        if [len(r) for r in parts] != [s["n"] for s in sources]:
            raise MIAError(f"{self.folder}: the pool files hold {[len(r) for r in parts]} records, the reference "
                           f"models were trained on {[s['n'] for s in sources]}; retrain them (delete the folder)")
        self._pool = Pool(images=np.concatenate([r.images for r in parts]),
                          labels=np.concatenate([r.labels for r in parts]), n_eval=self.n_eval, n_test=self.n_test,
                          sources=sources)
        return self._pool

    def load_model(self, j: int) -> torch.nn.Module:
        """Reference model j on the CPU, eval mode (its builder is found once, from the first model)."""
        path = self.model_path(j)
        state_dict, _ = load_state_dict(path)
        if self._architecture is None:
            self._architecture = discover_architecture(self.arch, state_dict, self.arch_dirs, what=str(path))
        return load_into(self._architecture, state_dict, path)


def load_reference_set(bundle_root: str | Path, victim: Victim, *, references_root: str | Path | None = None,
                       arch_dirs: list[Path] | None = None, rebuild_manifest: bool = True,
                       distill: Distill | str | bool = Distill.OFF) -> ReferenceSet | None:
    """The victim's reference set of kind ``distill`` as found on disk, or None when there is none.

    Merges shards: the complete models are those on disk, whoever trained them, and manifest.json
    is rewritten from them (``rebuild_manifest``). Models of another recipe are ignored here.
    """
    folder = references_folder(bundle_root, victim, references_root, distill=distill)
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
    complete, _ = scan_models(folder, header["k"], header["fingerprint"])
    manifest = write_manifest(folder, header, complete) if rebuild_manifest else _build_manifest(header, complete)
    return ReferenceSet(folder=folder, bundle_root=Path(bundle_root).resolve(), manifest=manifest, masks=masks,
                        complete=tuple(sorted(complete)), arch_dirs=list(arch_dirs or default_arch_dirs(bundle_root)),
                        models=complete)
