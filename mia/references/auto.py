"""What a run does for a victim without reference models (``run --references auto``).

On an accelerator it trains what ``RunConfig.reference_budget`` allows: with ``RunConfig.population``
(records of the victim's distribution outside its eval and test files) first one reference distilled from
the victim's predicted labels (the strongest single model measured, and usable by every task), then
standard ones with what is left; without a population, standard ones only. On a CPU it trains nothing and
says what one would cost and the command that trains it.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from mia.bundle import Bundle, Victim
from mia.config import RunConfig
from mia.devices import resolve_device
from mia.errors import DataError, MIAError
from mia.inspection import format_duration, measure_seconds_per_image
from mia.references import budget
from mia.references.pool import population_size
from mia.references.recipe import Distill, ReferenceRecipe
from mia.references.train import train_references

__all__ = ["distilled_recipe", "train_missing_references", "trains_references"]


def trains_references(device) -> bool:
    """Whether a run trains missing reference models itself (on an accelerator; a CPU only estimates)."""
    return resolve_device(device).type == "cuda"


def distilled_recipe(n_scored: int, n_population: int, device: str = "auto") -> ReferenceRecipe:
    """One reference distilled from the victim's predicted labels, as costly as one standard reference
    (budget.distilled_epochs)."""
    epochs = budget.distilled_epochs(ReferenceRecipe.epochs, n_scored, n_population)
    return ReferenceRecipe(k=1, epochs=epochs, distill=Distill.LABELS, device=device)


def train_missing_references(victim: Victim, bundle: Bundle, config: RunConfig, model: torch.nn.Module,
                             eval_images, n_scored: int, n_views: int, seconds_per_image: float | None,
                             progress: bool, log: Callable[[str], None] | None) -> bool:
    """A victim without reference models: on CUDA, train what ``config.reference_budget`` allows (returns
    True when any model was trained); elsewhere log how to train one and, when this run measured the
    victim's forward time (``seconds_per_image``: it had something to score), what it would cost. A warm
    CPU run times no forward pass for it. ``eval_images`` (n, C, H, W) time the forward pass on CUDA;
    ``n_scored``: eval + test records."""
    say = log if log is not None else (lambda line: None)
    device = resolve_device(config.device)
    n_population = _population_size(victim, config, say)
    if not (trains_references(device) and config.reference_budget > 0):
        say(_hint(victim, config, device, n_scored, n_views, seconds_per_image, n_population))
        return False
    # timed in bf16: the references train in bf16 autocast on CUDA (mia.training), whatever the scoring precision
    seconds_per_image = measure_seconds_per_image(model, eval_images, device, "bf16")
    left, trained = config.reference_budget, False
    if n_population:
        recipe = distilled_recipe(n_scored, n_population, str(device))
        cost = budget.reference_cost(seconds_per_image, n_scored, recipe, n_views, n_population)
        if cost.seconds <= left:
            say(f"{victim.name}: training 1 reference model distilled from its predicted labels on {n_population} "
                f"population records, {recipe.epochs} epochs (about {format_duration(cost.seconds)} of the "
                f"{format_duration(left)} budget) on {device}")
            t0 = time.perf_counter()
            trained = _train(victim, bundle, config, recipe, left, progress, say)
            left -= time.perf_counter() - t0
        else:
            say(f"{victim.name}: a reference distilled from its labels would take about "
                f"{format_duration(cost.seconds)} on {device}, more than the {format_duration(left)} budget")
    recipe = ReferenceRecipe(device=str(device))
    cost = budget.reference_cost(seconds_per_image, n_scored, recipe, n_views)
    k = budget.affordable_k(left, cost)
    if k < 1:
        if not trained:
            say(f"{victim.name}: no reference models; one would take about {format_duration(cost.seconds)} on "
                f"{device}, more than --reference-budget {config.reference_budget:g} s: `python -m mia references "
                f"--k 1 --victims {victim.name}`")
        return trained
    say(f"{victim.name}: training {k} reference models (about {format_duration(k * cost.seconds)} of the "
        f"{format_duration(left)} {'left of the ' if trained else ''}budget) on {device}")
    return _train(victim, bundle, config, dataclasses.replace(recipe, k=k), left, progress, say) or trained


def _population_size(victim: Victim, config: RunConfig, say) -> int:
    """Records in ``config.population`` (0 without one, or when it cannot be read: said, and the run goes on
    as without it)."""
    if config.population is None:
        return 0
    try:
        return population_size(config.population)
    except (MIAError, DataError) as e:
        say(f"{victim.name}: the population cannot be used ({e}); no distilled reference")
        return 0


def _hint(victim: Victim, config: RunConfig, device: torch.device, n_scored: int, n_views: int,
          seconds_per_image: float | None, n_population: int) -> str:
    """What a CPU run says about a victim without reference models."""
    if n_population:
        recipe = distilled_recipe(n_scored, n_population)
        command = (f"`python -m mia references --k 1 --distill labels --population {config.population} "
                   f"--epochs {recipe.epochs} --victims {victim.name}`")
        what = "one distilled from its predicted labels (the strongest single model, for every task)"
    else:
        recipe = ReferenceRecipe()
        command = f"`python -m mia references --k 1 --victims {victim.name}`"
        what = "one"
    if seconds_per_image is None:  # nothing was scored: no forward pass timed for an estimate
        cost = f"{command} trains {what} (`mia inspect` estimates its cost)"
    else:
        seconds = budget.reference_cost(seconds_per_image, n_scored, recipe, n_views, n_population).seconds
        cost = f"{what} would take about {format_duration(seconds)} on {device}: {command}"
    line = f"{victim.name}: no reference models; {cost}, then run again (LiRA and RMIA join the candidates)."
    if not n_population:
        line += (" With records of the victim's distribution that are not its eval or test records, `--distill "
                 "labels --population DIR` instead trains one that imitates the victim, stronger for every task "
                 "(`run --population DIR` on CUDA trains it within the budget)")
    return line


def _train(victim: Victim, bundle: Bundle, config: RunConfig, recipe: ReferenceRecipe, seconds: float, progress: bool,
           say) -> bool:
    """Train ``recipe``'s models within ``seconds``; False (said) when train_references refuses."""
    try:
        train_references(bundle.root, victim, recipe, population=config.population if recipe.distilled else None,
                         progress=progress, arch_dirs=bundle.arch_dirs, trust=config.trust_checkpoints,
                         cache_dir=config.cache_dir, time_budget=seconds, log=say)
    except MIAError as e:  # e.g. a folder holding another recipe's unfinished set: the run goes on without
        say(f"{victim.name}: no reference models trained ({e}); the run goes on without them")
        return False
    return True
