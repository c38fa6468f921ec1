"""Fanning reference-model training out: one job per (victim, model index), run by an existing engine.

* ``run_local``: one worker process per device on this node (``concurrent.futures.ProcessPoolExecutor``,
  spawned workers each claiming one device at start), all pulling from one queue of jobs, so a fast
  device takes more jobs than a slow one.
* ``run_submitit``: the same jobs as a job array through ``submitit`` (``cluster="slurm"`` submits to
  Slurm, one GPU per task; ``"local"`` runs them as local processes, which is how the tests use it).

A job is ``train_references(..., only=(j,))``: it trains model ``j`` of its victim unless the folder
already holds it, and writes it atomically (the ``.pth``, then its ``.json``). The folder is the
truth: ``merge`` rebuilds every manifest from what is on disk, so an interrupted fan-out resumes by
running again, and models trained by different workers, nodes or runs end up in one set.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mia.errors import MIAError
from mia.references.recipe import ReferenceRecipe
from mia.references.store import ReferenceSet

__all__ = ["ReferenceJob", "SlurmOptions", "merge", "parse_devices", "plan_jobs", "run_local", "run_submitit"]


@dataclass(frozen=True)
class ReferenceJob:
    """Train model ``index`` of one victim's reference set (everything a worker needs, picklable)."""

    bundle_root: str
    victim: str  # <arch>_<dataset>
    index: int  # model j
    recipe: ReferenceRecipe  # its device is the default; a local worker replaces it with its own
    population: str | None = None
    trust: bool = False
    cache_dir: str | None = None  # the cache root (mia.io.cache.cache_root); None: the default

    def run(self, device: str | None = None) -> dict:
        """Train the model (on ``device``, else the recipe's); returns what happened, for the log."""
        from mia.bundle import discover
        from mia.references.train import train_references

        recipe = self.recipe if device is None else dataclasses.replace(self.recipe, device=device)
        bundle = discover(self.bundle_root, victims=[self.victim])
        ref_set = train_references(bundle.root, bundle.victims[0], recipe, population=self.population,
                                   only=(self.index,), progress=False, arch_dirs=bundle.arch_dirs, trust=self.trust,
                                   cache_dir=self.cache_dir)
        meta = ref_set.models.get(self.index, {})
        return {"victim": self.victim, "index": self.index, "trained": self.index in ref_set.trained,
                "device": meta.get("device", recipe.device), "seconds": meta.get("seconds"),
                "out_accuracy": meta.get("out_accuracy")}


def parse_devices(text: str) -> list[str]:
    """``"0,1,2,3"`` -> cuda:0 ... cuda:3; ``"cpu,cpu"`` -> two CPU workers; names such as ``cuda:1`` as given."""
    devices = []
    for item in (s.strip() for s in str(text).split(",")):
        if item.isdigit():
            devices.append(f"cuda:{item}")
        elif item == "cpu" or item.startswith("cuda"):
            devices.append(item)
        else:
            raise MIAError(f"--devices expects GPU indices or device names separated by commas (0,1 or cpu,cpu), "
                           f"got {text!r}")
    if not devices:
        raise MIAError("--devices: no device given")
    return devices


def plan_jobs(bundle, recipe: ReferenceRecipe, *, population: str | Path | None = None,
              trust: bool = False, cache_dir: str | Path | None = None) -> list[ReferenceJob]:
    """The jobs left to do: for every victim of ``bundle`` (a mia.bundle.Bundle), the models its folder
    does not hold yet. Checks each folder against the recipe first (merge), so a mismatch fails here,
    before anything is launched."""
    jobs = []
    for victim, ref_set in zip(bundle.victims, merge(bundle, recipe, population=population, trust=trust,
                                                     cache_dir=cache_dir)):
        jobs += [ReferenceJob(str(bundle.root), victim.name, j, recipe,
                              None if population is None else str(population), trust,
                              None if cache_dir is None else str(cache_dir))
                 for j in range(recipe.k) if j not in ref_set.complete]
    return jobs


