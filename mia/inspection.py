"""What was understood of a bundle, before any scoring: ``python -m mia inspect`` (and the start of ``run``).

Per victim: the architecture file and builder found, class count, parameters, FLOPs per image
(``torch.utils.flop_counter``), records, image shape and value range, label range, and the planned work
(forward passes for the query views and noisy queries) with a scoring-time estimate measured on the
chosen device. A victim that cannot be loaded is a problem line, not a traceback.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mia.bundle import Bundle, Victim, discover
from mia.config import RunConfig
from mia.io.cache import cache_root
from mia.io.records import Records, load_records
from mia.errors import DataError, MIAError
from mia.models.loading import VictimModelInfo, load_victim_model
from mia.devices import ieee_fp32, resolve_device
from mia.scoring import CPU_FORWARD_IMAGES, VIEW_SETS, resolve_precision

__all__ = ["BundleSummary", "VictimSummary", "flops_per_image", "inspect_bundle", "load_victim",
           "format_duration", "measure_seconds_per_image", "summarize_victim", "total_line"]


@dataclass
class VictimSummary:
    """One victim as the toolkit understood it, and what scoring it will cost."""

    name: str
    builder: str  # e.g. "resnet_34 (bundle models/resnet34.py)"
    num_classes: int
    n_parameters: int
    flops_per_image: int | None  # forward FLOPs of one image (a multiply-add counts 2); None: not measured
    n_eval: int
    n_eval_members: int
    n_test: int
    image_shape: tuple[int, ...]  # (C, H, W)
    image_dtype: str  # as held after loading (float32)
    value_range: tuple[float, float]  # min and max pixel over eval and test
    label_range: tuple[int, int]  # min and max label over eval and test
    forward_passes: int  # images through the model: records x (views + noisy queries)
    queries_per_record: tuple[int, int]  # (views, noisy label-only queries)
    seconds_per_image: float | None  # measured on ``device`` with a batch of real records; None: not measured
    device: str

    @property
    def estimated_seconds(self) -> float:
        return self.forward_passes * (self.seconds_per_image or 0.0)

    def lines(self) -> list[str]:
        c, h, w = self.image_shape
        views, noisy = self.queries_per_record
        flops = "" if self.flops_per_image is None else f", {self.flops_per_image / 1e6:,.1f} MFLOPs per {h}x{w} image"
        cost = ("logits cached: nothing to score" if self.seconds_per_image is None else
                f"about {format_duration(self.estimated_seconds)} on {self.device} "
                f"({1 / self.seconds_per_image:,.0f} images/s measured)")
        return [
            f"{self.name}: {self.builder}",
            f"  {self.num_classes} classes, {self.n_parameters:,} parameters{flops}",
            f"  eval {self.n_eval} records ({self.n_eval_members} members), test {self.n_test}; images {c}x{h}x{w} "
            f"{self.image_dtype} in [{self.value_range[0]:.3g}, {self.value_range[1]:.3g}]; labels "
            f"{self.label_range[0]}..{self.label_range[1]} of {self.num_classes} classes",
            f"  planned: {self.forward_passes:,} forward passes ({views} views + {noisy} noisy queries per record), "
            + cost,
        ]


@dataclass
class BundleSummary:
    """Every victim's summary and every problem found (a victim that cannot be scored is one)."""

    root: Path
    victims: list[VictimSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def estimated_seconds(self) -> float:
        return sum(v.estimated_seconds for v in self.victims)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min' or '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def flops_per_image(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one image of ``shape`` (C, H, W) through ``model`` (a multiply-add counts 2),
    counted by ``torch.utils.flop_counter`` on a zero image on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode  # here: its first use costs about a second

    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *shape, device=device))
    return int(counter.get_total_flops())


def measure_seconds_per_image(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                              precision: str = "auto") -> float:
    """Forward time per image on ``device`` in ``precision`` (mia.scoring.resolve_precision: fp32, or bf16
    autocast), from one timed batch of real records after a warm-up."""
    n = min(len(images), CPU_FORWARD_IMAGES if device.type == "cpu" else 256)
    x = torch.from_numpy(images[:n]).to(device)
    model = model.to(device)
    bf16 = resolve_precision(device, precision) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast, ieee_fp32(device, enabled=not bf16):
        model(x)  # warm-up at the timed size (allocations, kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model.cpu()
    return max(time.perf_counter() - t0, 1e-9) / n


