"""mia.bundle: victims found in a challenge layout, and every layout error named."""
from __future__ import annotations

from pathlib import Path

import pytest

from mia.bundle import REPO_MODELS_DIR, discover, parse_data_name, parse_model_name
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
    assert bundle.arch_dirs == [root / "models", REPO_MODELS_DIR]
    assert bundle.architecture_files() == {
        "mobilenetv2": root / "models" / "mobilenetv2.py",
        "resnet34": root / "models" / "resnet34.py",
        "vgg16": root / "models" / "vgg.py",
    }


# ---------------------------------------------------------------------------------------------
# File names


def test_parse_names():
    assert parse_data_name(Path("cifar10_resnet34.p")) == ("cifar10", "resnet34")
    assert parse_data_name(Path("tiny_imagenet_vgg16.p")) == ("tiny_imagenet", "vgg16")  # arch = last field
    assert parse_model_name(Path("resnet34_cifar10.pth")) == ("resnet34", "cifar10")
    assert parse_model_name(Path("mobilenetv2_tiny_imagenet.pth")) == ("mobilenetv2", "tiny_imagenet")


@pytest.mark.parametrize("name", ["cifar10.p", "cifar10_lenet.p", "_resnet34.p", "cifar10-resnet34.p",
                                  "resnet34_cifar10.p"])
def test_parse_data_name_errors(name):
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        parse_data_name(Path(name))


@pytest.mark.parametrize("name", ["resnet34.pth", "lenet_cifar10.pth", "resnet34_.pth", "cifar10_resnet34.pth"])
def test_parse_model_name_errors(name):
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        parse_model_name(Path(name))


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
        "resnet34": root.resolve() / "models" / "resnet34.py",
        "vgg16": REPO_MODELS_DIR / "vgg.py",
    }