def merge(bundle, recipe: ReferenceRecipe, *, population: str | Path | None = None,
          trust: bool = False, cache_dir: str | Path | None = None) -> list[ReferenceSet]:
    """Every victim's reference set as the disk holds it, with its manifest rebuilt (trains nothing)."""
    from mia.references.train import train_references

    return [train_references(bundle.root, victim, recipe, population=population, only=(), progress=False,
                             arch_dirs=bundle.arch_dirs, trust=trust, cache_dir=cache_dir) for victim in bundle.victims]


# --------------------------------------------------------------------------- one node, several devices

_WORKER_DEVICE: str | None = None  # the device this worker process claimed


def _claim_device(devices, threads: int | None) -> None:
    """Worker initializer: take one device from the shared queue (and fix the CPU thread count)."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = devices.get()
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_on_claimed_device(job: ReferenceJob) -> dict:
    return job.run(_WORKER_DEVICE)


def run_local(jobs: Sequence[ReferenceJob], devices: Sequence[str], *, threads: int | None = None,
              log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Run ``jobs`` on one worker process per entry of ``devices`` (a shared queue: each worker takes the
    next job when it finishes one). ``threads``: torch threads per worker (default: the CPU cores shared
    out when several workers run on the CPU, torch's own setting otherwise). Returns (results, failures);
    a failing job does not stop the others."""
    if not jobs:
        return [], []
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked workers
    queue = ctx.Queue()
    for device in devices:
        queue.put(device)
    cpu_workers = sum(d == "cpu" for d in devices)
    if threads is None and cpu_workers > 1:
        threads = max(1, (os.cpu_count() or 1) // cpu_workers)
    results, failures = [], []
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx, initializer=_claim_device,
                             initargs=(queue, threads)) as pool:
        futures = {pool.submit(_run_on_claimed_device, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                results.append(future.result())
            except Exception as exc:  # a worker's error (or a worker that died) is reported, the rest go on
                failures.append(f"{job.victim} model {job.index:03d}: {type(exc).__name__}: {exc}")
                log(f"error: {failures[-1]}")
                continue
            r = results[-1]
            log(f"{r['victim']} model {r['index']:03d}: " + (f"trained on {r['device']} in {r['seconds']:.1f}s"
                                                             if r["trained"] else "already complete"))
    return results, failures


# --------------------------------------------------------------------------- job arrays (Slurm)


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks the cluster for (submitit's parameters)."""

    partition: str | None = None  # Slurm partition; None: the cluster's default
    timeout_min: int = 240  # wall-time limit of one task (one model)
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    array_parallelism: int = 64  # tasks of the array running at once


def _run_job(job: ReferenceJob) -> dict:
    return job.run()  # the recipe's device: "auto" finds the GPU Slurm gave the task


def run_submitit(jobs: Sequence[ReferenceJob], folder: str | Path, *, cluster: str = "slurm",
                 options: SlurmOptions | None = None, log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Submit ``jobs`` as one job array through submitit and wait for them. ``cluster``: "slurm", or
    "local" / "debug" (submitit's executors on this machine, without a cluster). ``folder`` keeps
    submitit's logs and pickles. Returns (results, failures) like run_local."""
    try:
        import submitit
    except ImportError:
        raise MIAError("--launcher slurm needs submitit: pip install submitit") from None
    if not jobs:
        return [], []
    options = options or SlurmOptions()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"name": "mia-references", "timeout_min": options.timeout_min}
    if cluster == "slurm":
        params.update(gpus_per_node=options.gpus_per_task, cpus_per_task=options.cpus_per_task,
                      mem_gb=options.mem_gb, slurm_array_parallelism=options.array_parallelism)
        if options.partition:
            params["slurm_partition"] = options.partition
    executor.update_parameters(**params)
    submitted = executor.map_array(_run_job, list(jobs))
    log(f"submitted {len(submitted)} jobs through submitit ({cluster}); logs under {folder}")
    results, failures = [], []
    for job, handle in zip(jobs, submitted):
        try:
            results.append(handle.result())
        except Exception as exc:  # submitit re-raises the task's error (or a scheduler failure)
            failures.append(f"{job.victim} model {job.index:03d}: {type(exc).__name__}: {str(exc)[-300:]}")
            log(f"error: {failures[-1]}")
    return results, failures
