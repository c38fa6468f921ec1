"""The pool of known-label records reference models train on, and the IN/OUT masks (LiRA's design)."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mia.bundle import Victim
from mia.errors import MIAError
from mia.io.cache import file_digest
from mia.io.records import Records, load_records, records_from_objects
from mia.io.unpickler import safe_load_pickle

_MASK_TAG = 0x6D61736B  # "mask": separates the mask stream from the model seeds
_MODEL_TAG = 0x6D6F646C  # "modl"


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


def load_population_file(path: Path, num_classes: int | None) -> Records:
    """Records ``[image, label]`` or ``[image, label, membership]`` (membership ignored)."""
    obj = safe_load_pickle(path)
    if isinstance(obj, (list, tuple)):
        obj = [r[:2] if isinstance(r, (list, tuple)) and len(r) == 3 else r for r in obj]
    return records_from_objects(obj, path=path, with_membership=False, num_classes=num_classes)


def population_size(population: str | Path) -> int:
    """Records in a population file or folder (before scored copies are dropped): what a distilled
    reference would train on. Each file is read once per process while its size and modification time stay
    the same (a run asks for every victim; one population usually serves them all). Raises MIAError /
    DataError as load_pool does."""
    return sum(_file_records(str(p), *_stamp(p)) for p in _population_files(Path(population)))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _file_records(path: str, size: int, mtime_ns: int) -> int:
    """Records in one population file (size and mtime_ns: part of the cache key only)."""
    return len(load_population_file(Path(path), None))


def relative_path(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` when inside it (bundles can move), else absolute."""
    path = Path(path).resolve()
    if root is not None:
        try:
            return str(path.relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


def _image_key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=16).digest()


def without_scored_copies(scored: list[Records], population: list[Records]) -> list[tuple[Records, int]]:
    """Each population file's records without those whose image equals a scored (eval or test) record's, bit
    for bit, and how many were dropped: a public population holds the scored records themselves, which
    must stay OUT for the reference models."""
    if not population:  # no images to hash
        return []
    seen = {_image_key(image) for recs in scored for image in recs.images}
    out = []
    for recs in population:
        keep = np.array([_image_key(image) not in seen for image in recs.images], dtype=bool)
        if not keep.all():
            recs = Records(recs.images[keep], recs.labels[keep], None, recs.path)
        out.append((recs, int((~keep).sum())))
    return out


def load_pool(victim: Victim, population: str | Path | None = None, *, num_classes: int | None = None,
              bundle_root: str | Path | None = None, cache_dir: str | Path | None = None) -> Pool:
    """Load the pool of ``victim``: its eval records, its test records, then population records.

    population: a ``.p`` file or a folder of them (sorted by name), records ``[image, label]`` or
    ``[image, label, membership]``. Raises DataError for a bad file and MIAError when image shapes
    differ between the files. Population records whose image equals an eval or test image (bit for bit)
    are dropped, and counted in their source's ``dropped_duplicates``. ``bundle_root``: paths are recorded
    relative to it. ``cache_dir``: the cache root the eval and test records are read through (mia.io.cache;
    None: no cache).
    """
    parts: list[tuple[str, Records]] = [
        ("eval", load_records(victim.eval_path, with_membership=True, num_classes=num_classes, cache_dir=cache_dir)),
        ("test", load_records(victim.test_path, with_membership=False, num_classes=num_classes, cache_dir=cache_dir)),
    ]
    if population is not None:
        parts += [("population", load_population_file(p, num_classes)) for p in _population_files(Path(population))]
    shape = parts[0][1].images.shape[1:]
    for role, recs in parts[1:]:
        if recs.images.shape[1:] != shape:
            raise MIAError(f"{recs.path}: {role} images are {recs.images.shape[1:]}, eval images are {shape}")
    sources = [{"role": role, "path": relative_path(recs.path, bundle_root), "sha256": file_digest(recs.path), "n": len(recs)}
               for role, recs in parts]
    kept = without_scored_copies([recs for _, recs in parts[:2]], [recs for _, recs in parts[2:]])
    for i, (recs, dropped) in enumerate(kept, start=2):
        parts[i] = ("population", recs)
        if dropped:
            sources[i].update(n=len(recs), dropped_duplicates=dropped)
    return Pool(
        images=np.concatenate([r.images for _, r in parts]),
        labels=np.concatenate([r.labels for _, r in parts]),
        n_eval=len(parts[0][1]),
        n_test=len(parts[1][1]),
        sources=sources,
    )


def make_masks(k: int, n: int, seed: int) -> np.ndarray:
    """(k, n) bool: ``masks[j, i]`` = model j trains on record i.

    Even k: every column has exactly k/2 True entries, a uniformly random k/2-subset of the models per
    record (LiRA's balanced split). k = 1: the one model trains on a uniformly random half of the
    records (n // 2 of them), so each record is IN or OUT for it with probability 1/2. Deterministic for
    (k, n, seed).
    """
    if k != 1 and (k < 2 or k % 2):
        raise MIAError(f"k must be 1 or an even number >= 2, got {k}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _MASK_TAG, int(k), int(n)]))
    if k == 1:
        masks = np.zeros((1, n), dtype=bool)
        masks[0, rng.permutation(n)[: n // 2]] = True
        return masks
    order = np.argsort(rng.random((n, k)), axis=1, kind="stable")  # a random permutation of models per record
    masks = np.zeros((n, k), dtype=bool)
    masks[np.arange(n)[:, None], order[:, : k // 2]] = True
    return np.ascontiguousarray(masks.T)


def distill_masks(k: int, pool: Pool) -> np.ndarray:
    """(k, n) bool for distilled reference models: every model trains on every population record and on no
    eval or test record, so each of those is OUT for all of them (the attacks are offline)."""
    if pool.n_population == 0:
        raise MIAError("distilled reference models train on population records only, and the pool has none: "
                       "give --population a folder of records from the victim's distribution that are not its "
                       "eval or test records (e.g. the public dataset it was drawn from)")
    masks = np.zeros((k, pool.n), dtype=bool)
    masks[:, pool.n_eval + pool.n_test:] = True
    return masks


def model_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([int(seed), _MODEL_TAG, int(j)]).generate_state(1)[0])
