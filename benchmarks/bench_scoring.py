"""Scoring throughput: records/s of the project's scoring path against a notebook-style baseline.

Both paths start from the same float32 images (n, 3, S, S) in memory and end with the seed's four
signals per record, on the same model weights, on the same device:

* baseline (``naive_scoring``): fp32, batch 64, ``.cpu()`` after every batch, then a Python loop
  over records computing softmax / entropy / modified entropy / loss with numpy and ``math``, as
  notebook solutions typically do;
* project (``project_scoring``): ``mia.scoring.compute_logits`` (identity view, batch 256; the run's
  default precision, fp32 (without TF32 on CUDA), in the memory format it chooses) then
  ``mia.core.signals.all_signals`` (all seven signals, vectorized, float64);
* on CUDA also the project with ``precision="bf16"`` (``run --precision bf16``: bf16 autocast, the
  classifier head in fp32), the fast option, against which the issue's targets are checked: ResNet34
  at 64x64 at least 30 % of the bf16 dense peak and 5x the baseline.

The two are timed alternately, ``repeat`` times. Records/s and the speedup come from each path's
fastest run (other jobs on a shared machine only add time, and multi-threaded CPU time is inflated
by threads spinning while their partner waits for a core); the median of per-repetition ratios is
in the JSON too. ``threads`` fixes torch's thread count for the measurement (same for both paths).
Model FLOPs per record come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts
2), so achieved FLOP/s = FLOPs/record x records/s; on CUDA it is also given as a fraction of the
device's bf16 dense peak (``peak_tflops``; by default looked up from the device's name,
``bf16_peak_tflops``). The fp32 paths' fractions are of the same bf16 peak (their own peaks are lower):
the headers say so.

A second table isolates the signals: the per-record Python loop against ``all_signals`` on the same
logits (no model), and checks that both give the same numbers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks import BenchResult, Check, best_ratio, fmt, interleaved, markdown_table, pair_ratio
from mia.models.registry import REPO_ARCHITECTURES, repo_builder
from mia.devices import ieee_fp32, resolve_device
from mia.inspection import flops_per_image
from mia.scoring import IDENTITY, compute_logits
from mia.core.signals import all_signals

ARCHS = ("resnet34", "vgg16", "mobilenetv2")
#: bf16 dense tensor-core peaks (TFLOP/s, datasheets) by a fragment of torch.cuda.get_device_name, the
#: most specific first; a device not listed gets no %-of-peak column unless --peak-tflops is given.
BF16_PEAKS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0),
              ("A100", 312.0), ("L40S", 362.0))


def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of the GPU named ``device_name`` (``torch.cuda.get_device_name``), or None."""
    for fragment, peak in BF16_PEAKS:
        if fragment in device_name:
            return peak
    return None
CPU_WIDTHS = {"resnet34": 16, "vgg16": 16, "mobilenetv2": 16}  # the demo bundle's victims
NAIVE_BATCH = 64
PROJECT_BATCH = 256


@dataclass
class ScoringConfig:
    """Sizes of the scoring benchmark; None fields get device-dependent defaults (``resolved``)."""

    archs: tuple[str, ...] = ARCHS  # the repository's architectures (mia.models.registry.repo_builder)
    sizes: tuple[int, ...] = (32, 64)  # image side S: inputs (n, 3, S, S)
    n: int | None = None  # records per timed call; None: 512 on the CPU, 16384 on CUDA
    widths: dict[str, int] | None = None  # arch -> width; None: 16 (demo victims) on CPU, paper on CUDA
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    repeat: int = 3  # timed repetitions of each path (interleaved)
    threads: int | None = None  # torch.set_num_threads for the measurement; None: leave torch's setting
    peak_tflops: float | None = None  # bf16 peak for the fraction columns; None: by the GPU's name, none on CPU
    num_classes: int = 10
    signal_n: int = 20000  # records in the signals-only comparison
    seed: int = 0
    compile: bool = False  # also time the project path through torch.compile (compiled before timing)
    bf16: bool | None = None  # also time the project path with precision="bf16"; None: on CUDA only

    def resolved(self) -> ScoringConfig:
        dev = resolve_device(self.device)
        cuda = dev.type == "cuda"
        widths = self.widths
        if widths is None:
            widths = {a: REPO_ARCHITECTURES[a].default_width for a in self.archs} if cuda else dict(CPU_WIDTHS)
        return ScoringConfig(
            archs=tuple(self.archs),
            sizes=tuple(self.sizes),
            n=self.n if self.n is not None else (16384 if cuda else 512),
            widths={a: int(widths[a]) for a in self.archs},
            device=str(dev),
            repeat=max(1, int(self.repeat)),
            threads=self.threads,
            peak_tflops=(self.peak_tflops if self.peak_tflops is not None
                         else bf16_peak_tflops(torch.cuda.get_device_name(dev)) if cuda else None),
            num_classes=self.num_classes,
            signal_n=self.signal_n,
            seed=self.seed,
            compile=self.compile,
            bf16=cuda if self.bf16 is None else bool(self.bf16),
        )


