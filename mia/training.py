"""Training a classifier the way challenge victims are trained: SGD with momentum, cosine schedule,
random flips and padded random crops. Used by the demo bundle's victims.

Deterministic for a seed on a given device and thread count: every random number comes from one
CPU generator.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random horizontal flip (probability 1/2), then a random HxW crop of the image zero-padded by ``pad``.

    x: (B, C, H, W) on any device; random numbers from ``generator`` (CPU). Returns a new tensor.
    """
    flip, shifts = draw_augmentation(x.shape[0], generator, pad)
    return apply_augmentation(x, flip.to(x.device), shifts.to(x.device), pad)


def draw_augmentation(b: int, generator: torch.Generator, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """augment_batch's random numbers for a batch of ``b``, on the CPU: (flip (b,) bool, shifts (2, b))."""
    flip = torch.rand(b, generator=generator) < 0.5
    shifts = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    return flip, shifts


def apply_augmentation(x: torch.Tensor, flip: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """augment_batch with its random numbers given (on x's device): flip (B,) bool, shifts (2, B)."""
    b, c, h, w = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = shifts[0][:, None] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = shifts[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches; a trailing batch of one joins the one before (BatchNorm in
    train mode cannot normalize a single record after the last pooling)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def epoch_plan(n: int, batch_size: int, generator: torch.Generator, augment: bool, pad: int,
               device: torch.device) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """An epoch's batches and their augmentation draws, on ``device``: [(indices, (flip, shifts) or None)].

    The random numbers are drawn on the CPU in the order the batch-by-batch loop would draw them (the
    permutation, then each batch's flips and shifts), so results do not depend on the device; they go to
    the device in one pinned, non-blocking copy per epoch. Copied batch by batch from ordinary host memory,
    each copy would wait for the device's queue to drain (three waits per training step)."""
    batches = epoch_batches(n, batch_size, generator)
    draws = [draw_augmentation(len(b), generator, pad) for b in batches] if augment else None
    sizes = [len(b) for b in batches]
    parts = [torch.cat(batches)]
    if draws is not None:
        parts += [torch.cat([f for f, _ in draws]).long(), torch.cat([s for _, s in draws], dim=1).reshape(-1)]
    flat = torch.cat(parts)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    m = sum(sizes)
    index_parts = flat[:m].split(sizes)
    if draws is None:
        return [(idx, None) for idx in index_parts]
    flips = (flat[m:2 * m] != 0).split(sizes)
    shifts = flat[2 * m:].reshape(2, m).split(sizes, dim=1)
    return [(idx, (f, sh)) for idx, f, sh in zip(index_parts, flips, shifts)]


def n_batches(n: int, batch_size: int) -> int:
    """len(epoch_batches(n, batch_size, ...)) without drawing a permutation."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


@dataclass(frozen=True)
class TrainRecipe:
    """How a classifier is trained."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate; cosine decay to 0 per step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # random flip + random crop of the image padded by ``pad``
    pad: int = 2
    optimizer: str = "sgd"  # "sgd" (momentum, weight decay) or "adam" (weight decay as an L2 term); both with
    #   the cosine schedule
    hard_teacher: bool = False  # with a teacher: learn its predicted labels (argmax) instead of its softmax


def train_classifier(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, recipe: TrainRecipe, *,
                     seed: int, device: torch.device, desc: str = "training", progress: bool = True,
                     teacher: torch.nn.Module | None = None) -> dict:
    """Train ``model`` in place on images (n, C, H, W) float32 and labels (n,) int.

    ``teacher``: distillation. The loss is the cross-entropy to the teacher's softmax on the same augmented
    batch (its KL divergence up to a constant), or with ``recipe.hard_teacher`` to its predicted labels,
    instead of to the labels, which then only count the reported accuracy; the teacher runs in eval mode
    without gradients and is left on ``device``.

    channels_last and bf16 autocast on CUDA. On the CPU the default (NCHW) layout: with torch 2.14 the
    multi-threaded CPU backward pass of ResNet34 in channels_last corrupts memory (segfault or "double
    free") on batches of odd size, which the last batch of an epoch often is (see
    tests/test_training.py). Returns {'seconds', 'final_loss', 'final_train_acc'} (the last epoch's
    running figures, on augmented batches). The model ends in eval mode on the CPU, float32.
    """
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device).to(memory_format=memory_format).eval()
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    n = len(y_all)
    if recipe.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {recipe.optimizer!r}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * n_batches(n, recipe.batch_size))
    start = time.perf_counter()
    loss_avg = acc = float("nan")
    bar = tqdm(range(recipe.epochs), desc=desc, unit="epoch", disable=not progress, leave=True)
    for _ in bar:
        model.train()
        # running figures stay on the device: one host synchronisation per epoch, not per batch
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        total_correct = torch.zeros((), dtype=torch.int64, device=device)
        for batch, draw in epoch_plan(n, recipe.batch_size, generator, recipe.augment, recipe.pad, device):
            x, y = x_all[batch], y_all[batch]
            if draw is not None:
                x = apply_augmentation(x, *draw, recipe.pad)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        answer = teacher(x).float()
                        target = answer.argmax(dim=1) if recipe.hard_teacher else answer.softmax(dim=1)
            loss = F.cross_entropy(logits.float(), y if teacher is None else target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach().double() * len(batch)
            total_correct += (logits.detach().argmax(1) == y).sum()
        loss_avg, acc = float(total_loss) / n, int(total_correct) / n
        bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}")
    model.cpu().float().eval()
    return {"seconds": time.perf_counter() - start, "final_loss": loss_avg, "final_train_acc": acc}


def build_and_train(build: Callable[[], torch.nn.Module], images: np.ndarray, labels: np.ndarray,
                    recipe: TrainRecipe, *, seed: int, device: torch.device, desc: str = "training",
                    progress: bool = True, teacher: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """The one seeded build-and-train of the demo victims and the reference models.

    ``build()`` runs with torch's global RNG seeded by ``seed`` (forked: the caller's RNG is left as it
    was), so the initial weights depend on ``seed`` alone; train_classifier is seeded by the same
    ``seed``; ``teacher`` is train_classifier's. Returns (model, train_classifier's figures); the model
    ends on the CPU in eval mode."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        model = build()
    stats = train_classifier(model, images, labels, recipe, seed=seed, device=device, desc=desc, progress=progress,
                             teacher=teacher)
    return model, stats
