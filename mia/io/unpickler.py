# size: one idea, the restricted unpickler: one checked handler per allowed global and per opcode that builds
# containers; splitting it would scatter the allowlist from the checks that make it safe.
"""The restricted unpickler: reading strangers' dataset pickles without running their code.

The pickles come from file-sharing links, so they are untrusted. ``safe_load_pickle`` uses an
unpickler that resolves only the globals that numpy arrays and torch tensors need (see
``SAFE_GLOBALS``) and refuses every other one with ``UnsafePickleError`` before anything is called.
It also checks the arguments and states handed to those globals (a malformed numpy dtype state
crashes the interpreter; an oversized tensor view makes torch allocate memory), which is why it
is built on the pure-Python unpickler. A torch tensor pickled with plain ``pickle`` embeds its
storage as bytes that torch itself would load with ``torch.load(weights_only=False)``; here those
bytes go through ``torch.load(weights_only=True)`` instead.
"""
from __future__ import annotations

import io
import math
import pickle
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from mia.errors import DataError, UnsafePickleError

__all__ = ["MAX_NESTING", "SAFE_GLOBALS", "exception_text", "file_size", "safe_load_pickle"]

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


# --------------------------------------------------------------------------- restricted unpickler

# Module names that older writers use for the same objects (protocols 0-2 write ``__builtin__``;
# numpy 1.x writes ``numpy.core``). Only used to look names up in the allowlist.
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}

# Canonical (module, name) pairs resolved by the restricted unpickler. Measured with pickletools on
# what `pickle.dumps` writes for numpy 2.x arrays and scalars and torch tensors, protocols 0-5.
_CANONICAL_GLOBALS = (
    ("builtins", "set"),  # protocols 0-3
    ("builtins", "frozenset"),  # protocols 0-3
    ("builtins", "complex"),  # protocols 0-5
    ("builtins", "bytes"),  # empty bytes, protocols 0-2
    ("builtins", "bytearray"),  # protocols 0-4
    ("_codecs", "encode"),  # bytes, protocols 0-2
    ("collections", "OrderedDict"),  # torch's (empty) backward hooks
    ("numpy", "dtype"),
    ("numpy", "ndarray"),  # only as the first argument of _reconstruct
    ("numpy._core.multiarray", "_reconstruct"),  # arrays, protocols 0-4
    ("numpy._core.multiarray", "scalar"),  # numpy scalars (np.int64(3))
    ("numpy._core.numeric", "_frombuffer"),  # arrays, protocol 5
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch.storage", "_load_from_bytes"),  # its bytes parsed here (mia.io.unpickler._legacy_storage)
)

SAFE_GLOBALS: frozenset[str] = frozenset(
    [f"{m}.{n}" for m, n in _CANONICAL_GLOBALS]
    + [f"{alias}.{n}" for alias, target in _MODULE_ALIASES.items() for m, n in _CANONICAL_GLOBALS if m == target]
)
"""Every ``module.name`` a dataset pickle may refer to; anything else raises UnsafePickleError."""

_LATIN1 = ("latin1", "latin-1")


def _short(text: object, limit: int = 200) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def exception_text(exc: BaseException) -> str:
    """``TypeName: message`` (or just the type name when the message is empty), shortened."""
    text = str(exc)
    return f"{type(exc).__name__}: {_short(text)}" if text else type(exc).__name__


_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_DTYPE_SPEC = re.compile(r"[biufc][0-9]{1,2}")  # what numpy writes for numeric dtypes: 'f4', 'u1', 'b1'
_BYTE_ORDERS = ("<", ">", "|", "=")


def _is_int_tuple(value: object, minimum: int | None = None) -> bool:
    return isinstance(value, tuple) and all(
        type(v) is int and (minimum is None or v >= minimum) for v in value
    )


def _is_latin1_text(args: tuple[Any, ...]) -> bool:
    """(str, 'latin1'): how protocols 0-2 spell a bytes object."""
    return len(args) == 2 and type(args[0]) is str and type(args[1]) is str and args[1] in _LATIN1


def _is_numeric_dtype(value: object) -> bool:
    return (isinstance(value, np.dtype) and value.kind in _NUMERIC_KINDS and value.fields is None
            and value.subdtype is None and not value.hasobject)


