"""``python -m mia references``: train reference models (resumable, sharded)."""
from __future__ import annotations

import time
from pathlib import Path

from mia.cli.options import add_bundle_option, add_cache_dir_option, add_trust_option, add_victims_option
from mia.errors import MIAError
from mia.references import Distill, ReferenceRecipe, load_reference_set, parse_shard, references_folder, train_references
from mia.references.launch import SlurmOptions
from mia.references.train import pct


def add_parser(subparsers) -> object:
    """Add the ``references`` command to an argparse subparsers object; returns its parser."""
    defaults = ReferenceRecipe()
    p = subparsers.add_parser(
        "references",
        help="train reference models for LiRA / RMIA (resumable; --shard i/n splits the work)",
        description="Train k reference models per victim on random halves of its eval + test (+ population) "
                    "records, under <bundle>/references/<victim>/. Resumes where a previous run stopped.",
    )
    add_bundle_option(p)
    add_victims_option(p)
    p.add_argument("--k", type=int, default=defaults.k,
                   help=f"number of reference models: 1, or even (default {defaults.k}); any with --distill, where a "
                        "larger --k grows the set (only the new models train)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=defaults.optimizer,
                   help="sgd (momentum 0.9, default) or adam, both with a cosine schedule: match the victim's "
                        "training (Adam usually wants --lr 0.001 to 0.002)")
    p.add_argument("--no-augment", action="store_true", help="no random flip / crop during training")
    p.add_argument("--pad", type=int, default=defaults.pad,
                   help=f"zero padding of the random crop, 0 = flips only (default {defaults.pad})")
    p.add_argument("--width", type=int, default=None, help="model width (default: the victim's)")
    p.add_argument("--population", type=Path, default=None,
                   help="folder (or file) of extra .p records [image, label(, membership)] added to the pool")
    p.add_argument("--distill", nargs="?", const=Distill.POSTERIORS.value, default=Distill.OFF.value,
                   choices=[d.value for d in Distill if d is not Distill.OFF], metavar="{posteriors,labels}",
                   help="train on the population records only (needs --population), towards the victim's answers "
                        "instead of the records' labels: imitations of the victim for the offline attacks; any --k. "
                        "'posteriors' (the default): its softmax, for tasks 1-2 only; 'labels': its predicted "
                        "labels, which a label-only attacker may ask for, so the models serve every task")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="train only models j with j %% N == I (default 0/1)")
    p.add_argument("--merge-only", action="store_true", help="train nothing: rebuild the manifests and report")
    fan = p.add_argument_group("fan-out (one job per model; an interrupted fan-out resumes when run again)")
    fan.add_argument("--devices", default=None, metavar="LIST",
                     help="one worker process per device on this node, sharing one queue of jobs: GPU indices "
                          "(0,1,2,3) or device names (cpu,cpu)")
    fan.add_argument("--launcher", choices=("slurm", "submitit-local"), default=None,
                     help="submit the jobs as a job array through submitit: to Slurm (one GPU per task), or as "
                          "local processes (submitit-local, no cluster needed)")
    fan.add_argument("--slurm-partition", default=None, help="Slurm partition (default: the cluster's)")
    fan.add_argument("--timeout-min", type=int, default=SlurmOptions.timeout_min,
                     help=f"wall-time limit of one job in minutes (default {SlurmOptions.timeout_min})")
    fan.add_argument("--array-parallelism", type=int, default=SlurmOptions.array_parallelism,
                     help=f"array tasks running at once (default {SlurmOptions.array_parallelism})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=defaults.seed)
    add_trust_option(p)
    add_cache_dir_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_cli(args) -> int:
    """Run ``python -m mia references`` with parsed ``args``; returns the exit status."""
    from mia.bundle import discover
    from mia.paths import default_bundle

    shard = parse_shard(args.shard)
    recipe = ReferenceRecipe(k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, augment=not args.no_augment, pad=args.pad, seed=args.seed,
                             device=args.device, width=args.width, optimizer=args.optimizer, distill=args.distill)
    recipe.validate()
    if recipe.distilled and args.population is None:
        raise MIAError("--distill trains on population records only: give --population a folder of records from "
                       "the victim's distribution (not its eval or test records)")
    bundle_root = args.bundle if args.bundle is not None else default_bundle(progress=not args.quiet)
    bundle = discover(bundle_root, victims=list(args.victims) if args.victims else None)
    t0 = time.perf_counter()
    if args.devices is not None or args.launcher is not None:
        return _fan_out(args, bundle, recipe, t0)
    for victim in bundle.victims:
        if args.merge_only:
            ref_set = load_reference_set(bundle.root, victim, arch_dirs=bundle.arch_dirs, distill=recipe.distill)
            if ref_set is None:
                print(f"{victim.name}: no reference models under "
                      f"{references_folder(bundle.root, victim, distill=recipe.distill)}")
                continue
        else:
            ref_set = train_references(bundle.root, victim, recipe, population=args.population, shard=shard,
                                       progress=not args.quiet, arch_dirs=bundle.arch_dirs,
                                       trust=args.trust_checkpoints, log=print, cache_dir=args.cache_dir)
        _report(victim, ref_set)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _fan_out(args, bundle, recipe: ReferenceRecipe, t0: float) -> int:
    """--devices / --launcher: every missing model as one job, run by the chosen engine, then merged."""
    from mia.devices import resolve_device
    from mia.references.launch import (
        merge,
        parse_devices,
        plan_jobs,
        run_local,
        run_submitit,
    )

    if args.devices is not None and args.launcher is not None:
        raise MIAError("--devices (workers on this node) and --launcher (a job array) exclude each other")
    if args.merge_only or args.shard != "0/1":
        raise MIAError("--devices / --launcher replace --shard and cannot be combined with --merge-only")
    devices = None if args.devices is None else parse_devices(args.devices)
    for device in set(devices or ()):  # before any worker starts: cuda:3 on a two-GPU node fails here
        resolve_device(device)
    jobs = plan_jobs(bundle, recipe, population=args.population, trust=args.trust_checkpoints,
                     cache_dir=args.cache_dir)
    print(f"{len(jobs)} reference models to train for {len(bundle.victims)} victims")
    if devices is not None:
        results, failures = run_local(jobs, devices)
    else:
        options = SlurmOptions(partition=args.slurm_partition, timeout_min=args.timeout_min,
                               array_parallelism=args.array_parallelism)
        cluster = "slurm" if args.launcher == "slurm" else "local"
        results, failures = run_submitit(jobs, bundle.root / "references" / ".submitit", cluster=cluster, options=options)
    for victim, ref_set in zip(bundle.victims, merge(bundle, recipe, population=args.population,
                                                     trust=args.trust_checkpoints, cache_dir=args.cache_dir)):
        _report(victim, ref_set, trained=sum(r["trained"] for r in results if r["victim"] == victim.name))
    print(f"total {time.perf_counter() - t0:.1f}s")
    if failures:
        print(f"{len(failures)} jobs failed (run the same command again to retry them):")
        for line in failures:
            print(f"  {line}")
        return 1
    return 0


def _report(victim, ref_set, trained: int | None = None) -> None:
    trained = len(ref_set.trained) if trained is None else trained
    print(f"{victim.name}: {len(ref_set.complete)} of {ref_set.k} reference models complete in {ref_set.folder}"
          f" ({trained} trained now)")
    for j in ref_set.complete:
        meta = ref_set.models[j]
        print(f"  model {j:03d}: OUT accuracy {pct(meta.get('out_accuracy'))}, "
              f"IN accuracy {pct(meta.get('in_accuracy'))}, {meta.get('seconds', float('nan')):.1f}s")
    missing = [j for j in range(ref_set.k) if j not in ref_set.complete]
    if missing:
        print(f"  missing: {missing}")
