"""Content-keyed cache entries under the user's cache folder: what a warm re-run reads instead of recomputing.

The cache lives outside every bundle (``cache_root``: ``$MIA_CACHE_DIR``, else the user's cache folder
as platformdirs gives it), so a bundle that ships its own ``.cache/`` cannot change results: that folder
is never read. Every entry is named by the sha256 of what it was derived from, so an edited input
simply misses, and bundles sharing the root never collide. Each entry also records what it claims to
be (its name, the caller's ``claims`` such as the source file's sha256, every array's dtype and shape)
and is used only when that matches what the caller expects and the caller's ``valid`` accepts the
arrays. Entries are written atomically (temp file + rename) and read with ``allow_pickle=False``: a
damaged, stale or planted entry is at worst rebuilt, never run. A cache that cannot be written is
skipped, with one warning per folder.

* ``cache_root``: where the cache lives.
* ``file_digest``: sha256 of a file, remembered for the process while the file's size, mtime and
  inode stay the same (one run hashes each input once, not once per use).
* ``cached_arrays`` / ``cached_array``: named arrays / one array as ``.npz`` (mia.io.records keeps
  validated records under ``records/``, mia.scoring logits under ``logits/``).
* ``cached_file``: a file such as a figure (mia.plots under ``plots/``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from mia.io.atomic import atomic_save_npz, atomic_write_bytes

__all__ = ["CACHE_DIR_ENV", "CacheWarning", "cache_root", "cached_array", "cached_arrays", "cached_file",
           "file_digest"]

CACHE_DIR_ENV = "MIA_CACHE_DIR"
_META = "__entry__"  # the array of an entry's .npz that holds what the entry claims (a JSON string)
_DIGESTS: dict[tuple, str] = {}
_UNWRITABLE_WARNED: set[str] = set()  # folders a warning was already given for
_log = logging.getLogger(__name__)


class CacheWarning(RuntimeWarning):
    """The cache could not be written: the run goes on without it."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder every cache entry lives under: ``cache_dir`` when given, else ``$MIA_CACHE_DIR`` when
    set, else the user's cache folder (``platformdirs.user_cache_dir("mia")``, e.g. ``~/.cache/mia`` on
    Linux). Never a folder inside a bundle unless asked for explicitly."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or None
    if cache_dir is None:
        import platformdirs

        return Path(platformdirs.user_cache_dir("mia", appauthor=False))
    return Path(cache_dir).expanduser()


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


def _describe_entry(name: str, claims: dict, arrays: dict[str, np.ndarray]) -> dict:
    """What an entry claims: its file name, the caller's claims and each array's dtype and shape (JSON-ready)."""
    return json.loads(json.dumps({
        "name": name,
        "claims": claims,
        "arrays": {k: [a.dtype.str, list(a.shape)] for k, a in sorted(arrays.items())},
    }))


def _read_entry(entry: Path, claims: dict) -> dict[str, np.ndarray] | None:
    """The arrays of ``entry`` when it states the expected name and claims and its arrays are what it
    states (dtypes, shapes), else None (said at debug level). Any damage is a miss, never an error."""
    try:
        with np.load(entry, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = arrays.pop(_META, None)
        if meta is None or meta.dtype.kind != "U" or meta.ndim != 0:
            _log.debug("cache entry %s ignored: no description", entry)
            return None
        if json.loads(str(meta)) != _describe_entry(entry.name, claims, arrays):
            _log.debug("cache entry %s ignored: not what it claims or not what is expected", entry)
            return None
        return arrays
    except Exception as e:  # noqa: BLE001 - a damaged entry (truncated zip, bad header, ...) is a miss
        _log.debug("cache entry %s ignored: unreadable (%s)", entry, e)
        return None


def _warn_unwritable(entry: Path, error: OSError) -> None:
    """One CacheWarning per folder that blocks writing (the nearest existing folder above ``entry``)."""
    folder = entry.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if str(folder) in _UNWRITABLE_WARNED:
        return
    _UNWRITABLE_WARNED.add(str(folder))
    warnings.warn(f"the cache cannot be written under {folder} ({error.strerror or error}); going on without "
                  f"it (set {CACHE_DIR_ENV} or --cache-dir to a writable folder, or use --no-cache)",
                  CacheWarning, stacklevel=3)


def cached_arrays(entry: Path | None, build: Callable[[], dict[str, np.ndarray]],
                  valid: Callable[[dict[str, np.ndarray]], bool],
                  claims: dict | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """Named arrays from the ``.npz`` file ``entry`` when it is a valid entry, else ``build()``'s, stored
    there atomically. Returns (arrays, hit).

    ``claims``: what the arrays are derived from (the source file's sha256, a format version, ...),
    JSON-ready; stored in the entry with its name and every array's dtype and shape. An entry is used
    only when all of that matches and ``valid`` (the caller's check of the content) accepts its arrays;
    otherwise it is rebuilt. ``entry=None`` disables the cache; an entry that cannot be written
    (read-only folder) is skipped with one CacheWarning per folder."""
    claims = claims or {}
    if entry is not None and entry.is_file():
        arrays = _read_entry(entry, claims)
        if arrays is not None:
            try:
                ok = bool(valid(arrays))
            except Exception:  # noqa: BLE001 - content the check cannot even read is a miss
                ok = False
            if ok:
                return arrays, True
            _log.debug("cache entry %s ignored: its content is rejected", entry)
    arrays = build()
    if entry is not None:
        meta = np.array(json.dumps(_describe_entry(entry.name, claims, arrays)))
        try:
            atomic_save_npz(entry, **arrays, **{_META: meta})
        except OSError as e:
            _warn_unwritable(entry, e)
    return arrays, False


def cached_array(entry: Path | None, build: Callable[[], np.ndarray], valid: Callable[[np.ndarray], bool],
                 claims: dict | None = None) -> tuple[np.ndarray, bool]:
    """One array under the same contract as ``cached_arrays`` (an ``.npz`` entry holding ``array``)."""
    arrays, hit = cached_arrays(entry, lambda: {"array": build()}, lambda a: a.keys() == {"array"} and valid(a["array"]),
                                claims)
    return arrays["array"], hit


def cached_file(entry: Path | None, target: Path, write: Callable[[Path], None]) -> bool:
    """Make ``target`` (a file such as a figure) from the cache entry when there is one, else ``write(target)``
    and keep a copy as the entry. Returns whether the entry was used. Entries are named by the caller
    from the content that determines them; an unreadable entry is rewritten, a read-only cache skipped
    (one CacheWarning per folder)."""
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
        except OSError as e:
            _warn_unwritable(entry, e)
    return False
