"""Fashion-MNIST for the demo bundle: find the IDX files (Debian's dataset-fashion-mnist, a folder, or an
opt-in download), parse them, and turn the images into model-ready challenge images."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from mia.errors import DataError, MIAError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_MNIST_ENV = "MIA_FASHION_MNIST"
DOWNLOAD_CACHE_DIR = Path.home() / ".cache" / "mia" / "fashion-mnist"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
POOL_SIZE = 70000  # images in Fashion-MNIST (train + t10k)
NUM_CLASSES = 10

# Mean and std of the Fashion-MNIST train images (60000) after padding to 32x32 and scaling to
# [0, 1] (unpadded 28x28: 0.2860 / 0.3530). Computed once, hard-coded so the recipe never depends on
# which copy of the data is read. The same numbers serve all three (identical) channels.
FMNIST_MEAN = 0.2190
FMNIST_STD = 0.3318

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST: locate, parse, convert


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw; detected from the content, not the name).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, one big-endian uint32 per dimension, then the data in
    C order. Returns an array of that shape in native byte order. Raises DataError on a bad magic,
    a truncated header, or a data size that does not match the dimensions.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file: {e}", path=path) from e
    if len(raw) < 4:
        raise DataError(f"not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic", path=path)
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"not an IDX file: bad magic {raw[:4].hex()}", path=path)
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise DataError("IDX file declares 0 dimensions", path=path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX header truncated: {ndim} dimensions need {header} bytes", path=path)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX data is {len(raw) - header} bytes, dimensions {dims} of {dtype} need {expected}",
            path=path,
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _idx_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (raw first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete_folder(folder: Path) -> Path | None:
    """The folder holding all four IDX files: ``folder`` itself or torchvision's FashionMNIST/raw."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if all(_idx_file(candidate, name) is not None for name in FASHION_MNIST_FILES):
            return candidate
    return None


def find_fashion_mnist(folder: str | Path | None = None, *, download: bool = False) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (``.gz`` or uncompressed).

    Looks in ``folder`` when given, else in ``$MIA_FASHION_MNIST`` when set, else in
    DEFAULT_FASHION_MNIST_DIR (Debian package ``dataset-fashion-mnist``); a folder also counts when
    the files are in its ``FashionMNIST/raw`` (torchvision's layout). The first of those that is set
    is the only one looked at, so a wrong explicit setting is reported, not silently bypassed.
    With ``download=True`` and torchvision installed, a missing data set is downloaded there (into
    DOWNLOAD_CACHE_DIR when falling back to the default). Raises MIAError otherwise.
    """
    if folder is not None:
        where, how = Path(folder).expanduser(), "the folder given"
    elif os.environ.get(FASHION_MNIST_ENV):
        where, how = Path(os.environ[FASHION_MNIST_ENV]).expanduser(), f"${FASHION_MNIST_ENV}"
    else:
        where, how = DEFAULT_FASHION_MNIST_DIR, "the default location"
    found = _complete_folder(where)
    if found is not None:
        return found
    if download:
        root = DOWNLOAD_CACHE_DIR if how == "the default location" else where
        return _download_fashion_mnist(root)
    raise MIAError(
        f"Fashion-MNIST not found in {where} ({how}): expected {', '.join(FASHION_MNIST_FILES)} "
        f"(each optionally .gz). Install it with `apt-get install dataset-fashion-mnist` "
        f"(files in {DEFAULT_FASHION_MNIST_DIR}), set {FASHION_MNIST_ENV} to a folder holding the "
        f"four files, or pass download=True (needs torchvision and network access)."
    )


def _download_fashion_mnist(root: Path) -> Path:
    """Download with torchvision into ``root/FashionMNIST/raw``; return that folder."""
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as e:
        raise MIAError(
            "Fashion-MNIST is missing and download=True needs torchvision, which is not installed. "
            f"Install the data with `apt-get install dataset-fashion-mnist` or set {FASHION_MNIST_ENV}."
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise MIAError(f"downloading Fashion-MNIST into {root} failed: {e}") from e
    found = _complete_folder(root)
    if found is None:
        raise MIAError(f"torchvision downloaded Fashion-MNIST into {root} but the IDX files are not there")
    return found


def load_fashion_mnist(folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70000 Fashion-MNIST images: train (60000) then t10k (10000).

    ``folder`` is resolved with find_fashion_mnist (None: env var, then the Debian location).
    Returns images uint8 (70000, 28, 28) and labels int64 (70000,) in 0..9.
    """
    folder = find_fashion_mnist(folder)
    images, labels = [], []
    for split, n in (("train", 60000), ("t10k", 10000)):
        img_path = _idx_file(folder, f"{split}-images-idx3-ubyte")
        lab_path = _idx_file(folder, f"{split}-labels-idx1-ubyte")
        img, lab = read_idx(img_path), read_idx(lab_path)
        if img.shape != (n, 28, 28) or img.dtype != np.uint8:
            raise DataError(f"expected uint8 images of shape {(n, 28, 28)}, got {img.dtype} {img.shape}", path=img_path)
        if lab.shape != (n,) or lab.dtype != np.uint8 or int(lab.max()) >= NUM_CLASSES:
            raise DataError(f"expected {n} uint8 labels in 0..9, got {lab.dtype} {lab.shape}", path=lab_path)
        images.append(img)
        labels.append(lab.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def to_challenge_images(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 3, 32, 32) shaped like the challenge's CIFAR records.

    Pads 2 px of zeros on every side, scales to [0, 1], normalizes with (FMNIST_MEAN, FMNIST_STD)
    and repeats the result to three identical channels.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}")
    padded = np.zeros((len(images), 32, 32), dtype=np.float32)
    padded[:, 2:30, 2:30] = images.astype(np.float32) / np.float32(255.0)
    normalized = (padded - np.float32(FMNIST_MEAN)) / np.float32(FMNIST_STD)
    return np.ascontiguousarray(np.repeat(normalized[:, None], 3, axis=1), dtype=np.float32)
