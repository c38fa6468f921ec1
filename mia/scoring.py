"""Batched inference: the logits of every record under a few deterministic views, cached on disk.

Views are the image itself, its horizontal flip and small translations (zero padded, not wrapped),
optionally plus Gaussian noise (the label-only attack's noisy queries). All views of a batch are
generated on the device and go through the model together. Logits (or, for the many noisy queries,
just the predicted labels) are the only thing computed with the model; every signal is derived from
them in float64 (mia.core.signals).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mia.devices import ieee_fp32, resolve_device
from mia.io.cache import cached_array, file_digest

CACHE_FORMAT = 2  # bump when the logits a cache file holds would change
#: On the CPU a forward pass takes at most this many images: larger batches fall out of the CPU caches
#: (measured with 2 threads, channels_last: ResNet34 at 64x64 scores 262 images/s in batches of 64 and
#: 143 in batches of 256; MobileNetV2 at 32x32 578 against 290).
CPU_FORWARD_IMAGES = 64
#: Images per forward pass on CUDA: all views of a batch (32 noisy queries x 256 records = 8,192 images)
#: in one pass would hold activations of 8-18 GiB at 64x64; 2,048 keep a pass large enough to fill the
#: device while fitting far smaller GPUs than an H200 (splitting a batch adds no host synchronisation).
CUDA_FORWARD_IMAGES = 2048


#: Seed of the noise patterns: draw d is the same standard normal image on every device and run.
NOISE_SEED = 20221


@dataclass(frozen=True)
class View:
    """A deterministic query view: optional horizontal flip, then a shift by (dx, dy) pixels, then
    ``noise`` times noise pattern number ``draw`` (a fixed standard normal image, see noise_pattern)."""

    flip: bool = False
    dx: int = 0  # positive moves the content right
    dy: int = 0  # positive moves the content down
    noise: float = 0.0  # standard deviation of the added Gaussian noise, in pixel units of the images
    draw: int = 0  # which noise pattern (only with noise > 0)

    def __post_init__(self):
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.draw < 0:
            raise ValueError(f"draw must be >= 0, got {self.draw}")

    @property
    def name(self) -> str:
        parts = ["flip" if self.flip else "id"]
        if self.dx or self.dy:
            parts.append(f"dx{self.dx:+d}dy{self.dy:+d}")
        if self.noise:
            parts.append(f"noise{self.noise:.6g}#{self.draw}")
        return ":".join(parts)


IDENTITY = View()
FLIP = View(flip=True)
#: The views every record is scored under: identity, flip, and shifts of 1 and 2 pixels in the four
#: directions. Posterior attacks average over them; the label-only attack counts how many stay correct.
STANDARD_VIEWS: tuple[View, ...] = (IDENTITY, FLIP) + tuple(
    View(dx=dx, dy=dy) for r in (1, 2) for dx, dy in ((r, 0), (-r, 0), (0, r), (0, -r))
)
VIEW_SETS = {"identity": (IDENTITY,), "flip": (IDENTITY, FLIP), "standard": STANDARD_VIEWS}


def noise_views(sigmas: tuple[float, ...], draws: int) -> tuple[View, ...]:
    """The noisy queries of the label-only attack: for each noise level sigma (pixel units), ``draws``
    noisy copies of the image and ``draws`` of its flip, every one with its own noise pattern."""
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    out, d = [], 0
    for sigma in sigmas:
        if not sigma > 0:
            raise ValueError(f"noise levels must be positive, got {sigma}")
        for flip in (False, True):
            for _ in range(draws):
                out.append(View(flip=flip, noise=float(sigma), draw=d))
                d += 1
    return tuple(out)


@lru_cache(maxsize=512)
def noise_pattern(shape: tuple[int, ...], draw: int) -> torch.Tensor:
    """Noise pattern ``draw``: a standard normal float32 image of ``shape`` (C, H, W), made on the CPU
    from its own seeded generator, so it does not depend on the batch, the device or other views."""
    gen = torch.Generator().manual_seed(NOISE_SEED * 1_000_003 + draw)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def apply_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """images (B, C, H, W) -> the same batch under ``view`` (zero fill where content moved out)."""
    out = images.flip(-1) if view.flip else images
    if view.dx or view.dy:
        h, w = out.shape[-2:]
        p = max(abs(view.dx), abs(view.dy))
        padded = F.pad(out, (p, p, p, p))
        top, left = p - view.dy, p - view.dx
        out = padded[..., top : top + h, left : left + w]
    if view.noise:
        out = out + view.noise * _pattern_on(tuple(out.shape[1:]), view.draw, str(out.device), out.dtype)
    return out


@lru_cache(maxsize=512)
def _pattern_on(shape: tuple[int, ...], draw: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """noise_pattern on ``device``: copied there once, not once per batch (a copy from host memory
    would wait for the device's queue each time)."""
    return noise_pattern(shape, draw).to(device, dtype)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(device: str | torch.device | None, precision: str = "auto") -> str:
    """"fp32" or "bf16": how compute_logits runs. "auto" is fp32 on every device (on CUDA without TF32):
    bf16 autocast, even with the classifier head in fp32, changed 3 of 18 chosen attacks on the demo (with
    and without reference models) and moved TPR at 1 % FPR by up to 0.5 points (docs/performance.md),
    beyond the 0.2 points a run may differ by; scoring is a small part of a GPU run's time. "bf16" (the
    body in bf16 autocast, the head in fp32) is the faster option; on the CPU it emulates a GPU's arithmetic.
    ``device`` is kept for callers that resolve per device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "fp32" if precision == "auto" else precision


def precision_tag(device: str | torch.device | None, precision: str = "auto", compile: bool = False) -> str:
    """Everything about how compute_logits runs on ``device`` that changes its numbers: the device type,
    the arithmetic (bf16 autocast with an fp32 head; fp32, on CUDA without TF32), ``torch.compile`` (fused
    kernels round differently) and the torch version. Part of every logits cache key, so logits computed
    one way are never reused for a run of another."""
    dev = resolve_device(device)
    if resolve_precision(dev, precision) == "bf16":
        mode = "bf16-autocast-fp32-head"
    else:
        mode = "fp32-no-tf32" if dev.type == "cuda" else "fp32"
    return f"device={dev.type};{mode}{';compiled' if compile else ''};torch={torch.__version__}"


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's last ``nn.Linear`` (its classifier in every architecture we build), or None."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def _head_in_fp32(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the head's output recomputed in fp32 from its (bf16) input, autocast off."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        bias = None if module.bias is None else module.bias.float()
        return F.linear(inputs[0].float(), module.weight.float(), bias)


def compute_logits(
    model: torch.nn.Module,
    images: np.ndarray,
    views: tuple[View, ...] = (IDENTITY,),
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    progress: bool | str = False,
    labels_only: bool = False,
    precision: str = "auto",
    fp32_head: bool = True,
    compile: bool = False,
) -> np.ndarray:
    """Logits of ``model`` on ``images`` (n, C, H, W) float32 under each view -> (V, n, classes) float32;
    with ``labels_only`` just the predicted labels (argmax) -> (V, n) int64 (for many noisy queries).

    The model runs in channels_last memory format (faster convolutions on the CPU as well); on CUDA
    the images go to the device once, every batch's views are made there and go through forward passes
    of ``CUDA_FORWARD_IMAGES`` images (no host synchronisation until the end); on the CPU through passes
    of ``CPU_FORWARD_IMAGES``. ``precision`` (see
    resolve_precision): under "fp32" (the default) no TF32 either (ieee_fp32); under "bf16" the body runs
    in bf16 autocast and, with ``fp32_head``, the classifier head (classifier_head) in fp32, so the
    logits are not rounded to bf16's 8-bit mantissa.
    ``compile``: the forward pass goes through ``torch.compile`` (compiled once per model and input
    shape, the first batch pays for it); when compiling fails (no C++ compiler, an operator it cannot
    trace) a RuntimeWarning says so and the pass runs uncompiled. The model is put in eval mode.
    """
    dev = resolve_device(device)
    # moved outside inference mode: parameters moved inside it become inference tensors, which the
    # caller's later training or load_state_dict on the same model would refuse
    model = model.to(dev).eval().to(memory_format=torch.channels_last)
    bf16 = resolve_precision(dev, precision) == "bf16"
    head = classifier_head(model) if bf16 and fp32_head else None
    hook = head.register_forward_hook(_head_in_fp32) if head is not None else None
    try:
        with ieee_fp32(dev, enabled=not bf16), torch.inference_mode():
            if compile:
                try:
                    return _forward_views(_compiled(model), images, views, dev, batch_size, progress, labels_only,
                                          bf16)
                except Exception as e:  # noqa: BLE001 - any compiler failure: the same pass, uncompiled
                    first = str(e).splitlines()[0][:200] if str(e) else ""
                    warnings.warn(f"torch.compile failed ({type(e).__name__}: {first}); scoring without it",
                                  RuntimeWarning, stacklevel=2)
            return _forward_views(model, images, views, dev, batch_size, progress, labels_only, bf16)
    finally:
        if hook is not None:
            hook.remove()


def _compiled(model: torch.nn.Module):
    """``torch.compile`` of the model, kept on it so a second call (the test split, the noisy queries) reuses
    the compiled code; shapes that vary (the last, smaller batch) are compiled as dynamic."""
    compiled = getattr(model, "_mia_compiled", None)
    if compiled is None:
        compiled = torch.compile(model, dynamic=None)
        object.__setattr__(model, "_mia_compiled", compiled)
    return compiled


def _forward_views(model: torch.nn.Module, images: np.ndarray, views: tuple[View, ...], dev: torch.device,
                   batch_size: int, progress: bool | str, labels_only: bool, bf16: bool) -> np.ndarray:
    """compute_logits' loop over batches (the model prepared and on ``dev``)."""
    cuda = dev.type == "cuda"
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if cuda:  # to the device once per call: batches are slices of it, views are made there
        x_all = x_all.pin_memory().to(dev, non_blocking=True)
    n = x_all.shape[0]
    chunks: list[torch.Tensor] = []
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=progress if isinstance(progress, str) else "scoring", unit="batch",
               disable=not progress, leave=False)
    for start in bar:
        x = x_all[start : start + batch_size]  # already on the device
        batch = torch.cat([apply_view(x, v) for v in views])  # (V*B, C, H, W): one forward for all views
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = torch.cat([model(b) for b in batch.split(CUDA_FORWARD_IMAGES if cuda else CPU_FORWARD_IMAGES)])
        out = out.float().reshape(len(views), x.shape[0], -1)
        chunks.append(out.argmax(dim=-1) if labels_only else out)
    if not chunks:
        raise ValueError("compute_logits: no images")
    return torch.cat(chunks, dim=1).cpu().numpy()


