"""exp.ipynb: committed clean, and it runs top to bottom headless on a tiny bundle.

Parameters are injected the way papermill does it: a new cell right after the one tagged
``parameters`` overrides its names. The committed notebook is never edited.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mia.check import check_submission

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "exp.ipynb"


def _parameters_index(cells: list) -> int:
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def test_committed_notebook_has_no_outputs():
    doc = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in doc["cells"] if c["cell_type"] == "code"]
    assert code
    for i, cell in enumerate(code):
        assert cell.get("outputs", []) == [], f"code cell {i} has outputs"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"
    params = doc["cells"][_parameters_index(doc["cells"])]
    assert params["cell_type"] == "code"
    source = "".join(params["source"])
    for name in ("BUNDLE", "SHOW_PLOTS", "PROGRESS", "SAVE_PLOTS", "TASKS"):
        assert f"{name} = " in source, f"parameters cell does not define {name}"


@pytest.mark.slow
def test_notebook_runs_headless(tiny_bundle, copy_bundle, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = copy_bundle(tiny_bundle, tmp_path / "bundle")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = _parameters_index(nb.cells)
    # SAVE_PLOTS=False keeps the run short: test_cli covers writing the PNG files
    injected = nbformat.v4.new_code_cell(
        f"BUNDLE = {str(root)!r}\nSHOW_PLOTS = 'first'\nPROGRESS = False\nSAVE_PLOTS = False\n")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)

    # the kernel inherits the environment: one thread, and matplotlib's inline backend as in Jupyter
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as in CI: %matplotlib inline must still show figures
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()

    report = check_submission(root)
    assert (report.n_predictions, report.n_scores) == (9, 9)
    assert not (root / "results" / "plots").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 9  # SHOW_PLOTS='first': 3 figures for each of the first victim's 3 tasks
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"bundle: {root.resolve()}" in text
    assert "check passed for 9 prediction files and 9 score files" in text