# --------------------------------------------------------------------------------------------------
# The two paths


def naive_record_signals(z: np.ndarray, y: int) -> tuple[float, float, float, float]:
    """One record, notebook style: logits (C,) and its label -> (confidence, -entropy, -Mentr, -loss)."""
    z = z.astype(np.float64)
    e = np.exp(z - z.max())
    p = e / e.sum()
    py = float(p[y])
    entropy = -sum(float(pi) * math.log(pi) for pi in p if pi > 0)
    mentr = -(1.0 - py) * math.log(max(py, 1e-300)) - sum(
        float(p[i]) * math.log(max(1.0 - float(p[i]), 1e-300)) for i in range(len(p)) if i != y
    )
    loss = -math.log(max(py, 1e-300))
    return py, -entropy, -mentr, -loss


def naive_signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """logits (n, C), labels (n,) -> the seed's four signals, one Python loop iteration per record."""
    rows = [naive_record_signals(z, int(y)) for z, y in zip(logits, labels)]
    cols = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return dict(zip(("confidence", "neg_entropy", "neg_modified_entropy", "neg_loss"), cols.T))


def naive_scoring(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                  batch_size: int = NAIVE_BATCH) -> dict[str, np.ndarray]:
    """The baseline: fp32 batches of 64, ``.cpu()`` per batch, signals per record in Python.

    images (n, C, H, W) float32, labels (n,) -> {signal: (n,) float64}. fp32 as the project's default path
    computes it (on CUDA without TF32, which cuDNN would otherwise use for convolutions).
    """
    model.eval()
    out: list[dict[str, np.ndarray]] = []
    with torch.no_grad(), ieee_fp32(device):
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            logits = model(x).cpu().numpy()
            out.append(naive_signals(logits, labels[start : start + batch_size]))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def project_scoring(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                    batch_size: int = PROJECT_BATCH, compile: bool = False,
                    precision: str = "auto") -> dict[str, np.ndarray]:
    """The project: compute_logits (identity view) + all_signals. -> {signal: (n,) float64}."""
    logits = compute_logits(model, images, (IDENTITY,), device=device, batch_size=batch_size, compile=compile,
                            precision=precision)
    return all_signals(logits[0], labels)


