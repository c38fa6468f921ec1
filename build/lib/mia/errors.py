"""The project's exception types. Every failure a user can cause raises one of these.

The CLI turns them into one readable line (``--debug`` shows the traceback).
"""
from __future__ import annotations

from pathlib import Path


class MIAError(Exception):
    """Base class for every error the project raises on bad input or bad state."""


class BundleError(MIAError):
    """The bundle's layout is wrong: missing files, unmatched victims, names that do not parse."""


class DataError(MIAError):
    """A dataset pickle is unreadable or one of its records is invalid.

    ``path`` and ``index`` (record index, or None for file-level problems) are kept as attributes
    and are part of the message.
    """

    def __init__(self, message: str, path: str | Path | None = None, index: int | None = None):
        self.path = None if path is None else Path(path)
        self.index = index
        where = []
        if path is not None:
            where.append(str(path))
        if index is not None:
            where.append(f"record {index}")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class UnsafePickleError(DataError):
    """A pickle asked for a global that the restricted unpickler does not allow."""


class CheckpointError(MIAError):
    """A checkpoint cannot be loaded safely or does not match its architecture."""


class ArchitectureError(MIAError):
    """An architecture file cannot be imported or its constructor cannot be called."""


class SubmissionError(MIAError):
    """A submission (results/*.npy, result.json) is missing or invalid."""
