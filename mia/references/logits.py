"""Reference models' logits (and noisy-query labels, and penultimate features) on the pool, cached by content."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mia.errors import MIAError
from mia.io.cache import cache_root, cached_array, file_digest
from mia.references.pool import Pool
from mia.references.store import ReferenceSet
from mia.scoring import IDENTITY, View, classifier_head, compute_logits, precision_tag

LOGITS_FORMAT = 1  # bump when cached reference logits would change
FEATURES_CACHE_BYTES = 256 * 2**20  # larger penultimate-feature arrays are recomputed, not cached


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


def _logits_cache_path(cache_dir: Path, ref_set: ReferenceSet, j: int, views: tuple[View, ...],
                       labels_only: bool = False, device: str = "auto", what: str = "",
                       precision: str = "auto", scored_only: bool = False) -> Path:
    """``<cache_dir>/logits/reference-<victim>-model_<j>-<key>.npz``: the key hashes the model file, the pool's
    fingerprint, the views, the architecture file, ``labels_only`` (or ``what`` else it holds), the
    precision and ``scored_only``."""
    h = hashlib.sha256(f"format={LOGITS_FORMAT};views={[v.name for v in views]};"
                       f"pool={ref_set.fingerprint}{';labels' if labels_only else ''}{what}"
                       f"{';scored' if scored_only else ''};"
                       f"{precision_tag(device, 'fp32' if what else precision)}".encode())
    h.update(file_digest(ref_set.model_path(j)).encode())
    arch_file = ref_set.manifest.get("architecture_file", {}).get("sha256", "-")
    h.update(str(arch_file).encode())
    prefix = "reference-features" if what else "reference"
    return cache_dir / "logits" / f"{prefix}-{ref_set.manifest['victim']}-model_{j:03d}-{h.hexdigest()[:24]}.npz"


def reference_logits(ref_set: ReferenceSet, views: tuple[View, ...] = (IDENTITY,), device: str = "auto",
                     batch_size: int = 256, *, progress: bool = False, cache: bool = True,
                     cache_dir: str | Path | None = None, pool: Pool | None = None,
                     labels_only: bool = False, precision: str = "auto", scored_only: bool = False) -> np.ndarray:
    """Logits of every complete reference model on the whole pool -> (K, V, N_pool, C) float32; with
    ``labels_only`` their predicted labels -> (K, V, N_pool) int64 (for the many noisy queries).
    ``precision``: compute_logits' (the victim's: RunConfig.precision), part of the cache key.
    ``scored_only``: the pool's eval and test records only, the ones an attack scores (N_pool becomes
    n_eval + n_test): the population records, which only train the models, are not queried (a distilled set's
    population is often many times the scored records).

    K = len(ref_set.complete), in that order (``ref_set.complete_masks()`` are the matching masks);
    V = len(views). With ``cache``, each model's array is kept under ``<cache root>/logits/`` (mia.io.cache:
    ``cache_dir``, else the default root), keyed by the model file, the pool, the views, the architecture
    file and ``labels_only``; an entry of another shape or dtype, or with a non-finite logit, is recomputed.
    """
    views = tuple(views)
    root = cache_root(cache_dir) if cache else None
    n = ref_set.n_eval + ref_set.n_test if scored_only else ref_set.n_pool
    out = []
    for j in tqdm(ref_set.complete, desc=f"{ref_set.manifest['victim']} reference logits", unit="model",
                  disable=not progress, leave=False):
        path = (_logits_cache_path(root, ref_set, j, views, labels_only, device, precision=precision,
                                   scored_only=scored_only) if root is not None else None)

        def compute(j: int = j) -> np.ndarray:
            images = (pool if pool is not None else ref_set.load_pool(cache_dir=root)).images[:n]
            return compute_logits(ref_set.load_model(j), images, views, device=device, batch_size=batch_size,
                                  labels_only=labels_only, precision=precision)

        def valid(a: np.ndarray) -> bool:
            if labels_only:
                return a.shape == (len(views), n) and a.dtype == np.int64
            return a.ndim == 3 and a.shape[:2] == (len(views), n) and a.dtype == np.float32 and bool(np.isfinite(a).all())

        arr, _ = cached_array(path, compute, valid, {"format": LOGITS_FORMAT, "views": [v.name for v in views]})
        out.append(arr.astype(np.int64 if labels_only else np.float32, copy=False))
    if not out:
        raise MIAError(f"{ref_set.folder}: no complete reference model")
    return np.stack(out)


# --------------------------------------------------------------------------------------------------
# Penultimate features (the classifier head's input), for the last-layer Laplace attack


def head_parameters(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight (C, D), bias (C,) or None) of the model's classifier head (``scoring.classifier_head``),
    float64. MIAError for a model without an ``nn.Linear``."""
    head = classifier_head(model)
    if head is None:
        raise MIAError(f"{type(model).__name__} has no nn.Linear classifier head: no last-layer Laplace attack")
    bias = None if head.bias is None else head.bias.detach().double().cpu().numpy()
    return head.weight.detach().double().cpu().numpy(), bias


