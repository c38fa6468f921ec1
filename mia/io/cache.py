"""Content-keyed files under ``<bundle>/.cache/``: what a warm re-run reads instead of recomputing.

Every entry is named by the sha256 of the files it was derived from, so an edited input simply
misses the cache; entries are written atomically (temp file + rename) and read with
``allow_pickle=False``, so a damaged or planted entry can at worst be ignored, never run code.
A cache that cannot be written (read-only bundle) is skipped silently.

* ``file_digest``: sha256 of a file, remembered for the process while the file's size, mtime and
  inode stay the same (one run hashes each input once, not once per use).
* ``cached_arrays``: named arrays as ``.npz``, validated by the caller before use (mia.io.records keeps
  validated records under ``records/``, so the slow safe unpickling happens once per file content).
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from mia.io.atomic import atomic_save_npy, atomic_save_npz, atomic_write_bytes

__all__ = ["cached_array", "cached_arrays", "cached_file", "file_digest"]

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


def cached_arrays(entry: Path | None, build: Callable[[], dict[str, np.ndarray]],
                  valid: Callable[[dict[str, np.ndarray]], bool]) -> tuple[dict[str, np.ndarray], bool]:
    """Named arrays from the ``.npz`` file ``entry`` when it exists and ``valid`` accepts its arrays,
    else ``build()``'s, stored there atomically. Returns (arrays, hit).

    The cache knows nothing of what the arrays mean: ``valid`` (the caller's) decides whether an entry
    can be used, so a damaged or planted entry is rebuilt. ``entry=None`` disables the cache; an entry
    that cannot be written (read-only folder) is skipped."""
    if entry is not None and entry.is_file():
        try:
            with np.load(entry, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if valid(arrays):
                return arrays, True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged entry: rebuilt below
    arrays = build()
    if entry is not None:
        try:
            atomic_save_npz(entry, **arrays)
        except OSError:
            pass  # read-only bundle: no cache, same arrays
    return arrays, False


def cached_array(entry: Path | None, build: Callable[[], np.ndarray],
                 valid: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, bool]:
    """One array as ``.npy`` under the same contract as ``cached_arrays``: used when ``valid`` accepts it,
    else built, stored atomically (skipped where the folder is read-only) and returned. (array, hit)."""
    if entry is not None and entry.is_file():
        try:
            array = np.load(entry, allow_pickle=False)
            if isinstance(array, np.ndarray) and valid(array):
                return array, True
        except (OSError, ValueError, EOFError):
            pass  # damaged entry: rebuilt below
    array = build()
    if entry is not None:
        try:
            atomic_save_npy(entry, array)
        except OSError:
            pass  # read-only bundle: no cache, same array
    return array, False


def cached_file(entry: Path | None, target: Path, write: Callable[[Path], None]) -> bool:
    """Make ``target`` (a file such as a figure) from the cache entry when there is one, else ``write(target)``
    and keep a copy as the entry. Returns whether the entry was used. Entries are named by the caller
    from the content that determines them; an unreadable entry is rewritten, a read-only cache skipped."""
    if entry is not None and entry.is_file():
        try:
            atomic_write_bytes(target, entry.read_bytes())
            return True
        except OSError:
            pass  # unreadable entry: made again below
    write(target)
    if entry is not None:
        try:
            atomic_write_bytes(entry, target.read_bytes())
        except OSError:
            pass  # read-only bundle: no cache
    return False
