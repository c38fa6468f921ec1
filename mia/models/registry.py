"""Architectures and their candidate builders (mia.models.discovery picks the one that fits a checkpoint).

A victim ``<arch>_<dataset>.pth`` names its architecture, but nothing says how its weights are laid out:
kuangliu-style files (``linear``, ``shortcut``), torchvision's constructors (``fc``, ``downsample``,
``features.N``, ``classifier.N``) or a challenge's own factories. So builders are *found*, not assumed:

1. candidate builders come from, in order, the bundle's architecture file(s) for ``arch``, the
   repository's own file (``mia/models/``) and torchvision's constructors for that family;
2. within a file, first the names users know (``ResNet34``, ``resnet_34``, ``VGG('VGG16')``, ...), then
   every other public function or ``nn.Module`` subclass defined there that takes a class count;
3. mia.models.discovery keeps the first whose ``state_dict`` keys and shapes equal the checkpoint's.

Architecture files are code: importing one runs it (see ``candidate_files`` for which are imported).
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.nn as nn

from mia.errors import ArchitectureError

__all__ = [
    "Builder",
    "REPO_ARCH_DIR",
    "REPO_ARCHITECTURES",
    "candidate_builders",
    "candidate_files",
    "family_name",
    "first_line",
    "import_architecture_file",
    "norm_name",
    "repo_builder",
]

# The repository's own architecture files live beside this module (package data).
REPO_ARCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RepoArchitecture:
    """One of the repository's own architectures (used by the demo and the benchmarks)."""

    file: str  # file name in REPO_ARCH_DIR
    default_width: int  # width at which the model is the paper's / kuangliu's


REPO_ARCHITECTURES: dict[str, RepoArchitecture] = {
    "resnet34": RepoArchitecture("resnet34.py", 64),
    "vgg16": RepoArchitecture("vgg.py", 64),
    "mobilenetv2": RepoArchitecture("mobilenetv2.py", 32),
}

# Names users know, per architecture: (callable name, leading positional arguments), tried first.
KNOWN_BUILDERS: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = {
    "resnet34": (("ResNet34", ()), ("resnet34", ()), ("resnet_34", ())),
    "vgg16": (("VGG", ("VGG16",)), ("vgg16", ()), ("vgg_16", ()), ("vgg16_bn", ())),
    "mobilenetv2": (("MobileNetV2", ()), ("mobilenetv2", ()), ("mobilenet_v2", ())),
}
# torchvision constructors per architecture (any other name: those whose name matches, see below).
TORCHVISION_BUILDERS: dict[str, tuple[str, ...]] = {
    "resnet34": ("resnet34",),
    "vgg16": ("vgg16", "vgg16_bn"),
    "mobilenetv2": ("mobilenet_v2",),
}
# Parameter names that mean "class count" and "width" in a builder's signature.
CLASS_PARAMS = ("num_classes", "n_classes", "num_class", "nclasses", "classes", "class_num", "num_labels")
WIDTH_PARAM = "width"


