"""The restricted unpickler: malicious pickles are refused before they run; arrays and tensors load."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mia.io.records import load_records
from mia.io.unpickler import SAFE_GLOBALS, safe_load_pickle
from mia.errors import DataError, UnsafePickleError


def _touch(path: str) -> int:
    """The side effect every exploit below tries to cause."""
    Path(path).touch()
    return 0


class _Reduce:
    """Pickles as ``func(*args)``: how an attacker writes a call into a pickle."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


class _Exploit:
    """A made-up class whose __reduce__ calls a function of this module."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


class _Sneaky:
    """A made-up class without __reduce__; its __setstate__ has the side effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        _touch(state["marker"])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _payloads(marker: Path) -> list[tuple[str, bytes, str]]:
    """(id, pickle bytes, the global the refusal must name). Each would create ``marker``."""
    m = str(marker)
    eval_src = f"open({m!r}, 'w').close()"
    return [
        ("os.system", pickle.dumps(_Reduce(os.system, f"touch {m}")), f"{os.system.__module__}.system"),
        ("os.system-proto0-text", f"cos\nsystem\n(S'touch {m}'\ntR.".encode(), "os.system"),
        ("subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", m])), "subprocess.Popen"),
        ("subprocess.check_output", pickle.dumps(_Reduce(subprocess.check_output, ["touch", m])),
         "subprocess.check_output"),
        ("builtins.eval", pickle.dumps(_Reduce(builtins.eval, eval_src)), "builtins.eval"),
        ("builtins.exec", pickle.dumps(_Reduce(builtins.exec, eval_src)), "builtins.exec"),
        ("__builtin__.eval-proto2", pickle.dumps(_Reduce(builtins.eval, eval_src), protocol=2), "__builtin__.eval"),
        # getattr(__import__("os"), "system")(...)
        ("builtins.getattr",
         f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch {m}'\ntR.".encode(),
         "builtins.getattr"),
        # protocol 4 resolves dotted names attribute by attribute; reaching through an allowed object
        ("dotted-through-allowed", b"\x80\x04\x8c\x05numpy\x8c\x0fndarray.__new__\x93.", "numpy.ndarray.__new__"),
        ("dotted-torch-load", b"\x80\x04\x8c\rtorch.storage\x8c\ntorch.load\x93.", "torch.storage.torch.load"),
        ("torch.load", pickle.dumps(_Reduce(torch.load, m)), "torch.serialization.load"),
        ("made-up __reduce__", pickle.dumps(_Exploit(marker)), f"{__name__}._touch"),
        ("made-up __setstate__", pickle.dumps(_Sneaky(marker)), f"{__name__}._Sneaky"),
        # the refused global sits after a valid record: refusal still comes before the call
        ("after-valid-record",
         pickle.dumps([[torch.zeros(1, 2, 2), 0, 1], [torch.zeros(1, 2, 2), 0, _Exploit(marker)]]),
         f"{__name__}._touch"),
    ]


_PAYLOAD_IDS = [p[0] for p in _payloads(Path("x"))]


@pytest.mark.parametrize("case", _PAYLOAD_IDS)
@pytest.mark.parametrize("loader", ["safe_load_pickle", "load_records"])
def test_malicious_globals_are_refused_before_running(tmp_path: Path, case: str, loader: str) -> None:
    marker = tmp_path / "marker"
    _, data, name = next(p for p in _payloads(marker) if p[0] == case)
    path = _write(tmp_path / "evil.p", data)
    with pytest.raises(UnsafePickleError) as excinfo:
        if loader == "safe_load_pickle":
            safe_load_pickle(path)
        else:
            load_records(path, with_membership=True)
    message = str(excinfo.value)
    assert f"global {name}:" in message
    assert str(path) in message and excinfo.value.path == path
    assert not marker.exists()


def test_the_payloads_are_live_under_plain_pickle(tmp_path: Path) -> None:
    # Guards the test above against payloads that would never have run anyway.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _write(tmp_path / "pid.p", b"Pfoo\n.")
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_load_pickle(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- torch tensors

def _legacy_storage_bytes(main_object: object) -> bytes:
    """Bytes in the layout of torch.storage._load_from_bytes' argument, with any main object."""
    buf = io.BytesIO()
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info):
        pickle.dump(header, buf, protocol=2)
    pickle.dump(main_object, buf, protocol=2)
    pickle.dump([], buf, protocol=2)  # keys of the storages whose raw bytes would follow: none
    return buf.getvalue()


def _tensor_with_storage_bytes(storage_bytes: bytes) -> bytes:
    """A pickle shaped exactly like a pickled tensor, whose embedded storage is ``storage_bytes``."""
    storage = _Reduce(torch.storage._load_from_bytes, storage_bytes)
    return pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (2,), (1,), False, OrderedDict()))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
                                   torch.int64])
