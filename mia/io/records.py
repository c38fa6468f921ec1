"""Dataset records: validation and writing of the challenge's dataset pickles (reading: mia.io.unpickler).

A dataset pickle holds a list of records:

* eval files (``datasets/eval/<dataset>_<arch>.p``): ``[image, label, membership]``
* test files (``datasets/test/<dataset>_<arch>.p``): ``[image, label]``

``image`` is a model-ready (C, H, W) float tensor (already normalised: feed it as is), a
``torch.Tensor`` or a ``numpy.ndarray``; ``label`` and ``membership`` are integers (python int,
numpy integer, or a 0-d or one-element integer tensor/array). Records may be lists or tuples.
Validated records are cached by file content (mia.io.cache), so the slow safe unpickling runs once.
"""
from __future__ import annotations

import math
import pickle
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mia.core.arrays import to_numpy
from mia.errors import DataError
from mia.io.atomic import atomic_write
from mia.io.cache import cached_arrays, file_digest
from mia.io.unpickler import exception_text, file_size, safe_load_pickle

__all__ = ["Records", "load_records", "records_from_objects", "save_records"]


@dataclass(frozen=True, eq=False)  # eq=False: a field-wise == on arrays would raise
class Records:
    """The validated content of one dataset pickle.

    images: (n, C, H, W) float32, C-contiguous, all finite.
    labels: (n,) int64, class indices >= 0.
    membership: (n,) int64 in {0, 1} (1 = member), or None for test files.
    path: the file the records came from, if any.
    """

    images: np.ndarray
    labels: np.ndarray
    membership: np.ndarray | None
    path: Path | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if self.labels.ndim == 1 else -1
        if self.images.ndim != 4 or self.images.shape[0] != n:
            raise ValueError(
                f"images must be (n, C, H, W) with n = len(labels); got images {self.images.shape}, "
                f"labels {self.labels.shape}"
            )
        if self.membership is not None and self.membership.shape != (n,):
            raise ValueError(f"membership must be ({n},), got {self.membership.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


_TORCH_INT_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)
_INT64_MAX = int(np.iinfo(np.int64).max)
RECORDS_CACHE_FORMAT = 2  # bump when the arrays a records cache entry holds would change
_FINITE_CHUNK = 4096  # records per np.isfinite pass (bounds the temporary bool array)


def _describe(value: object) -> str:
    """Short human description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"torch.Tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"numpy array of dtype {value.dtype} and shape {value.shape}"
    try:
        text = reprlib.repr(value)
    except Exception:  # a foreign object with a broken __repr__
        text = "<unprintable>"
    return f"{type(value).__name__} {text}"


def _as_int(value: object, what: str, path: Path | None, index: int) -> int:
    """``value`` as a python int: int, numpy integer, or a 0-d or one-element integer array/tensor.
    No bools, no floats."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{what} must be an integer, found bool {value!r}", path=path, index=index)
    if isinstance(value, int):
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1 and value.dtype.kind in "iu":
        return int(value.reshape(()))
    if (isinstance(value, torch.Tensor) and value.numel() == 1 and value.ndim <= 1
            and value.dtype in _TORCH_INT_DTYPES and value.layout == torch.strided and value.device.type != "meta"):
        return int(value.reshape(()).item())
    raise DataError(f"{what} must be an integer, found {_describe(value)}", path=path, index=index)


