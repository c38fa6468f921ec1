"""Victim weights: safe loading, class count and width from the weights, key/shape checks.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
reading it cannot run code from the file. Accepted layouts: ``{'net': state_dict, 'acc', 'epoch'}``
(kuangliu/pytorch-cifar), ``{'state_dict': ...}``, ``{'model_state_dict': ...}``, ``{'model': ...}``
and a bare state_dict; a ``module.`` prefix (``DataParallel``) is stripped. A whole pickled
``nn.Module`` needs ``trust=True`` (CLI ``--trust-checkpoints``).

Architecture files (``models/resnet34.py``, ``models/vgg.py``, ``models/mobilenetv2.py``) are imported
by path; a bundle can ship its own, so ``arch_dirs`` is searched in order and the first hit wins.
"""
from __future__ import annotations

import importlib.util
import itertools
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from mia.atomic import atomic_write
from mia.errors import ArchitectureError, CheckpointError

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "REPO_ARCH_DIR",
    "VictimModelInfo",
    "build_model",
    "import_architecture_file",
    "infer_num_classes",
    "infer_width",
    "load_state_dict",
    "load_victim_model",
    "save_checkpoint",
]

# The repository's own architecture files; callers usually put a bundle's models/ before it.
REPO_ARCH_DIR = Path(__file__).resolve().parent.parent / "models"

# Keys under which a wrapper dict may hold the state_dict, in the order they are tried.
_WRAPPER_KEYS = ("net", "state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10  # keys listed per category in a mismatch message


@dataclass(frozen=True)
class ArchSpec:
    """How to find, build and size one architecture."""

    arch: str  # name used in bundle file names, e.g. "resnet34"
    file: str  # architecture file name inside an arch dir, e.g. "resnet34.py"
    factory: str  # callable in that file that returns the nn.Module
    factory_args: tuple[Any, ...]  # positional arguments always passed first, e.g. ("VGG16",)
    default_width: int  # width at which the model is the paper's / kuangliu's
    classes_key: str  # state_dict key whose shape[0] is the class count (final Linear weight)
    width_key: str  # state_dict key whose shape[0] is the width (first conv weight)


ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet34": ArchSpec("resnet34", "resnet34.py", "ResNet34", (), 64, "linear.weight", "conv1.weight"),
    "vgg16": ArchSpec("vgg16", "vgg.py", "VGG", ("VGG16",), 64, "classifier.weight", "features.0.weight"),
    "mobilenetv2": ArchSpec("mobilenetv2", "mobilenetv2.py", "MobileNetV2", (), 32, "linear.weight", "conv1.weight"),
}


@dataclass(frozen=True)
class VictimModelInfo:
    """What was loaded for one victim model."""

    arch: str  # key of ARCHITECTURES
    num_classes: int  # from the final Linear's weight
    width: int  # from the first conv's weight
    architecture_file: Path  # the .py the model was built from
    checkpoint_acc: float | None  # 'acc' stored in the checkpoint, if any
    epoch: int | None  # 'epoch' stored in the checkpoint, if any


def _spec(arch: str) -> ArchSpec:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ArchitectureError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None


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
    return _strip_prefixes(dict(sd)), meta


def _key_shape(arch: str, state_dict: dict[str, torch.Tensor], key: str, what: str, ndim: int) -> int:
    tensor = state_dict.get(key)
    if tensor is None or tensor.dim() != ndim:
        got = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
        raise CheckpointError(f"cannot read the {what} of a {arch} checkpoint: key {key!r} is {got} "
                              f"(expected a {ndim}-d tensor); is this really a {arch} checkpoint?")
    return int(tensor.shape[0])


def infer_num_classes(arch: str, state_dict: dict[str, torch.Tensor]) -> int:
    """Class count = rows of the final Linear weight (``linear.weight`` / ``classifier.weight``)."""
    spec = _spec(arch)
    return _key_shape(arch, state_dict, spec.classes_key, "class count", 2)


def infer_width(arch: str, state_dict: dict[str, torch.Tensor]) -> int:
    """Width = output channels of the first conv (``conv1.weight`` / ``features.0.weight``)."""
    spec = _spec(arch)
    return _key_shape(arch, state_dict, spec.width_key, "width", 4)


# ---------------------------------------------------------------------------------------------
# Building models from architecture files

_import_counter = itertools.count()


def import_architecture_file(path: str | Path) -> ModuleType:
    """Import a .py file by path under a fresh, unique module name (never cached or shared)."""
    path = Path(path).resolve()
    name = f"_mia_arch_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{next(_import_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ArchitectureError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ArchitectureError(f"{path}: architecture file not found") from None
    except Exception as e:  # any error in someone else's file
        raise ArchitectureError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    return module