def penultimate_features(model: torch.nn.Module, images: np.ndarray, views: tuple[View, ...], device: str = "auto",
                         batch_size: int = 256) -> np.ndarray:
    """The classifier head's input for every image under each view -> (V, n, D) float32, computed in fp32
    (a forward hook on ``classifier_head`` records what the head receives)."""
    head = classifier_head(model)
    if head is None:
        raise MIAError(f"{type(model).__name__} has no nn.Linear classifier head: no last-layer Laplace attack")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].detach().float().flatten(1)))
    try:
        out = []
        for view in views:  # one view per call: the hook sees the records in order
            captured.clear()
            compute_logits(model, images, (view,), device=device, batch_size=batch_size, labels_only=True,
                           precision="fp32")
            out.append(torch.cat(captured).cpu().numpy())  # one copy per view: no wait per batch
    finally:
        hook.remove()
    return np.stack(out)


def reference_features(ref_set: ReferenceSet, j: int, views: tuple[View, ...], device: str = "auto",
                       batch_size: int = 256, *, cache: bool = True, cache_dir: str | Path | None = None,
                       pool: Pool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Reference model j's penultimate features -> (scored (V, n_eval + n_test, D) float32: the scored records
    under ``views``; trained (N_trained, D) float32: the records it trained on, in pool order, under the
    identity view (the first of ``views`` without one); head weight (C, D); head bias (C,) or None).

    Only what the Laplace attack reads is computed: the population records under one view, not all of
    them (a distilled set's population is often many times the scored records). Each array is cached like
    the logits when it takes at most FEATURES_CACHE_BYTES (a 4,096-wide head on a large pool would take
    gigabytes: recomputed instead)."""
    model = ref_set.load_model(j)
    weight, bias = head_parameters(model)
    root = cache_root(cache_dir) if cache else None
    n, width = ref_set.n_eval + ref_set.n_test, weight.shape[1]
    fit_view = IDENTITY if IDENTITY in views else views[0]
    inside = np.asarray(ref_set.masks[j], dtype=bool)
    population = np.flatnonzero(inside[n:]) + n  # the population records it trained on

    def features(what: str, rows: np.ndarray | slice, these: tuple[View, ...], count: int) -> np.ndarray:
        small = len(these) * count * width * 4 <= FEATURES_CACHE_BYTES
        path = (_logits_cache_path(root, ref_set, j, these, device=device, what=what)
                if root is not None and small else None)

        def compute() -> np.ndarray:
            images = (pool if pool is not None else ref_set.load_pool(cache_dir=root)).images[rows]
            return penultimate_features(model, images, these, device=device, batch_size=batch_size)

        def valid(a: np.ndarray) -> bool:
            return (a.ndim == 3 and a.shape[:2] == (len(these), count) and a.dtype == np.float32
                    and bool(np.isfinite(a).all()))

        arr, _ = cached_array(path, compute, valid, {"format": LOGITS_FORMAT, "views": [v.name for v in these],
                                                     "features": what})
        return arr

    scored = features(";features;scored", slice(0, n), tuple(views), n)
    trained = scored[list(views).index(fit_view)][inside[:n]]
    if len(population):
        trained = np.concatenate([trained, features(";features;population", population, (fit_view,),
                                                    len(population))[0]])
    return scored, trained, weight, bias