def _image_array(image: object, path: Path | None, index: int) -> np.ndarray:
    """A (C, H, W) numpy view/copy of ``image`` with a real numeric dtype (not yet float32)."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if not (t.is_floating_point() or t.dtype in _TORCH_INT_DTYPES) or t.layout != torch.strided:
            raise DataError(f"image must be a real-valued dense tensor, found {_describe(image)}", path=path,
                            index=index)
        try:
            if t.device.type != "cpu":
                t = t.cpu()
            if t.dtype not in (torch.float32, torch.float64, torch.float16) and t.is_floating_point():
                t = t.to(torch.float32)  # bfloat16, float8: no numpy equivalent
            arr = t.resolve_conj().resolve_neg().numpy()
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # meta or otherwise unreadable tensors
            raise DataError(f"image tensor cannot be read: {exception_text(exc)}", path=path, index=index) from None
    elif isinstance(image, np.ndarray):
        if image.dtype.kind not in "fiu":
            raise DataError(f"image must be a real-valued array, found {_describe(image)}", path=path,
                            index=index)
        arr = image
    else:
        raise DataError(f"image must be a torch.Tensor or numpy.ndarray, found {_describe(image)}", path=path,
                        index=index)
    if arr.ndim != 3:
        raise DataError(f"image must be 3-D (C, H, W), found shape {tuple(arr.shape)}", path=path, index=index)
    if arr.shape[2] in (1, 3) and arr.shape[0] not in (1, 3):
        raise DataError(f"image of shape {tuple(arr.shape)} looks like (H, W, C); records hold (C, H, W) images "
                        f"as the model takes them (transpose with .permute(2, 0, 1))", path=path, index=index)
    if arr.dtype.kind in "iu":
        raise DataError(f"image has integer dtype {arr.dtype}: records must hold model-ready float images (what the "
                        f"victim was fed, after its own scaling and normalisation); convert them the way the victim's "
                        f"training did, e.g. x / 255 then (x - mean) / std, and save float32", path=path, index=index)
    if 0 in arr.shape:
        raise DataError(f"image has an empty dimension: shape {tuple(arr.shape)}", path=path, index=index)
    return arr


def records_from_objects(
    obj: object,
    *,
    path: str | Path | None,
    with_membership: bool,
    num_classes: int | None = None,
) -> Records:
    """Validate unpickled records and stack them.

    obj: a list/tuple of records, each a list/tuple ``[image, label, membership]`` when
        ``with_membership`` (eval files) or ``[image, label]`` otherwise (test files).
    path: the file they came from (used in error messages), or None.
    num_classes: when given, every label must lie in [0, num_classes).

    Returns Records with images (n, C, H, W) float32. Raises DataError naming the path and the
    record index for the first problem found: structure, shapes and integer fields first, then
    non-finite pixels, then (eval files) the presence of both members and non-members.
    """
    return _validate_records(obj, path=path, with_membership=with_membership, num_classes=num_classes,
                             max_image_bytes=None)


def _validate_records(
    obj: object,
    *,
    path: str | Path | None,
    with_membership: bool,
    num_classes: int | None,
    max_image_bytes: int | None,
) -> Records:
    """records_from_objects, refusing when the stacked images would exceed ``max_image_bytes``."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    path = None if path is None else Path(path)
    kind, arity, layout = (
        ("an eval", 3, "[image, label, membership]") if with_membership else ("a test", 2, "[image, label]")
    )
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"expected a list of {layout} records at the top level, found {_describe(obj)}", path=path)
    n = len(obj)
    if n == 0:
        raise DataError("contains no records", path=path)

    images: np.ndarray | None = None
    first_shape: tuple[int, ...] = ()
    labels = np.empty(n, dtype=np.int64)
    membership = np.empty(n, dtype=np.int64) if with_membership else None
    for i, record in enumerate(obj):
        if not isinstance(record, (list, tuple)):
            raise DataError(f"record must be a list or tuple {layout}, found {_describe(record)}", path=path,
                            index=i)
        if len(record) != arity:
            hint = ""
            if with_membership and len(record) == 2:
                hint = " (no membership: is this a test file?)"
            elif not with_membership and len(record) == 3:
                hint = " (a third item: is this an eval file with membership?)"
            raise DataError(
                f"{kind} record must have {arity} items {layout}, found {len(record)}{hint}", path=path, index=i
            )
        arr = _image_array(record[0], path, i)
        if images is None:
            first_shape = arr.shape
            needed = n * math.prod(first_shape) * 4
            if max_image_bytes is not None and needed > max_image_bytes:
                raise DataError(
                    f"{n} images of shape {tuple(first_shape)} would take {needed / 2**30:.1f} GiB as float32, "
                    f"far more than the file holds: records reuse the same image data", path=path)
            try:
                images = np.empty((n, *first_shape), dtype=np.float32)
            except MemoryError:
                raise DataError(f"{n} images of shape {first_shape} do not fit in memory", path=path) from None
        elif arr.shape != first_shape:
            raise DataError(
                f"image shape {tuple(arr.shape)} differs from record 0's shape {tuple(first_shape)}",
                path=path, index=i,
            )
        if arr.dtype == np.float32:
            images[i] = arr
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                images[i] = arr  # casts to float32; overflow becomes inf, reported below

        label = _as_int(record[1], "label", path, i)
        if label < 0 or (num_classes is not None and label >= num_classes) or label > _INT64_MAX:
            bound = f"in [0, {num_classes})" if num_classes is not None else ">= 0 and fit in int64"
            raise DataError(f"label {label} out of range: must be {bound}", path=path, index=i)
        labels[i] = label
        if membership is not None:
            member = _as_int(record[2], "membership", path, i)
            if member not in (0, 1):
                raise DataError(f"membership must be 0 or 1, found {member}", path=path, index=i)
            membership[i] = member

    assert images is not None
    flat = images.reshape(n, -1)
    for start in range(0, n, _FINITE_CHUNK):
        finite = np.isfinite(flat[start:start + _FINITE_CHUNK]).all(axis=1)
        if not finite.all():
            i = start + int(np.argmin(finite))
            bad = flat[i][~np.isfinite(flat[i])][0]
            raise DataError(f"image contains a non-finite value ({bad} as float32)", path=path, index=i)

    if membership is not None:
        n_members = int(membership.sum())
        if n_members == n:
            raise DataError(f"all {n} records are members (membership 1); an eval file needs members and "
                            f"non-members", path=path)
        if n_members == 0:
            raise DataError(f"all {n} records are non-members (membership 0); an eval file needs members and "
                            f"non-members", path=path)
    return Records(images=images, labels=labels, membership=membership, path=path)


