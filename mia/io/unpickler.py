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
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from mia.errors import DataError, UnsafePickleError

__all__ = ["SAFE_GLOBALS", "exception_text", "file_size", "safe_load_pickle"]

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
    ("torch.storage", "_load_from_bytes"),  # replaced by a weights_only=True load
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
      small file cannot allocate a lot of memory by reusing one payload many times.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, path: Path | None, byte_budget: int):
        super().__init__(file)
        self._path = path
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
        target[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict):
            self._malformed(f"SETITEMS on a {type(target).__name__}")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            self._malformed(f"ADDITEMS on a {type(target).__name__}")
        target.update(items)

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
    for _opcode, _name in ((pickle.NEWOBJ, "NEWOBJ"), (pickle.NEWOBJ_EX, "NEWOBJ_EX"), (pickle.OBJ, "OBJ"),
                           (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"), (pickle.EXT4, "EXT4")):
        dispatch[_opcode[0]] = lambda self, _name=_name: self._refuse_opcode(_name)
    del _opcode, _name

    # -- builtins
    def _set(self, *args: Any) -> set[Any]:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            self._malformed("builtins.set is only allowed on a list")
        return set(*args)

    def _frozenset(self, *args: Any) -> frozenset[Any]:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            self._malformed("builtins.frozenset is only allowed on a list")
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
        storage = _load_storage_weights_only(args[0], self._path)
        nbytes = storage._untyped_storage.nbytes()
        if nbytes > len(args[0]):
            self._malformed("embedded torch storage is larger than its bytes")
        self._spend(nbytes)
        return storage

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


def _weights_only_reason(message: str) -> str:
    """The specific part of torch's "Weights only load failed" message (it wraps it in advice)."""
    marker = "WeightsUnpickler error:"
    if marker in message:
        reason = message.split(marker, 1)[1]
    else:
        lines = [ln for ln in message.splitlines() if ln.strip()]
        reason = "\n".join(lines[1:]) if len(lines) > 1 else message
    reason = " ".join(reason.split("Check the documentation", 1)[0].split())
    return reason.split(" Please use `torch.serialization", 1)[0] or "(no reason given)"


def _load_storage_weights_only(data: bytes, path: Path | None) -> torch.storage.TypedStorage:
    """What ``torch.storage._load_from_bytes`` does, with ``weights_only=True`` and on the CPU."""
    try:
        with warnings.catch_warnings():  # torch warns about odd protocols etc.; failures are raised below
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        if "GLOBAL" in reason or "global" in reason:
            raise UnsafePickleError(
                f"embedded torch storage refused by torch.load(weights_only=True): {_short(reason, 300)}", path=path
            ) from None
        raise DataError(f"embedded torch storage is corrupt: {_short(reason, 300)}", path=path) from None
    except Exception as exc:  # untrusted bytes: any failure is a data problem
        raise DataError(f"embedded torch storage is corrupt ({exception_text(exc)})", path=path) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise DataError(f"embedded torch storage holds a {type(storage).__name__}, not a storage", path=path)
    return storage


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
            return _RestrictedUnpickler(f, path, byte_budget=2 * size + (1 << 20)).load()
        except DataError:
            raise
        except MemoryError:
            raise DataError("pickle too large to load into memory", path=path) from None
        except Exception as exc:  # untrusted bytes: every failure is reported as a data problem
            raise DataError(f"truncated or not a pickle ({exception_text(exc)})", path=path) from exc


# --------------------------------------------------------------------------- record validation

