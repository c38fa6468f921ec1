"""Replace a bundle's ``results/`` folder and ``result.json`` together: all at once or not at all.

A submission is a folder tree and a file beside it; no single rename swaps both. The protocol below
makes every moment of a write (an error, a full disk, Ctrl-C, SIGKILL, a power cut) leave either the
old submission or the complete new one, once ``recover`` has run (every write starts with it). Names are
relative to the bundle root; ``XXXX`` is one random suffix per write.

1. ``lock``: an exclusive ``flock`` on the bundle folder (a second writer is refused, not interleaved).
2. ``recover`` (below), then ``check_targets``: ``results/`` (and its ``plots/``, ``scores/``) must be real
   folders inside the bundle and ``result.json`` a regular file; a symbolic link is refused.
3. ``stage``: the complete new ``results/`` tree is written into ``.results-staging-XXXX/`` (earlier files
   that stay are linked or copied in by ``carry``), the new result.json last as
   ``.results-staging-XXXX/.pending-result.json``; ``commit`` fsyncs every file and folder in it.
4. ``results/`` is renamed to ``.results-old-XXXX/`` (skipped when there is none).
5. ``.results-staging-XXXX/`` is renamed to ``results/``.
6. ``results/.pending-result.json`` is renamed onto ``result.json``: the new submission is complete.
7. ``.results-old-XXXX/`` is removed (what an error leaves of it, the next ``recover`` removes).

``recover`` reads the state a crash left: ``results/.pending-result.json`` exists only between steps 5
and 6 (the new tree is complete: step 6 is finished); no ``results/`` but a ``.results-old-*`` exists only
between 4 and 5 (it is renamed back: the old submission). Then every leftover ``.results-staging-*`` and
``.results-old-*`` is removed. This module writes nothing outside the bundle, and nothing in it but
``results/``, ``result.json`` and those two kinds of folders.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mia.errors import SubmissionError

__all__ = ["PENDING", "carry", "check_targets", "commit", "lock", "recover", "stage"]

RESULTS = "results"
RESULT_JSON = "result.json"
PENDING = ".pending-result.json"  # the new result.json inside the staged tree (steps 3 to 6)
STAGING_PREFIX = ".results-staging-"
OLD_PREFIX = ".results-old-"
OUTPUT_FOLDERS = ("results", "results/plots", "results/scores")


@contextlib.contextmanager
def lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the bundle folder (no lock file: the folder itself is locked)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer is the user's business
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SubmissionError(f"{root}: another process is writing this bundle's results; try again "
                                  "when it has finished") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _leftovers(root: Path, prefix: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(prefix))


def _remove_folder(path: Path) -> None:
    """Remove one of our own staging or old folders; a link with such a name is refused, never followed."""
    if path.is_symlink() or not path.is_dir():
        raise SubmissionError(f"{path}: not a folder this program made (a link or a file); remove it by hand")
    shutil.rmtree(path)


def recover(root: Path) -> list[str]:
    """Finish or undo a write that was cut short (see the module docstring); returns what was done."""
    root = Path(root)
    results, pending, done = root / RESULTS, root / RESULTS / PENDING, []
    olds = _leftovers(root, OLD_PREFIX)
    if results.is_dir() and not results.is_symlink() and pending.is_file() and not pending.is_symlink():
        os.replace(pending, root / RESULT_JSON)  # crashed between steps 5 and 6: the new tree is complete
        pending.unlink(missing_ok=True)  # still there when both names were links to one file (a no-op rename)
        _fsync_folder(root)
        done.append(f"completed the interrupted write of {results} and {root / RESULT_JSON}")
    elif not os.path.lexists(results) and olds:  # crashed between steps 4 and 5: put the old tree back
        if len(olds) > 1:
            raise SubmissionError(f"{root}: no results/ but several earlier ones ({', '.join(p.name for p in olds)}); "
                                  "rename the right one to results/")
        _check_real_folder(olds[0], root)
        os.rename(olds[0], results)
        _fsync_folder(root)
        olds = []
        done.append(f"restored {results} of the earlier submission (a write was interrupted)")
    for path in olds + _leftovers(root, STAGING_PREFIX):
        _remove_folder(path)
        done.append(f"removed {path.name}, left by an interrupted write")
    return done


def _check_real_folder(path: Path, root: Path) -> None:
    if path.is_symlink():
        raise SubmissionError(f"{path}: a symbolic link; results are written only to real folders inside the "
                              "bundle (remove the link)")
    if not path.is_dir():
        raise SubmissionError(f"{path}: not a folder")
    if not path.resolve().is_relative_to(root.resolve()):
        raise SubmissionError(f"{path}: resolves outside the bundle {root}")


def check_targets(root: Path) -> None:
    """Refuse outputs that are links or lead outside the bundle, an earlier tree holding anything but
    folders and regular files (it would be carried into the new one), and read-only folders (the bundle,
    or the earlier results/ that would be replaced)."""
    root = Path(root)
    if not os.access(root, os.W_OK):
        raise SubmissionError(f"{root}: read-only folder; cannot write results/ and result.json there")
    for rel in OUTPUT_FOLDERS:
        if os.path.lexists(root / rel):
            _check_real_folder(root / rel, root)
    rj = root / RESULT_JSON
    if rj.is_symlink() or (os.path.lexists(rj) and not rj.is_file()):
        raise SubmissionError(f"{rj}: not a regular file (a symbolic link?); it is written only as a regular file "
                              "inside the bundle (remove it)")
    results = root / RESULTS
    if results.is_dir():
        for dirpath, dirnames, filenames in os.walk(results):
            if not os.access(dirpath, os.W_OK):
                raise SubmissionError(f"{dirpath}: read-only folder; the earlier results cannot be replaced")
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink() or not (path.is_dir() or path.is_file()):
                    raise SubmissionError(f"{path}: not a regular file or folder (a symbolic link?); results/ holds "
                                          "only files this program wrote (remove it)")


def stage(root: Path) -> Path:
    """A new, empty staging folder inside the bundle: the future ``results/``."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def carry(root: Path, staging: Path, keep: Callable[[str], bool]) -> list[str]:
    """Link (or copy) into ``staging`` every file of the current ``results/`` that ``staging`` does not hold
    and ``keep(relative path)`` accepts (relative to results/, with '/'). Returns those paths."""
    results, carried = Path(root) / RESULTS, []
    if not results.is_dir():
        return carried
    for path in sorted(p for p in results.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(results).as_posix()
        target = staging / rel
        if rel == PENDING or target.exists() or not keep(rel):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # no hard links on this file system
            shutil.copyfile(path, target)
        carried.append(rel)
    return carried


def _fsync_folder(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(Path(dirpath))


def commit(root: Path, staging: Path, result_json: bytes) -> None:
    """Steps 3 (end) to 7: write the pending result.json, fsync the staged tree, swap it in."""
    root = Path(root)
    with open(staging / PENDING, "xb") as f:
        f.write(result_json)
    _fsync_tree(staging)
    results = root / RESULTS
    old = root / (OLD_PREFIX + staging.name.removeprefix(STAGING_PREFIX))
    if os.path.lexists(results):
        os.rename(results, old)
    os.rename(staging, results)
    _fsync_folder(root)
    os.replace(results / PENDING, root / RESULT_JSON)
    _fsync_folder(root)
    if old.is_dir():
        try:
            shutil.rmtree(old)
        except OSError:  # the new submission is in place; the next write's recover removes what is left
            pass
