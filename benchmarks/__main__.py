"""``python -m benchmarks``: run the benchmarks and print Markdown tables (optionally save JSON).

    python -m benchmarks [--only scoring,sweep,e2e,precision,training,attacks] [--tiny] [--device auto] [--repeat N] [--json OUT]
    python -m benchmarks --only attacks --bundle demo --label-noise 0.1,0.15 --budgets 1,2,all

``--tiny`` shrinks every benchmark to a smoke-test size (seconds to a minute); the numbers are then
only good for checking that everything runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import BenchResult, machine_info, markdown_table

BENCHMARKS = ("scoring", "sweep", "e2e", "precision", "training", "attacks")
DEFAULT = ("scoring", "sweep", "e2e")  # precision (bf16 on a CPU is slow), training, attacks: opt in


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(DEFAULT),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: {','.join(DEFAULT)})")
    p.add_argument("--tiny", action="store_true", help="toy sizes and a tiny demo bundle built in a temp dir")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per measurement (default 3)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also save every number as JSON")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for the %%-of-peak columns (default: from the GPU's name, e.g. 989 for an H200; "
                        "none on CPU)")
    p.add_argument("--width", type=int, default=None,
                   help="scoring: width of every architecture (default: 16 on CPU, the paper's on CUDA)")
    p.add_argument("--records", type=int, default=None,
                   help="scoring: records per timed call (default: 512 on CPU, 16384 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="scoring: torch threads for both paths (default: torch's own setting)")
    p.add_argument("--brute-force-cap", type=float, default=20.0, metavar="SECONDS",
                   help="sweep: extrapolate brute force when its projected time exceeds this (default 20)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="e2e: bundle to copy and run (default: the demo bundle if built, else a tiny one)")
    p.add_argument("--compile", action="store_true", help="scoring: also time the project path through torch.compile")
    p.add_argument("--label-noise", default="none", metavar="S1,S2,...",
                   help="attacks: the label-only noisy queries' levels (default none; the run's default is 0.1,0.15)")
    p.add_argument("--budgets", default=None, metavar="K1,K2,...",
                   help="attacks: reference models used per victim after K = 0, 'all' = every complete one "
                        "(default 1,all); precision: the reference models of each comparison, 0 = none "
                        "(default 0)")
    p.add_argument("--victims", default=None, metavar="NAME,...",
                   help="attacks, precision: only these victims (default: all the bundle's)")
    p.add_argument("--no-subprocess", action="store_true",
                   help="e2e: skip the `python -m mia run` child processes (wall time with imports, peak memory)")
    return p


def parse_budgets(text: str, *, zero: bool = False) -> tuple[int | None, ...]:
    """``"1,2,all"`` -> (1, 2, None): positive model counts (and 0 with ``zero``), 'all' for every complete
    model."""
    budgets = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            budgets.append(None)
        elif part.isdigit() and (int(part) > 0 or zero):
            budgets.append(int(part))
        else:
            raise SystemExit(f"--budgets: expected {'integers >= 0' if zero else 'positive integers'} or 'all', "
                             f"got {part!r}")
    if not budgets:
        raise SystemExit("--budgets: give at least one budget, e.g. 1,all")
    return tuple(budgets)


def _selected(only: str) -> list[str]:
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown or not names:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
    return [b for b in BENCHMARKS if b in names]


def run_benchmarks(args: argparse.Namespace, log=print) -> dict[str, BenchResult]:
    """Run the selected benchmarks with the options in ``args`` (see build_parser)."""
    results: dict[str, BenchResult] = {}
    victims = tuple(v.strip() for v in args.victims.split(",") if v.strip()) if args.victims else None
    for name in _selected(args.only):
        if name == "scoring":
            from benchmarks.bench_scoring import ScoringConfig, run

            widths = None if args.width is None else {a: args.width for a in ("resnet34", "vgg16", "mobilenetv2")}
            cfg = ScoringConfig(device=args.device, repeat=args.repeat, peak_tflops=args.peak_tflops,
                                widths=widths, n=args.records, threads=args.threads, compile=args.compile)
            if args.tiny:
                cfg.widths = widths or {"resnet34": 4, "vgg16": 4, "mobilenetv2": 4}
                cfg.n = args.records or 64
                cfg.signal_n = 2000
            results[name] = run(cfg, log=log)
        elif name == "sweep":
            from benchmarks.bench_sweep import SweepConfig, run

            cfg = SweepConfig(repeat=args.repeat, brute_force_cap_s=args.brute_force_cap)
            if args.tiny:
                cfg.sizes, cfg.brute_force_cap_s = (1_000, 10_000), min(args.brute_force_cap, 2.0)
            results[name] = run(cfg, log=log)
        elif name == "attacks":
            import tempfile

            from benchmarks.bench_attacks import AttacksConfig, run
            from benchmarks.bench_end_to_end import EndToEndConfig, resolve_bundle

            bundle, _ = resolve_bundle(EndToEndConfig(bundle=args.bundle, tiny=args.tiny),
                                       Path(tempfile.mkdtemp(prefix="mia-attacks-")), log=log)
            noise = () if args.label_noise == "none" else tuple(float(x) for x in args.label_noise.split(","))
            results[name] = run(AttacksConfig(bundle=bundle, device=args.device, label_noise=noise,
                                              budgets=parse_budgets(args.budgets or "1,all"),
                                              victims=victims), log=log)
        elif name == "training":
            from benchmarks.bench_training import TrainingConfig, run

            cfg = TrainingConfig(device=args.device, width=args.width, n=args.records)
            if args.tiny:
                cfg.n, cfg.width, cfg.sizes = args.records or 32, args.width or 4, (32,)
            results[name] = run(cfg, log=log)
        elif name == "precision":
            import tempfile

            from benchmarks.bench_end_to_end import EndToEndConfig, resolve_bundle
            from benchmarks.bench_precision import PrecisionConfig, run

            bundle, _ = resolve_bundle(EndToEndConfig(bundle=args.bundle, tiny=args.tiny),
                                       Path(tempfile.mkdtemp(prefix="mia-precision-")), log=log)
            cfg = PrecisionConfig(bundle=bundle, device=args.device, victims=victims,
                                  budgets=parse_budgets(args.budgets or "0", zero=True))
            if args.tiny:
                cfg.head_sample = 16
            results[name] = run(cfg, log=log)
        else:
            from benchmarks.bench_end_to_end import EndToEndConfig, run

            cfg = EndToEndConfig(bundle=args.bundle, tiny=args.tiny, device=args.device,
                                 repeat=1 if args.tiny else args.repeat, subprocess=not args.no_subprocess)
            results[name] = run(cfg, log=log)
    return results


def render(machine: dict, results: dict[str, BenchResult], seconds: float) -> str:
    """The Markdown report: machine, every table and note, then the targets."""
    parts = ["## Machine", "", markdown_table(["", ""], [
        ["CPU", f"{machine['cpu']} ({machine['cores']} cores, {machine['cores_usable']} usable, "
                f"torch threads {machine['torch_threads']})"],
        ["load average (1, 5, 15 min)", ", ".join(f"{x:.1f}" for x in machine["load_average"] or [])],
        ["speed probe", f"pure-Python loop of 1e7 additions: {machine['python_loop_1e7_s']:.2f} s "
                        "(a typical desktop core: about 0.5 s)"],
        ["device", machine["device"] + (f" ({machine['gpu']})" if "gpu" in machine else "")],
        ["versions", f"torch {machine['torch']}, numpy {machine['numpy']}, python {machine['python']}"],
    ])]
    for res in results.values():
        for table in res.tables:
            parts += ["", table]
        for note in res.notes:
            parts += ["", f"_{note}_"]
    checks = [c for res in results.values() for c in res.checks]
    if checks:
        verdict = {True: "met", False: "MISSED", None: "not measured"}
        parts += ["", "## Targets", "",
                  markdown_table(["target", "measured", "verdict"], [[c.target, c.measured, verdict[c.passed]] for c in checks])]
    parts += ["", f"(benchmarks took {seconds:.0f} s)"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _selected(args.only)  # fail fast on a typo
    from mia.devices import resolve_device

    device = str(resolve_device(args.device))
    args.device = device
    machine = machine_info(device)
    t0 = time.perf_counter()
    results = run_benchmarks(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(render(machine, results, seconds))
    if args.json is not None:
        doc = {
            "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": machine,
            "seconds": seconds,
            "benchmarks": {name: {"settings": r.settings, "rows": r.rows, "checks": [asdict(c) for c in r.checks],
                                  "notes": r.notes} for name, r in results.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nsaved {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