def norm_name(name: str) -> str:
    """'ResNet_34' -> 'resnet34': lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def family_name(arch: str) -> str:
    """'vgg16' -> 'vgg', 'resnet34' -> 'resnet', 'mobilenetv2' -> 'mobilenet', 'wrn16_4' -> 'wrn'."""
    found = re.match(r"[a-z]+?(?=v?\d|$)", norm_name(arch))
    return found.group(0) if found else norm_name(arch)


# ---------------------------------------------------------------------------------------------
# Builders


@dataclass(frozen=True)
class Builder:
    """One way to build a model: a callable, where it came from and how it is called."""

    label: str  # how it is shown, e.g. "resnet_34", "VGG('VGG16')", "torchvision.models.resnet34"
    source: str  # "bundle", "repository" or "torchvision"
    file: Path | None  # the architecture file it was found in (None for torchvision)
    fn: Callable[..., Any] = field(compare=False, repr=False)
    args: tuple[Any, ...] = ()  # leading positional arguments, e.g. ("VGG16",)
    classes_param: str | None = "num_classes"  # keyword for the class count; None: positional after args
    takes_width: bool = False  # whether it takes ``width=`` (channels of the first conv)
    kwargs: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments (torchvision: weights=None)

    def build(self, num_classes: int, width: int | None = None) -> nn.Module:
        """Call the builder; raises whatever it raises, or TypeError when it returns no nn.Module."""
        args = list(self.args)
        kwargs = dict(self.kwargs)
        if self.classes_param is None:
            args.append(num_classes)
        else:
            kwargs[self.classes_param] = num_classes
        if width is not None and self.takes_width:
            kwargs[WIDTH_PARAM] = width
        model = self.fn(*args, **kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"returned a {type(model).__name__}, not an nn.Module")
        return model

    @property
    def where(self) -> str:
        return f"{self.file}" if self.file is not None else "torchvision"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


_import_counter = itertools.count()


def import_architecture_file(path: str | Path) -> ModuleType:
    """Import a .py file by path under a fresh, unique module name (never cached or shared).

    The file's folder is appended (not prepended) to ``sys.path`` while it runs, so a file can import
    a sibling helper module but cannot shadow an installed package."""
    path = Path(path).resolve()
    name = f"_mia_arch_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{next(_import_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ArchitectureError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ArchitectureError(f"{path}: architecture file not found") from None
    except Exception as e:  # any error in someone else's file
        raise ArchitectureError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _call_plan(fn: Callable[..., Any], n_leading: int, known: bool) -> tuple[str | None, bool] | None:
    """(classes keyword or None for positional, takes width) for calling ``fn``; None if it cannot be.

    A builder must take a class count: a parameter named like one (CLASS_PARAMS), or, for the names
    users know only, its first free positional parameter. Every other parameter needs a default."""
    sig = _signature(fn)
    if sig is None:
        return None
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    free = params[n_leading:]
    named = next((p for p in free if p.name in CLASS_PARAMS and p.kind != p.POSITIONAL_ONLY), None)
    takes_width = any(p.name == WIDTH_PARAM and p.kind != p.POSITIONAL_ONLY for p in free)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if named is not None:
        classes: inspect.Parameter | None = named
        plan: tuple[str | None, bool] = (named.name, takes_width)
    elif known and var_keyword:  # e.g. def resnet34(pretrained=False, **kwargs)
        classes, plan = None, ("num_classes", takes_width)
    elif known and free and free[0].kind in (free[0].POSITIONAL_ONLY, free[0].POSITIONAL_OR_KEYWORD):
        classes, plan = free[0], (None, takes_width)
    else:
        return None
    required = [p for p in free if p is not classes and p.default is p.empty]
    return None if required else plan


def _label(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})" if args else name


def _module_builders(module: ModuleType, arch: str, source: str, file: Path) -> list[Builder]:
    """The builders of one imported file, known names first, then the other public candidates."""
    builders: list[Builder] = []
    seen: set[tuple[int, tuple[Any, ...]]] = set()

    def add(name: str, obj: Any, args: tuple[Any, ...], known: bool) -> None:
        if not callable(obj) or (id(obj), args) in seen:
            return
        if inspect.isclass(obj) and not issubclass(obj, nn.Module):
            return
        plan = _call_plan(obj, len(args), known)
        if plan is None:
            return
        seen.add((id(obj), args))
        builders.append(Builder(_label(name, args), source, file, obj, args, plan[0], plan[1]))

    namespace = vars(module)
    for name, args in KNOWN_BUILDERS.get(norm_name(arch), ()):
        if name in namespace:
            add(name, namespace[name], args, True)
    for name, obj in namespace.items():  # a callable named like the architecture: ResNet18, wrn16_4
        if norm_name(name) == norm_name(arch):
            add(name, obj, (), True)
    family = family_name(arch)
    for name, obj in namespace.items():  # a family class taking the variant's name: VGG('VGG16')
        if norm_name(name) == family and family != norm_name(arch):
            sig = _signature(obj)
            first = next(iter(sig.parameters.values()), None) if sig else None
            if first is not None and ("name" in first.name or "cfg" in first.name or first.annotation is str):
                add(name, obj, (arch.upper(),), True)
    for name, obj in namespace.items():  # every other public builder defined in this file
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)):
            add(name, obj, (), False)
    return builders


def candidate_files(arch: str, arch_dirs: list[Path]) -> list[tuple[str, Path]]:
    """(source, file) of every architecture file that discovery imports for ``arch``, in order.

    ``arch_dirs``: the bundle's models/ first (source "bundle"), the repository's last ("repository").
    In a bundle folder, files named after the architecture or its family (``resnet34.py``,
    ``mobilenet_v2.py``, ``vgg.py`` for vgg16) come first, then its other ``.py`` files."""
    out: list[tuple[str, Path]] = []
    for folder in arch_dirs:
        folder = Path(folder)
        repo = folder.resolve() == REPO_ARCH_DIR
        source = "repository" if repo else "bundle"
        if repo:
            spec = REPO_ARCHITECTURES.get(norm_name(arch))
            if spec is not None:
                out.append((source, REPO_ARCH_DIR / spec.file))
            continue
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.glob("*.py") if p.is_file())
        named = [p for p in files if norm_name(p.stem) in (norm_name(arch), family_name(arch))]
        out += [(source, p) for p in named] + [(source, p) for p in files if p not in named]
    return out


def _torchvision_builders(arch: str) -> list[Builder]:
    try:
        import torchvision.models as tvm
    except Exception:  # torchvision missing or broken: no candidates from it
        return []
    names = list(TORCHVISION_BUILDERS.get(norm_name(arch), ()))
    for name in tvm.list_models(module=tvm):
        if norm_name(name) in (norm_name(arch), norm_name(arch) + "bn") and name not in names:
            names.append(name)
    return [Builder(f"torchvision.models.{n}", "torchvision", None, tvm.get_model_builder(n),
                    kwargs=(("weights", None),)) for n in names]


def candidate_builders(arch: str, arch_dirs: list[Path]) -> Iterator[Builder | ArchitectureError]:
    """Every candidate builder for ``arch``, in discovery order; a file that fails to import yields
    its ArchitectureError in place (so the caller can report it and go on)."""
    for source, path in candidate_files(arch, arch_dirs):
        try:
            module = import_architecture_file(path)
        except ArchitectureError as e:
            yield e
            continue
        yield from _module_builders(module, arch, source, path)
    yield from _torchvision_builders(arch)


def repo_builder(arch: str) -> Builder:
    """The repository's own builder of one of REPO_ARCHITECTURES (demo, benchmarks)."""
    if arch not in REPO_ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r}; the repository builds {sorted(REPO_ARCHITECTURES)}")
    file = REPO_ARCH_DIR / REPO_ARCHITECTURES[arch].file
    builders = _module_builders(import_architecture_file(file), arch, "repository", file)
    if not builders:
        raise ArchitectureError(f"{file}: no builder for {arch}")
    return builders[0]
