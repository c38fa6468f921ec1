"""Atomic file writes: a temporary file in the target's folder, then ``os.replace`` onto the target.

A reader sees the old file or the new one, never half of one; an error (or Ctrl-C) while writing
leaves the old file as it was and no temporary file behind. Files are created 0644 (``mkstemp``
alone would make them 0600). ``durable=True`` also fsyncs the data before the rename (submission
files, records written for users); cache entries skip it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

__all__ = ["atomic_save_npy", "atomic_save_npz", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, durable: bool = False) -> Path:
    """Call ``write(f)`` on a binary temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=durable)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """np.save (no pickles) atomically."""
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """np.savez (uncompressed: loading is a copy) atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))
