"""End to end: ``mia.pipeline.run`` + ``mia.submission.write_run`` on the demo bundle, cold and warm.

The bundle's inputs (models/, datasets/, answers/) are copied into a temporary folder, and the runs
keep their cache in a folder of their own beside it (``--cache-dir``), so they never touch the source
bundle's results or the user's cache. Then, ``repeat`` times:

* cold: no cache (that cache folder is deleted), so every file is unpickled and every victim scored;
* warm: the same run again, its validated records and logits read from the cache the cold run wrote;

each with plots off, followed by the write step (predictions + result.json). With ``subprocess``
the same two runs are also made as a user makes them, ``python -m mia run --no-plots --quiet``,
then twice more with plots (the first draws every figure, the second finds them in the figure
cache: what re-running ``make run`` costs), each in a new process (interpreter start and imports
included), reporting its wall time, CPU time and peak
memory (the child's VmHWM, i.e. its own peak RSS, and ``ru_maxrss``, which Linux carries over from
the parent across fork + exec; ``torch.cuda.max_memory_allocated`` on CUDA). A child that only
imports what ``mia run`` imports shows the fixed start-up cost.

Bundle: ``bundle`` when given; else the demo bundle (``mia.paths.default_bundle``) when it is built;
else, or with ``tiny``, a tiny demo bundle built in a temporary folder (``DemoConfig.tiny``).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import BenchResult, Check, fmt, markdown_table, median, timed_cpu
from mia.paths import REPO_ROOT, default_bundle, is_challenge_bundle
from mia.config import RunConfig
from mia.pipeline import run as run_pipeline
from mia.submission import write_run

BUNDLE_PARTS = ("models", "datasets", "answers")  # what a run reads; everything else stays behind
WARM_TARGET_S = 5.0
_MARK = "@@bench-child@@"

# Peak memory of the calling process in KiB. ru_maxrss alone would not do: Linux keeps it across
# fork + exec, so a child started from a big parent reports the parent's size; VmHWM belongs to the
# child's own address space. Both are reported.
_PEAK = (
    "def _peak():\n"
    "    import resource\n"
    "    hwm = None\n"
    "    try:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('VmHWM:'):\n"
    "                hwm = int(line.split()[1])\n"
    "    except OSError:\n"
    "        pass\n"
    "    return {'vmhwm_kib': hwm, 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n"
)
# Run in a child process: the CLI exactly as a user calls it, then its own peak memory.
CHILD_SCRIPT = _PEAK + f"""
import contextlib, io, json, sys
from mia.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
cuda = None
if "torch" in sys.modules:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.max_memory_allocated() / 2**20
print("{_MARK}" + json.dumps({{"rc": rc, **_peak(), "cuda_max_memory_mib": cuda}}))
"""
# What `python -m mia run` imports before it does any work (mia.plots: write_run imports it).
IMPORTS_SCRIPT = _PEAK + (
    "import json; import mia.cli, mia.pipeline, mia.submission, mia.report, mia.plots\n"
    f"print('{_MARK}' + json.dumps({{'rc': 0, **_peak()}}))\n"
)


@dataclass
class EndToEndConfig:
    """What to run end to end."""

    bundle: Path | None = None  # None: the demo bundle if built, else a tiny one
    tiny: bool = False  # build and use a tiny demo bundle in a temporary folder
    device: str = "auto"  # RunConfig.device
    repeat: int = 1  # cold + warm pairs in this process
    subprocess: bool = True  # also time `python -m mia run` cold and warm in child processes
    workdir: Path | None = None  # parent of the temporary folder (None: the system's)
    extra: dict = field(default_factory=dict)  # RunConfig overrides, e.g. {"views": "identity"}


def resolve_bundle(cfg: EndToEndConfig, tmp: Path, log=print) -> tuple[Path, str]:
    """(bundle folder to copy from, description)."""
    if cfg.bundle is not None and not cfg.tiny:
        return Path(cfg.bundle).resolve(), f"bundle {cfg.bundle}"
    if not cfg.tiny:
        demo = default_bundle(build=False)
        if is_challenge_bundle(demo):
            return demo, f"the demo bundle {demo}"
        log(f"e2e: no demo bundle at {demo} (build it with `python -m mia demo`); using a tiny one")
    from mia.demo import DemoConfig, build_demo

    built = build_demo(DemoConfig.tiny(tmp / "tiny-demo"), progress=False)
    return built.path, "a tiny demo bundle (DemoConfig.tiny)" + ("" if cfg.tiny else ": the demo bundle is not built")


def copy_inputs(src: Path, dst: Path) -> Path:
    """Copy a bundle's models/, datasets/ and answers/ (not its cache or results) into ``dst``."""
    dst.mkdir(parents=True)
    for part in BUNDLE_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _clear_outputs(bundle: Path, cache_dir: Path | None = None) -> None:
    """Remove a run's results (and the cache folder ``cache_dir`` when given)."""
    shutil.rmtree(bundle / "results", ignore_errors=True)
    (bundle / "result.json").unlink(missing_ok=True)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _in_process(bundle: Path, config: RunConfig, *, cold: bool) -> dict:
    _clear_outputs(bundle, Path(config.cache_dir) if cold else None)
    run_wall, run_cpu, result = timed_cpu(lambda: run_pipeline(bundle, config, progress=False, log=lambda *_: None))
    write_wall, write_cpu, written = timed_cpu(lambda: write_run(result))
    hits = sum(d.cache_hits for d in result.victims.values())
    if result.failures:
        raise RuntimeError(f"end-to-end run failed: {result.failures}")
    if not cold and hits != 2 * len(result.victims):
        raise RuntimeError(f"warm run read {hits} of {2 * len(result.victims)} logit arrays from the cache")
    score = sum(d.seconds for d in result.victims.values())
    return {
        "run_seconds": run_wall, "run_cpu_seconds": run_cpu, "load_score_seconds": score,
        "attack_seconds": run_wall - score, "write_seconds": write_wall, "write_cpu_seconds": write_cpu,
        "total_seconds": run_wall + write_wall, "cache_hits": hits, "victims": len(result.victims),
        "files_written": len(written),
    }


