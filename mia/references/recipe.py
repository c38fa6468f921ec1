"""The reference-model training recipe (a frozen dataclass: one source of defaults and validation)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from mia.errors import MIAError
from mia.training import TrainRecipe

# --------------------------------------------------------------------------------------------------
# Recipe

OPTIMIZERS = ("sgd", "adam")


class Distill(StrEnum):
    """What a reference model learns from: the records' labels, or the victim's answers on population records."""

    OFF = "off"  # the records' own labels, on random halves of eval + test (+ population): IN and OUT models
    POSTERIORS = "posteriors"  # the victim's softmax on population records only: offline posterior attacks (tasks
    #   1-2); a label-only attack may not use it (it saw the victim's posteriors)
    LABELS = "labels"  # the victim's predicted labels on population records only: what a label-only attacker
    #   can ask for, so its models serve every task

    @classmethod
    def of(cls, value: Distill | str | bool) -> Distill:
        """Distill from an enum, its value, or a bool (True: POSTERIORS, as recipes wrote it before LABELS)."""
        if isinstance(value, bool):
            return cls.POSTERIORS if value else cls.OFF
        try:
            return cls(value)
        except ValueError:
            raise MIAError(f"distill must be one of {[d.value for d in cls]}, got {value!r}") from None

    @property
    def serves_labels(self) -> bool:
        """A label-only attack may use these models: all but the posterior imitations."""
        return self is not Distill.POSTERIORS

    @property
    def suffix(self) -> str:
        """Appended to the victim's folder name: each kind of reference set has its own folder."""
        return {Distill.OFF: "", Distill.POSTERIORS: "-distilled", Distill.LABELS: "-distilled-labels"}[self]


@dataclass(frozen=True)
class ReferenceRecipe:
    """How reference models are trained. Every field but ``device`` is part of the fingerprint."""

    k: int = 8  # number of reference models: 1, or even with each record IN for exactly k/2 of them (any k
    #   when distilled)
    epochs: int = 15  # training epochs per model
    batch_size: int = 128  # minibatch size
    lr: float = 0.05  # peak learning rate; cosine decay to 0 per step over all epochs
    momentum: float = 0.9  # SGD momentum (unused by Adam)
    weight_decay: float = 5e-4  # weight decay (L2)
    augment: bool = True  # random horizontal flip + random crop of the image zero-padded by `pad`
    pad: int = 4  # padding (pixels) of the random crop; 0 = flips only
    seed: int = 0  # masks and every model's initialisation, batch order and augmentation
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"; not fingerprinted
    width: int | None = None  # model width; None: the victim's width (read from its weights)
    optimizer: str = "sgd"  # "sgd" or "adam" (match the victim's training; lr 1e-3 to 2e-3 is usual for Adam)
    distill: Distill = Distill.OFF  # POSTERIORS / LABELS: train on the population records only, towards the
    #   victim's posteriors (soft labels) or its predicted labels instead of the records' labels: every eval and
    #   test record is OUT for every model (offline attacks), and the models imitate the victim's function
    #   rather than its recipe. Needs population records. A bool is read as POSTERIORS (True) or OFF (False)

    def __post_init__(self):
        object.__setattr__(self, "distill", Distill.of(self.distill))

    @property
    def distilled(self) -> bool:
        """The models learn the victim's answers on population records (no eval or test record is IN)."""
        return self.distill is not Distill.OFF

    def validate(self) -> None:
        """Raise MIAError on a recipe that cannot be trained."""
        not_int = isinstance(self.k, bool) or not isinstance(self.k, int)
        if self.distilled and (not_int or self.k < 1):
            raise MIAError(f"k must be a positive integer, got {self.k!r}")
        if not self.distilled and (not_int or (self.k != 1 and (self.k < 2 or self.k % 2))):
            raise MIAError(f"k must be 1 or an even number >= 2 (each record is IN for exactly k/2 models), "
                           f"got {self.k!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise MIAError(f"epochs >= 1 and batch_size >= 2 are required, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise MIAError("lr > 0, weight_decay >= 0 and 0 <= momentum < 1 are required")
        if self.pad < 0:
            raise MIAError(f"pad must be >= 0, got {self.pad}")
        if self.width is not None and self.width < 1:
            raise MIAError(f"width must be positive, got {self.width}")
        if self.optimizer not in OPTIMIZERS:
            raise MIAError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def to_dict(self) -> dict:
        """The fields (the fingerprint's recipe); ``optimizer`` only when not "sgd" and ``distill`` only when
        on (POSTERIORS as ``true``, as it was written before LABELS existed), so that reference sets trained
        before these fields keep their fingerprint."""
        data = dataclasses.asdict(self)
        if data["optimizer"] == "sgd":
            del data["optimizer"]
        if self.distill is Distill.OFF:
            del data["distill"]
        else:
            data["distill"] = True if self.distill is Distill.POSTERIORS else self.distill.value
        return data

    def train_recipe(self) -> TrainRecipe:
        """The mia.training recipe of one model."""
        return TrainRecipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, augment=self.augment, pad=self.pad,
                           optimizer=self.optimizer, hard_teacher=self.distill is Distill.LABELS)

    @classmethod
    def from_dict(cls, data: dict) -> ReferenceRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
