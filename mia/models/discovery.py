"""Builder discovery: the first candidate builder that makes exactly a checkpoint's keys and shapes.

Each candidate (mia.models.registry.candidate_builders, in order) is built on the meta device (no
memory, no RNG draws); its final classifier (last ``nn.Linear``, else last 2-D weight) says which
checkpoint key holds the class count; it is rebuilt at that class count (and at the checkpoint's width,
only for a builder that takes ``width``) and kept if its ``state_dict`` keys and shapes equal the
checkpoint's exactly. When nothing fits, ArchitectureError lists every builder tried with its first
difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mia.errors import ArchitectureError
from mia.models.registry import (
    REPO_ARCHITECTURES,
    Builder,
    candidate_builders,
    family_name,
    first_line,
    norm_name,
)

__all__ = ["Architecture", "MAX_CLASSES", "discover_architecture", "state_dict_differences"]

# Refuse to build anything bigger: a checkpoint whose classifier claims more classes is not a classifier.
MAX_CLASSES = 1_000_000
_MAX_LISTED = 5  # keys shown per kind of difference


@dataclass(frozen=True)
class Architecture:
    """What discovery found for one checkpoint: the builder and the sizes read from the weights."""

    arch: str  # the name in the bundle's file names
    builder: Builder
    num_classes: int  # output size of the final classifier, read from the checkpoint
    width: int | None  # channels of the first conv, only for a builder that takes ``width``
    classifier_key: str  # the checkpoint key the class count was read from, e.g. "fc.weight"
    n_parameters: int  # parameters of the built model (= elements of the checkpoint's parameters)

    def build(self, width: int | None = None) -> nn.Module:
        """A fresh model on the CPU (random init from torch's global RNG), at ``width`` when given."""
        try:
            return self.builder.build(self.num_classes, width if width is not None else self.width)
        except Exception as e:  # someone else's code
            raise ArchitectureError(f"{self.builder.label} from {self.builder.where} failed: "
                                    f"{type(e).__name__}: {first_line(e)}") from e



def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def state_dict_differences(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """How ``state_dict`` differs from a model's ``expected`` one: lines of missing / unexpected /
    mis-shaped keys, empty when it fits. Missing ``*.num_batches_tracked`` keys are tolerated."""
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


def _classifier_key(model: nn.Module) -> str | None:
    """State-dict key of the final classifier's weight: the last nn.Linear, else the last 2-D weight."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is not None:
        return f"{last}.weight" if last else "weight"
    two_d = [k for k, v in model.state_dict().items() if v.dim() == 2 and k.endswith("weight")]
    return two_d[-1] if two_d else None


def _first_conv_width(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Output channels of the first 4-D weight in key order (the width of our own files)."""
    return next((int(v.shape[0]) for v in state_dict.values() if v.dim() == 4), None)


def _meta_build(builder: Builder, num_classes: int, width: int | None) -> nn.Module:
    """Build without allocating (meta device); builders that cannot run on meta are built on the CPU."""
    try:
        with torch.device("meta"):
            return builder.build(num_classes, width)
    except Exception:
        return builder.build(num_classes, width)


def _match(builder: Builder, state_dict: dict[str, torch.Tensor], arch: str) -> Architecture | str:
    """The Architecture when ``builder`` builds exactly ``state_dict``'s keys and shapes, else the first
    difference as one line."""
    widths: list[int | None] = [None]
    if builder.takes_width:
        inferred = _first_conv_width(state_dict)
        widths = [inferred, None] if inferred is not None else [None]
    first_problem = None
    for width in widths:
        try:
            probe = _meta_build(builder, 10, width)
            key = _classifier_key(probe)
            if key is None:
                return "builds a model without a Linear or 2-D weight to read the class count from"
            target = state_dict.get(key)
            if target is None or target.dim() != 2:
                problem = (f"its classifier {key!r} is not in the checkpoint" if target is None else
                           f"its classifier {key!r} is {tuple(target.shape)} in the checkpoint, not 2-D")
                first_problem = first_problem or problem
                continue
            num_classes = int(target.shape[0])
            if not 1 <= num_classes <= MAX_CLASSES:
                return f"the checkpoint's {key!r} claims {num_classes} classes (at most {MAX_CLASSES} are accepted)"
            model = probe if num_classes == 10 else _meta_build(builder, num_classes, width)
        except Exception as e:  # someone else's code
            return f"calling it failed: {type(e).__name__}: {first_line(e)}"
        expected = model.state_dict()
        problems = state_dict_differences(state_dict, expected)
        if not problems:
            n_params = sum(p.numel() for p in model.parameters())
            return Architecture(arch, builder, num_classes, width, key, int(n_params))
        first_problem = first_problem or (f"(num_classes={num_classes}{'' if width is None else f', width={width}'}) "
                                          + problems[0])
    return first_problem or "no match"


def discover_architecture(arch: str, state_dict: dict[str, torch.Tensor], arch_dirs: list[Path], *,
                          what: str = "checkpoint") -> Architecture:
    """The first candidate builder (see module docstring) that builds exactly ``state_dict``.

    ``what`` names the weights in messages (usually the checkpoint's path). Raises ArchitectureError
    listing every builder tried with its first difference when none fits, or naming what was looked
    for when there was no candidate at all."""
    tried: list[str] = []
    for builder in candidate_builders(arch, arch_dirs):
        if isinstance(builder, ArchitectureError):
            tried.append(str(builder))
            continue
        found = _match(builder, state_dict, arch)
        if isinstance(found, Architecture):
            return found
        where = f" ({builder.source} {builder.file.name})" if builder.file is not None else ""
        tried.append(f"{builder.label}{where}: {found}")
    if not tried:
        dirs = ", ".join(str(d) for d in arch_dirs) or "no folders"
        raise ArchitectureError(
            f"{what}: no builder for architecture {arch!r}: no architecture file for it in {dirs} (looked for "
            f"{' or '.join(sorted({norm_name(arch) + '.py', family_name(arch) + '.py'}))} or any .py in the bundle's "
            f"models/), not one of the repository's "
            f"({', '.join(REPO_ARCHITECTURES)}) and no torchvision constructor named like it")
    shown = tried[:12] + ([f"... and {len(tried) - 12} more"] if len(tried) > 12 else [])
    raise ArchitectureError(f"{what}: no builder makes a model with exactly these weights' keys and shapes; "
                            f"tried {len(tried)}:\n  " + "\n  ".join(shown))
