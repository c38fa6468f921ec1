"""Training a victim's reference models: resumable, sharded, each model written atomically."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from mia.bundle import Victim
from mia.devices import resolve_device
from mia.errors import MIAError
from mia.io.atomic import atomic_save_npy
from mia.io.cache import cache_root
from mia.io.checkpoints import load_state_dict, save_checkpoint
from mia.models.discovery import Architecture, discover_architecture
from mia.models.loading import load_into
from mia.references.pool import distill_masks, load_pool, make_masks, model_seed
from mia.references.recipe import ReferenceRecipe
from mia.references.store import (
    REFERENCES_FORMAT,
    ReferenceSet,
    adopt_earlier_distilled,
    check_compatible,
    default_arch_dirs,
    grown_size,
    load_reference_set,
    make_header,
    model_files,
    references_folder,
    scan_models,
    write_json,
    write_manifest,
)
from mia.scoring import IDENTITY, compute_logits
from mia.training import build_and_train

# --------------------------------------------------------------------------------------------------
# Training


def _fit_model(architecture: Architecture, width: int | None, images: np.ndarray,
               labels: np.ndarray, recipe: ReferenceRecipe, seed: int, device: torch.device,
               desc: str, progress: bool, teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """A model initialised from ``seed`` and trained on images (n, C, H, W) / labels (n,) with
    mia.training.train_classifier (the demo victims' loop; distilled from ``teacher`` when given); returned on
    the CPU in eval mode."""
    model, _ = build_and_train(lambda: architecture.build(width), images, labels, recipe.train_recipe(), seed=seed,
                               device=device, desc=desc, progress=progress, teacher=teacher)
    return model.cpu().float().eval()


def _accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float | None:
    if len(labels) == 0:
        return None
    logits = compute_logits(model, images, (IDENTITY,), device=device, batch_size=512)[0]
    return float((logits.argmax(-1) == labels).mean())


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4); MIAError unless 0 <= i < n."""
    i, sep, n = str(text).partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise MIAError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(i), int(n)


def train_references(
    bundle_root: str | Path,
    victim: Victim,
    recipe: ReferenceRecipe | None = None,
    *,
    population: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    only: Iterable[int] | None = None,
    progress: bool = True,
    references_root: str | Path | None = None,
    arch_dirs: list[Path] | None = None,
    trust: bool = False,
    log: Callable[[str], None] | None = None,
    cache_dir: str | Path | None = None,
    time_budget: float | None = None,
) -> ReferenceSet:
    """Train the victim's missing reference models of this shard; return the set found on disk.

    Models j with ``j % n == i`` for ``shard=(i, n)`` that are not complete yet are trained, each on
    the pool records its mask marks IN, and written atomically (``.pth`` then ``.json``); the
    manifest is rebuilt after each one. ``only``: train no models but these (``()`` trains none: it
    checks the folder against the recipe, writes the masks and rebuilds the manifest, as a merge). Architecture, class count and width (unless
    ``recipe.width``) come from the victim's weights; ``trust`` is passed to load_state_dict.
    ``log`` receives one line per trained model. The victim's records are read through the cache under
    ``cache_root(cache_dir)`` (mia.io.cache). ``time_budget``: wall seconds this call may spend training;
    after each model, the next is started only if the mean time per model so far says it will end within
    the budget (an estimate made before training can be off on a new device; the models already written
    stay, and a later call resumes). ``recipe.distill`` (POSTERIORS or LABELS): every model trains on all
    the population records (none of eval or test) towards the victim's posteriors or predicted labels
    (mia.training.train_classifier's teacher), in the victim's folder + Distill.suffix (beside the other
    reference models; a run uses every set). A distilled set grows: ``k`` beyond the models on disk trains
    the missing ones (model j is the same whatever k), a smaller ``k`` keeps all that are there.
    Raises MIAError when the folder holds models of another recipe or pool, or a distilled recipe has no
    population records.
    """
    recipe = recipe or ReferenceRecipe()
    recipe.validate()
    i_shard, n_shard = shard
    if not 0 <= i_shard < n_shard:
        raise MIAError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    bundle_root = Path(bundle_root).resolve()
    arch_dirs = list(arch_dirs or default_arch_dirs(bundle_root))
    state_dict, _ = load_state_dict(victim.checkpoint, trust=trust)
    architecture = discover_architecture(victim.arch, state_dict, arch_dirs, what=str(victim.checkpoint))
    num_classes = architecture.num_classes
    if recipe.width and not architecture.builder.takes_width:
        raise MIAError(f"{victim.name}: a reference width was asked for, but {architecture.builder.label} "
                       f"(from {architecture.builder.where}) takes no width argument")
    width = recipe.width or architecture.width
    pool = load_pool(victim, population, num_classes=num_classes, bundle_root=bundle_root,
                     cache_dir=cache_root(cache_dir))
    folder = references_folder(bundle_root, victim, references_root, distill=recipe.distill)
    folder.mkdir(parents=True, exist_ok=True)
    asked = recipe.k
    header = make_header(victim, recipe, pool, num_classes, width, architecture, bundle_root)
    if recipe.distilled:  # a distilled set grows (and a smaller k keeps the models it has); k is not fingerprinted
        adopt_earlier_distilled(folder, header)
        recipe = dataclasses.replace(recipe, k=grown_size(folder, recipe.k, header["fingerprint"]))
        header = {**header, "k": recipe.k, "recipe": {**header["recipe"], "k": recipe.k}}
        masks = distill_masks(recipe.k, pool)
    else:
        masks = make_masks(recipe.k, pool.n, recipe.seed)
    if check_compatible(folder, header, masks):
        atomic_save_npy(folder / "masks.npy", masks)
    complete, _ = scan_models(folder, recipe.k, header["fingerprint"])
    write_manifest(folder, header, complete)

    device = resolve_device(recipe.device)
    wanted = set(range(asked)) if only is None else set(only)
    todo = [j for j in range(recipe.k) if j % n_shard == i_shard and j not in complete and j in wanted]
    # the victim itself only where a distilled model is trained (a merge, only=(), builds nothing)
    teacher = load_into(architecture, state_dict, victim.checkpoint) if recipe.distilled and todo else None
    del state_dict
    trained = []
    started = time.perf_counter()
    for j in tqdm(todo, desc=f"{victim.name} references", unit="model", disable=not progress or not todo):
        if trained and time_budget is not None:
            spent = time.perf_counter() - started
            if spent + spent / len(trained) > time_budget:
                if log is not None:
                    log(f"{victim.name}: stopped after {len(trained)} reference model(s) in {spent:.0f} s: another "
                        f"would pass the {time_budget:g} s budget")
                break
        seed = model_seed(recipe.seed, j)
        inside = masks[j]
        t0 = time.perf_counter()
        model = _fit_model(architecture, width, pool.images[inside], pool.labels[inside],
                           recipe, seed, device, f"model {j:03d}", progress, teacher)
        seconds = time.perf_counter() - t0
        in_acc = _accuracy(model, pool.images[inside], pool.labels[inside], device)
        out_acc = _accuracy(model, pool.images[~inside], pool.labels[~inside], device)
        pth, meta_path = model_files(folder, j)
        save_checkpoint(pth, model, None if out_acc is None else 100.0 * out_acc, recipe.epochs - 1)
        meta = {
            "format": REFERENCES_FORMAT,
            "index": j,
            "fingerprint": header["fingerprint"],
            "seed": seed,
            "n_in": int(inside.sum()),
            "n_out": int((~inside).sum()),
            "in_accuracy": in_acc,
            "out_accuracy": out_acc,
            "seconds": seconds,
            "device": str(device),
            "torch_version": torch.__version__,
        }
        write_json(meta_path, meta)
        trained.append(j)
        complete, _ = scan_models(folder, recipe.k, header["fingerprint"])
        write_manifest(folder, header, complete)
        if log is not None:
            log(f"{victim.name} model {j:03d}: OUT accuracy {pct(out_acc)}, IN accuracy {pct(in_acc)}, "
                f"{seconds:.1f}s on {device}")
    ref_set = load_reference_set(bundle_root, victim, references_root=references_root, arch_dirs=arch_dirs,
                                 distill=recipe.distill)
    assert ref_set is not None
    ref_set.trained = tuple(trained)
    return ref_set


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
