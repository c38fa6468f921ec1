"""Writing a submission safely: only inside the bundle, all at once, with one-line errors, and a check
that catches a submission mixing runs (mia.submission.write_run, mia.io.publish, check_submission).

Two runs of the tiny bundle are scored once per module (the seed's method on every victim, the strong
method on one); each test writes them into its own copy of the bundle. Figures are replaced by small
files named and filled from the figure's titles: drawing is not what is tested here.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mia import plots
from mia.bundle import discover, select_victims
from mia.check import check_submission
from mia.cli import main
from mia.config import RunConfig
from mia.errors import BundleError, SubmissionError
from mia.io import publish
from mia.io.atomic import atomic_write_bytes
from mia.io.cache import CACHE_DIR_ENV
from mia.pipeline import run
from mia.submission import write_run

VICTIMS = ["mobilenetv2_fashionmnist", "resnet34_fashionmnist", "vgg16_fashionmnist"]


def _quiet(*_args) -> None:
    pass


def _small_figure(fig, path, dpi=110):
    """A figure as a few bytes made of its titles (they differ when the chosen attack differs)."""
    return atomic_write_bytes(path, "|".join(ax.get_title() for ax in fig.axes).encode())


@pytest.fixture(autouse=True)
def _small_figures(monkeypatch):
    monkeypatch.setattr(plots, "save_figure", _small_figure)


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """This module's own cache: figures here are drawn small (``_small_figure``), and a real figure another
    test left in the session's cache under the same key would make a redrawn one differ from it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("safety-cache")))
        yield


@pytest.fixture(scope="module")
def runs(tiny_bundle, copy_bundle, tmp_path_factory):
    """``old``: the seed's method on every victim; ``new``: the strong method on vgg16_fashionmnist only."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("safety") / "bundle")
    old = run(root, RunConfig(method="seed"), progress=False, log=_quiet)
    new = run(root, RunConfig(victims=("vgg16_fashionmnist",)), progress=False, log=_quiet)
    return SimpleNamespace(root=root, old=old, new=new)


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle made of hard links (nothing is ever written into a file in place), without
    the logits cache."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("logits"))
    return dst


def _at(result, root: Path):
    """The RunResult, to be written into the bundle at ``root``."""
    return dataclasses.replace(result, bundle=dataclasses.replace(result.bundle, root=root))


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file of the submission (result.json, all of results/) by path relative to the bundle."""
    files = [root / "result.json"] + sorted(p for p in (root / "results").rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".results-staging-", ".results-old-")))


@pytest.fixture(scope="module")
def submitted(runs, tmp_path_factory):
    """Bundles holding the old submission (``base``) and the new one written over it (``expected``)."""
    base = _copy(runs.root, tmp_path_factory.mktemp("base") / "bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save_figure", _small_figure)
        write_run(_at(runs.old, base))
        after = _copy(base, tmp_path_factory.mktemp("after") / "bundle")
        write_run(_at(runs.new, after))
    # the new figures are in the (session's) cache now, so every later copy of base writes the same bytes
    return SimpleNamespace(base=base, old=_outputs(base), after=after, new=_outputs(after))


# ---------------------------------------------------------------------------------------------
# All at once or not at all


def test_subset_run_keeps_the_other_victims_files_and_vouches_for_them(submitted):
    old, new = submitted.old, submitted.new
    doc = json.loads(new["result.json"])
    assert sorted(doc["victims"]) == ["vgg16_fashionmnist"]
    kept = {rel for rel in old if rel != "result.json" and "vgg16" not in rel}
    assert len(kept) == 2 * (3 + 3 + 6)  # two victims: 3 predictions, 3 scores, 6 figures each
    assert all(new[rel] == old[rel] for rel in kept)
    assert set(doc["files"]) == set(new) - {"result.json"}  # every file, the kept ones included
    assert any(new[rel] != old[rel] for rel in new if "vgg16" in rel)
    check_submission(submitted.after)
    check_submission(submitted.base)


