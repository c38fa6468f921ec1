"""Content-keyed files under ``<bundle>/.cache/``: what a warm re-run reads instead of recomputing.

Every entry is named by the sha256 of the files it was derived from, so an edited input simply
misses the cache; entries are written atomically (temp file + rename) and read with
``allow_pickle=False``, so a damaged or planted entry can at worst be ignored, never run code.
A cache that cannot be written (read-only bundle) is skipped silently.

* ``file_digest``: sha256 of a file, remembered for the process while the file's size, mtime and
  inode stay the same (one run hashes each input once, not once per use).
* ``cached_records``: validated dataset records as ``.npz`` (``records/``), so the safe but slow
  pure-Python unpickling of a ``.p`` file happens once per file content.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from mia.atomic import atomic_save_npz

__all__ = ["RECORDS_CACHE_FORMAT", "cached_records", "file_digest"]

RECORDS_CACHE_FORMAT = 1  # bump when the arrays a records entry holds would change

_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex). Remembered per (path, device, inode, size, mtime) for the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def _read_records_entry(entry: Path, with_membership: bool):
    """(images, labels, membership or None) from a cache entry, or None if missing or malformed."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
            membership = z["membership"] if with_membership else None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    n = len(labels)
    ok = (images.dtype == np.float32 and images.ndim == 4 and len(images) == n and n > 0
          and labels.dtype == np.int64 and labels.ndim == 1 and labels.min() >= 0 and np.isfinite(images).all())
    if ok and with_membership:
        ok = (membership.dtype == np.int64 and membership.shape == (n,) and np.isin(membership, (0, 1)).all()
              and 0 < membership.sum() < n)
    return (images, labels, membership) if ok else None


def cached_records(cache_dir: str | Path | None, path: str | Path, with_membership: bool, load: Callable):
    """Records of ``path``: from ``<cache_dir>/records/`` when an entry for this file content exists,
    else ``load()`` (which validates; num_classes unchecked) and store them.

    Returns (Records, hit). ``load`` is only called on a miss; the caller checks label ranges.
    """
    from mia.data import Records

    if cache_dir is None:
        return load(), False
    kind = "eval" if with_membership else "test"
    entry = Path(cache_dir) / "records" / f"{file_digest(path)[:32]}-{kind}-v{RECORDS_CACHE_FORMAT}.npz"
    arrays = _read_records_entry(entry, with_membership)
    if arrays is not None:
        images, labels, membership = arrays
        return Records(images=images, labels=labels, membership=membership, path=Path(path)), True
    recs = load()
    parts = {"images": recs.images, "labels": recs.labels}
    if with_membership:
        parts["membership"] = recs.membership
    try:
        atomic_save_npz(entry, **parts)
    except OSError:
        pass  # read-only bundle: no cache, same records
    return recs, False
