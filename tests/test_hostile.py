"""The hostile corpus (tests/hostile/corpus.py) against the loader and against a whole run.

Every case must be refused with one line naming the file, before anything in it runs, within a
memory bound far below what it asks for; a run on a bundle holding one must leave the earlier
submission byte for byte as it was.
"""
from __future__ import annotations

import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
from hostile.corpus import Case, cases

from mia.cli import main
from mia.errors import DataError, UnsafePickleError
from mia.io.records import load_records

_CASES = cases(Path("marker"))
# the large cases take seconds each in the pure-Python unpickler under tracemalloc: CI runs them, not the quick loop
_PARAMS = [pytest.param(c.name, id=c.name, marks=[pytest.mark.slow] if len(c.data) > 100_000 else [])
           for c in _CASES]
PEAK_BOUND = 64 << 20  # bytes traced while loading any case; the bombs ask for 2 GiB to 1 TiB


def _case(name: str, marker: Path) -> Case:
    return next(c for c in cases(marker) if c.name == name)


def test_the_corpus_covers_every_family() -> None:
    families = {c.family for c in _CASES}
    assert families == {"reduce", "reduce_ex", "copyreg", "INST/OBJ/NEWOBJ", "STACK_GLOBAL",
                        "partial/attrgetter/getattr", "numpy rebuild", "torch rebuild", "nested torch blob",
                        "declared-length bomb", "depth bomb", "shared-reference bomb", "hash-collision bomb"}
    assert len(_CASES) >= 60 and sum(c.live for c in _CASES) >= 10


@pytest.mark.parametrize("name", [c.name for c in _CASES if c.live])
def test_live_cases_run_under_plain_pickle(tmp_path: Path, name: str) -> None:
    # Guards the refusals below against payloads that would never have run anyway.
    marker = tmp_path / "marker"
    try:
        pickle.loads(_case(name, marker).data)
    except Exception:
        pass  # most fail after running: what counts is the side effect
    assert marker.exists()


@pytest.mark.parametrize("name", _PARAMS)
def test_case_is_refused_before_anything_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    case = _case(name, marker)
    path = tmp_path / "cifar10_resnet34.p"
    path.write_bytes(case.data)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as excinfo:
            load_records(path, with_membership=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = excinfo.value
    assert isinstance(err, UnsafePickleError) == case.unsafe, str(err)
    message = str(err)
    assert "\n" not in message and message.startswith(f"{path}: ") and err.path == path
    assert not marker.exists()
    assert peak < PEAK_BOUND, f"{peak / 2**20:.0f} MiB traced"


@pytest.fixture(scope="module")
def submitted(tiny_bundle, copy_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle with a submission of a first run."""
    root = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("hostile") / "bundle")
    assert main(["run", "--bundle", str(root), "--quiet", "--no-plots"]) == 0
    return root


def _outputs(root: Path) -> dict[str, bytes]:
    files = [root / "result.json", *sorted((root / "results").rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


# One case per family (the loader test above covers them all): a run stops at the hostile file.
_RUN_CASES = sorted({c.family: c.name for c in _CASES if len(c.data) < 300_000}.values())


@pytest.mark.parametrize("name", _RUN_CASES)
def test_a_run_on_a_hostile_file_leaves_the_submission_as_it_was(submitted, tmp_path: Path, capsys,
                                                                 name: str) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(submitted, root)
    before = _outputs(root)
    marker = tmp_path / "marker"
    target = root / "datasets" / "eval" / "fashionmnist_mobilenetv2.p"
    target.write_bytes(_case(name, marker).data)
    assert main(["run", "--bundle", str(root), "--quiet", "--no-plots"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(target) in err
    assert not marker.exists()
    assert _outputs(root) == before