def test_two_identical_writes_are_identical_bytes(runs, submitted, tmp_path):
    root = _copy(submitted.after, tmp_path / "bundle")
    write_run(_at(runs.new, root))
    assert _outputs(root) == submitted.new  # result.json (with its sha256 map) included
    assert _leftovers(root) == []


class _Faults:
    """Wraps the file system calls a write makes; call number ``at`` (0-based) and, when ``persist``,
    every later one raises ``error``: a crash there (nothing after it runs), or a one-off failure."""

    CALLS = ("replace", "rename", "link", "fsync", "mkdir", "rmdir", "unlink")

    def __init__(self, at: int | None, error: BaseException, persist: bool):
        self.at, self.error, self.persist, self.calls = at, error, persist, 0
        self._fsync = os.fsync

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in self.CALLS:
            mp.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            n, self.calls = self.calls, self.calls + 1
            if self.at is not None and (n == self.at or (self.persist and n > self.at)):
                raise self.error
            return None if fn is self._fsync else fn(*args, **kwargs)  # a step, but no waiting for the disk
        return call


@pytest.mark.parametrize("error, persist", [
    (KeyboardInterrupt(), True),  # killed at that step: nothing of the write runs afterwards
    (OSError(errno.ENOSPC, "No space left on device"), False),  # one failed call: the write cleans up itself
], ids=["killed", "enospc"])
def test_an_interrupted_write_leaves_the_old_or_the_new_submission(runs, submitted, tmp_path, error, persist):
    seen = {"old": 0, "new": 0}
    for at in range(10_000):
        root = _copy(submitted.base, tmp_path / f"n{at}" / "bundle")
        faults = _Faults(at, error, persist)
        completed = False
        with pytest.MonkeyPatch.context() as mp:
            faults.install(mp)
            try:
                write_run(_at(runs.new, root))
                completed = True
            except (KeyboardInterrupt, SubmissionError):
                pass
        publish.recover(root)  # what the next write does first
        state = _outputs(root)
        assert state in (submitted.old, submitted.new), f"a mix after a failure at file system call {at}"
        seen["old" if state == submitted.old else "new"] += 1
        assert _leftovers(root) == []
        check_submission(root)
        shutil.rmtree(root.parent)
        if completed:  # a failed call the write could do without (a folder's fsync): the new submission
            assert state == submitted.new
        if faults.calls <= at:  # the write made fewer calls than ``at``: no failure was injected
            break
    assert seen["old"] > 10 and seen["new"] > 10, seen


def test_check_reports_an_interrupted_swap(submitted, tmp_path):
    root = _copy(submitted.after, tmp_path / "bundle")
    shutil.copyfile(root / "result.json", root / "results" / publish.PENDING)
    with pytest.raises(SubmissionError, match="a write was interrupted"):
        check_submission(root)
    publish.recover(root)
    check_submission(root)
    os.rename(root / "results", root / ".results-old-x")
    with pytest.raises(SubmissionError, match="a write was interrupted"):
        check_submission(root)
    assert publish.recover(root) and _outputs(root) == submitted.new


def test_a_second_writer_is_refused(runs, submitted, tmp_path):
    root = _copy(submitted.base, tmp_path / "bundle")
    with publish.lock(root):
        with pytest.raises(SubmissionError, match="another process is writing"):
            write_run(_at(runs.new, root))
    assert _outputs(root) == submitted.old


# ---------------------------------------------------------------------------------------------
# The check sees a submission that mixes runs


def test_check_reports_each_mixed_or_edited_file_once(submitted, tmp_path):
    root = _copy(submitted.after, tmp_path / "bundle")
    mixed = "results/task1_vgg16_fashionmnist.npy"  # the old run's predictions beside the new result.json
    (root / mixed).unlink()
    (root / mixed).write_bytes(submitted.old[mixed])
    edited = "results/plots/resnet34_fashionmnist_label_roc.png"
    (root / edited).unlink()
    (root / edited).write_bytes(b"edited")
    stray = "results/scores/task2_resnet34_fashionmnist.npy"  # one file result.json does not list
    doc = json.loads((root / "result.json").read_text())
    del doc["files"][stray]
    (root / "result.json").unlink()
    (root / "result.json").write_text(json.dumps(doc))
    with pytest.raises(SubmissionError) as err:
        check_submission(root)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3, lines
    assert sum(mixed in line and "sha256 differs" in line for line in lines) == 1
    assert sum(edited in line and "sha256 differs" in line for line in lines) == 1
    assert sum(stray in line and "not listed" in line for line in lines) == 1


