"""A bundle written in a challenge organiser's style (tests/foreign.py): inspected, run and checked end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from foreign import build_foreign_bundle
from mia.cli import main

pytestmark = pytest.mark.slow  # trains nothing, but scores three models end to end


@pytest.fixture(scope="module")
def foreign_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign") / "bundle"
    build_foreign_bundle(root, n=24)
    return root


def test_inspect_shows_what_was_understood(foreign_bundle, capsys):
    assert main(["inspect", str(foreign_bundle), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_toy: torchvision.models.mobilenet_v2 (torchvision)" in out
    assert "resnet34_toy: resnet_34 (bundle models/resnet34.py)" in out
    assert "wrn10_2_toy: WideResNet (bundle models/wrn10_2.py)" in out
    assert "eval 24 records (12 members), test 24" in out and "labels " in out and "of 10 classes" in out
    # 48 records x (10 views + 32 noisy queries)
    assert out.count("planned: 2,016 forward passes (10 views + 32 noisy queries per record)") == 3
    assert "MFLOPs per 32x32 image" in out and "total: about" in out


def test_run_and_check_with_no_option(foreign_bundle, capsys):
    assert main(["run", "--bundle", str(foreign_bundle), "--quiet", "--no-plots"]) == 0
    assert main(["check", str(foreign_bundle)]) == 0
    doc = json.loads((foreign_bundle / "result.json").read_text())
    victims = doc["victims"]
    assert victims["mobilenetv2_toy"]["architecture_file"] == "torchvision.models.mobilenet_v2"
    assert victims["resnet34_toy"]["builder"] == "resnet_34" and victims["resnet34_toy"]["width"] is None
    assert victims["wrn10_2_toy"]["architecture_file"] == "models/wrn10_2.py"
    for name in victims:
        for k in (1, 2, 3):
            pred = np.load(foreign_bundle / "results" / f"task{k}_{name}.npy")
            assert pred.shape == (24,) and set(np.unique(pred)) <= {0, 1}


def test_a_victim_nothing_builds_is_a_problem_and_a_nonzero_exit(foreign_bundle, tmp_path, capsys):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(foreign_bundle, root, ignore=shutil.ignore_patterns("results", ".cache", "result.json"))
    (root / "models" / "wrn10_2.py").unlink()
    assert main(["inspect", str(root), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "wrn10_2_toy" in err and "no builder makes a model" in err
    assert "resnet_34 (bundle resnet34.py): its classifier 'fc.weight' is not in the checkpoint" in err


def test_a_fifo_is_never_opened(foreign_bundle, tmp_path):
    import os
    import shutil

    from mia.bundle import discover
    from mia.errors import BundleError

    root = tmp_path / "b"
    shutil.copytree(foreign_bundle, root, ignore=shutil.ignore_patterns("results", ".cache", "result.json"))
    os.mkfifo(root / "models" / "vgg16_toy.pth")  # would hang torch.load forever
    os.mkfifo(root / "datasets" / "test" / "toy_vgg16.p")
    with pytest.raises(BundleError, match=r"models/vgg16_toy.pth: not a regular file"):
        discover(root)
    bundle = discover(root, strict=False)
    assert sorted(v.name for v in bundle.victims) == ["mobilenetv2_toy", "resnet34_toy", "wrn10_2_toy"]
    assert any("datasets/test/toy_vgg16.p: not a regular file" in p for p in bundle.problems)


def test_nan_weights_are_a_per_victim_error(foreign_bundle, tmp_path, capsys):
    import shutil

    import torch

    root = tmp_path / "b"
    shutil.copytree(foreign_bundle, root, ignore=shutil.ignore_patterns("results", ".cache", "result.json"))
    ckpt = root / "models" / "wrn10_2_toy.pth"
    obj = torch.load(ckpt, weights_only=True)
    obj["state_dict"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    torch.save(obj, ckpt)
    assert main(["run", "--bundle", str(root), "--quiet", "--no-plots", "--keep-going",
                 "--victims", "wrn10_2_toy", "resnet34_toy"]) == 1
    captured = capsys.readouterr()
    assert "wrn10_2_toy: the model gives non-finite logits (NaN or inf) on 24 of 24 eval records" in captured.err
    assert (root / "results" / "task1_resnet34_toy.npy").is_file()  # the other victim was finished
    assert not (root / "results" / "task1_wrn10_2_toy.npy").exists()


def test_a_warm_run_measures_nothing(foreign_bundle, tmp_path, capsys, monkeypatch):
    import shutil

    import mia.inspection

    root = tmp_path / "b"
    shutil.copytree(foreign_bundle, root, ignore=shutil.ignore_patterns("results", ".cache", "result.json"))
    args = ["run", "--bundle", str(root), "--quiet", "--no-plots", "--victims", "wrn10_2_toy",
            "--cache-dir", str(tmp_path / "cache")]  # its own cache: other tests scored this victim already
    assert main(args) == 0
    assert "images/s measured" in capsys.readouterr().out  # cold: the cost is measured and shown

    def refuse(*a, **k):
        raise AssertionError("measured on a warm run")

    monkeypatch.setattr(mia.inspection, "flops_per_image", refuse)
    monkeypatch.setattr(mia.inspection, "measure_seconds_per_image", refuse)
    assert main(args) == 0
    assert "logits cached: nothing to score" in capsys.readouterr().out