def flops_per_record(model: torch.nn.Module, size: int, channels: int = 3) -> float:
    """Forward FLOPs of one (channels, size, size) record (multiply-add = 2): mia.inspection.flops_per_image."""
    return float(flops_per_image(model, (channels, size, size)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Benchmarks


def _measure_model(arch: str, size: int, cfg: ScoringConfig, dev: torch.device) -> dict:
    width = cfg.widths[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = repo_builder(arch).build(cfg.num_classes, width)
    naive_model = copy.deepcopy(model).to(dev).eval()  # compute_logits may change its model in place
    flops = flops_per_record(model, size)
    rng = np.random.default_rng(cfg.seed)
    images = rng.standard_normal((cfg.n, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, cfg.num_classes, cfg.n).astype(np.int64)

    def run_naive():
        _sync(dev)
        out = naive_scoring(naive_model, images, labels, dev)
        _sync(dev)
        return out

    def run_project():
        _sync(dev)
        out = project_scoring(model, images, labels, dev)
        _sync(dev)
        return out

    paths = {"naive": run_naive, "project": run_project}
    if cfg.bf16:
        def run_bf16():
            _sync(dev)
            out = project_scoring(model, images, labels, dev, precision="bf16")
            _sync(dev)
            return out

        paths["bf16"] = run_bf16
    if cfg.compile:
        compiled_model = copy.deepcopy(model)

        def run_compiled():
            _sync(dev)
            out = project_scoring(compiled_model, images, labels, dev, compile=True)
            _sync(dev)
            return out

        paths["compiled"] = run_compiled
        run_compiled()  # compiles for both batch shapes (full and last), not timed
    # Warm-up (kernel selection, allocator, lazy imports) on a slice, not timed.
    warm = min(cfg.n, PROJECT_BATCH)
    naive_scoring(naive_model, images[:warm], labels[:warm], dev)
    project_scoring(model, images[:warm], labels[:warm], dev)
    if cfg.bf16:
        project_scoring(model, images[:warm], labels[:warm], dev, precision="bf16")
    times = interleaved(paths, cfg.repeat)
    row = {
        "arch": arch,
        "width": width,
        "size": size,
        "n": cfg.n,
        "device": str(dev),
        "flops_per_record": flops,
        "naive_seconds": times["naive"]["wall"],
        "project_seconds": times["project"]["wall"],
        "naive_cpu_seconds": times["naive"]["cpu"],
        "project_cpu_seconds": times["project"]["cpu"],
        "naive_records_per_s": cfg.n / min(times["naive"]["wall"]),
        "project_records_per_s": cfg.n / min(times["project"]["wall"]),
        "speedup": best_ratio(times, "naive", "project", "wall"),
        "speedup_cpu_time": best_ratio(times, "naive", "project", "cpu"),
        "speedup_median_of_pairs": pair_ratio(times, "naive", "project", "wall"),
    }
    if cfg.compile:
        row["compiled_records_per_s"] = cfg.n / min(times["compiled"]["wall"])
        row["compiled_speedup"] = best_ratio(times, "naive", "compiled", "wall")
    if cfg.bf16:
        row["bf16_records_per_s"] = cfg.n / min(times["bf16"]["wall"])
        row["bf16_speedup"] = best_ratio(times, "naive", "bf16", "wall")
    for path in paths:
        achieved = flops * row[f"{path}_records_per_s"]
        row[f"{path}_tflops"] = achieved / 1e12
        row[f"{path}_peak_fraction"] = achieved / (cfg.peak_tflops * 1e12) if cfg.peak_tflops else None
    if dev.type == "cuda":  # one more project call, alone, for its peak memory
        torch.cuda.reset_peak_memory_stats(dev)
        run_project()
        row["cuda_max_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def _measure_signals(cfg: ScoringConfig) -> dict:
    """Signals alone, from the same logits: the per-record loop vs all_signals."""
    rng = np.random.default_rng(cfg.seed + 1)
    n = cfg.signal_n
    logits = (3.0 * rng.standard_normal((n, cfg.num_classes))).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, n).astype(np.int64)
    naive = naive_signals(logits, labels)
    fast = all_signals(logits, labels)
    max_rel = max(float(np.max(np.abs(naive[k] - fast[k]) / np.maximum(1.0, np.abs(fast[k])))) for k in naive)
    times = interleaved({"naive": lambda: naive_signals(logits, labels),
                         "project": lambda: all_signals(logits, labels)}, cfg.repeat)
    return {
        "n": n,
        "classes": cfg.num_classes,
        "naive_cpu_seconds": times["naive"]["cpu"],
        "project_cpu_seconds": times["project"]["cpu"],
        "naive_records_per_s": n / min(times["naive"]["cpu"]),
        "project_records_per_s": n / min(times["project"]["cpu"]),
        "speedup": best_ratio(times, "naive", "project", "cpu"),
        "max_relative_difference": max_rel,
    }


def run(config: ScoringConfig | None = None, log=print) -> BenchResult:
    """Measure every (arch, size) and the signals alone; returns tables and the CPU target check."""
    cfg = (config or ScoringConfig()).resolved()
    dev = torch.device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    try:
        rows = []
        for arch in cfg.archs:
            for size in cfg.sizes:
                log(f"scoring: {arch} width {cfg.widths[arch]} at {size}x{size}, {cfg.n} records x {cfg.repeat}, "
                    f"{threads} torch threads")
                rows.append(_measure_model(arch, size, cfg, dev))
        sig_row = _measure_signals(cfg)
    finally:
        torch.set_num_threads(threads_before)

    cuda = dev.type == "cuda"
    headers = ["arch (width)", "input", "MFLOP/record", "baseline rec/s", "project rec/s", "speedup (by CPU time)",
               "baseline TFLOP/s", "project TFLOP/s"]
    if cfg.peak_tflops:
        headers += ["baseline % bf16 peak", "project % bf16 peak"]
    if cfg.compile:
        headers += ["compiled rec/s", "compiled speedup"]
    if cfg.bf16:
        headers += ["bf16 rec/s", "bf16 speedup"] + (["bf16 % peak"] if cfg.peak_tflops else [])
    if cuda:
        headers += ["project peak GPU MiB"]
    table_rows = []
    for r in rows:
        cells = [f"{r['arch']} ({r['width']})", f"{r['size']}x{r['size']}", fmt(r["flops_per_record"] / 1e6),
                 fmt(r["naive_records_per_s"]), fmt(r["project_records_per_s"]),
                 f"{r['speedup']:.2f}x ({r['speedup_cpu_time']:.2f}x)",
                 fmt(r["naive_tflops"]), fmt(r["project_tflops"])]
        if cfg.peak_tflops:
            cells += [f"{100 * r['naive_peak_fraction']:.2f}%", f"{100 * r['project_peak_fraction']:.2f}%"]
        if cfg.compile:
            cells += [fmt(r["compiled_records_per_s"]), f"{r['compiled_speedup']:.2f}x"]
        if cfg.bf16:
            cells += [fmt(r["bf16_records_per_s"]), f"{r['bf16_speedup']:.2f}x"]
            cells += [f"{100 * r['bf16_peak_fraction']:.2f}%"] if cfg.peak_tflops else []
        if cuda:
            cells += [fmt(r["cuda_max_memory_mib"])]
        table_rows.append(cells)
    precision = "fp32 without TF32" if cuda else "fp32"
    model_table = (
        f"### Scoring throughput on {dev}, {threads} torch thread(s) ({cfg.n} records, fastest of {cfg.repeat} "
        "interleaved runs each)\n\n"
        f"baseline: fp32, batch {NAIVE_BATCH}, `.cpu()` per batch, 4 signals per record in Python; "
        f"project: `compute_logits` (identity view, batch {PROJECT_BATCH}, {precision}) + `all_signals` (7 signals)"
        + ("; bf16: the same with `precision=\"bf16\"` (bf16 autocast, fp32 head)" if cfg.bf16 else "")
        + (f"; bf16 dense peak {cfg.peak_tflops:g} TFLOP/s" if cfg.peak_tflops else "") + ".\n\n"
        + markdown_table(headers, table_rows)
    )
    sig_table = (
        f"### Signals from logits alone ({sig_row['n']} records x {sig_row['classes']} classes, "
        f"single-threaded, CPU time, fastest of {cfg.repeat})\n\n"
        + markdown_table(
            ["path", "records/s", "speedup"],
            [["per-record Python loop (4 signals)", fmt(sig_row["naive_records_per_s"]), "1x"],
             ["`all_signals` (7 signals)", fmt(sig_row["project_records_per_s"]), f"{sig_row['speedup']:.0f}x"]],
        )
        + f"\n\nmax relative difference between the two on the shared signals: {sig_row['max_relative_difference']:.1e}"
    )
    checks = []
    if not cuda:
        slowest = min(rows, key=lambda r: r["speedup"])
        checks.append(Check(
            "on CPU, project scoring at least as fast as the naive baseline",
            f"speedup {min(r['speedup'] for r in rows):.2f}x (worst: {slowest['arch']} {slowest['size']}x{slowest['size']})"
            f" .. {max(r['speedup'] for r in rows):.2f}x",
            all(r["speedup"] >= 1.0 for r in rows),
        ))
    target = next((r for r in rows if r["arch"] == "resnet34" and r["size"] == 64), None)
    if cuda and cfg.bf16 and target is not None:
        if cfg.peak_tflops:
            checks.append(Check("ResNet34 at 64x64, bf16: at least 30 % of the dense peak",
                                f"{100 * target['bf16_peak_fraction']:.1f} %", target["bf16_peak_fraction"] >= 0.30))
        checks.append(Check("ResNet34 at 64x64, bf16: at least 5x the naive fp32 baseline",
                            f"{target['bf16_speedup']:.2f}x", target["bf16_speedup"] >= 5.0))
    settings = asdict(cfg)
    settings["torch_threads_used"] = threads
    return BenchResult("scoring", rows + [{"signals_only": sig_row}], [model_table, sig_table], checks,
                       settings=settings)
