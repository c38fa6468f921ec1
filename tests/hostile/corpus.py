"""Hostile dataset pickles: the payload families of the bad-input audit (issue 16), as bytes.

``cases(marker)`` returns every case. Each would, under plain ``pickle``, run code (``live``: it
creates ``marker``), crash the interpreter, allocate far more memory than the file holds, burn CPU
out of proportion to its size, or hand uninitialised memory on as data. The restricted unpickler must
refuse each with one line naming the file (and the record, for record-level problems), before
anything runs, within a small memory bound. Payloads are built from opcodes or from ``pickle.dumps``
of stand-ins whose ``__reduce__`` names the real target, so nothing here runs them.
"""
from __future__ import annotations

import builtins
import functools
import io
import operator
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Case", "cases"]


@dataclass(frozen=True)
class Case:
    """One hostile pickle."""

    name: str
    family: str
    data: bytes
    unsafe: bool  # refused as UnsafePickleError (a global or opcode that is never allowed); else DataError
    live: bool = False  # under plain pickle.loads it creates the marker file (checked by the tests)


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _ReduceEx:
    """Pickles as ``func(*args)`` through ``__reduce_ex__``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce_ex__(self, protocol):
        return self.func, self.args


def _global(module: str, name: str) -> bytes:
    """GLOBAL module.name (protocols 0-3 spelling)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL module.name (protocol 4 spelling)."""
    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw
    return text(module) + text(name) + b"\x93"


def _legacy_blob(pid: tuple | object, keys: list, payload: bytes, *, little_endian: bool = True) -> bytes:
    """The bytes ``torch.storage._load_from_bytes`` gets: headers, a main pickle (a persistent id when
    ``pid`` is a tuple, else the object itself), the key list, then ``payload``."""
    buf = io.BytesIO()
    sys_info = {"protocol_version": 1001, "little_endian": little_endian, "type_sizes": {"short": 2, "int": 4,
                                                                                        "long": 4}}
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info):
        pickle.dump(header, buf, protocol=2)
    if isinstance(pid, tuple):
        class _Pid(pickle.Pickler):
            def persistent_id(self, obj):
                return pid if obj == "the storage" else None
        _Pid(buf, protocol=2).dump("the storage")
    else:
        pickle.dump(pid, buf, protocol=2)
    pickle.dump(keys, buf, protocol=2)
    return buf.getvalue() + payload


def _tensor_over(blob: bytes, size: tuple[int, ...] = (2,)) -> bytes:
    """A pickled 1-record eval list whose image is a tensor over the embedded storage ``blob``."""
    storage = _Reduce(torch.storage._load_from_bytes, blob)
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    tensor = _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, {})
    return pickle.dumps([[tensor, 0, 1], [torch.zeros(size), 1, 0]], protocol=2)


def _record_list(image_bytes: bytes) -> bytes:
    """Protocol-4 pickle of ``[[<image_bytes as pushed>, 0, 1]]``: ``image_bytes`` pushes one object."""
    return b"\x80\x04]" + b"(" + image_bytes + b"K\x00K\x01l" + b"a."


def _exec_payloads(src: str) -> list[Case]:
    exec_ = builtins.exec
    cases = [Case(f"reduce-exec-protocol{p}", "reduce", pickle.dumps(_Reduce(exec_, src), protocol=p), True, True)
             for p in (0, 2, 4, 5)]
    cases += [
        Case("reduce_ex-exec", "reduce_ex", pickle.dumps(_ReduceEx(exec_, src), protocol=4), True, True),
        Case("reduce-in-second-record", "reduce",
             pickle.dumps([[torch.zeros(1, 2, 2), 0, 1], [torch.zeros(1, 2, 2), 0, _Reduce(exec_, src)]]), True, True),
        Case("copyreg-reconstructor", "copyreg",
             _global("copyreg", "_reconstructor") + b"(" + _global("builtins", "object") + _global("builtins", "object")
             + b"NtR.", True),
        Case("copyreg-newobj", "copyreg", _global("copyreg", "__newobj__") + b"(" + _global("builtins", "object")
             + b"tR.", True),
        Case("inst-exec", "INST/OBJ/NEWOBJ", b"(S" + repr(src).encode() + b"\nibuiltins\nexec\n.", True, True),
        Case("obj-exec", "INST/OBJ/NEWOBJ", b"(" + _global("builtins", "exec") + b"S" + repr(src).encode() + b"\no.",
             True, True),
        Case("newobj-allowed-class", "INST/OBJ/NEWOBJ", b"\x80\x02" + _global("collections", "OrderedDict") + b")\x81.",
             True),
        Case("newobj_ex-allowed-class", "INST/OBJ/NEWOBJ",
             b"\x80\x04" + _stack_global("collections", "OrderedDict") + b")}\x92.", True),
        Case("ext1", "INST/OBJ/NEWOBJ", b"\x80\x02\x82\x01.", True),
        Case("ext4", "INST/OBJ/NEWOBJ", b"\x80\x02\x84\x01\x00\x00\x00.", True),
        Case("stack-global-builtins-exec", "STACK_GLOBAL",
             b"\x80\x04" + _stack_global("builtins", "exec") + b"\x8c" + bytes([len(src)]) + src.encode() + b"\x85R.",
             True, True),
        Case("stack-global-dotted-through-ndarray", "STACK_GLOBAL",
             b"\x80\x04" + _stack_global("numpy", "ndarray.__class__") + b".", True),
        Case("stack-global-dotted-to-module-globals", "STACK_GLOBAL",
             b"\x80\x04" + _stack_global("torch._utils", "_rebuild_tensor_v2.__globals__") + b".", True),
        Case("stack-global-non-string-operands", "STACK_GLOBAL", b"\x80\x04K\x01K\x02\x93.", False),
        Case("partial-exec", "partial/attrgetter/getattr",
             pickle.dumps(_Reduce(functools.partial(exec_, src)), protocol=4), True, True),
        Case("attrgetter", "partial/attrgetter/getattr",
             pickle.dumps(_Reduce(operator.attrgetter("system"), "x"), protocol=4), True),
        Case("methodcaller", "partial/attrgetter/getattr",
             pickle.dumps(_Reduce(operator.methodcaller("system", "true"), "x"), protocol=4), True),
        Case("getattr-import-chain", "partial/attrgetter/getattr",
             b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'builtins'\ntRS'exec'\ntR(S" + repr(src).encode()
             + b"\ntR.", True, True),
    ]
    return cases


def _numpy_payloads() -> list[Case]:
    obj_array = pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)
    scalar = _global("numpy.core.multiarray", "scalar") + b"(" + _global("numpy", "dtype") + b"(S'O8'\nI00\nI01\ntR" \
        + b"(I3\nS'|'\nNNNI-1\nI-1\nI63\ntbS'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\ntR."
    # _frombuffer(buf, dtype('O8'), (1,), 'C'): MARK-less tuple via TUPLE after a MARK
    frombuffer_obj = (b"\x80\x05" + _stack_global("numpy._core.numeric", "_frombuffer") + b"(C\x08" + b"\x00" * 8
                      + _stack_global("numpy", "dtype") + b"\x8c\x02O8\x89\x88\x87R" + b"K\x01\x85\x8c\x01Ct" + b"R.")
    huge_shape = pickle.dumps(np.zeros(2, dtype=np.float32), protocol=2).replace(
        b"K\x02\x85", b"\x8a\x08" + (1 << 62).to_bytes(8, "little") + b"\x85", 1)  # shape (2**62,), 8 bytes
    return [
        Case("numpy-object-array", "numpy rebuild", obj_array, False),
        Case("numpy-object-scalar", "numpy rebuild", scalar, False),
        Case("numpy-frombuffer-object-dtype", "numpy rebuild", frombuffer_obj, False),
        Case("numpy-shape-2^62", "numpy rebuild", huge_shape, False),
        Case("numpy-load", "numpy rebuild", pickle.dumps(_Reduce(np.load, "x.npy")), True),
        Case("numpy-frombuffer-public", "numpy rebuild", pickle.dumps(_Reduce(np.frombuffer, b"\x00" * 8)), True),
    ]


def _torch_payloads(src: str) -> list[Case]:
    zeros = torch.zeros(4)
    with warnings.catch_warnings():  # TypedStorage is deprecated, yet it is what pickled tensors hold
        warnings.simplefilter("ignore", UserWarning)
        storage = zeros.storage()
    view_too_big = pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, storage, 0, (1 << 20,), (1,), False, {}),
                                protocol=2)
    negative_stride = pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, storage, 3, (2,), (-1,), False, {}),
                                   protocol=2)
    good = _legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 2, None), ["0"], struct.pack("<q", 2) + b"\x00" * 8)
    return [
        Case("torch-rebuild-tensor-v1", "torch rebuild",
             pickle.dumps(_Reduce(torch._utils._rebuild_tensor, storage, 0, (4,), (1,))), True),
        Case("torch-rebuild-from-type-v2", "torch rebuild",
             pickle.dumps(_Reduce(torch._tensor._rebuild_from_type_v2, builtins.exec, torch.Tensor, (src,), {})),
             True, True),
        Case("torch-rebuild-parameter-with-state", "torch rebuild",
             pickle.dumps(_Reduce(torch._utils._rebuild_parameter_with_state, zeros, False, {}, {})), True),
        Case("torch-load", "torch rebuild", pickle.dumps(_Reduce(torch.load, "x.pt")), True),
        Case("torch-view-larger-than-storage", "torch rebuild", view_too_big, False),
        Case("torch-negative-stride", "torch rebuild", negative_stride, False),
        Case("blob-runs-code", "nested torch blob",
             _tensor_over(_legacy_blob(_Reduce(builtins.exec, src), [], b"")), True, True),
        Case("blob-storage-missing-from-key-list", "nested torch blob",  # torch leaves it unfilled: heap bytes
             _tensor_over(_legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 2, None), [], b"")), False),
        Case("blob-key-listed-twice", "nested torch blob",
             _tensor_over(_legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 2, None), ["0", "0"],
                                       struct.pack("<q", 2) + b"\x00" * 8)), False),
        Case("blob-count-mismatch", "nested torch blob",
             _tensor_over(_legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 2, None), ["0"],
                                       struct.pack("<q", 1) + b"\x00" * 4)), False),
        Case("blob-numel-2^40-no-data", "nested torch blob",
             _tensor_over(_legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 1 << 40, None), ["0"],
                                       struct.pack("<q", 1 << 40))), False),
        Case("blob-short-data", "nested torch blob", _tensor_over(good[:-3]), False),
        Case("blob-big-endian", "nested torch blob",
             _tensor_over(_legacy_blob(("storage", torch.FloatStorage, "0", "cpu", 2, None), ["0"],
                                       struct.pack("<q", 2) + b"\x00" * 8, little_endian=False)), False),
        Case("blob-foreign-storage-class", "nested torch blob",
             _tensor_over(_legacy_blob(("storage", torch.serialization.load, "0", "cpu", 2, None), ["0"],
                                       struct.pack("<q", 2) + b"\x00" * 8)), True),
        Case("blob-inside-blob", "nested torch blob",
             _tensor_over(_legacy_blob(_Reduce(torch.storage._load_from_bytes, good), [], b"")), True),
    ]


def _length_bombs() -> list[Case]:
    big8, big4 = struct.pack("<Q", 1 << 40), struct.pack("<I", (1 << 32) - 1)
    return [
        Case("bytearray8-2GiB", "declared-length bomb", b"\x80\x05\x96" + struct.pack("<Q", 1 << 31) + b"abc.", False),
        Case("binbytes8-1TiB", "declared-length bomb", b"\x80\x04\x8e" + big8 + b"abc.", False),
        Case("binunicode8-1TiB", "declared-length bomb", b"\x80\x04\x8d" + big8 + b"abc.", False),
        Case("binbytes-4GiB", "declared-length bomb", b"\x80\x03B" + big4 + b"abc.", False),
        Case("binunicode-4GiB", "declared-length bomb", b"\x80\x02X" + big4 + b"abc.", False),
        Case("binstring-2GiB", "declared-length bomb", b"\x80\x02T" + struct.pack("<i", (1 << 31) - 1) + b"abc.", False),
        Case("long4-2GiB", "declared-length bomb", b"\x80\x02\x8b" + struct.pack("<i", (1 << 31) - 1) + b"abc.", False),
        Case("frame-1TiB", "declared-length bomb", b"\x80\x04\x95" + big8 + b"N.", False),
        Case("bytes-in-record-4GiB", "declared-length bomb", _record_list(b"B" + big4 + b"abc"), False),
    ]


def _depth_bombs() -> list[Case]:
    return [
        Case("tuple-200k-deep-image", "depth bomb", _record_list(b")" + b"\x85" * 200_000), False),
        Case("tuple-1M-deep-dict-key", "depth bomb", b"\x80\x04}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.", False),
        Case("tuple-1M-deep-set-member", "depth bomb", b"\x80\x04\x8f(" + b")" + b"\x85" * 1_000_000 + b"\x90.", False),
        Case("tuple-1M-deep-builtins-set", "depth bomb",
             b"\x80\x02" + _global("builtins", "set") + b"]" + b")" + b"\x85" * 1_000_000 + b"a\x85R.", False),
        Case("list-100k-deep", "depth bomb", b"\x80\x04" + b"]" * 100_001 + b"a" * 100_000 + b".", False),
        Case("list-contains-itself", "depth bomb", b"\x80\x02]q\x00h\x00a.", False),
        Case("dict-contains-itself", "depth bomb", b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.", False),
    ]


def _shared_reference_bombs() -> list[Case]:
    image = torch.zeros(3, 64, 64)
    record = [image, 0, 1]
    many_records = pickle.dumps([record] * 200_000 + [[image, 1, 0]], protocol=4)  # 9.8 GB of float32 images
    many_images = pickle.dumps([[image, i % 2, i % 2] for i in range(200_000)], protocol=4)
    payload = b"\x80\x04" + b"C\xff" + b"\x00" * 255 + b"\x94" + _stack_global("builtins", "bytearray") + b"\x94" \
        + b"]" + b"(" + b"h\x01h\x00\x85R" * 200_000 + b"e."  # 200,000 copies of one 255-byte payload
    return [
        Case("one-record-200k-times", "shared-reference bomb", many_records, False),
        Case("one-image-in-200k-records", "shared-reference bomb", many_images, False),
        Case("one-bytes-payload-copied-200k-times", "shared-reference bomb", payload, False),
    ]


def _collision_bombs() -> list[Case]:
    p = (1 << 61) - 1

    def long1(k: int) -> bytes:
        raw = k.to_bytes((k.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    colliding = b"".join(long1(k * p) + b"K\x00" for k in range(1, 40_001))
    return [
        Case("dict-40k-colliding-int-keys", "hash-collision bomb", b"\x80\x04}(" + colliding + b"u.", False),
        Case("dict-colliding-keys-opcode", "hash-collision bomb", b"\x80\x02(" + colliding + b"d.", False),
        Case("set-40k-colliding-ints", "hash-collision bomb",
             b"\x80\x04\x8f(" + b"".join(long1(k * p) for k in range(1, 40_001)) + b"\x90.", False),
        Case("dict-float-keys", "hash-collision bomb", b"\x80\x04}(G?\xf0\x00\x00\x00\x00\x00\x00K\x00u.", False),
    ]


def cases(marker: Path) -> list[Case]:
    """Every hostile case; the live ones would create ``marker``."""
    src = f"open({str(marker)!r}, 'w').close()"
    return (_exec_payloads(src) + _numpy_payloads() + _torch_payloads(src) + _length_bombs() + _depth_bombs()
            + _shared_reference_bombs() + _collision_bombs())
