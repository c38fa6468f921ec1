"""Safe loading, validation and writing of the challenge's dataset pickles.

A dataset pickle holds a list of records:

* eval files (``datasets/eval/<dataset>_<arch>.p``): ``[image, label, membership]``
* test files (``datasets/test/<dataset>_<arch>.p``): ``[image, label]``

``image`` is a model-ready (C, H, W) float tensor (already normalised: feed it as is), a
``torch.Tensor`` or a ``numpy.ndarray``; ``label`` and ``membership`` are integers (python int,
numpy integer, or a 0-d integer tensor/array). Records may be lists or tuples.

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
import reprlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import torch

from mia.atomic import atomic_write
from mia.cache import cached_arrays, file_digest
from mia.errors import DataError, UnsafePickleError

__all__ = [
    "SAFE_GLOBALS",
    "Records",
    "load_records",
    "records_from_objects",
    "safe_load_pickle",
    "save_records",
]

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


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


def _exc_text(exc: BaseException) -> str:
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
        raise DataError(f"embedded torch storage is corrupt ({_exc_text(exc)})", path=path) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise DataError(f"embedded torch storage holds a {type(storage).__name__}, not a storage", path=path)
    return storage


def _file_size(path: Path) -> int:
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
    size = _file_size(path)
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
            raise DataError(f"truncated or not a pickle ({_exc_text(exc)})", path=path) from exc


# --------------------------------------------------------------------------- record validation

_TORCH_INT_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)
_INT64_MAX = int(np.iinfo(np.int64).max)
RECORDS_CACHE_FORMAT = 1  # bump when the arrays a records cache entry holds would change
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
            raise DataError(f"image tensor cannot be read: {_exc_text(exc)}", path=path, index=index) from None
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

    cache_dir: when given, the validated arrays are kept there as ``.npz`` keyed by the file's
    sha256 (mia.cache.cached_arrays), and later calls on the same content read them instead of
    unpickling again; labels are checked against ``num_classes`` either way.
    """
    if cache_dir is None:
        return _load_validated(path, with_membership, num_classes)
    kind = "eval" if with_membership else "test"
    entry = Path(cache_dir) / "records" / f"{file_digest(path)[:32]}-{kind}-v{RECORDS_CACHE_FORMAT}.npz"

    def build() -> dict[str, np.ndarray]:
        recs = _load_validated(path, with_membership, None)
        arrays = {"images": recs.images, "labels": recs.labels}
        if with_membership:
            arrays["membership"] = recs.membership
        return arrays

    arrays, _ = cached_arrays(entry, build, lambda a: _valid_record_arrays(a, with_membership))
    recs = Records(images=arrays["images"], labels=arrays["labels"], membership=arrays.get("membership"),
                   path=Path(path))
    if num_classes is not None:
        _check_label_range(recs.labels, num_classes, Path(path))
    return recs


def _valid_record_arrays(arrays: dict[str, np.ndarray], with_membership: bool) -> bool:
    """Whether a cache entry holds what _validate_records returns (shapes, dtypes, finite, 0/1 membership)."""
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None or labels is None or (with_membership and "membership" not in arrays):
        return False
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
    max_image_bytes = 4 * _file_size(Path(path)) + (64 << 20)
    return _validate_records(obj, path=path, with_membership=with_membership, num_classes=num_classes,
                             max_image_bytes=max_image_bytes)


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path | None) -> None:
    """The DataError _validate_records raises for the first label outside [0, num_classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"label {int(labels[i])} out of range: must be in [0, {num_classes})", path=path, index=i)


# --------------------------------------------------------------------------- writing

def _to_numpy(values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


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
    image_array = _to_numpy(images)
    if image_array.dtype.kind not in "fiu" or image_array.ndim != 4:
        raise DataError(f"images must be a real-valued (n, C, H, W) array, found {_describe(image_array)}",
                        path=path)
    with np.errstate(over="ignore", invalid="ignore"):
        image_array = image_array.astype(np.float32, copy=False)  # overflow -> inf, refused below
    n = image_array.shape[0]
    label_array = _to_numpy(labels)
    if label_array.shape != (n,):
        raise DataError(f"labels must have shape ({n},), found {label_array.shape}", path=path)
    member_array = None if membership is None else _to_numpy(membership)
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
