"""Stratified k-fold splits, repeated: the one place where cross-validation folds are drawn."""
from __future__ import annotations

import numpy as np

__all__ = ["repeated_stratified_folds", "stratified_folds"]


def _draw(membership: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    folds = np.empty(len(membership), dtype=np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(membership == cls)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = np.arange(len(idx)) % k
    return folds


def stratified_folds(membership: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(n,) fold index in [0, k), members and non-members spread evenly, deterministic for ``seed``."""
    return _draw(np.asarray(membership), k, np.random.default_rng(seed))


def repeated_stratified_folds(membership: np.ndarray, k: int, repeats: int, seed: int) -> np.ndarray:
    """(repeats, n) fold indices: ``repeats`` independent stratified k-fold splits drawn from one
    generator seeded with ``seed``; row 0 is ``stratified_folds(membership, k, seed)``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    membership = np.asarray(membership)
    rng = np.random.default_rng(seed)
    return np.stack([_draw(membership, k, rng) for _ in range(repeats)])