def test_torch_tensor_pickled_with_plain_pickle_loads(tmp_path: Path, protocol: int, dtype: torch.dtype) -> None:
    tensor = (torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) - 5).to(dtype)
    view = tensor[:, 1:, ::2]  # a strided view of a larger storage
    path = _write(tmp_path / "t.p", pickle.dumps({"t": tensor, "view": view, "x": [1, 2.5]}, protocol=protocol))
    loaded = safe_load_pickle(path)
    assert loaded["t"].dtype == dtype and torch.equal(loaded["t"], tensor)
    assert torch.equal(loaded["view"], view) and loaded["view"].stride() == view.stride()
    assert loaded["x"] == [1, 2.5]


def test_parameter_and_requires_grad_tensor_load(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(2, 2))
    grad = torch.zeros(3, requires_grad=True)
    loaded = safe_load_pickle(_write(tmp_path / "p.p", pickle.dumps([param, grad])))
    assert isinstance(loaded[0], torch.nn.Parameter) and torch.equal(loaded[0], param)
    assert loaded[1].requires_grad and torch.equal(loaded[1], grad)


def test_tampered_torch_storage_bytes_do_not_run(tmp_path: Path) -> None:
    live_marker, marker = tmp_path / "live", tmp_path / "marker"
    # Under plain pickle, torch loads the embedded bytes with weights_only=False and runs them.
    with pytest.raises(Exception):
        pickle.loads(_tensor_with_storage_bytes(_legacy_storage_bytes(_Exploit(live_marker))))
    assert live_marker.exists()

    path = _write(tmp_path / "t.p", _tensor_with_storage_bytes(_legacy_storage_bytes(_Exploit(marker))))
    with pytest.raises(UnsafePickleError) as excinfo:
        load_records(path, with_membership=True)
    assert "embedded torch storage" in str(excinfo.value) and "_touch" in str(excinfo.value)
    assert excinfo.value.path == path
    assert not marker.exists()


@pytest.mark.parametrize(
    ("storage_bytes", "fragment"),
    [
        (b"garbage", "embedded torch storage is corrupt"),
        (b"", "embedded torch storage is corrupt"),
        (_legacy_storage_bytes({"a": 1}), "not a storage"),
    ],
    ids=["garbage", "empty", "dict-instead-of-storage"],
)
def test_corrupt_torch_storage_bytes_raise_data_error(tmp_path: Path, storage_bytes: bytes, fragment: str) -> None:
    path = _write(tmp_path / "t.p", _tensor_with_storage_bytes(storage_bytes))
    with pytest.raises(DataError, match=fragment) as excinfo:
        safe_load_pickle(path)
    assert excinfo.value.path == path


def test_tensor_with_backward_hooks_is_refused(tmp_path: Path) -> None:
    storage = torch.zeros(2).__reduce_ex__(2)[1][0]  # the TypedStorage a pickled tensor carries
    data = pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (2,), (1,), False,
                                OrderedDict(hook=1)))
    with pytest.raises(DataError, match="backward hooks"):
        safe_load_pickle(_write(tmp_path / "t.p", data))


# --------------------------------------------------------------------------- numpy arrays

@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int64, np.float16])
def test_numpy_arrays_load(tmp_path: Path, protocol: int, dtype: type) -> None:
    a = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    objs = {"c": a, "f": np.asfortranarray(a), "strided": a[:, ::2, 1:], "zero_d": np.array(3, dtype=dtype),
            "scalar": dtype(5), "empty": np.zeros((0, 3), dtype=dtype)}
    loaded = safe_load_pickle(_write(tmp_path / "a.p", pickle.dumps(objs, protocol=protocol)))
    for key, value in objs.items():
        assert loaded[key].dtype == np.dtype(dtype), key
        np.testing.assert_array_equal(loaded[key], value)


