"""One device resolver for scoring, training, the demo and the benchmarks, and fp32 as on a CPU on CUDA
(``ieee_fp32``)."""
from __future__ import annotations

import contextlib

import torch

from mia.errors import MIAError

__all__ = ["ieee_fp32", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' as given.

    MIAError for a device string torch does not know, for CUDA asked for where there is none, or for a
    ``cuda:N`` this machine does not have."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise MIAError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MIAError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MIAError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                       f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@contextlib.contextmanager
def ieee_fp32(dev: torch.device, enabled: bool = True):
    """fp32 as on a CPU while inside: on CUDA, cuDNN's convolutions (and, where enabled, matrix products)
    otherwise round their inputs to TF32's 10-bit mantissa. Restores the previous settings. A no-op when
    not ``enabled`` (bf16 autocast: TF32 does not apply) or off CUDA."""
    if dev.type != "cuda" or not enabled:
        yield
        return
    flags = _fp32_flags()
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def _fp32_flags() -> list[tuple[object, str, object]]:
    """(owner, attribute, value inside ieee_fp32) for the TF32 switches of this torch. From torch 2.9 the
    ``fp32_precision`` attributes; reading the legacy ``allow_tf32`` flags raises once anything in the
    process set precision through them, so they are used only where the new ones do not exist."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