def cache_key(checkpoint: Path, data: Path, views: tuple[View, ...], architecture_file: Path | None,
              builder: str = "", precision: str = "") -> str:
    """Content hash of everything the logits depend on: weights, records, views, architecture code.
    ``builder`` names code that is not in a file of the bundle (a torchvision constructor and its version)."""
    h = hashlib.sha256(f"format={CACHE_FORMAT};views={[v.name for v in views]}".encode())
    for p in (checkpoint, data, architecture_file):
        h.update((file_digest(p) if p is not None else "-").encode())
    if builder:
        h.update(f";builder={builder}".encode())
    if precision:
        h.update(f";precision={precision}".encode())
    return h.hexdigest()[:24]


def logits_cache_path(cache_dir: Path | None, key_parts: tuple, label: str, views: tuple[View, ...]) -> Path | None:
    """Where ``cached_logits`` keeps these logits: ``<cache_dir>/logits/<label>-<key>.npz`` (None without a
    cache root). ``key_parts``: the arguments of ``cache_key`` after ``views`` is left out: (checkpoint,
    data, architecture_file[, builder[, precision]]). The key is in the name, which the entry states."""
    if cache_dir is None:
        return None
    key = cache_key(key_parts[0], key_parts[1], views, *key_parts[2:])
    return Path(cache_dir) / "logits" / f"{label}-{key}.npz"