def _child(args: list[str]) -> dict:
    """Run ``python`` with ``args`` from the repository root; wall, CPU and its self-reported memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    wall, _, proc = timed_cpu(lambda: subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env,
                                                     capture_output=True, text=True))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len(_MARK):])
    if report["rc"] != 0:
        raise RuntimeError(f"`mia run` in a child exited with {report['rc']}:\n{proc.stderr[-3000:]}")
    return {
        "seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mib": (report["vmhwm_kib"] or report["maxrss_kib"]) / 1024,  # VmHWM where Linux has it
        "ru_maxrss_mib": report["maxrss_kib"] / 1024,
        "cuda_max_memory_mib": report.get("cuda_max_memory_mib"),
    }


def run(config: EndToEndConfig | None = None, log=print) -> BenchResult:
    """Cold / warm runs in this process and (optionally) in child processes; see the module docstring."""
    cfg = config or EndToEndConfig()
    tmp = Path(tempfile.mkdtemp(prefix="mia-bench-e2e-", dir=cfg.workdir))
    cache = tmp / "cache"
    # no reference training (a run on CUDA would otherwise spend up to its budget per victim training them):
    # the benchmark times loading, scoring, attacks and writing
    extra = {"reference_budget": 0.0, **cfg.extra}
    run_config = RunConfig(plots=False, device=cfg.device, cache_dir=str(cache), **extra)
    try:
        src, described = resolve_bundle(cfg, tmp, log)
        bundle = copy_inputs(src, tmp / "bundle")
        rows = []
        for r in range(max(1, cfg.repeat)):
            for cold in (True, False):
                log(f"e2e: {'cold' if cold else 'warm'} run {r + 1}/{cfg.repeat} in this process")
                rows.append({"mode": "cold" if cold else "warm", "where": "in-process", "repetition": r,
                             **_in_process(bundle, run_config, cold=cold)})
        children = []
        if cfg.subprocess:
            cli = ["-c", CHILD_SCRIPT, "run", "--bundle", str(bundle), "--no-plots", "--quiet", "--device", cfg.device,
                   "--cache-dir", str(cache)]
            cli += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
            with_plots = [a for a in cli if a != "--no-plots"]
            log("e2e: `python -m mia run` in a child process: imports only, cold, warm; warm with plots twice")
            children.append({"mode": "imports only", **_child(["-c", IMPORTS_SCRIPT])})
            _clear_outputs(bundle, cache)
            children.append({"mode": "cold", **_child(cli)})
            children.append({"mode": "warm", **_child(cli)})
            children.append({"mode": "warm, plots drawn", **_child(with_plots)})  # the figure cache is empty
            children.append({"mode": "warm, plots cached", **_child(with_plots)})  # `make run` run again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(cfg, described, rows, children)


def _report(cfg: EndToEndConfig, described: str, rows: list[dict], children: list[dict]) -> BenchResult:
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("cold", "warm")}
    med = {m: {k: median([r[k] for r in rs]) for k in rs[0] if isinstance(rs[0][k], float)} for m, rs in by_mode.items()}
    n_victims = rows[0]["victims"]
    table_rows = [
        [f"{m} (in process, median of {len(by_mode[m])})", fmt(med[m]["total_seconds"]), fmt(med[m]["run_seconds"]),
         fmt(med[m]["load_score_seconds"]), fmt(med[m]["attack_seconds"]), fmt(med[m]["write_seconds"]),
         fmt(med[m]["run_cpu_seconds"] + med[m]["write_cpu_seconds"]), "", ""]
        for m in ("cold", "warm")
    ]
    cuda = any(c.get("cuda_max_memory_mib") is not None for c in children)
    for c in children:
        table_rows.append([f"{c['mode']} (`python -m mia run`, new process)" if c["mode"] != "imports only"
                           else "imports only (new process)", fmt(c["seconds"]), "", "", "", "",
                           fmt(c["cpu_seconds"]), fmt(c["peak_rss_mib"]),
                           fmt(c["cuda_max_memory_mib"]) if cuda else ""])
    headers = ["run", "total s", "`run` s", "load + score s", "attacks s", "write s", "CPU s", "peak RSS MiB",
               "peak GPU MiB" if cuda else ""]
    if not cuda:
        headers, table_rows = headers[:-1], [row[:-1] for row in table_rows]
    table = (f"### End to end on {described} ({n_victims} victims, device {cfg.device}; plots off unless "
             "the row says otherwise)\n\n"
             + markdown_table(headers, table_rows))
    warm_child = [c for c in children if c["mode"] == "warm, plots cached"]
    if cfg.tiny or described.startswith("a tiny"):
        check = Check(f"warm re-run of the demo under {WARM_TARGET_S:g} s on 2 CPU cores",
                      "not measured: tiny bundle (build the demo bundle with `python -m mia demo`)", None)
    else:
        warm_s = warm_child[0]["seconds"] if warm_child else med["warm"]["total_seconds"]
        how = ("`python -m mia run` with plots, in a new process" if warm_child
               else "in process, run + write, no plots")
        check = Check(f"warm re-run of the demo under {WARM_TARGET_S:g} s on 2 CPU cores",
                      f"{warm_s:.2f} s ({how}; {os.cpu_count()} cores)", warm_s < WARM_TARGET_S)
    notes = ["CPU s = this process's (or the child's) user + system time over all threads; on a shared machine "
             "wall time also includes waiting for a core."]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings["bundle_used"] = described
    return BenchResult("e2e", rows + [{"where": "child", **c} for c in children], [table], [check], notes,
                       settings=settings)
