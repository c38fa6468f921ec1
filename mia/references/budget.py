"""What reference models would cost for a victim, and how many a time budget allows.

``run`` uses this when a victim has no reference models (mia.references.auto): on an accelerator it
trains as many as ``RunConfig.reference_budget`` allows; elsewhere it says how long one would take and the
command that trains it.

The estimate comes from the victim's own measured forward time per image (mia.inspection): a reference
model trains ``epochs`` times on half the pool (eval + test records), a distilled one on every population
record, and one training image costs ``TRAIN_FORWARD_RATIO`` forward passes (forward, backward and the
update); then the model answers every eval and test record under the reference views.
"""
from __future__ import annotations

from dataclasses import dataclass

from mia.references.recipe import ReferenceRecipe

__all__ = ["DISTILLED_TRAIN_FACTOR", "MIN_DISTILLED_EPOCHS", "TRAIN_FORWARD_RATIO", "ReferenceCost", "affordable_k", "distilled_epochs",
           "reference_cost"]

#: Seconds of training per image / seconds of inference per image (batch 128 with SGD against the forward
#: timing of mia.inspection), measured on the demo victims on the 2-core CPU, 2026-12-03: MobileNetV2 4.3,
#: ResNet34 3.0, VGG16 3.7 (docs/performance.md). An estimate, good to a few tens of percent.
TRAIN_FORWARD_RATIO = 4.0

#: A distilled model's training step also runs the victim forward on the batch: its time per training image
#: against a standard model's, measured on the demo's three victims on the 2-core CPU (753 s against 532 s,
#: 2026-12-04, docs/performance.md).
DISTILLED_TRAIN_FACTOR = 1.42

#: The fewest epochs ``distilled_epochs`` gives: the fewest measured (48,000 population records x 2 epochs
#: on the demo victims, docs/results.md, 2026-12-05).
MIN_DISTILLED_EPOCHS = 2


@dataclass(frozen=True)
class ReferenceCost:
    """Estimated wall time of one reference model of a victim."""

    train_seconds: float  # training on half the pool for recipe.epochs epochs
    query_seconds: float  # its logits on every pool record under the reference views

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.query_seconds


def reference_cost(seconds_per_image: float, n_pool: int, recipe: ReferenceRecipe, n_views: int,
                   n_population: int = 0) -> ReferenceCost:
    """The cost of one reference model from the victim's forward time per image (seconds_per_image),
    the number of scored records (eval + test: n_pool), the number of reference views and, for a distilled
    recipe, the number of population records it trains on (a standard one trains on half the pool), each
    DISTILLED_TRAIN_FACTOR times as costly."""
    per_epoch = n_population * DISTILLED_TRAIN_FACTOR if recipe.distilled else n_pool / 2
    train = recipe.epochs * per_epoch * TRAIN_FORWARD_RATIO * seconds_per_image
    return ReferenceCost(train_seconds=train, query_seconds=n_pool * n_views * seconds_per_image)


def distilled_epochs(epochs: int, n_pool: int, n_population: int) -> int:
    """Epochs of a distilled reference on ``n_population`` records that see as many training images as a
    standard one of ``epochs`` epochs on half the ``n_pool`` eval + test records, and at least
    MIN_DISTILLED_EPOCHS. On the demo victims the population's size mattered more than the epochs at equal
    cost (2,000 x 25, 8,000 x 8, 24,000 x 3: TPR@1% 5.4, 8.4, 9.7 %)."""
    if n_population < 1:
        raise ValueError(f"a distilled reference needs population records, got {n_population}")
    return max(MIN_DISTILLED_EPOCHS, round(epochs * (n_pool / 2) / n_population))


def affordable_k(budget_seconds: float, cost: ReferenceCost, k_max: int = 16) -> int:
    """The most models (1, or an even number at most ``k_max``) whose estimated time fits in the budget;
    0 when not even one fits."""
    if cost.seconds <= 0:
        return k_max - k_max % 2
    k = int(budget_seconds // cost.seconds)
    k = min(k, k_max)
    return k - k % 2 if k >= 2 else max(k, 0)
