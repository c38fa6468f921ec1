"""Speed measurements of the toolkit, each printed as a ratio against a baseline run in the same process.

``python -m benchmarks`` runs them all (see ``benchmarks/__main__.py``):

* ``bench_scoring``    records/s of batched scoring + vectorized signals vs a notebook-style loop;
* ``bench_sweep``      the exact O(n log n) threshold sweep vs brute force and a 100-point grid;
* ``bench_end_to_end`` cold and warm runs of the whole pipeline on the demo bundle, peak memory.

Timings on a shared machine are noisy, so every comparison is measured *interleaved* (baseline and
project alternate, repetition after repetition) and reported as the median of the per-repetition
ratios. This module holds what the benchmarks share: results, checks, timing and table helpers.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = [
    "BenchResult",
    "Check",
    "best_ratio",
    "calls_per_sample",
    "fmt",
    "machine_info",
    "markdown_table",
    "median",
    "pair_ratio",
    "interleaved",
    "timed",
    "timed_cpu",
]


@dataclass
class Check:
    """A target from the issue and whether this run met it (None: not measured in this run)."""

    target: str  # e.g. "exact sweep >= 100x faster than brute force at n=1e4"
    measured: str  # the number the verdict rests on, human-readable
    passed: bool | None


@dataclass
class BenchResult:
    """What one benchmark measured: raw rows for JSON, Markdown tables for people, target checks."""

    name: str  # "scoring", "sweep" or "e2e"
    rows: list[dict]  # one JSON-ready dict per measured configuration (seconds, records/s, ratios)
    tables: list[str]  # Markdown, each with its own heading
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats printed under the tables
    settings: dict = field(default_factory=dict)  # the sizes and options used (JSON-ready)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, return value) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, all threads, return value) of one call.

    On a machine shared with other jobs the CPU time of single-threaded code is close to what its
    wall time would be on an idle machine, while the wall time also counts the time spent waiting.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt(x: float | int | None, digits: int = 3) -> str:
    """Human number: None -> 'n/a', integers with thousands separators, else ``digits`` significant."""
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def python_speed_probe(iterations: int = 10_000_000) -> float:
    """Seconds for a pure-Python loop of ``iterations`` additions: how fast this core is right now.

    A typical desktop core needs about 0.5 s; a throttled or oversubscribed virtual one several times
    that. It puts the absolute numbers of a run in context (the ratios need no such context)."""
    t0 = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - t0


def machine_info(device: str) -> dict:
    """CPU model, cores, torch / numpy / python versions and the device the benchmarks use."""
    import numpy as np
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python_loop_1e7_s": python_speed_probe(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def calls_per_sample(fn: Callable[[], object], min_seconds: float = 0.02) -> int:
    """How many back-to-back calls of ``fn`` take at least ``min_seconds`` (1, 2, 5, 10, 20, ...)."""
    loops = 1
    while True:
        for step in (1, 2, 5):
            calls = loops * step
            wall, _ = timed(lambda: [fn() for _ in range(calls)])
            if wall >= min_seconds or calls >= 10_000:
                return calls
        loops *= 10


def interleaved(fns: dict[str, Callable[[], object]], repeat: int,
                calls: dict[str, int] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time each function once per repetition, rotating which goes first.

    ``calls[name]`` back-to-back calls make one sample (for very short functions); samples are
    divided by it. Returns name -> {"wall": [seconds per call] * repeat, "cpu": [...]}.
    """
    names = list(fns)
    out = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            k = (calls or {}).get(name, 1)
            fn = fns[name]
            wall, cpu, _ = timed_cpu(lambda: [fn() for _ in range(k)])
            out[name]["wall"].append(wall / k)
            out[name]["cpu"].append(cpu / k)
    return out


def pair_ratio(times: dict[str, dict[str, list[float]]], slow: str, fast: str, clock: str = "wall") -> float:
    """Median over repetitions of time(slow) / time(fast): how many times faster ``fast`` is."""
    return median([a / b for a, b in zip(times[slow][clock], times[fast][clock])])


def best_ratio(times: dict[str, dict[str, list[float]]], slow: str, fast: str, clock: str = "wall") -> float:
    """min time(slow) / min time(fast): the ratio of the least disturbed runs of each.

    Other jobs only ever add time, so on a busy machine the fastest of several interleaved runs is
    the most reproducible estimate of each path's own speed.
    """
    return min(times[slow][clock]) / min(times[fast][clock])
