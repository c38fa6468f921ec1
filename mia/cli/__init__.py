"""The command line: ``python -m mia {run,inspect,check,demo,evaluate,references} ...``.

Errors on bad input are the project's own (mia.errors), and file system errors (a read-only folder, a
full disk): they print as one line and exit with status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from mia.config import ACCESS_LEVELS, CHALLENGE_TASKS, RunConfig, TaskConfig
from mia.cli import references as references_cli
from mia.cli.options import add_bundle_option, add_cache_dir_option, add_trust_option, add_victims_option
from mia.errors import MIAError
from mia.io.cache import CacheWarning
from mia.paths import REPO_ROOT, default_bundle


def _parse_task_access(values: list[str] | None) -> tuple[TaskConfig, ...]:
    """['1=posterior', '3=label'] -> tasks; unspecified tasks keep the challenge's access level."""
    tasks = {t.task: t.access for t in CHALLENGE_TASKS}
    for item in values or []:
        k, sep, access = item.partition("=")
        if not sep or not k.strip().isdigit() or access not in ACCESS_LEVELS:
            raise MIAError(f"--task expects K=ACCESS with ACCESS in {ACCESS_LEVELS}, got {item!r}")
        tasks[int(k)] = access
    return tuple(TaskConfig(k, v) for k, v in sorted(tasks.items()))