def load_records(path: str | Path, *, with_membership: bool, num_classes: int | None = None,
                 cache_dir: str | Path | None = None) -> Records:
    """Safely load and validate a dataset pickle (eval: ``with_membership=True``; test: False).

    Returns Records with images (n, C, H, W) float32, labels (n,) int64 and membership (n,) int64
    or None. Raises DataError (UnsafePickleError for a refused global) naming the file and record.

    cache_dir: the cache root (mia.io.cache.cache_root), or None for no cache. When given, the validated
    arrays are kept under ``<cache_dir>/records/`` as ``.npz`` keyed by the file's sha256
    (mia.io.cache.cached_arrays), and later calls on the same content read them instead of unpickling
    again. An entry is used only when it states this file's sha256, the file's kind (eval or test) and
    the format, and its arrays pass the checks the records themselves pass (dtypes, shapes, one label
    and membership per image); labels are checked against ``num_classes`` either way.
    """
    if cache_dir is None:
        return _load_validated(path, with_membership, num_classes)
    kind = "eval" if with_membership else "test"
    digest = file_digest(path)
    entry = Path(cache_dir) / "records" / f"{digest[:32]}-{kind}-v{RECORDS_CACHE_FORMAT}.npz"
    claims = {"source_sha256": digest, "kind": kind, "format": RECORDS_CACHE_FORMAT}

    def build() -> dict[str, np.ndarray]:
        recs = _load_validated(path, with_membership, None)
        arrays = {"images": recs.images, "labels": recs.labels}
        if with_membership:
            arrays["membership"] = recs.membership
        return arrays

    arrays, _ = cached_arrays(entry, build, lambda a: _valid_record_arrays(a, with_membership), claims)
    recs = Records(images=arrays["images"], labels=arrays["labels"], membership=arrays.get("membership"),
                   path=Path(path))
    if num_classes is not None:
        _check_label_range(recs.labels, num_classes, Path(path))
    return recs


