"""mia.bundle: victims found in a challenge layout, and every layout error named."""
from __future__ import annotations

from pathlib import Path

import pytest

from mia.bundle import discover
from mia.models.registry import REPO_ARCH_DIR
from mia.errors import BundleError

TINY_NAMES = ["mobilenetv2_fashionmnist", "resnet34_fashionmnist", "vgg16_fashionmnist"]


def _layout(root: Path, files: list[str]) -> Path:
    """A fake bundle: the three challenge folders and empty files (discover never opens them)."""
    for sub in ("models", "datasets/eval", "datasets/test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


def _victim_files(arch: str, dataset: str) -> list[str]:
    return [f"models/{arch}_{dataset}.pth", f"datasets/eval/{dataset}_{arch}.p", f"datasets/test/{dataset}_{arch}.p"]


# ---------------------------------------------------------------------------------------------
# The tiny demo bundle


def test_discover_tiny_bundle(tiny_bundle):
    bundle = discover(tiny_bundle)
    assert [v.name for v in bundle.victims] == TINY_NAMES
    assert bundle.problems == []
    assert bundle.root == Path(tiny_bundle).resolve()
    for v in bundle.victims:
        assert v.name == f"{v.arch}_{v.dataset}"
        assert v.dataset == "fashionmnist"
        assert v.checkpoint == bundle.root / "models" / f"{v.arch}_fashionmnist.pth"
        assert v.eval_path == bundle.root / "datasets" / "eval" / f"fashionmnist_{v.arch}.p"
        assert v.test_path == bundle.root / "datasets" / "test" / f"fashionmnist_{v.arch}.p"
        assert v.answers_path == bundle.root / "answers" / f"fashionmnist_{v.arch}.npy"
    assert bundle.results_dir == bundle.root / "results"
    assert bundle.result_json == bundle.root / "result.json"


def test_victims_filter(tiny_bundle):
    bundle = discover(tiny_bundle, victims=["vgg16_fashionmnist", "resnet34_fashionmnist"])
    assert [v.name for v in bundle.victims] == ["resnet34_fashionmnist", "vgg16_fashionmnist"]
    assert list(bundle.architecture_files()) == ["resnet34", "vgg16"]


def test_unknown_victim_is_an_error(tiny_bundle):
    with pytest.raises(BundleError) as err:
        discover(tiny_bundle, victims=["vgg16_fashionmnist", "vgg16_cifar10"])
    msg = str(err.value)
    assert "vgg16_cifar10" in msg
    assert "vgg16_fashionmnist" in msg  # the names that do exist are listed as a hint


def test_architecture_files_prefer_the_bundle(tiny_bundle):
    bundle = discover(tiny_bundle)
    root = bundle.root
    assert bundle.arch_dirs == [root / "models", REPO_ARCH_DIR]
    files = bundle.architecture_files()
    # the file named after the architecture (or its family) first, then the bundle's other files, then ours
    assert files["mobilenetv2"][0] == root / "models" / "mobilenetv2.py"
    assert files["resnet34"][0] == root / "models" / "resnet34.py"
    assert files["vgg16"][0] == root / "models" / "vgg.py"
    assert files["vgg16"][1:] == [root / "models" / "mobilenetv2.py", root / "models" / "resnet34.py",
                                  REPO_ARCH_DIR / "vgg.py"]


# ---------------------------------------------------------------------------------------------
# File names


@pytest.mark.parametrize("arch, dataset", [("resnet34", "cifar10"), ("vgg16", "tiny_imagenet"),
                                           ("wrn28_2", "cifar100"), ("resnet18", "tiny_imagenet"), ("lenet", "x")])
def test_any_architecture_name_pairs_with_its_data(tmp_path, arch, dataset):
    root = _layout(tmp_path / "b", _victim_files(arch, dataset))
    (victim,) = discover(root).victims
    assert (victim.arch, victim.dataset, victim.name) == (arch, dataset, f"{arch}_{dataset}")


def test_names_with_underscores_on_both_sides(tmp_path):
    root = _layout(tmp_path / "b", _victim_files("wrn28_2", "tiny_imagenet") + _victim_files("vgg16", "tiny_imagenet"))
    assert sorted((v.arch, v.dataset) for v in discover(root).victims) == [("vgg16", "tiny_imagenet"),
                                                                           ("wrn28_2", "tiny_imagenet")]


def test_ambiguous_pairing_is_an_error(tmp_path):
    # x_y_z.p is both dataset x_y of arch z (model z_x_y.pth) and dataset x of arch y_z (model y_z_x.pth)
    root = _layout(tmp_path / "b", ["models/z_x_y.pth", "models/y_z_x.pth", "datasets/eval/x_y_z.p",
                                    "datasets/test/x_y_z.p"])
    with pytest.raises(BundleError, match="matches several models"):
        discover(root)


@pytest.mark.parametrize("name", ["datasets/eval/cifar10.p", "models/resnet34.pth", "datasets/test/_resnet34.p",
                                  "models/resnet34_.pth"])
def test_names_without_two_parts_do_not_parse(tmp_path, name):
    root = _layout(tmp_path / "b", _victim_files("vgg16", "cifar10") + [name])
    with pytest.raises(BundleError, match="does not parse"):
        discover(root)
    assert [v.name for v in discover(root, strict=False).victims] == ["vgg16_cifar10"]


def test_bad_file_name_strict_and_lenient(tmp_path):
    root = _layout(tmp_path / "b", _victim_files("resnet34", "cifar10") + ["datasets/eval/cifar10_lenet.p"])
    with pytest.raises(BundleError, match="cifar10_lenet.p"):
        discover(root)
    bundle = discover(root, strict=False)
    assert [v.name for v in bundle.victims] == ["resnet34_cifar10"]
    assert len(bundle.problems) == 1 and "cifar10_lenet.p" in bundle.problems[0]


# ---------------------------------------------------------------------------------------------
# Unmatched files


@pytest.mark.parametrize(
    "drop, missing",
    [
        ("datasets/test/cifar10_vgg16.p", "test file"),
        ("models/vgg16_cifar10.pth", "model"),
        ("datasets/eval/cifar10_vgg16.p", "eval file"),
    ],
)
def test_unmatched_victim(tmp_path, drop, missing):
    files = _victim_files("resnet34", "cifar10") + [f for f in _victim_files("vgg16", "cifar10") if f != drop]
    root = _layout(tmp_path / "b", files)
    with pytest.raises(BundleError) as err:
        discover(root)
    msg = str(err.value)
    assert "vgg16_cifar10" in msg and f"without its {missing}" in msg
    assert "resnet34_cifar10" not in msg

    bundle = discover(root, strict=False)
    assert [v.name for v in bundle.victims] == ["resnet34_cifar10"]
    assert len(bundle.problems) == 1
    assert bundle.problems[0].startswith("vgg16_cifar10:") and f"without its {missing}" in bundle.problems[0]


def test_eval_file_alone_names_both_missing_files(tmp_path):
    root = _layout(tmp_path / "b", _victim_files("resnet34", "cifar10") + ["datasets/eval/cifar10_vgg16.p"])
    bundle = discover(root, strict=False)
    (problem,) = bundle.problems
    assert "datasets/eval/cifar10_vgg16.p" in problem
    assert "test file and model" in problem


def test_no_complete_victim(tmp_path):
    root = _layout(tmp_path / "b", ["datasets/eval/cifar10_vgg16.p"])
    with pytest.raises(BundleError, match="no complete victim"):
        discover(root, strict=False)


def test_missing_folders(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        discover(tmp_path / "nowhere")
    root = tmp_path / "b"
    (root / "models").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"missing datasets/eval/"):
        discover(root)
    (root / "datasets" / "eval").mkdir(parents=True)
    with pytest.raises(BundleError, match=r"missing datasets/test/"):
        discover(root)


def test_answers_are_optional(tmp_path):
    root = _layout(tmp_path / "b", _victim_files("resnet34", "cifar10") + _victim_files("vgg16", "cifar10")
                   + ["answers/cifar10_vgg16.npy"])
    answers = {v.name: v.answers_path for v in discover(root).victims}
    assert answers == {"resnet34_cifar10": None, "vgg16_cifar10": root.resolve() / "answers" / "cifar10_vgg16.npy"}


def test_architecture_files_fall_back_to_the_repository(tmp_path):
    root = _layout(tmp_path / "b", _victim_files("resnet34", "cifar10") + _victim_files("vgg16", "cifar10")
                   + ["models/resnet34.py"])
    bundle = discover(root)
    assert bundle.architecture_files() == {
        "resnet34": [root.resolve() / "models" / "resnet34.py", REPO_ARCH_DIR / "resnet34.py"],
        "vgg16": [root.resolve() / "models" / "resnet34.py", REPO_ARCH_DIR / "vgg.py"],
    }
