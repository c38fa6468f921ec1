"""Loading, validating and writing dataset pickles: a corpus of bad inputs, round trips, fuzzing."""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mia.io.records import Records, load_records, records_from_objects, save_records
from mia.errors import DataError

SHAPE = (3, 4, 4)


def _image(value: float = 0.5, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float32)


def _eval_records(n: int = 4) -> list[list[Any]]:
    """n valid eval records: labels 0..n-1 (mod 10), membership alternating 1, 0, 1, 0, ..."""
    return [[_image(i / 10), i % 10, (i + 1) % 2] for i in range(n)]


def _with(records: list[list[Any]], index: int, field: int, value: Any) -> list[list[Any]]:
    records[index][field] = value
    return records


def _write(path: Path, obj: Any) -> Path:
    path.write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=4))
    return path


def _nan_image() -> torch.Tensor:
    image = _image()
    image[1, 2, 3] = math.nan
    return image


def _inf_image(sign: float) -> torch.Tensor:
    image = _image()
    image[0, 0, 0] = sign * math.inf
    return image


_VALID_BYTES = pickle.dumps(_eval_records(), protocol=4)

# (id, file content: bytes or an object to pickle, with_membership, num_classes, fragment, record index)
BAD_INPUTS: list[tuple[str, Callable[[], Any], bool, int | None, str, int | None]] = [
    ("truncated", lambda: _VALID_BYTES[: len(_VALID_BYTES) // 2], True, None, "truncated or not a pickle", None),
    ("truncated-1-byte", lambda: _VALID_BYTES[:1], True, None, "truncated or not a pickle", None),
    ("empty-file", lambda: b"", True, None, "empty file: truncated or not a pickle", None),
    ("not-a-pickle", lambda: b"garbage, not a pickle", True, None, "truncated or not a pickle", None),
    ("zip-archive", lambda: b"PK\x03\x04 rest of a zip", True, None, "a zip archive (torch.save format?)", None),
    ("top-level-dict", lambda: {"images": [], "labels": []}, True, None,
     "expected a list of [image, label, membership] records at the top level, found dict", None),
    ("top-level-int", lambda: 7, False, None, "expected a list of [image, label] records at the top level, found int",
     None),
    ("top-level-ndarray", lambda: np.zeros((2, 3)), True, None, "found numpy array", None),
    ("empty-list", lambda: [], True, None, "contains no records", None),
    ("record-not-a-sequence", lambda: [*_eval_records(2), {"image": 1}], True, None,
     "record must be a list or tuple [image, label, membership], found dict", 2),
    ("eval-arity-2", lambda: [r[:2] for r in _eval_records()], True, None,
     "an eval record must have 3 items [image, label, membership], found 2 (no membership: is this a test file?)",
     0),
    ("eval-arity-4", lambda: _eval_records()[:1] + [[_image(), 1, 0, 0]], True, None,
     "an eval record must have 3 items", 1),
    ("test-arity-3", lambda: _eval_records(), False, None,
     "a test record must have 2 items [image, label], found 3 (a third item: is this an eval file", 0),
    ("mixed-shapes", lambda: _with(_eval_records(), 2, 0, _image(shape=(3, 5, 5))), True, None,
     "image shape (3, 5, 5) differs from record 0's shape (3, 4, 4)", 2),
    ("nan-pixel", lambda: _with(_eval_records(), 1, 0, _nan_image()), True, None, "non-finite value (nan", 1),
    ("inf-pixel", lambda: _with(_eval_records(), 3, 0, _inf_image(1.0)), True, None, "non-finite value (inf", 3),
    ("minus-inf-pixel", lambda: _with(_eval_records(), 0, 0, _inf_image(-1.0)), True, None,
     "non-finite value (-inf", 0),
    ("float64-overflows-float32", lambda: _with(_eval_records(), 2, 0, np.full(SHAPE, 1e300)), True, None,
     "non-finite value (inf as float32)", 2),
    ("image-2d", lambda: _with(_eval_records(), 1, 0, torch.zeros(4, 4)), True, None,
     "image must be 3-D (C, H, W), found shape (4, 4)", 1),
    ("image-4d-batched", lambda: _with(_eval_records(), 0, 0, torch.zeros(1, *SHAPE)), True, None,
     "image must be 3-D (C, H, W), found shape (1, 3, 4, 4)", 0),
    ("image-list-of-floats", lambda: _with(_eval_records(), 1, 0, [[[0.5] * 4] * 4] * 3), True, None,
     "image must be a torch.Tensor or numpy.ndarray, found list", 1),
    ("image-complex", lambda: _with(_eval_records(), 1, 0, torch.zeros(SHAPE, dtype=torch.complex64)), True, None,
     "image must be a real-valued dense tensor", 1),
    ("image-bool-array", lambda: _with(_eval_records(), 1, 0, np.zeros(SHAPE, dtype=bool)), True, None,
     "image must be a real-valued array", 1),
    ("image-empty-dim", lambda: _with(_eval_records(), 0, 0, np.zeros((3, 0, 4), np.float32)), True, None,
     "image has an empty dimension", 0),
    ("float-label", lambda: _with(_eval_records(), 2, 1, 1.0), True, None,
     "label must be an integer, found float 1.0", 2),
    ("numpy-float-label", lambda: _with(_eval_records(), 2, 1, np.float32(1.0)), True, None,
     "label must be an integer, found float32", 2),
    ("bool-label", lambda: _with(_eval_records(), 1, 1, True), True, None, "label must be an integer, found bool", 1),
    ("str-label", lambda: _with(_eval_records(), 1, 1, "3"), True, None, "label must be an integer, found str '3'", 1),
    ("tensor-2-elements-label", lambda: _with(_eval_records(), 1, 1, torch.tensor([3, 4])), True, None,
     "label must be an integer, found torch.Tensor of dtype torch.int64 and shape (2,)", 1),
    ("array-2d-label", lambda: _with(_eval_records(), 1, 1, np.array([[3]])), True, None,
     "label must be an integer, found numpy array of dtype int64 and shape (1, 1)", 1),
    ("uint8-image", lambda: _with(_eval_records(), 1, 0, np.full(SHAPE, 200, np.uint8)), True, None,
     "image has integer dtype uint8: records must hold model-ready float images", 1),
    ("hwc-image", lambda: _with(_eval_records(), 1, 0, np.zeros((8, 8, 3), np.float32)), True, None,
     "looks like (H, W, C)", 1),
    ("float-tensor-label", lambda: _with(_eval_records(), 1, 1, torch.tensor(3.0)), True, None,
     "label must be an integer, found torch.Tensor of dtype torch.float32", 1),
    ("label-out-of-range", lambda: _with(_eval_records(), 3, 1, 10), True, 10,
     "label 10 out of range: must be in [0, 10)", 3),
    ("negative-label", lambda: _with(_eval_records(), 1, 1, -1), True, None, "label -1 out of range: must be >= 0",
     1),
    ("negative-label-with-classes", lambda: _with(_eval_records(), 1, 1, np.int64(-1)), True, 10,
     "label -1 out of range: must be in [0, 10)", 1),
    ("membership-2", lambda: _with(_eval_records(), 2, 2, 2), True, None, "membership must be 0 or 1, found 2", 2),
    ("membership-minus-1", lambda: _with(_eval_records(), 0, 2, -1), True, None, "membership must be 0 or 1", 0),
    ("membership-float", lambda: _with(_eval_records(), 0, 2, 1.0), True, None,
     "membership must be an integer, found float 1.0", 0),
    ("membership-bool", lambda: _with(_eval_records(), 0, 2, np.bool_(True)), True, None,
     "membership must be an integer, found bool", 0),
    ("only-members", lambda: [[_image(), 0, 1] for _ in range(5)], True, None,
     "all 5 records are members (membership 1); an eval file needs members and non-members", None),
    ("only-non-members", lambda: [[_image(), 0, 0] for _ in range(3)], True, None,
     "all 3 records are non-members (membership 0)", None),
]


@pytest.mark.parametrize(
    ("content", "with_membership", "num_classes", "fragment", "index"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_inputs_raise_data_error_naming_file_and_record(
    tmp_path: Path, content: Callable[[], Any], with_membership: bool, num_classes: int | None, fragment: str,
    index: int | None,
) -> None:
    path = _write(tmp_path / "cifar10_resnet34.p", content())
    with pytest.raises(DataError) as excinfo:
        load_records(path, with_membership=with_membership, num_classes=num_classes)
    err = excinfo.value
    message = str(err)
    assert type(err) is DataError
    assert fragment in message
    assert err.path == path and message.startswith(f"{path}: ")
    assert err.index == index
    if index is not None:
        assert message.startswith(f"{path}: record {index}: ")
    else:
        assert "record " not in message.split(": ", 1)[1][:7]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as excinfo:
        load_records(tmp_path / "absent.p", with_membership=True)
    assert excinfo.value.path == tmp_path / "absent.p"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot open file"):
        load_records(tmp_path, with_membership=True)


def test_first_problem_is_reported() -> None:
    records = _with(_with(_eval_records(), 3, 1, -5), 1, 2, 7)
    with pytest.raises(DataError, match="record 1: membership"):
        records_from_objects(records, path="x.p", with_membership=True)


def test_records_from_objects_without_path() -> None:
    with pytest.raises(DataError) as excinfo:
        records_from_objects(_with(_eval_records(), 2, 1, 2.5), path=None, with_membership=True)
    assert str(excinfo.value).startswith("record 2: label must be an integer")


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_argument_is_checked(num_classes: Any) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        records_from_objects(_eval_records(), path=None, with_membership=True, num_classes=num_classes)


def test_records_sharing_one_image_object_are_refused(tmp_path: Path) -> None:
    image = torch.zeros(3, 64, 64)  # 48 KiB, pickled once and then referenced by every record
    path = _write(tmp_path / "eval.p", [[image, 0, i % 2] for i in range(3000)])
    with pytest.raises(DataError, match="records reuse the same image data"):
        load_records(path, with_membership=True)
    # the same objects handed over directly are fine: no file to compare with
    assert len(records_from_objects([[image, 0, i % 2] for i in range(3000)], path=None, with_membership=True)) == 3000


# --------------------------------------------------------------------------- accepted inputs

def test_accepted_label_and_image_types(tmp_path: Path) -> None:
    image64 = np.arange(48, dtype=np.float64).reshape(SHAPE) / 7
    records = (
        (torch.ones(SHAPE), 3, 1),  # tuples are fine, top level too
        (image64, np.int64(9), np.uint8(0)),
        (torch.zeros(SHAPE, dtype=torch.float16), torch.tensor(2), torch.tensor(1, dtype=torch.uint8)),
        (np.full(SHAPE, 200, np.float64), np.array([0]), torch.tensor([0], dtype=torch.int32)),  # one-element
        (torch.nn.Parameter(torch.full(SHAPE, -1.5)), 1, 1),
        (torch.full(SHAPE, 0.25, dtype=torch.bfloat16), 4, 0),
    )
    path = _write(tmp_path / "eval.p", records)
    loaded = load_records(path, with_membership=True, num_classes=10)
    assert len(loaded) == 6 and loaded.image_shape == SHAPE and loaded.path == path
    assert loaded.images.dtype == np.float32 and loaded.images.flags.c_contiguous
    assert loaded.images.shape == (6, *SHAPE)
    np.testing.assert_array_equal(loaded.labels, [3, 9, 2, 0, 1, 4])
    np.testing.assert_array_equal(loaded.membership, [1, 0, 1, 0, 1, 0])
    assert loaded.labels.dtype == np.int64 and loaded.membership.dtype == np.int64
    np.testing.assert_array_equal(loaded.images[1], image64.astype(np.float32))
    np.testing.assert_array_equal(loaded.images[3], 200.0)
    np.testing.assert_array_equal(loaded.images[4], -1.5)
    np.testing.assert_array_equal(loaded.images[5], 0.25)


def test_test_file_has_no_membership(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.p", [[_image(0.1), 5], [_image(0.2), 0]])
    loaded = load_records(path, with_membership=False)
    assert loaded.membership is None and len(loaded) == 2
    np.testing.assert_array_equal(loaded.labels, [5, 0])


def test_records_dataclass_checks_shapes() -> None:
    with pytest.raises(ValueError, match="images must be"):
        Records(images=np.zeros((2, 3, 4, 4), np.float32), labels=np.zeros(3, np.int64), membership=None)
    with pytest.raises(ValueError, match="membership"):
        Records(images=np.zeros((2, 3, 4, 4), np.float32), labels=np.zeros(2, np.int64),
                membership=np.zeros(3, np.int64))


# --------------------------------------------------------------------------- save_records round trip

def _sample(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    membership = np.array([1, 0] * (n // 2))
    return images, labels, membership


@pytest.mark.parametrize("as_torch", [False, True])
def test_save_load_round_trip(tmp_path: Path, as_torch: bool) -> None:
    images, labels, membership = _sample()
    path = tmp_path / "datasets" / "eval" / "cifar10_vgg16.p"  # parent folders are created
    if as_torch:
        save_records(path, torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(membership))
    else:
        save_records(path, images, labels, membership)
    loaded = load_records(path, with_membership=True, num_classes=10)
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.membership, membership)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_saved_file_is_the_challenge_format(tmp_path: Path) -> None:
    images, labels, membership = _sample(4)
    save_records(tmp_path / "eval.p", images.astype(np.float64), list(labels), list(membership))
    save_records(tmp_path / "test.p", images, labels)
    with open(tmp_path / "eval.p", "rb") as f:
        raw = pickle.load(f)  # plain pickle, as the challenge's own code reads it
    assert isinstance(raw, list) and len(raw) == 4
    for record, image, label, member in zip(raw, images, labels, membership):
        assert isinstance(record, list) and len(record) == 3
        assert isinstance(record[0], torch.Tensor) and record[0].dtype == torch.float32
        assert tuple(record[0].shape) == SHAPE and record[0].untyped_storage().nbytes() == image.nbytes
        assert type(record[1]) is int and record[1] == label
        assert type(record[2]) is int and record[2] == member
        np.testing.assert_array_equal(record[0].numpy(), image)
    with open(tmp_path / "test.p", "rb") as f:
        raw_test = pickle.load(f)
    assert all(len(record) == 2 for record in raw_test)
    assert load_records(tmp_path / "test.p", with_membership=False).membership is None


def test_round_trip_of_numpy_and_tuple_records(tmp_path: Path) -> None:
    images, labels, membership = _sample(4, seed=1)
    records = tuple((images[i], np.int64(labels[i]), int(membership[i])) for i in range(4))
    first = load_records(_write(tmp_path / "np.p", records), with_membership=True)
    save_records(tmp_path / "again.p", first.images, first.labels, first.membership)
    second = load_records(tmp_path / "again.p", with_membership=True)
    np.testing.assert_array_equal(second.images, images)
    np.testing.assert_array_equal(second.labels, labels)
    np.testing.assert_array_equal(second.membership, membership)


def test_save_overwrites_atomically_and_refuses_invalid_data(tmp_path: Path) -> None:
    images, labels, membership = _sample()
    path = tmp_path / "eval.p"
    save_records(path, images, labels, membership)
    before = path.read_bytes()
    bad = images.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="record 2: image contains a non-finite value"):
        save_records(path, bad, labels, membership)
    with pytest.raises(DataError, match="record 0: label must be an integer, found float"):
        save_records(path, images, labels.astype(np.float64), membership)
    with pytest.raises(DataError, match="labels must have shape"):
        save_records(path, images, labels[:-1], membership)
    with pytest.raises(DataError, match="all 6 records are members"):
        save_records(path, images, labels, np.ones(6, np.int64))
    with pytest.raises(DataError, match=r"real-valued \(n, C, H, W\)"):
        save_records(path, images[0], labels, membership)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval.p"]

    save_records(path, images[:2], labels[:2], membership[:2])
    assert len(load_records(path, with_membership=True)) == 2


# --------------------------------------------------------------------------- fuzzing

def _load_or_data_error(path: Path, data: bytes, with_membership: bool) -> None:
    path.write_bytes(data)
    try:
        loaded = load_records(path, with_membership=with_membership)
    except DataError:
        return
    assert loaded.images.ndim == 4 and loaded.images.dtype == np.float32 and len(loaded) >= 1


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.slow
@_FUZZ
@given(data=st.binary(max_size=300), with_membership=st.booleans())
def test_fuzz_arbitrary_bytes(fuzz_dir: Path, data: bytes, with_membership: bool) -> None:
    _load_or_data_error(fuzz_dir / "bytes.p", data, with_membership)


_SEED_PICKLES = [
    pickle.dumps([[torch.full((1, 2, 2), 0.5), 1, 0], [torch.zeros(1, 2, 2), 0, 1]], protocol=p) for p in (2, 5)
] + [
    pickle.dumps([(np.ones((1, 2, 2), np.float32), np.int64(1), 0), (np.zeros((1, 2, 2)), 0, 1)], protocol=p)
    for p in (2, 4, 5)
]


@pytest.mark.slow
@_FUZZ
@given(
    seed=st.sampled_from(_SEED_PICKLES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
)
def test_fuzz_mutated_valid_pickles(fuzz_dir: Path, seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    _load_or_data_error(fuzz_dir / "mutated.p", bytes(data[: max(1, len(data) - cut % 8)]), True)


_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
            | st.binary(max_size=5) | st.complex_numbers())
_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.uint8, np.int64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=2),
)
_tensors = _arrays.filter(lambda a: a.dtype != np.uint8 or a.ndim > 0).map(lambda a: torch.from_numpy(a.copy()))
_leaves = _scalars | _arrays | _tensors
_objects = st.recursive(
    _leaves,
    lambda children: (st.lists(children, max_size=4) | st.tuples(children, children, children)
                      | st.tuples(children, children) | st.dictionaries(st.text(max_size=3), children, max_size=3)
                      | st.frozensets(st.integers() | st.text(max_size=3), max_size=3)),
    max_leaves=12,
)
_record_like = st.lists(
    st.tuples(_arrays | _tensors, st.integers(-1, 3) | _leaves, st.integers(-1, 2) | _leaves).map(list)
    | st.tuples(_arrays | _tensors, st.integers(0, 3)),
    min_size=1, max_size=4,
)


@pytest.mark.slow
@_FUZZ
@given(obj=_objects | _record_like, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
       with_membership=st.booleans())
def test_fuzz_arbitrary_objects(fuzz_dir: Path, obj: Any, protocol: int, with_membership: bool) -> None:
    _load_or_data_error(fuzz_dir / "objects.p", pickle.dumps(obj, protocol=protocol), with_membership)