def test_numpy_1x_module_names_load(tmp_path: Path) -> None:
    # numpy 1.x writes numpy.core.multiarray; protocol 2 spells globals as text lines.
    a = np.linspace(0, 1, 6, dtype=np.float32).reshape(1, 2, 3)
    data = pickle.dumps([a, np.int64(4)], protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in data
    loaded = safe_load_pickle(_write(tmp_path / "a.p", data))
    np.testing.assert_array_equal(loaded[0], a)
    assert loaded[1] == 4


@pytest.mark.parametrize(
    "data",
    [
        # _reconstruct(ndarray, (huge,), b'b') would allocate before any data is read
        pickle.dumps(_Reduce(np._core.multiarray._reconstruct, np.ndarray, (10**12,), b"b")),
        # NEWOBJ on numpy.ndarray: ndarray.__new__(ndarray, shape)
        b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x81.",
        # bytes(n) allocates n zero bytes
        b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",
    ],
    ids=["reconstruct-huge-shape", "newobj-ndarray", "bytes-of-int"],
)
def test_allowed_globals_refuse_unexpected_arguments(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(DataError):
        safe_load_pickle(_write(tmp_path / "a.p", data))


def test_build_on_an_allowed_global_is_refused(tmp_path: Path) -> None:
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD {'x': 1} onto it.
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00xK\x01sb."
    with pytest.raises(DataError, match="BUILD on a method"):
        safe_load_pickle(_write(tmp_path / "a.p", data))
    assert not hasattr(torch._utils._rebuild_tensor_v2, "x")


class _ReduceWithState:
    """Pickles as ``func(*args)`` followed by BUILD(state)."""

    def __init__(self, func, args, state):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args, self.state)


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        # this state crashes the interpreter under plain pickle (numpy's dtype.__setstate__)
        (_ReduceWithState(np.dtype, ("f4", False, True), (3, "<", None, -1, -1, 0)),
         "unexpected state for numpy dtype"),
        # flags 63 mark items as python objects: floats would be read as pointers
        (_ReduceWithState(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 63)),
         "unexpected state for numpy dtype"),
        (np.array([1, "a"], dtype=object), "only numeric numpy dtypes"),
        (np.array(["ab"]), "only numeric numpy dtypes"),
        (_ReduceWithState(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                          (1, (1000,), np.dtype("f8"), False, b"\0" * 8)), "with 8 bytes of data"),
        (_ReduceWithState(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                          (1, (2,), np.dtype("f8"), False, [1.0, 2.0])), "unexpected state for a numpy array"),
        (_Reduce(np._core.numeric._frombuffer, b"\0" * 8, np.dtype("f4"), (100,), "C"), "with 8 bytes of data"),
        (_Reduce(np._core.multiarray.scalar, np.dtype("f8"), b"\0"), "numpy scalar called with unexpected"),
        # torch would grow the 2-element storage to 10**6 elements of uninitialised memory
        (_Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(2).__reduce_ex__(2)[1][0], 0, (10**6,), (1,), False,
                 OrderedDict()), "does not fit its storage of 2 elements"),
        (_Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(4).__reduce_ex__(2)[1][0], 0, (2, 2), (0, 0), False,
                 OrderedDict()), None),  # an expanded view is fine while it fits
        (_Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(4).__reduce_ex__(2)[1][0], 3, (2,), (1,), False,
                 OrderedDict()), "does not fit its storage of 4 elements"),
    ],
    ids=["dtype-crash-state", "dtype-object-flags", "object-array", "str-array", "array-short-data",
         "array-list-data", "frombuffer-short", "scalar-short", "tensor-grows-storage", "tensor-expanded-view",
         "tensor-past-end"],
)
def test_allowed_objects_with_crafted_states_are_refused(tmp_path: Path, obj: object, fragment: str | None) -> None:
    path = _write(tmp_path / "a.p", pickle.dumps(obj, protocol=2))
    if fragment is None:
        safe_load_pickle(path)
        return
    with pytest.raises(DataError, match=re.escape(fragment)):
        safe_load_pickle(path)


def test_one_payload_reused_many_times_is_refused(tmp_path: Path) -> None:
    storage_bytes = torch.zeros(1 << 18).__reduce_ex__(2)[1][0].__reduce__()[1][0]  # 1 MiB of float32
    tensors = [_Reduce(torch._utils._rebuild_tensor_v2, _Reduce(torch.storage._load_from_bytes, storage_bytes), 0,
                       (1 << 18,), (1,), False, OrderedDict()) for _ in range(8)]
    path = _write(tmp_path / "a.p", pickle.dumps(tensors))  # the bytes are written once, then memo references
    assert path.stat().st_size < 2 << 20
    with pytest.raises(DataError, match="creates far more data than the file holds"):
        safe_load_pickle(path)


def test_instance_opcodes_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    newobj = b"\x80\x02c__builtin__\nset\n)\x81."  # set.__new__(set)
    with pytest.raises(UnsafePickleError, match="opcode NEWOBJ"):
        safe_load_pickle(_write(tmp_path / "a.p", newobj))
    inst = f"(S'touch {marker}'\nios\nsystem\n.".encode()
    with pytest.raises(UnsafePickleError, match="global os.system"):
        safe_load_pickle(_write(tmp_path / "b.p", inst))
    assert not marker.exists()


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.seen: set[str] = set()

    def find_class(self, module, name):
        self.seen.add(f"{module}.{name}")
        return super().find_class(module, name)


def test_allowlist_covers_what_numpy_and_torch_write() -> None:
    samples = [np.zeros((2, 2), np.float32), np.float32(1.5), np.int64(2), torch.zeros(2),
               torch.nn.Parameter(torch.zeros(1)), OrderedDict(a=1), {1}, frozenset([2]), b"", b"ab",
               bytearray(b"x"), 1 + 2j]
    seen: set[str] = set()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for sample in samples:
            unpickler = _RecordingUnpickler(io.BytesIO(pickle.dumps(sample, protocol=protocol)))
            unpickler.load()
            seen |= unpickler.seen
    assert seen <= SAFE_GLOBALS, seen - SAFE_GLOBALS
    assert "torch.storage._load_from_bytes" in seen
