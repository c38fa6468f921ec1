"""One device resolver for scoring, training, the demo and the benchmarks."""
from __future__ import annotations

import torch

from mia.errors import MIAError

__all__ = ["resolve_device"]


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