def _parse_noise_levels(text: str) -> tuple[float, ...]:
    """'0.1,0.15' -> (0.1, 0.15); 'none' or '' -> () (no noisy queries)."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        levels = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise MIAError(f"--label-noise expects comma-separated positive numbers or 'none', got {text!r}") from None
    if any(not x > 0 for x in levels):
        raise MIAError(f"--label-noise levels must be positive, got {text!r}")
    return levels


def _config_from_args(args) -> RunConfig:
    try:
        return _run_config(args)
    except ValueError as e:  # a value RunConfig refuses (--folds 1, --label-noise-draws 0, ...)
        raise MIAError(f"invalid option: {e}") from e


def _run_config(args) -> RunConfig:
    return RunConfig(
        tasks=_parse_task_access(args.task),
        method=args.method,
        views=args.views,
        folds=args.folds,
        cv_repeats=args.cv_repeats,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        batch_size=args.batch_size,
        plots=not args.no_plots,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        trust_checkpoints=args.trust_checkpoints,
        keep_going=args.keep_going,
        references=args.references == "auto" and not args.no_references,
        reference_budget=args.reference_budget,
        reference_models=args.reference_models,
        population=args.population,
        score_ranking=args.scores == "ranking",
        reference_views=args.reference_views,
        label_noise=_parse_noise_levels(args.label_noise),
        label_noise_draws=args.label_noise_draws,
        victims=tuple(args.victims) if args.victims else None,
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()  # the one source of defaults: every default below is read from it
    add_bundle_option(p)
    p.add_argument("--device", default=d.device, help=f"auto (cuda if available), cpu, cuda, cuda:N (default {d.device})")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="scoring arithmetic: auto = fp32 (on CUDA without TF32); bf16 = bf16 autocast with an "
                        "fp32 classifier head, faster on a GPU (on the CPU it emulates one); the reference "
                        f"models' logits follow it (default {d.precision})")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="score through torch.compile (worth it on a GPU for a whole bundle; the first batch of "
                        "each shape pays for compiling)")
    p.add_argument("--method", choices=("strong", "seed"), default=d.method,
                   help="strong: every candidate, chosen by cross-validation (default); seed: the seed's method")
    p.add_argument("--views", choices=("identity", "flip", "standard"), default=d.views,
                   help="query views per record (default: identity, flip and 8 shifts)")
    p.add_argument("--folds", type=int, default=d.folds, help=f"k of the k-fold cross-validation on eval (default {d.folds})")
    p.add_argument("--cv-repeats", type=int, default=d.cv_repeats,
                   help=f"independent k-fold splits of eval averaged, the same for every candidate (default {d.cv_repeats})")
    p.add_argument("--scores", choices=("ranking", "chosen"), default="ranking" if d.score_ranking else "chosen",
                   help="results/scores/: ranking (default) = in the order of the candidate with the best CV AUC, "
                        "giving the chosen predictions at the threshold in result.json; chosen = the chosen "
                        "candidate's own scores")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--task", action="append", metavar="K=ACCESS",
                   help="access level of task K: posterior or label (default 1=posterior 2=posterior 3=label)")
    add_victims_option(p)
    p.add_argument("--no-plots", action="store_true", help="do not write results/plots/*.png")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache (logits, validated records, figures)")
    add_cache_dir_option(p)
    add_trust_option(p)
    p.add_argument("--keep-going", action="store_true",
                   help="when a victim fails, finish the others and report the failures at the end")
    p.add_argument("--references", choices=("auto", "off"), default="auto" if d.references else "off",
                   help="auto (default): use the reference models under <bundle>/references/ (LiRA/RMIA candidates); "
                        "a victim without them gets them trained on CUDA within --reference-budget, and on a CPU "
                        "the run says what they would cost; off: ignore them")
    p.add_argument("--no-references", action="store_true", help="the same as --references off")
    p.add_argument("--reference-budget", type=float, default=d.reference_budget, metavar="SECONDS",
                   help="on CUDA, a victim without reference models gets as many as this much training allows (at "
                        f"least 1; 0 = never; default {d.reference_budget:g}); on a CPU the run says what 1 would cost")
    p.add_argument("--population", default=d.population, metavar="DIR",
                   help="records of the victims' distribution that are not their eval or test records (a .p file "
                        "or a folder of them): on CUDA a victim without reference models first gets one distilled "
                        "from its predicted labels on them (the strongest single reference, for every task), "
                        "within --reference-budget; on a CPU the run says what it would cost")
    p.add_argument("--reference-models", type=int, default=d.reference_models, metavar="K",
                   help="use at most the first K complete reference models of each victim, its distilled ones first "
                        "(default: all); measures "
                        "the attacks at a smaller budget without retraining")
    p.add_argument("--reference-views", choices=("identity", "flip", "standard"), default=d.reference_views,
                   help="views the reference models are queried on (default flip: the image and its flip; each "
                        "view costs one scoring pass per reference model)")
    p.add_argument("--label-noise", default=",".join(f"{x:g}" for x in d.label_noise) or "none", metavar="S1,S2,...",
                   help="task 3's noisy queries: Gaussian noise levels in units of the eval images' pixel standard "
                        f"deviation (default {','.join(f'{x:g}' for x in d.label_noise) or 'none'}); 'none' turns them off")
    p.add_argument("--label-noise-draws", type=int, default=d.label_noise_draws, metavar="N",
                   help=f"noisy copies of the image, and N of its flip, per noise level (default {d.label_noise_draws})")


def build_parser() -> argparse.ArgumentParser:
    prog = "mia" if Path(sys.argv[0]).name == "mia" else "python -m mia"  # the console script or -m
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="score, choose, predict: write results/*.npy, result.json and plots")
    _add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="compare the seed's method and ours on test with the bundle's answer key")
    _add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("inspect", help="what was understood of a bundle and what scoring it will cost; scores nothing")
    p.add_argument("path", type=Path, nargs="?", default=None, metavar="BUNDLE", help="the bundle (or --bundle)")
    _add_run_options(p)

    p = sub.add_parser("check", help="validate an existing submission against the bundle's test files")
    p.add_argument("bundle", type=Path, nargs="?", default=None)
    add_cache_dir_option(p)

    p = sub.add_parser("demo", help="build the Fashion-MNIST demo bundle (cached)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "demo")
    p.add_argument("--width", type=int, default=None, help="width of every victim (default: per-arch defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--source", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--tiny", action="store_true", help="a seconds-long toy build (tests, smoke checks)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date bundle exists")
    p.add_argument("--population", type=int, default=None, metavar="N",
                   help="also write N Fashion-MNIST records outside every split to <out>/population/ (for "
                        "`mia references --population`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    references_cli.add_parser(sub)
    return parser


def _cmd_demo(args) -> int:
    from mia.demo import DemoConfig, build_demo, write_population

    overrides = {"seed": args.seed, "device": args.device, "source": args.source}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = DemoConfig.tiny(args.out, **overrides) if args.tiny else DemoConfig(out=args.out, **overrides)
    if args.width is not None:
        cfg.widths = {a: args.width for a in cfg.archs}
    t0 = time.perf_counter()
    res = build_demo(cfg, force=args.force, progress=not args.quiet)
    state = "reused" if res.reused else f"built in {time.perf_counter() - t0:.0f}s"
    print(f"demo bundle at {res.path} ({state})")
    for v in res.victims:
        print(f"  {v.arch}: width {v.width}, train acc {100 * v.train_acc:.1f}%, held-out acc "
              f"{100 * v.holdout_acc:.1f}%, trained in {v.seconds:.0f}s")
    if args.population is not None:
        path = write_population(res.path, args.population, seed=args.seed, source=args.source)
        print(f"population: {args.population} records in {path}")
    return 0


def _run(args, *, write: bool):
    from mia import report
    from mia.pipeline import run

    config = _config_from_args(args)
    bundle = args.bundle if args.bundle is not None else default_bundle(progress=not args.quiet)
    print(f"bundle: {Path(bundle).resolve()}")
    result = run(bundle, config, progress=not args.quiet)
    if write:
        from mia.check import check_submission
        from mia.submission import write_run

        written = write_run(result)
        n_npy = sum(1 for k in written if k.endswith(".npy") and not k.startswith("scores/"))
        n_scores = sum(1 for k in written if k.startswith("scores/"))
        n_png = sum(1 for k in written if k.endswith(".png"))
        print(f"wrote {n_npy} prediction files, {n_scores} score files, {n_png} plots and result.json under "
              f"{result.bundle.root}")
        if result.victims:
            check_submission(result.bundle.root, tuple(t.task for t in config.tasks), set(result.victims),
                             cache=config.cache, cache_dir=config.cache_dir)
    print()
    print(report.summary_table(result))
    if any(d.answers is not None for d in result.victims.values()):
        print()
        print("On test, against the answer key (seed's method -> ours):")
        print(report.comparison_table(result))
        ref_table = report.reference_table(result)
        if ref_table is not None:
            print()
            print("Reference-model attacks on test (one global threshold each), beside the seed's and ours:")
            print(ref_table)
    print(f"\ntotal {result.seconds:.1f}s")
    if result.failures:
        print(f"\n{len(result.failures)} failure(s):", file=sys.stderr)
        for name, msg in result.failures.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args) -> int:
    from mia.inspection import inspect_bundle, total_line

    config = _config_from_args(args)
    root = args.path or args.bundle or default_bundle(build=False)
    print(f"bundle: {Path(root).resolve()}")
    summary = inspect_bundle(root, config, log=print)  # prints each victim as soon as it is loaded
    if summary.victims:
        print(total_line(summary))
    if summary.problems:
        print(f"\n{len(summary.problems)} problem(s):", file=sys.stderr)
        for problem in summary.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args) -> int:
    from mia.check import check_submission

    root = args.bundle if args.bundle is not None else default_bundle(build=False)
    rep = check_submission(root, cache_dir=args.cache_dir)
    for line in rep.ok:
        print(f"ok  {line}")
    print(f"submission at {Path(root).resolve()} is valid ({rep.n_predictions} prediction files, {rep.n_scores} "
          f"score files); {rep.n_verified} files match the sha256 in result.json")
    return 0


def _cache_warnings_on_one_line(show):
    """``warnings.showwarning`` that prints a CacheWarning as ``warning: ...`` (no source line), others as ``show``."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores warnings.showwarning on return
        if not args.debug:
            warnings.showwarning = _cache_warnings_on_one_line(warnings.showwarning)
        return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args) -> int:
    try:
        if args.command == "run":
            return _run(args, write=True)
        if args.command == "evaluate":
            return _run(args, write=False)
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "references":
            if args.bundle is None:
                args.bundle = default_bundle(progress=not args.quiet)
            return references_cli.run_cli(args)
    except MIAError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system error outside the writes that name their folder (a full disk, ...)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (": results/ and result.json hold the earlier submission, or this run's complete one"
                 if args.command == "run" else "")
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
