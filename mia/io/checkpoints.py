"""Checkpoints: read a victim's weights safely, write our own atomically.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
reading it cannot run code from the file. Accepted layouts: ``{'net': state_dict, 'acc', 'epoch'}``,
``{'state_dict': ...}``, ``{'model_state_dict': ...}``, ``{'model': ...}`` and a bare state_dict; a
``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix shared by every key is stripped. A
whole pickled ``nn.Module`` needs ``trust=True`` (CLI ``--trust-checkpoints``). Which architecture the
weights belong to is found by ``mia.models.registry`` from their keys and shapes, not assumed here.
"""
from __future__ import annotations

import itertools
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mia.io.atomic import atomic_write
from mia.errors import CheckpointError

__all__ = ["load_state_dict", "save_checkpoint"]

# Keys under which a wrapper dict may hold the state_dict, in the order they are tried.
_WRAPPER_KEYS = ("net", "state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10  # keys listed per category in a mismatch message


# ---------------------------------------------------------------------------------------------
# Loading weights


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix shared by every key (``module.`` from DataParallel), repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _scalar(value: object, kind: type) -> Any:
    """``acc``/``epoch`` as a Python number (they may be stored as 0-d tensors); None if not a number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    return None


def _torch_load(path: Path, trust: bool) -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        message = str(e)
        if not trust and "Weights only load failed" in message:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            if found:
                what = (f"it contains the Python object {found.group(1)} (for example a whole pickled "
                        "nn.Module) rather than only tensors. Loading it would execute arbitrary code")
            else:
                what = ("the safe weights-only loader cannot read it (it is not a plain tensor "
                        "checkpoint). Loading it fully could execute arbitrary code")
            raise CheckpointError(
                f"{path}: refusing to load: {what} from the file. If you trust its source, pass "
                "--trust-checkpoints (trust=True)."
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except (ImportError, AttributeError) as e:
        if not trust:
            raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
        raise CheckpointError(
            f"{path}: the pickled objects refer to code that cannot be imported here "
            f"({type(e).__name__}: {_first_line(e)}); save the state_dict instead of the whole model"
        ) from e
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, zipfile.BadZipFile,
            TypeError, IndexError) as e:
        if path.is_file() and path.stat().st_size == 0:
            raise CheckpointError(f"{path}: checkpoint file is empty") from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint, possibly truncated or not saved by torch.save "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def load_state_dict(path: str | Path, *, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's weights on the CPU.

    Returns ``(state_dict, meta)``: state_dict maps key -> tensor with any ``module.`` prefix
    removed; meta has ``'acc'`` (float) and ``'epoch'`` (int) when the checkpoint stores them.
    Raises CheckpointError (naming the file) for empty, truncated or non-checkpoint files, and
    for files that need code execution to load unless ``trust`` is True.
    """
    path = Path(path)
    obj = _torch_load(path, trust)
    meta: dict = {}
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        sd: object = obj.state_dict()
    elif _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict):
        sd = None
        for key in _WRAPPER_KEYS:
            candidate = obj.get(key)
            if isinstance(candidate, nn.Module):
                candidate = candidate.state_dict()
            if _is_state_dict(candidate):
                sd = candidate
                break
        if sd is None:
            keys = ", ".join(repr(k) for k in itertools.islice(obj, _MAX_LISTED))
            raise CheckpointError(
                f"{path}: no weights found: expected a state_dict (str -> tensor) or a dict holding one "
                f"under {', '.join(repr(k) for k in _WRAPPER_KEYS)}; top-level keys are: {keys or 'none'}"
            )
        for key, kind in (("acc", float), ("epoch", int)):
            value = _scalar(obj.get(key), kind)
            if value is not None:
                meta[key] = value
    else:
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, "
                              "not a state_dict or a dict holding one")
    sd = _strip_prefixes(dict(sd))
    _check_storage(path, sd)
    return sd, meta


def _check_storage(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that claim more elements than their storage holds (``zeros(160).expand(2e6, 160)``):
    sizes read from such a tensor would make us build a model far larger than the file."""
    for key, tensor in state_dict.items():
        needed = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if needed > held or any(stride == 0 for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
            raise CheckpointError(f"{path}: tensor {key!r} of shape {tuple(tensor.shape)} is backed by {held} bytes "
                                  f"(it needs {needed}): an expanded or overlapping tensor is not trained weights")


def save_checkpoint(path: str | Path, model: nn.Module, acc: float | None, epoch: int | None) -> None:
    """Write ``{'net': state_dict, 'acc': acc, 'epoch': epoch}`` atomically (temp file + os.replace).

    Tensors are saved on the CPU and ``acc``/``epoch`` as Python numbers, so the file loads with
    ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "net": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "acc": None if acc is None else float(acc),
        "epoch": None if epoch is None else int(epoch),
    }
    atomic_write(path, lambda f: torch.save(payload, f), durable=True)