def _valid_record_arrays(arrays: dict[str, np.ndarray], with_membership: bool) -> bool:
    """Whether a cache entry holds what _validate_records returns (shapes, dtypes, finite, 0/1 membership)."""
    expected = {"images", "labels", "membership"} if with_membership else {"images", "labels"}
    if arrays.keys() != expected:
        return False
    images, labels = arrays["images"], arrays["labels"]
    n = len(labels)
    ok = (images.dtype == np.float32 and images.ndim == 4 and len(images) == n and n > 0
          and labels.dtype == np.int64 and labels.ndim == 1 and labels.min() >= 0 and bool(np.isfinite(images).all()))
    if ok and with_membership:
        membership = arrays["membership"]
        ok = (membership.dtype == np.int64 and membership.shape == (n,) and bool(np.isin(membership, (0, 1)).all())
              and 0 < membership.sum() < n)
    return ok


def _load_validated(path: str | Path, with_membership: bool, num_classes: int | None) -> Records:
    obj = safe_load_pickle(path)
    # Every image's data is in the file at 1 byte per value or more, so float32 needs at most 4x.
    max_image_bytes = 4 * file_size(Path(path)) + (64 << 20)
    return _validate_records(obj, path=path, with_membership=with_membership, num_classes=num_classes,
                             max_image_bytes=max_image_bytes)


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path | None) -> None:
    """The DataError _validate_records raises for the first label outside [0, num_classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"label {int(labels[i])} out of range: must be in [0, {num_classes})", path=path, index=i)


# --------------------------------------------------------------------------- writing

def save_records(
    path: str | Path,
    images: np.ndarray | torch.Tensor | Sequence[Any],
    labels: np.ndarray | torch.Tensor | Sequence[int],
    membership: np.ndarray | torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Write a dataset pickle in the challenge format, atomically.

    images: (n, C, H, W) real numbers (stored as float32). labels: (n,) integers.
    membership: (n,) 0/1 for an eval file, or None for a test file.

    Each record is ``[torch.Tensor (C, H, W) float32, int, int]`` (eval) or ``[tensor, int]``
    (test), written with plain ``pickle`` (protocol 4). The records are validated with
    ``records_from_objects`` first, so whatever is written loads back with ``load_records``.
    """
    path = Path(path)
    image_array = to_numpy(images)
    if image_array.dtype.kind not in "fiu" or image_array.ndim != 4:
        raise DataError(f"images must be a real-valued (n, C, H, W) array, found {_describe(image_array)}",
                        path=path)
    with np.errstate(over="ignore", invalid="ignore"):
        image_array = image_array.astype(np.float32, copy=False)  # overflow -> inf, refused below
    n = image_array.shape[0]
    label_array = to_numpy(labels)
    if label_array.shape != (n,):
        raise DataError(f"labels must have shape ({n},), found {label_array.shape}", path=path)
    member_array = None if membership is None else to_numpy(membership)
    if member_array is not None and member_array.shape != (n,):
        raise DataError(f"membership must have shape ({n},), found {member_array.shape}", path=path)

    records: list[list[Any]] = []
    for i in range(n):
        # .copy(): a view would pickle the whole shared storage once per record.
        record: list[Any] = [torch.from_numpy(image_array[i].copy()), _as_int(label_array[i], "label", path, i)]
        if member_array is not None:
            record.append(_as_int(member_array[i], "membership", path, i))
        records.append(record)
    records_from_objects(records, path=path, with_membership=membership is not None)

    atomic_write(path, lambda f: pickle.dump(records, f, protocol=4), durable=True)