# ---------------------------------------------------------------------------------------------
# Only real folders inside the bundle


@pytest.mark.parametrize("link", ["results", "results/plots", "results/scores", "result.json"])
def test_links_to_outside_the_bundle_are_refused(runs, submitted, tmp_path, link):
    root = _copy(submitted.base, tmp_path / "bundle")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not yours")
    target = root / link
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(outside / "keep.txt" if link == "result.json" else outside)
    before = _outputs(root) if link != "results" else None
    with pytest.raises(SubmissionError, match=f"{link}: .*symbolic link") as err:
        write_run(_at(runs.new, root))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "not yours"
    assert target.is_symlink() and _leftovers(root) == []
    if before is not None:
        assert _outputs(root) == before
    with pytest.raises(SubmissionError, match="symbolic link"):
        check_submission(root)


def test_a_link_named_like_a_leftover_is_never_followed(submitted, tmp_path):
    root = _copy(submitted.base, tmp_path / "bundle")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not yours")
    (root / ".results-old-x").symlink_to(outside)
    with pytest.raises(SubmissionError, match=r"\.results-old-x: not a folder this program made"):
        publish.recover(root)
    assert (outside / "keep.txt").read_text() == "not yours"


# ---------------------------------------------------------------------------------------------
# Folders that cannot be written: one line, no traceback


@pytest.fixture
def cli_run(runs, monkeypatch):
    """``mia run`` on a bundle with the pipeline replaced by the module's new RunResult at that bundle."""
    import mia.pipeline

    def run_cli(root: Path, capsys) -> tuple[int, str]:
        monkeypatch.setattr(mia.pipeline, "run", lambda *a, **k: _at(runs.new, root))
        code = main(["run", "--bundle", str(root), "--quiet"])
        return code, capsys.readouterr().err
    return run_cli


@pytest.mark.parametrize("read_only", ["", "results", "results/plots"])
def test_a_read_only_folder_is_a_one_line_error(submitted, tmp_path, monkeypatch, capsys, cli_run, read_only):
    root = _copy(submitted.base, tmp_path / "bundle")
    folder = os.path.normpath(root / read_only)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.normpath(p) == folder and mode == os.W_OK
                        else access(p, mode, **kw))
    code, err = cli_run(root, capsys)
    assert code == 2
    assert err.startswith(f"error: {folder}: read-only folder") and err.count("\n") == 1 and "Traceback" not in err
    assert _outputs(root) == submitted.old


def test_a_permission_error_while_writing_is_a_one_line_error(submitted, tmp_path, monkeypatch, capsys, cli_run):
    root = _copy(submitted.base, tmp_path / "bundle")
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if Path(path).parent == root:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", refuse)
    code, err = cli_run(root, capsys)
    assert code == 2
    assert err.startswith(f"error: {root}: cannot write the submission: Permission denied") and err.count("\n") == 1
    assert _outputs(root) == submitted.old


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not bind root")
def test_a_really_read_only_results_folder(submitted, tmp_path, capsys, cli_run):
    root = _copy(submitted.base, tmp_path / "bundle")
    (root / "results").chmod(0o555)
    try:
        code, err = cli_run(root, capsys)
    finally:
        (root / "results").chmod(0o755)
    assert code == 2 and "read-only folder" in err and "Traceback" not in err
    assert _outputs(root) == submitted.old


# ---------------------------------------------------------------------------------------------
# Victims matched by exact names


