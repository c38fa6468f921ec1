"""``python -m mia``: exit codes, one-line errors, and what each command writes.

A few tests start the real command in a subprocess (the way users run it); the rest call
``mia.cli.main`` in this process, which runs the same code without paying for a torch import.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mia.check import check_submission
from mia.cli import _config_from_args, build_parser, main
from mia.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
VICTIMS = ["mobilenetv2_fashionmnist", "resnet34_fashionmnist", "vgg16_fashionmnist"]


def _mia(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m mia ARGS`` with this interpreter (the venv's) from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "mia", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(tiny_bundle, copy_bundle, tmp_path_factory):
    """A copy of the tiny bundle after ``python -m mia run --quiet --no-plots``: (root, process)."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("cli") / "bundle")
    return root, _mia("run", "--bundle", str(root), "--quiet", "--no-plots")


def _single_victim_bundle(src: Path, dst: Path, arch: str) -> Path:
    """A copy of ``src`` that keeps only the ``arch`` victim."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache", "results", "result.json"))
    for path in list(dst.rglob("*.p")) + list(dst.rglob("*.pth")) + list(dst.rglob("*.npy")):
        if arch not in path.name:
            path.unlink()
    return dst


def test_run_then_check(submitted):
    root, proc = submitted
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wrote 9 prediction files, 9 score files, 0 plots and result.json" in proc.stdout
    assert "seed's method -> ours" in proc.stdout  # the demo bundle has an answer key
    assert not (root / "results" / "plots").exists()

    check = _mia("check", str(root))
    assert check.returncode == 0, check.stderr
    assert "is valid (9 prediction files, 9 score files)" in check.stdout
    assert len([line for line in check.stdout.splitlines() if line.startswith("ok  ")]) == 18  # 9 predictions + 9 scores


def test_check_rejects_a_broken_submission(submitted, tmp_path, capsys):
    src, proc = submitted
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "bundle"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns(".cache"))
    np.save(root / "results" / "task3_vgg16_fashionmnist.npy", np.full(32, 0.5))
    assert main(["check", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: submission check failed")
    assert "task3_vgg16_fashionmnist.npy" in err and "dtype float64" in err


def test_check_with_an_unwritable_cache_says_so_once(submitted, tmp_path, capsys):
    root, proc = submitted
    assert proc.returncode == 0, proc.stderr
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")  # unwritable, even for root
    assert main(["check", str(root), "--cache-dir", str(blocker / "cache")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the cache cannot be written") == 1 and "Traceback" not in err, err


@pytest.mark.slow
def test_run_with_plots(tiny_bundle, tmp_path):
    root = _single_victim_bundle(tiny_bundle, tmp_path / "bundle", "vgg16")
    proc = _mia("run", "--bundle", str(root), "--quiet", "--method", "seed", "--views", "flip")
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in (root / "results" / "plots").glob("*.png"))
    assert pngs == sorted(f"vgg16_fashionmnist_{access}_{kind}.png" for access in ("posterior", "label")
                          for kind in ("accuracy_vs_threshold", "roc", "histogram"))
    for name in pngs:
        assert (root / "results" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = check_submission(root)
    assert (report.n_predictions, report.n_scores, len(report.ok)) == (3, 3, 6)


def test_evaluate_prints_the_comparison(tiny_bundle, copy_bundle, tmp_path, capsys):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    assert main(["evaluate", "--bundle", str(root), "--quiet", "--victims", "vgg16_fashionmnist"]) == 0
    out = capsys.readouterr().out
    assert "On test, against the answer key (seed's method -> ours):" in out
    assert "attack (seed -> ours)" in out and "test acc %" in out
    table = [line for line in out.splitlines() if line.startswith("| task")]
    assert {line.split("|")[1].strip() for line in table} >= {"task1", "task2", "task3"}
    assert not (root / "result.json").exists() and not (root / "results").exists()  # evaluate writes nothing


@pytest.mark.slow
def test_bad_bundle_is_one_line_and_exit_2(tmp_path):
    proc = _mia("run", "--bundle", str(tmp_path / "nowhere"), "--quiet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "nowhere" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    proc = _mia("--debug", "run", "--bundle", str(tmp_path / "nowhere"), "--quiet")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "BundleError" in proc.stderr


def test_bad_task_option_is_an_error(tmp_path, capsys):
    assert main(["run", "--bundle", str(tmp_path), "--task", "3=probabilities"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task expects K=ACCESS")


@pytest.mark.parametrize("option, message", [
    (["--folds", "1"], "error: invalid option: folds must be at least 2"),
    (["--cv-repeats", "0"], "error: invalid option: cv_repeats must be at least 1"),
    (["--label-noise-draws", "0"], "error: invalid option: label_noise_draws must be at least 1"),
    (["--label-noise", "0.1,x"], "error: --label-noise expects comma-separated positive numbers"),
    (["--label-noise", "0.1,-1"], "error: --label-noise levels must be positive"),
])
def test_bad_run_options_are_one_line_errors(tmp_path, capsys, option, message):
    assert main(["run", "--bundle", str(tmp_path), *option]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_label_noise_option_parsing():
    args = build_parser().parse_args(["run", "--label-noise", "none"])
    assert _config_from_args(args).label_noise == ()
    args = build_parser().parse_args(["run", "--label-noise", "0.2,0.3", "--label-noise-draws", "3"])
    config = _config_from_args(args)
    assert config.label_noise == (0.2, 0.3) and config.label_noise_draws == 3
    assert _config_from_args(build_parser().parse_args(["run"])).label_noise == RunConfig().label_noise


def test_demo_builds_then_reuses(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "built in" in first and "reused" not in first
    assert (out / "demo.json").is_file()
    assert sorted(p.name for p in (out / "models").glob("*.pth")) == sorted(f"{v}.pth" for v in VICTIMS)
    stamp = (out / "demo.json").stat().st_mtime_ns
    assert main(["demo", "--tiny", "--out", str(out), "--quiet"]) == 0
    second = capsys.readouterr().out
    assert "(reused)" in second
    assert (out / "demo.json").stat().st_mtime_ns == stamp


def test_run_one_victim_of_many(tiny_bundle, copy_bundle, tmp_path, capsys):
    root, cache = copy_bundle(tiny_bundle, tmp_path / "bundle"), tmp_path / "cache"
    code = main(["run", "--bundle", str(root), "--quiet", "--no-plots", "--method", "seed",
                 "--victims", "vgg16_fashionmnist", "--cache-dir", str(cache)])
    capsys.readouterr()
    assert sorted(p.name for p in (root / "results").glob("*.npy")) == [
        f"task{t}_vgg16_fashionmnist.npy" for t in (1, 2, 3)]
    assert code == 0
    # the cache went where --cache-dir said, nothing into the bundle; check reads through it too
    assert not (root / ".cache").exists()
    assert len(list((cache / "records").glob("*.npz"))) == 2 and len(list((cache / "logits").glob("*.npz"))) == 4
    assert "cache_dir" not in json.loads((root / "result.json").read_text())["config"]
    assert check_submission(root, victims={"vgg16_fashionmnist"}, cache_dir=cache).n_predictions == 3
    assert _config_from_args(build_parser().parse_args(["run", "--cache-dir", str(cache)])).cache_dir == str(cache)
    assert build_parser().parse_args(["check", "--cache-dir", str(cache)]).cache_dir == str(cache)


def test_run_options_default_to_run_config():
    from mia.cli import _config_from_args, build_parser
    from mia.config import RunConfig

    for command in ("run", "evaluate", "inspect"):
        assert _config_from_args(build_parser().parse_args([command])) == RunConfig()


def test_references_option():
    from mia.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    assert _config_from_args(parse(["run", "--references", "auto"])).references
    assert not _config_from_args(parse(["run", "--references", "off"])).references
    assert not _config_from_args(parse(["run", "--no-references"])).references
    assert _config_from_args(parse(["run", "--reference-budget", "60"])).reference_budget == 60.0