def _built_size(spec: ArchSpec, model: nn.Module) -> tuple[int | None, int | None]:
    """(class count, width) of a built model, None where its keys do not say."""
    sd = model.state_dict()
    classes = sd.get(spec.classes_key)
    width = sd.get(spec.width_key)
    return (int(classes.shape[0]) if classes is not None and classes.dim() == 2 else None,
            int(width.shape[0]) if width is not None and width.dim() == 4 else None)


def build_model(arch: str, num_classes: int, width: int, arch_dirs: list[Path]) -> tuple[nn.Module, Path]:
    """Build ``arch`` from the first of ``arch_dirs`` that holds its file; returns (model, file used).

    Factory calls tried in order: ``(*args, num_classes=, width=)``, ``(*args, num_classes=)``,
    ``(*args, num_classes)``, ``(*args)`` where args is e.g. ``('VGG16',)``. The first call that
    returns an nn.Module whose class count and width (read from its weights) match is used;
    otherwise ArchitectureError lists every call tried and what went wrong.
    """
    spec = _spec(arch)
    dirs = [Path(d) for d in arch_dirs]
    file = next((d / spec.file for d in dirs if (d / spec.file).is_file()), None)
    if file is None:
        raise ArchitectureError(f"no {spec.file} for {arch} in: {', '.join(str(d) for d in dirs) or 'no dirs given'}")
    module = import_architecture_file(file)
    factory = getattr(module, spec.factory, None)
    if not callable(factory):
        raise ArchitectureError(f"{file}: has no callable {spec.factory!r} to build {arch}")

    args = spec.factory_args
    attempts: list[tuple[tuple, dict]] = [
        (args, {"num_classes": num_classes, "width": width}),
        (args, {"num_classes": num_classes}),
        (args + (num_classes,), {}),
        (args, {}),
    ]
    failures = []
    for call_args, call_kwargs in attempts:
        shown = [repr(a) for a in call_args] + [f"{k}={v!r}" for k, v in call_kwargs.items()]
        call = f"{spec.factory}({', '.join(shown)})"
        try:
            model = factory(*call_args, **call_kwargs)
        except Exception as e:  # any error from someone else's factory
            failures.append(f"{call}: {type(e).__name__}: {_first_line(e)}")
            continue
        if not isinstance(model, nn.Module):
            failures.append(f"{call}: returned a {type(model).__name__}, not an nn.Module")
            continue
        got_classes, got_width = _built_size(spec, model)
        if got_classes is not None and got_classes != num_classes:
            failures.append(f"{call}: built a model with {got_classes} classes, need {num_classes}")
            continue
        if got_width is not None and got_width != width:
            failures.append(f"{call}: built a model of width {got_width}, need {width}")
            continue
        return model, file
    raise ArchitectureError(
        f"{file}: cannot build {arch} with {num_classes} classes and width {width}; tried:\n  "
        + "\n  ".join(failures)
    )


# ---------------------------------------------------------------------------------------------
# Victim models


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _check_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Lines describing how ``state_dict`` differs from ``model``'s; empty when it fits.

    Missing ``*.num_batches_tracked`` keys are tolerated (checkpoints older than PyTorch 0.4.1).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing keys (in the model, not in the checkpoint): {_listed(missing)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not in the model): {_listed(unexpected)}")
    if misshaped:
        lines.append(f"{len(misshaped)} mis-shaped keys: {_listed(misshaped)}")
    return lines


def load_victim_model(arch: str, checkpoint: str | Path, arch_dirs: list[Path], *,
                      trust: bool = False) -> tuple[nn.Module, VictimModelInfo]:
    """Load a victim: weights -> class count and width -> build from an arch file -> strict load.

    Returns the model (CPU, float32, eval mode) and a VictimModelInfo. Raises CheckpointError when
    the weights do not fit the architecture, listing missing, unexpected and mis-shaped keys.
    """
    checkpoint = Path(checkpoint)
    state_dict, meta = load_state_dict(checkpoint, trust=trust)
    try:
        num_classes = infer_num_classes(arch, state_dict)
        width = infer_width(arch, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None
    model, file = build_model(arch, num_classes, width, arch_dirs)
    problems = _check_keys(state_dict, model)
    if problems:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit {arch} from {file} "
            f"(num_classes={num_classes}, width={width}):\n  " + "\n  ".join(problems)
        )
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: loading into {arch} from {file} failed: {e}") from e
    model = model.float().eval()
    info = VictimModelInfo(arch=arch, num_classes=num_classes, width=width, architecture_file=file,
                           checkpoint_acc=meta.get("acc"), epoch=meta.get("epoch"))
    return model, info


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
