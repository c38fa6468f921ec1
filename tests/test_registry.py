"""mia.models.registry and discovery: builders found from the weights, whatever the files and key names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from foreign import RESNET_FILE, WRN_FILE, import_text, trained_like
from mia.errors import ArchitectureError
from mia.models.loading import load_victim_model
from mia.models.discovery import discover_architecture
from mia.models.registry import REPO_ARCH_DIR, candidate_files, repo_builder


def _bundle_models(tmp_path, files: dict[str, str]):
    folder = tmp_path / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("wrap", ["net", "bare", "module"])
def test_challenge_factory_with_torchvision_names(tmp_path, wrap):
    folder = _bundle_models(tmp_path, {"resnet34.py": RESNET_FILE})
    model = trained_like(import_text(RESNET_FILE, "r")["resnet_34"](37))
    sd = model.state_dict()
    payload = {"net": sd, "acc": 12.5} if wrap == "net" else (
        sd if wrap == "bare" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    torch.save(payload, tmp_path / "resnet34_x.pth")
    loaded, info = load_victim_model("resnet34", tmp_path / "resnet34_x.pth", [folder, REPO_ARCH_DIR])
    assert (info.builder, info.builder_source, info.architecture_file) == ("resnet_34", "bundle", folder / "resnet34.py")
    assert info.num_classes == 37 and info.width is None  # no width argument: none inferred
    assert info.architecture.classifier_key == "fc.weight"
    assert info.n_parameters == sum(p.numel() for p in model.parameters())
    assert _same_outputs(loaded, model)


@pytest.mark.slow
def test_torchvision_checkpoint_wins_over_a_bundle_file_that_does_not_build_it(tmp_path):
    folder = _bundle_models(tmp_path, {"resnet34.py": RESNET_FILE})
    model = trained_like(torchvision.models.resnet34(num_classes=200))
    torch.save({"net": model.state_dict()}, tmp_path / "resnet34_tiny.pth")
    loaded, info = load_victim_model("resnet34", tmp_path / "resnet34_tiny.pth", [folder, REPO_ARCH_DIR])
    assert (info.builder, info.builder_source, info.architecture_file) == ("torchvision.models.resnet34", "torchvision", None)
    assert info.num_classes == 200
    assert _same_outputs(loaded, model)


@pytest.mark.slow
@pytest.mark.parametrize("tv_name, arch", [("vgg16_bn", "vgg16"), ("mobilenet_v2", "mobilenetv2"),
                                           ("resnet18", "resnet18")])
def test_torchvision_constructors_for_the_family(tv_name, arch):
    sd = torchvision.models.get_model(tv_name, num_classes=3).state_dict()
    found = discover_architecture(arch, sd, [REPO_ARCH_DIR])
    assert (found.builder.label, found.num_classes) == (f"torchvision.models.{tv_name}", 3)


def test_of_two_plausible_builders_the_matching_one_wins(tmp_path):
    text = (
        "import torch.nn as nn\n"
        "def small_net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def wide_net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
        "def narrow_net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n"
    )
    folder = _bundle_models(tmp_path, {"tinynet.py": text})
    ns = import_text(text, "t")
    found = discover_architecture("tinynet", ns["narrow_net"](5).state_dict(), [folder, REPO_ARCH_DIR])
    assert (found.builder.label, found.num_classes) == ("narrow_net", 5)
    found = discover_architecture("tinynet", ns["wide_net"](6).state_dict(), [folder, REPO_ARCH_DIR])
    assert (found.builder.label, found.num_classes) == ("wide_net", 6)


def test_a_new_architecture_name_with_its_own_file(tmp_path):
    folder = _bundle_models(tmp_path, {"wrn10_2.py": WRN_FILE})
    model = trained_like(import_text(WRN_FILE, "w")["WideResNet"](num_classes=4))
    found = discover_architecture("wrn10_2", model.state_dict(), [folder, REPO_ARCH_DIR])
    assert (found.builder.label, found.builder.source, found.num_classes) == ("WideResNet", "bundle", 4)
    assert found.classifier_key == "head.weight"


def test_no_builder_lists_every_one_tried(tmp_path):
    text = ("import torch.nn as nn\n"
            "def resnet_34(num_classes):\n    return nn.Linear(3, num_classes)\n"
            "class Helper(nn.Module):\n    def __init__(self, block, layers):\n        super().__init__()\n")
    folder = _bundle_models(tmp_path, {"resnet34.py": text})
    sd = torchvision.models.resnet18(num_classes=3).state_dict()  # not a ResNet-34
    with pytest.raises(ArchitectureError) as err:
        discover_architecture("resnet34", sd, [folder, REPO_ARCH_DIR], what="victim.pth")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("victim.pth: no builder makes a model with exactly these weights' keys and shapes; tried 3")
    assert lines[1].startswith("  resnet_34 (bundle resnet34.py): its classifier 'weight' is not in the checkpoint")
    assert lines[2].startswith("  ResNet34 (repository resnet34.py): its classifier 'linear.weight' is not in")
    assert lines[3].startswith("  torchvision.models.resnet34: (num_classes=3) ") and "missing keys" in lines[3]
    assert len(lines) == 4  # Helper needs arguments no builder call can supply: not a candidate


def test_unknown_name_without_any_file_says_what_was_looked_for(tmp_path):
    with pytest.raises(ArchitectureError, match=r"no builder for architecture 'lenet5'.*lenet\.py or lenet5\.py"):
        discover_architecture("lenet5", {"w": torch.zeros(2, 2)}, [tmp_path, REPO_ARCH_DIR])


def test_broken_file_is_reported_and_discovery_goes_on(tmp_path):
    folder = _bundle_models(tmp_path, {"vgg.py": "import torch\ndef VGG(:\n"})
    sd = repo_builder("vgg16").build(7, 8).state_dict()
    found = discover_architecture("vgg16", sd, [folder, REPO_ARCH_DIR])
    assert found.builder.source == "repository" and found.width == 8
    sd["classifier.weight"] = torch.zeros(7, 3)
    with pytest.raises(ArchitectureError, match=r"vgg\.py: importing it failed: SyntaxError"):
        discover_architecture("vgg16", sd, [folder, REPO_ARCH_DIR])


def test_file_order_named_first_then_the_others_then_ours(tmp_path):
    folder = _bundle_models(tmp_path, {"a_helpers.py": "", "mobilenet_v2.py": "", "vgg.py": ""})
    assert candidate_files("mobilenetv2", [folder, REPO_ARCH_DIR]) == [
        ("bundle", folder / "mobilenet_v2.py"), ("bundle", folder / "a_helpers.py"), ("bundle", folder / "vgg.py"),
        ("repository", REPO_ARCH_DIR / "mobilenetv2.py")]
    assert candidate_files("vgg16", [folder])[0] == ("bundle", folder / "vgg.py")


def test_known_names_first_and_widths_only_where_taken(tmp_path):
    text = ("import torch.nn as nn\n"
            "def other(num_classes=10):\n    return nn.Linear(2, num_classes)\n"
            "def vgg_16(n, width=4):\n"
            "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n))\n")
    folder = _bundle_models(tmp_path, {"vgg.py": text})
    sd = import_text(text, "v")["vgg_16"](9, width=6).state_dict()
    found = discover_architecture("vgg16", sd, [folder])
    assert (found.builder.label, found.num_classes, found.width) == ("vgg_16", 9, 6)
    assert found.builder.classes_param is None  # positional: a known name's first parameter


@pytest.mark.slow
def test_meta_probing_draws_no_random_numbers_and_allocates_nothing(tmp_path):
    sd = torchvision.models.vgg16_bn(num_classes=3).state_dict()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    discover_architecture("vgg16", sd, [REPO_ARCH_DIR])
    assert torch.equal(before, torch.random.get_rng_state())


def test_references_build_the_same_way(tmp_path):
    found = discover_architecture("resnet34", repo_builder("resnet34").build(7, 8).state_dict(), [REPO_ARCH_DIR])
    torch.manual_seed(1)
    a = found.build()
    torch.manual_seed(1)
    b = repo_builder("resnet34").build(7, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert found.build(width=4).state_dict()["conv1.weight"].shape[0] == 4
    assert np.isclose(found.n_parameters, sum(p.numel() for p in a.parameters()))