def cached_logits(path: Path | None, views: tuple[View, ...], compute, ndim: int = 3, *,
                  records: int | None = None, classes: int | None = None) -> tuple[np.ndarray, bool]:
    """Return (logits, hit) from the entry at ``path`` (see ``logits_cache_path``); ``compute()`` runs only
    when there is no valid entry. ``ndim``: 3 for logits (V, n, C), 2 for predicted labels (V, n).
    ``records`` / ``classes``: n and C the entry must have, when known; an entry of another shape, dtype
    or with a non-finite value is recomputed."""
    claims = {"format": CACHE_FORMAT, "views": [v.name for v in views]}
    return cached_array(path, compute, lambda a: _valid_scores(a, ndim, len(views), records, classes), claims)


def _valid_scores(array: np.ndarray, ndim: int, n_views: int, records: int | None = None,
                  classes: int | None = None) -> bool:
    """A cache entry holds what compute_logits returns: (V, n, C) finite float32, or (V, n) int64 labels."""
    if array.ndim != ndim or array.shape[0] != n_views or 0 in array.shape:
        return False
    if records is not None and array.shape[1] != records:
        return False
    if ndim == 2:
        return array.dtype == np.int64
    if classes is not None and array.shape[2] != classes:
        return False
    return array.dtype == np.float32 and bool(np.isfinite(array).all())