MAX_NESTING = 100
"""Containers inside containers a pickle may hold (a record list needs 3): deeper ones are refused, since
recursive C code (hashing, comparison, repr, torch.tensor) would overflow the interpreter's stack."""

_HASH_MODULUS = (1 << 61) - 1  # CPython hashes ints modulo this prime: smaller ones never collide


def _is_safe_key(key: object) -> bool:
    """Keys whose hashes an attacker cannot make collide (colliding keys make dict building quadratic):
    strings and bytes (randomised hashes), small ints, bools and None."""
    return type(key) in (str, bytes, bool) or key is None or (type(key) is int and -_HASH_MODULUS < key < _HASH_MODULUS)


class _BoundedFile:
    """The file as the unpickler reads it: a read longer than what is left of the file is refused before
    anything is read or allocated (a BYTES8 opcode claiming 2 GiB in a 15-byte file)."""

    def __init__(self, f: io.BufferedIOBase, size: int, path: Path | None):
        self._f, self._left, self._path = f, size, path

    def _check(self, n: int) -> None:
        if n > self._left:
            raise DataError(f"truncated or not a pickle: it declares {n} bytes where {self._left} are left (a "
                            f"truncated file or a forged length)", path=self._path)

    def read(self, n: int) -> bytes:
        self._check(n)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buf: bytearray) -> int:
        self._check(len(buf))
        n = self._f.readinto(buf)
        self._left -= n
        return n

    def readline(self) -> bytes:
        data = self._f.readline()
        self._left -= len(data)
        return data


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, restricted to what numpy arrays and torch tensors need.

    The C unpickler only lets a subclass filter globals; every opcode that touches an object is
    overridden here as well, because allowed objects can still be misused: numpy's
    ``dtype.__setstate__`` crashes the interpreter on a malformed state, and torch silently grows
    a storage when a tensor's size exceeds it. So:

    * globals resolve only to SAFE_GLOBALS, each a checking wrapper made for this load;
    * REDUCE calls only those wrappers; NEWOBJ, NEWOBJ_EX, OBJ, INST, EXT* and persistent ids are
      refused (numpy and torch never write them);
    * BUILD is allowed once on each dtype and array made by the numpy wrappers, with the state
      checked against what numpy writes;
    * APPEND(S), SETITEM(S) and ADDITEMS act only on real lists, dicts and sets;
    * arrays, storages and byte strings created may total at most ``byte_budget`` bytes, so a
      small file cannot allocate a lot of memory by reusing one payload many times; a declared length
      is checked against the bytes left in the file before anything is allocated (``_BoundedFile``);
    * dict keys and set members are strings, bytes or small ints (``_is_safe_key``): colliding keys
      would make building a dict quadratic in the file's size.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, path: Path | None, byte_budget: int, size: int):
        super().__init__(_BoundedFile(file, size, path))
        self._path = path
        self._size = size
        self._byte_budget = byte_budget
        self._ndarray_token = object()  # what numpy.ndarray resolves to: inert
        self._unbuilt: dict[int, object] = {}  # dtypes and arrays awaiting their single BUILD
        self._resolved: dict[tuple[str, str], Any] = {
            ("builtins", "set"): self._set,
            ("builtins", "frozenset"): self._frozenset,
            ("builtins", "complex"): self._complex,
            ("builtins", "bytes"): self._bytes,
            ("builtins", "bytearray"): self._bytearray,
            ("_codecs", "encode"): self._codecs_encode,
            ("collections", "OrderedDict"): self._ordered_dict,
            ("numpy", "dtype"): self._dtype,
            ("numpy", "ndarray"): self._ndarray_token,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "scalar"): self._scalar,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_from_bytes,
        }
        assert set(self._resolved) == set(_CANONICAL_GLOBALS)
        # The bound methods above are created once and kept alive, so their ids identify them.
        self._callables = {id(v) for v in self._resolved.values() if v is not self._ndarray_token}

    # -- refusals
    def _malformed(self, what: str) -> NoReturn:
        raise DataError(f"malformed pickle: {what}", path=self._path)

    def _refuse_opcode(self, opcode: str) -> NoReturn:
        raise UnsafePickleError(f"refusing pickle opcode {opcode}: dataset pickles never use it", path=self._path)

    def _spend(self, nbytes: int) -> None:
        self._byte_budget -= nbytes
        if self._byte_budget < 0:
            self._malformed("it creates far more data than the file holds (one payload reused many times?)")

    def find_class(self, module: str, name: str) -> Any:
        obj = self._resolved.get((_MODULE_ALIASES.get(module, module), name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to load global {_short(module, 100)}.{_short(name, 100)}: a dataset pickle may only "
                f"contain lists/tuples/dicts of numbers, numpy arrays and torch tensors",
                path=self._path,
            )
        return obj

    def persistent_load(self, pid: Any) -> NoReturn:
        raise UnsafePickleError("refusing a persistent id: dataset pickles never reference external objects",
                                path=self._path)

    # -- opcodes that touch objects
    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables or type(args) is not tuple:
            self._malformed(f"REDUCE may only call an allowed global, not a {type(func).__name__}")
        self.stack[-1] = func(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._unbuilt.pop(id(inst), None) is not inst:
            self._malformed(f"BUILD on a {type(inst).__name__}")
        if isinstance(inst, np.dtype):
            self._build_dtype(inst, state)
        else:
            self._build_array(inst, state)

    def _load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not list:
            self._malformed(f"APPEND to a {type(target).__name__}")
        target.append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not list:
            self._malformed(f"APPENDS to a {type(target).__name__}")
        target.extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict):
            self._malformed(f"SETITEM on a {type(target).__name__}")
        self._check_keys((key,))
        target[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict):
            self._malformed(f"SETITEMS on a {type(target).__name__}")
        self._check_keys(items[::2])
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            self._malformed(f"ADDITEMS on a {type(target).__name__}")
        self._check_keys(items)
        target.update(items)

    def _load_dict(self) -> None:
        items = self.pop_mark()
        self._check_keys(items[::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        self._check_keys(items)
        self.append(frozenset(items))

    def _load_bytearray8(self) -> None:
        n, = struct.unpack("<Q", self.read(8))
        if n > self._size:
            self._malformed(f"BYTEARRAY8 declares {n} bytes in a file of {self._size}")
        self._spend(n)
        buf = bytearray(n)
        self.readinto(buf)
        self.append(buf)

    def _check_keys(self, keys) -> None:
        for key in keys:
            if not _is_safe_key(key):
                what = "an int beyond 2**61" if type(key) is int else f"a {type(key).__name__}"
                self._malformed(f"{what} as a dict key or set member: dataset pickles key by names and small "
                                f"integers (others can be made to collide)")

    def _load_inst(self) -> NoReturn:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        self.find_class(module, name)  # names the global when it is not allowed
        self._refuse_opcode("INST")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.INST[0]] = _load_inst
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    for _opcode, _name in ((pickle.NEWOBJ, "NEWOBJ"), (pickle.NEWOBJ_EX, "NEWOBJ_EX"), (pickle.OBJ, "OBJ"),
                           (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4")):
        dispatch[_opcode[0]] = lambda self, _name=_name: self._refuse_opcode(_name)
    del _opcode, _name

    # -- builtins
    def _set(self, *args: Any) -> set[Any]:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            self._malformed("builtins.set is only allowed on a list")
        self._check_keys(args[0] if args else ())
        return set(*args)

    def _frozenset(self, *args: Any) -> frozenset[Any]:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            self._malformed("builtins.frozenset is only allowed on a list")
        self._check_keys(args[0] if args else ())
        return frozenset(*args)

    def _complex(self, *args: Any) -> complex:
        if not (len(args) <= 2 and all(type(a) in (int, float) for a in args)):
            self._malformed("builtins.complex is only allowed on two floats")
        return complex(*args)

    def _ordered_dict(self, *args: Any) -> OrderedDict[Any, Any]:
        if args:
            self._malformed("collections.OrderedDict is only allowed without arguments")
        return OrderedDict()

    def _bytes(self, *args: Any) -> bytes:
        if not args:
            return b""
        if len(args) == 1 and type(args[0]) in (bytes, bytearray):
            self._spend(len(args[0]))
            return bytes(args[0])
        if _is_latin1_text(args):
            self._spend(len(args[0]))
            return args[0].encode("latin-1")
        self._malformed("builtins.bytes is only allowed on bytes or a latin-1 str")

    def _bytearray(self, *args: Any) -> bytearray:
        data = self._bytes(*args)
        self._spend(len(data))
        return bytearray(data)

    def _codecs_encode(self, *args: Any) -> bytes:
        if not _is_latin1_text(args):
            self._malformed("_codecs.encode is only allowed as encode(str, 'latin1')")
        self._spend(len(args[0]))
        return args[0].encode("latin-1")

    # -- numpy
    def _dtype(self, *args: Any) -> np.dtype:
        # numpy writes dtype('f4', False, True), then BUILDs (3, '<', None, None, None, -1, -1, 0).
        if not (len(args) == 3 and type(args[0]) is str and _DTYPE_SPEC.fullmatch(args[0])
                and type(args[1]) is bool and type(args[2]) is bool):
            self._malformed(f"only numeric numpy dtypes are allowed, not dtype{_short(repr(args), 80)}")
        dtype = np.dtype(args[0], align=False, copy=True)  # a copy: BUILD must not touch numpy's own
        self._unbuilt[id(dtype)] = dtype
        return dtype

    def _build_dtype(self, dtype: np.dtype, state: object) -> None:
        if not (type(state) is tuple and len(state) == 8 and type(state[0]) is int and state[0] == 3
                and type(state[1]) is str and state[1] in _BYTE_ORDERS
                and state[2] is None and state[3] is None and state[4] is None
                and all(type(v) is int for v in state[5:]) and state[5:] == (-1, -1, dtype.flags)):
            self._malformed(f"unexpected state for numpy dtype {dtype}")
        dtype.__setstate__((3, state[1], None, None, None, -1, -1, dtype.flags))

    def _reconstruct(self, *args: Any) -> np.ndarray:
        # numpy writes _reconstruct(ndarray, (0,), b'b'), then BUILDs the real shape and data.
        if not (len(args) == 3 and args[0] is self._ndarray_token and _is_int_tuple(args[1]) and args[1] == (0,)
                and type(args[2]) is bytes):
            self._malformed("numpy _reconstruct is only allowed as _reconstruct(ndarray, (0,), b'b')")
        array = _np_multiarray._reconstruct(np.ndarray, (0,), args[2])
        self._unbuilt[id(array)] = array
        return array

    def _build_array(self, array: np.ndarray, state: object) -> None:
        # (version 1, shape, dtype, is_fortran, raw bytes)
        if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1
                and _is_int_tuple(state[1], minimum=0) and _is_numeric_dtype(state[2])
                and type(state[3]) is bool and type(state[4]) in (bytes, bytearray)):
            self._malformed("unexpected state for a numpy array")
        shape, dtype, data = state[1], state[2], state[4]
        if len(data) != math.prod(shape) * dtype.itemsize:
            self._malformed(f"numpy array of shape {shape} and dtype {dtype} with {len(data)} bytes of data")
        self._spend(len(data))
        array.__setstate__((1, shape, dtype, state[3], data))

    def _frombuffer(self, *args: Any) -> np.ndarray:
        # (buf, dtype, shape, order[, axis_order]), written for protocol 5.
        if not (4 <= len(args) <= 5 and type(args[0]) in (bytes, bytearray) and _is_numeric_dtype(args[1])
                and _is_int_tuple(args[2], minimum=0) and type(args[3]) is str and args[3] in ("C", "F", "K")
                and (len(args) == 4 or args[4] is None
                     or (_is_int_tuple(args[4]) and sorted(args[4]) == list(range(len(args[2])))))):
            self._malformed("numpy _frombuffer called with unexpected arguments")
        if len(args[0]) != math.prod(args[2]) * args[1].itemsize:
            self._malformed(f"numpy array of shape {args[2]} and dtype {args[1]} with {len(args[0])} bytes of data")
        self._spend(len(args[0]))
        return _np_numeric._frombuffer(*args)

    def _scalar(self, *args: Any) -> Any:
        if not (len(args) == 2 and _is_numeric_dtype(args[0]) and type(args[1]) is bytes
                and len(args[1]) == args[0].itemsize):
            self._malformed("numpy scalar called with unexpected arguments")
        return _np_multiarray.scalar(*args)

    # -- torch
    def _load_from_bytes(self, *args: Any) -> torch.storage.TypedStorage:
        if not (len(args) == 1 and type(args[0]) is bytes):
            self._malformed("torch.storage._load_from_bytes called with unexpected arguments")
        self._spend(len(args[0]))
        return _legacy_storage(args[0], self._path)

    def _rebuild_tensor_v2(self, *args: Any) -> torch.Tensor:
        # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        if not 6 <= len(args) <= 7:
            self._malformed("torch _rebuild_tensor_v2 called with unexpected arguments")
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        if not (isinstance(storage, torch.storage.TypedStorage) and type(offset) is int and offset >= 0
                and _is_int_tuple(size, minimum=0) and _is_int_tuple(stride, minimum=0) and len(size) == len(stride)
                and type(requires_grad) is bool):
            self._malformed("torch _rebuild_tensor_v2 called with unexpected arguments")
        if type(hooks) not in (dict, OrderedDict) or hooks:
            self._malformed("tensor carries backward hooks")
        if len(args) == 7 and not (args[6] is None or (type(args[6]) is dict and not args[6])):
            self._malformed("tensor carries metadata")
        # torch would silently grow the storage to fit; a real tensor never needs that.
        numel = math.prod(size)
        storage_numel = storage._untyped_storage.nbytes() // storage.dtype.itemsize
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
        if end > storage_numel or numel > storage_numel:
            self._malformed(f"tensor view (offset {offset}, size {size}, stride {stride}) does not fit its storage "
                            f"of {storage_numel} elements")
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())

    def _rebuild_parameter(self, *args: Any) -> torch.Tensor:
        if not (len(args) == 3 and isinstance(args[0], torch.Tensor) and type(args[1]) is bool):
            self._malformed("torch _rebuild_parameter called with unexpected arguments")
        if type(args[2]) not in (dict, OrderedDict) or args[2]:
            self._malformed("parameter carries backward hooks")
        return torch.nn.Parameter(args[0], args[1])


# --------------------------------------------------------------------------- embedded torch storages

# torch's storage classes as a legacy blob names them, and the dtype each holds.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class _StorageRef:
    """What the persistent id of a legacy blob names: one storage's dtype, key and element count."""

    def __init__(self, dtype: torch.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _LegacyBlobUnpickler(_RestrictedUnpickler):
    """The small pickles of a legacy storage blob: headers, one persistent id, the list of storage keys.

    Globals resolve only to torch's storage classes, and only inside the persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UnsafePickleError(f"embedded torch storage refers to global {_short(module, 100)}.{_short(name, 100)}: "
                                f"only torch's storage classes are allowed", path=self._path)

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', torch.FloatStorage, key, location, numel[, view_metadata])
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and type(pid[2]) is str and len(pid[2]) <= 64 and type(pid[3]) is str and len(pid[3]) <= 64
                and type(pid[4]) is int and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None)):
            self._malformed(f"embedded torch storage with an unexpected persistent id {_short(repr(pid), 120)}")
        return _StorageRef(pid[1], pid[2], pid[4])


def _legacy_storage(data: bytes, path: Path | None) -> torch.storage.TypedStorage:
    """The storage in ``data``, the blob ``torch.storage._load_from_bytes`` receives, parsed without torch.load.

    A pickled tensor embeds its storage in torch's legacy format: magic number, protocol version and
    system-info pickles, a pickle holding one persistent id (dtype, key, element count), the pickled list
    of the storage keys whose bytes follow, then per key an int64 element count and the raw bytes. Only
    exactly that is accepted: one storage, listed once, its count equal to the persistent id's and its
    bytes all present. Every byte of the result comes from the blob (torch's own loader leaves a storage
    that is missing from the key list unfilled, so heap memory would become data).
    """
    def malformed(what: str) -> NoReturn:
        raise DataError(f"embedded torch storage is corrupt: {what}", path=path)

    f = io.BytesIO(data)

    def unpickle() -> Any:
        try:
            return _LegacyBlobUnpickler(f, path, byte_budget=len(data), size=len(data) - f.tell()).load()
        except UnsafePickleError:
            raise
        except DataError as exc:
            malformed(str(exc).removeprefix(f"{path}: ").removeprefix("malformed pickle: ")
                      .removeprefix("truncated or not a pickle: "))
        except Exception as exc:  # untrusted bytes: every failure is a data problem
            malformed(f"not a torch storage ({exception_text(exc)})")

    magic, protocol, sys_info = unpickle(), unpickle(), unpickle()
    if type(magic) is not int or magic != _LEGACY_MAGIC or type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        malformed("not torch's legacy storage format")
    if type(sys_info) is not dict or sys_info.get("little_endian") is not True:
        malformed("not a little-endian storage")
    ref = unpickle()
    if not isinstance(ref, _StorageRef):
        malformed(f"it holds a {type(ref).__name__}, not a storage")
    keys = unpickle()
    if keys != [ref.key]:
        malformed(f"its key list {_short(repr(keys), 80)} does not list its one storage {ref.key!r} once")
    header = f.read(8)
    if len(header) != 8 or struct.unpack("<q", header)[0] != ref.numel:
        malformed(f"its data does not start with its element count {ref.numel}")
    payload = f.read()
    if len(payload) != ref.numel * ref.dtype.itemsize:
        malformed(f"{len(payload)} bytes of data for {ref.numel} elements of {ref.dtype}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=ref.dtype, _internal=True)


# --------------------------------------------------------------------------- loading


def _nesting_problem(root: object) -> str | None:
    """Why ``root`` cannot be handed to code that walks it recursively: containers nested deeper than
    MAX_NESTING, or a container that contains itself. None when it is fine. Iterative, linear time."""
    containers = (list, tuple, dict, OrderedDict, set, frozenset)
    height: dict[int, int] = {}  # id -> containers on the longest path down from it (done)
    active: set[int] = set()  # ids on the path from the root to the node being expanded

    def children(obj: Any):
        return (x for kv in obj.items() for x in kv) if isinstance(obj, dict) else iter(obj)

    stack: list[tuple[Any, bool]] = [(root, False)] if type(root) in containers else []
    while stack:
        obj, expanded = stack.pop()
        i = id(obj)
        if expanded:
            active.discard(i)
            height[i] = h = 1 + max((height[id(c)] for c in children(obj) if type(c) in containers), default=0)
            if h > MAX_NESTING:
                return f"containers nested more than {MAX_NESTING} deep"
        elif i in active:
            return "a container that contains itself"
        elif i not in height:
            active.add(i)
            stack.append((obj, True))
            stack.extend((c, False) for c in children(obj) if type(c) in containers and id(c) not in height)
    return None


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes; DataError when it cannot be read."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot open file: {exc.strerror or exc}", path=path) from None


def safe_load_pickle(path: str | Path) -> object:
    """Unpickle ``path`` allowing only containers, numbers, strings, numpy arrays and torch tensors.

    Raises UnsafePickleError (before anything is called) for any other global, a persistent id or
    an instance-creating opcode, and DataError for a missing, empty, truncated or malformed file.
    """
    path = Path(path)
    size = file_size(path)
    if size == 0:
        raise DataError("empty file: truncated or not a pickle", path=path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open file: {exc.strerror or exc}", path=path) from None
    with f:
        if f.read(4) == b"PK\x03\x04":
            raise DataError("a zip archive (torch.save format?), not a pickle", path=path)
        f.seek(0)
        try:
            obj = _RestrictedUnpickler(f, path, byte_budget=2 * size + (1 << 20), size=size).load()
        except DataError:
            raise
        except RecursionError:
            raise DataError(f"containers nested more than {MAX_NESTING} deep", path=path) from None
        except MemoryError:
            raise DataError("pickle too large to load into memory", path=path) from None
        except Exception as exc:  # untrusted bytes: every failure is reported as a data problem
            raise DataError(f"truncated or not a pickle ({exception_text(exc)})", path=path) from exc
    problem = _nesting_problem(obj)
    if problem is not None:
        raise DataError(f"malformed pickle: {problem}", path=path)
    return obj
