"""What reference models would cost for a victim, and how many a time budget allows.

``run`` uses this when a victim has no reference models: on an accelerator it trains as many as
``RunConfig.reference_budget`` allows (at least two: each record must have an IN and an OUT model);
elsewhere it says how long two would take and the command that trains them.

The estimate comes from the victim's own measured forward time per image (mia.inspection): a reference
model trains ``epochs`` times on half the pool (eval + test records), and one training image costs
``TRAIN_FORWARD_RATIO`` forward passes (forward, backward and the update); then the model answers every pool record under the reference views.
"""
from __future__ import annotations

from dataclasses import dataclass

from mia.references.recipe import ReferenceRecipe

__all__ = ["TRAIN_FORWARD_RATIO", "ReferenceCost", "affordable_k", "reference_cost"]

#: Seconds of training per image / seconds of inference per image (batch 128 with SGD against the forward
#: timing of mia.inspection), measured on the demo victims on the 2-core CPU, 2026-12-03: MobileNetV2 4.3,
#: ResNet34 3.0, VGG16 3.7 (docs/performance.md). An estimate, good to a few tens of percent.
TRAIN_FORWARD_RATIO = 4.0


@dataclass(frozen=True)
class ReferenceCost:
    """Estimated wall time of one reference model of a victim."""

    train_seconds: float  # training on half the pool for recipe.epochs epochs
    query_seconds: float  # its logits on every pool record under the reference views

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.query_seconds


def reference_cost(seconds_per_image: float, n_pool: int, recipe: ReferenceRecipe, n_views: int) -> ReferenceCost:
    """The cost of one reference model from the victim's forward time per image (seconds_per_image),
    the pool size (eval + test records) and the number of reference views."""
    train = recipe.epochs * (n_pool / 2) * TRAIN_FORWARD_RATIO * seconds_per_image
    return ReferenceCost(train_seconds=train, query_seconds=n_pool * n_views * seconds_per_image)


def affordable_k(budget_seconds: float, cost: ReferenceCost, k_max: int = 16) -> int:
    """The most models (1, or an even number at most ``k_max``) whose estimated time fits in the budget;
    0 when not even one fits."""
    if cost.seconds <= 0:
        return k_max - k_max % 2
    k = int(budget_seconds // cost.seconds)
    k = min(k, k_max)
    return k - k % 2 if k >= 2 else max(k, 0)