def summarize_victim(victim: Victim, model: torch.nn.Module, info: VictimModelInfo, eval_recs: Records,
                     test_recs: Records, config: RunConfig, root: Path, *, measure: bool = True) -> VictimSummary:
    """The summary of a loaded victim (``model`` on the CPU, eval mode). With ``measure`` (the default;
    ``run`` passes False when every logit is cached) FLOPs and forward time are measured."""
    views = len(VIEW_SETS[config.views])
    noisy = 2 * config.label_noise_draws * len(config.label_noise) if any(
        t.access == "label" for t in config.tasks) else 0
    if info.architecture_file is None:
        where = "torchvision"
    else:
        try:
            where = f"bundle {Path(info.architecture_file).relative_to(root)}"
        except ValueError:
            where = f"repository {Path(info.architecture_file).name}"
    device = resolve_device(config.device)
    flops, seconds_per_image = None, None
    try:
        if measure:
            flops = flops_per_image(model, eval_recs.images.shape[1:])
            seconds_per_image = measure_seconds_per_image(model, eval_recs.images, device, config.precision)
    except RuntimeError as e:  # shape errors from the model itself
        raise MIAError(f"{victim.name}: the model failed on images of shape {eval_recs.images.shape[1:]}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    images = (eval_recs.images, test_recs.images)
    labels = np.concatenate([eval_recs.labels, test_recs.labels])
    return VictimSummary(
        name=victim.name,
        builder=f"{info.builder} ({where})",
        num_classes=info.num_classes,
        n_parameters=info.n_parameters,
        flops_per_image=flops,
        n_eval=len(eval_recs),
        n_eval_members=int(eval_recs.membership.sum()),
        n_test=len(test_recs),
        image_shape=tuple(int(d) for d in eval_recs.images.shape[1:]),
        image_dtype=str(eval_recs.images.dtype),
        value_range=(float(min(a.min() for a in images)), float(max(a.max() for a in images))),
        label_range=(int(labels.min()), int(labels.max())),
        forward_passes=(len(eval_recs) + len(test_recs)) * (views + noisy),
        queries_per_record=(views, noisy),
        seconds_per_image=seconds_per_image,
        device=str(device),
    )


def load_victim(victim: Victim, bundle: Bundle, config: RunConfig
                ) -> tuple[torch.nn.Module, VictimModelInfo, Records, Records]:
    """The victim's model and its eval and test records, validated (records cached when config.cache)."""
    model, info = load_victim_model(victim.arch, victim.checkpoint, bundle.arch_dirs, trust=config.trust_checkpoints)
    cache = cache_root(config.cache_dir) if config.cache else None
    eval_recs = load_records(victim.eval_path, with_membership=True, num_classes=info.num_classes, cache_dir=cache)
    test_recs = load_records(victim.test_path, with_membership=False, num_classes=info.num_classes, cache_dir=cache)
    if eval_recs.images.shape[1:] != test_recs.images.shape[1:]:
        raise DataError(f"test images are {test_recs.images.shape[1:]} but eval images are "
                        f"{eval_recs.images.shape[1:]}", victim.test_path)
    return model, info, eval_recs, test_recs


def inspect_bundle(bundle: Bundle | str | Path, config: RunConfig | None = None,
                   log: Callable[[str], None] | None = None) -> BundleSummary:
    """Load every victim of ``bundle`` (nothing is scored or written but the records cache) and summarize
    it; ``log`` receives each victim's lines as soon as they are known."""
    config = config or RunConfig()
    if not isinstance(bundle, Bundle):
        bundle = discover(bundle, strict=False, victims=list(config.victims) if config.victims else None)
    out = BundleSummary(bundle.root, problems=list(bundle.problems))
    for victim in bundle.victims:
        try:
            summary = summarize_victim(victim, *load_victim(victim, bundle, config), config, bundle.root)
        except MIAError as e:
            out.problems.append(f"{victim.name}: {e}")
            if log is not None:
                log(f"{victim.name}: cannot be scored: {e}")
            continue
        out.victims.append(summary)
        if log is not None:
            log("\n".join(summary.lines()))
    return out


def total_line(summary: BundleSummary) -> str:
    """One line: the planned scoring time of every victim together."""
    return (f"total: about {format_duration(summary.estimated_seconds)} of scoring for {len(summary.victims)} victim(s) on "
            f"{summary.victims[0].device if summary.victims else '-'} (reference models, if any, come on top)")
