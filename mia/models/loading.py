"""Victim models: weights (mia.io.checkpoints) + builder discovery (mia.models.registry) -> a loaded model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mia.io.checkpoints import load_state_dict
from mia.errors import CheckpointError
from mia.models.discovery import Architecture, discover_architecture

__all__ = ["VictimModelInfo", "builder_key", "load_into", "load_victim_model"]


@dataclass(frozen=True)
class VictimModelInfo:
    """What was loaded for one victim model."""

    arch: str  # the architecture name in the bundle's file names
    num_classes: int  # output size of the final classifier, from the weights
    width: int | None  # channels of the first conv, for a builder that takes ``width``; else None
    architecture_file: Path | None  # the .py the builder came from (None: torchvision)
    checkpoint_acc: float | None  # 'acc' stored in the checkpoint, if any
    epoch: int | None  # 'epoch' stored in the checkpoint, if any
    builder: str = ""  # e.g. "ResNet34", "resnet_34", "torchvision.models.mobilenet_v2"
    builder_source: str = ""  # "bundle", "repository" or "torchvision"
    n_parameters: int = 0
    architecture: Architecture | None = None  # how to build a fresh model of the same architecture


def load_into(architecture: Architecture, state_dict: dict[str, torch.Tensor], what: str | Path) -> nn.Module:
    """Build ``architecture`` on the CPU and load ``state_dict`` strictly; float32, eval mode.

    The model is built on the meta device and given empty CPU storage (no random init: the weights
    overwrite it), unless it has buffers the state_dict does not hold: then it is built on the CPU."""
    try:
        with torch.device("meta"):
            model = architecture.build()
        if {k for k, _ in model.named_buffers()} - set(model.state_dict()):
            raise RuntimeError("non-persistent buffers")  # their values come from the constructor
        model = model.to_empty(device="cpu")
    except Exception:  # builders that cannot run on meta
        model = architecture.build()
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)  # checkpoints older than PyTorch 0.4.1
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: loading into {architecture.builder.label} failed: {e}") from e
    return model.float().eval()


def load_victim_model(arch: str, checkpoint: str | Path, arch_dirs: list[Path], *,
                      trust: bool = False) -> tuple[nn.Module, VictimModelInfo]:
    """Load a victim: weights -> the builder that makes exactly these keys and shapes -> strict load.

    Returns the model (CPU, float32, eval mode) and a VictimModelInfo. Raises CheckpointError for
    unreadable weights and ArchitectureError (listing every builder tried) when nothing builds them."""
    checkpoint = Path(checkpoint)
    state_dict, meta = load_state_dict(checkpoint, trust=trust)
    found = discover_architecture(arch, state_dict, arch_dirs, what=str(checkpoint))
    model = load_into(found, state_dict, checkpoint)
    b = found.builder
    info = VictimModelInfo(arch=arch, num_classes=found.num_classes, width=found.width, architecture_file=b.file,
                           checkpoint_acc=meta.get("acc"), epoch=meta.get("epoch"), builder=b.label,
                           builder_source=b.source, n_parameters=found.n_parameters, architecture=found)
    return model, info


def builder_key(info: VictimModelInfo) -> str:
    """What a logits cache key must add for code that is not an architecture file: the torchvision
    constructor and torchvision's version ("" when the code is a file, whose content is hashed)."""
    if info.architecture_file is not None:
        return ""
    import torchvision

    return f"{info.builder};torchvision={torchvision.__version__}"
