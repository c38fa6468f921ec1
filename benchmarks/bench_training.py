"""Reference-model training throughput: images/s of mia.training.train_classifier per architecture.

The loop the demo victims and the reference models train with (SGD, batch 128, flips and crops; the
data resident on the device, channels_last and bf16 autocast on CUDA, one host synchronisation per
epoch), on random images of the demo's class count, timed over ``epochs`` epochs after a warm-up epoch.
From the rate it also gives the wall time of K reference models of the demo bundle's recipe (2,000
training images each, 25 epochs): what ``mia references --k K`` would take for one victim.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks import BenchResult, markdown_table
from mia.devices import resolve_device
from mia.models.registry import REPO_ARCHITECTURES, repo_builder
from mia.training import TrainRecipe, build_and_train

ARCHS = ("resnet34", "vgg16", "mobilenetv2")
DEMO_IMAGES, DEMO_EPOCHS = 2000, 25  # one demo reference model: half of the 4,000-record pool, 25 epochs


@dataclass
class TrainingConfig:
    """Sizes of the training benchmark."""

    archs: tuple[str, ...] = ARCHS
    sizes: tuple[int, ...] = (32, 64)  # image side S: inputs (n, 3, S, S)
    n: int | None = None  # training images; None: 512 on the CPU, 16384 on CUDA
    epochs: int = 1  # timed epochs (after one warm-up epoch)
    width: int | None = None  # every architecture's width; None: 16 (the demo's) on the CPU, the paper's on CUDA
    device: str = "auto"
    num_classes: int = 10
    k: int = 8  # references whose wall time is extrapolated


def _train(builder, num_classes: int, width: int, images: np.ndarray, labels: np.ndarray, epochs: int,
           device) -> float:
    """Wall seconds of build_and_train for ``epochs`` epochs."""
    t0 = time.perf_counter()
    build_and_train(lambda: builder.build(num_classes, width), images, labels, TrainRecipe(epochs=epochs), seed=0,
                    device=device, progress=False)
    return time.perf_counter() - t0


def run(cfg: TrainingConfig, log=print) -> BenchResult:
    dev = resolve_device(cfg.device)
    cuda = dev.type == "cuda"
    n = cfg.n or (16384 if cuda else 512)
    rng = np.random.default_rng(0)
    rows = []
    for arch in cfg.archs:
        width = cfg.width or (REPO_ARCHITECTURES[arch].default_width if cuda else 16)
        for size in cfg.sizes:
            images = rng.normal(size=(n, 3, size, size)).astype(np.float32)
            labels = rng.integers(0, cfg.num_classes, n)

            builder = repo_builder(arch)
            _train(builder, cfg.num_classes, width, images, labels, 1, dev)  # warm-up: allocations, kernels
            seconds = _train(builder, cfg.num_classes, width, images, labels, cfg.epochs, dev)
            ips = n * cfg.epochs / seconds
            k_minutes = cfg.k * DEMO_IMAGES * DEMO_EPOCHS / ips / 60
            rows.append({"arch": arch, "size": size, "width": width, "n": n, "seconds": seconds,
                         "images_per_s": ips, f"k{cfg.k}_demo_minutes": k_minutes})
            log(f"training: {arch} {size}x{size} width {width}: {ips:,.0f} images/s")
    table = markdown_table(
        ["architecture", "input", "width", "training images/s", f"K = {cfg.k} demo references, minutes"],
        [[r["arch"], f"{r['size']}x{r['size']}", str(r["width"]), f"{r['images_per_s']:,.0f}",
          f"{r[f'k{cfg.k}_demo_minutes']:.1f}"] for r in rows])
    return BenchResult("training", rows, [f"### Training throughput on {dev}\n\n" + table],
                       notes=[(f"{n} random images, {cfg.epochs} timed epoch(s) after a warm-up; K = {cfg.k} "
                               f"references extrapolated at {DEMO_IMAGES} images x {DEMO_EPOCHS} epochs each "
                               "(one model at a time)")],
                       settings={k: str(v) for k, v in asdict(cfg).items()})