def test_victim_names_are_exact_and_globs_expanded_once(tiny_bundle):
    names = ["resnet34_fmnist", "resnet34_fmnist_x", "vgg16_fmnist"]
    assert select_victims(names, ["resnet34_fmnist"]) == ["resnet34_fmnist"]
    assert select_victims(names, ["resnet34_*"]) == ["resnet34_fmnist", "resnet34_fmnist_x"]
    assert select_victims(names, ["vgg16_fmnist", "resnet34_fmnist_?"]) == ["resnet34_fmnist_x", "vgg16_fmnist"]
    with pytest.raises(BundleError, match=r"no victim named or matching wrn_\*, resnet34 \(found: "):
        select_victims(names, ["wrn_*", "resnet34", "vgg16_*"])
    assert [v.name for v in discover(tiny_bundle, victims=["resnet34_*"]).victims] == ["resnet34_fashionmnist"]


def _with_prefix_twin(runs, root: Path):
    """A RunResult for ``root`` with a fourth victim ``resnet34_fashionmnist_x``: a copy of resnet34_fashionmnist
    whose name starts with the other's (its files copied to the bundle so that the check finds them)."""
    shutil.copyfile(root / "models" / "resnet34_fashionmnist.pth", root / "models" / "resnet34_fashionmnist_x.pth")
    for split in ("eval", "test"):
        shutil.copyfile(root / "datasets" / split / "fashionmnist_resnet34.p",
                        root / "datasets" / split / "fashionmnist_x_resnet34.p")
    result = _at(runs.old, root)
    data = result.victims["resnet34_fashionmnist"]
    twin_victim = dataclasses.replace(data.victim, dataset="fashionmnist_x")
    twin = [dataclasses.replace(o, victim=twin_victim.name) for o in result.outcomes if o.victim == data.victim.name]
    bundle = dataclasses.replace(result.bundle, victims=[*result.bundle.victims, twin_victim])
    return dataclasses.replace(result, bundle=bundle, outcomes=[*result.outcomes, *twin],
                               victims={**result.victims, twin_victim.name: dataclasses.replace(data, victim=twin_victim)})


def test_a_failed_victim_loses_only_its_own_files(runs, submitted, tmp_path):
    root = _copy(submitted.base, tmp_path / "bundle")
    full = _with_prefix_twin(runs, root)
    write_run(full)
    before = _outputs(root)
    twin_files = {rel for rel in before if "resnet34_fashionmnist_x" in rel}
    assert len(twin_files) == 3 + 3 + 6

    # --keep-going with --victims 'resnet34_*': resnet34_fashionmnist fails, its twin is written again
    failed = dataclasses.replace(
        full, outcomes=[o for o in full.outcomes if o.victim == "resnet34_fashionmnist_x"],
        victims={"resnet34_fashionmnist_x": full.victims["resnet34_fashionmnist_x"]},
        failures={"resnet34_fashionmnist": "unreadable eval file"},
        bundle=dataclasses.replace(full.bundle, victims=[v for v in full.bundle.victims if v.arch == "resnet34"]))
    written = write_run(failed)
    after = _outputs(root)
    own = {rel for rel in before if "resnet34_fashionmnist" in rel and rel not in twin_files}
    assert len(own) == 12 and not own & set(after)  # the failed victim's predictions, scores and figures
    assert twin_files <= set(after)
    plots_now = {rel for rel in after if rel.startswith("results/plots/")}
    assert {f"results/{rel}" for rel in written if rel.startswith("plots/")} == {r for r in plots_now if "_x_" in r}
    others = {rel for rel in before if rel.startswith("results/") and "resnet34" not in rel}
    assert all(after[rel] == before[rel] for rel in others)  # mobilenetv2 and vgg16: kept as they were
    assert set(after) == others | twin_files | {"result.json"}
    assert json.loads(after["result.json"])["failures"] == {"resnet34_fashionmnist": "unreadable eval file"}
    check_submission(root, victims={"resnet34_fashionmnist_x", "vgg16_fashionmnist", "mobilenetv2_fashionmnist"})


def test_a_victims_pattern_that_matches_nothing_is_a_one_line_error(tiny_bundle, copy_bundle, tmp_path, capsys):
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")
    code = main(["run", "--bundle", str(root), "--quiet", "--keep-going", "--victims", "resnet34_*", "wrn*"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "no victim named or matching wrn*" in err and "resnet34_fashionmnist" in err
    assert not (root / "results").exists() and not (root / "result.json").exists()
