"""Architecture files: kuangliu-compatible keys, width scaling, 32x32 and 64x64 inputs."""
from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "mia" / "models"
TINY = 4  # width used for forward passes


def _load(file: str):
    """Import an architecture file by path, as the toolkit does (no package, no sys.path)."""
    path = MODELS_DIR / file
    spec = importlib.util.spec_from_file_location(f"_test_models_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resnet34 = _load("resnet34.py")
vgg = _load("vgg.py")
mobilenetv2 = _load("mobilenetv2.py")

BUILDERS = {
    "resnet34": lambda **kw: resnet34.ResNet34(**kw),
    "vgg16": lambda **kw: vgg.VGG("VGG16", **kw),
    "mobilenetv2": lambda **kw: mobilenetv2.MobileNetV2(**kw),
}


@functools.lru_cache(maxsize=None)
def _default_model(arch: str) -> torch.nn.Module:
    """The default-width, 10-class model in eval mode (built once per arch: full width is slow)."""
    return BUILDERS[arch]().eval()


def _default_state_dict(arch: str) -> dict[str, torch.Tensor]:
    return _default_model(arch).state_dict()


@pytest.mark.parametrize("arch, n_keys", [("resnet34", 218), ("vgg16", 93), ("mobilenetv2", 344)])
def test_key_count_at_default_width(arch, n_keys):
    assert len(_default_state_dict(arch)) == n_keys


def test_resnet34_key_layout():
    sd = _default_state_dict("resnet34")
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith("layer")}
    assert blocks == {f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)}
    shortcuts = sorted({k.rsplit(".shortcut", 1)[0] for k in sd if ".shortcut." in k})
    assert shortcuts == ["layer2.0", "layer3.0", "layer4.0"]
    assert {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var"} <= set(sd)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["linear.weight"].shape == (10, 512)


def test_vgg16_key_layout():
    sd = _default_state_dict("vgg16")
    convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    conv_keys = sorted(int(k.split(".")[1]) for k in sd if k.startswith("features.") and sd[k].dim() == 4)
    assert conv_keys == convs
    for n in convs:
        assert f"features.{n}.bias" in sd  # convs keep their bias
        assert f"features.{n + 1}.running_mean" in sd  # BN right after
    assert sd["classifier.weight"].shape == (10, 512)
    assert [k for k in sd if not k.startswith("features.")] == ["classifier.weight", "classifier.bias"]


def test_mobilenetv2_key_layout():
    sd = _default_state_dict("mobilenetv2")
    shortcuts = sorted({int(k.split(".")[1]) for k in sd if ".shortcut." in k})
    assert shortcuts == [0, 1, 10, 16]
    assert max(int(k.split(".")[1]) for k in sd if k.startswith("layers.")) == 16
    assert not any(k.endswith(".bias") and sd[k.replace(".bias", ".weight")].dim() == 4 for k in sd)
    assert sd["conv2.weight"].shape == (1280, 320, 1, 1)
    assert sd["linear.weight"].shape == (10, 1280)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_default_width_forward_32(arch):
    with torch.no_grad():
        out = _default_model(arch)(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_tiny_forward_any_size(arch, size):
    model = BUILDERS[arch](num_classes=7, width=TINY)
    x = torch.randn(3, 3, size, size)
    out = model.train()(x)  # train mode: batch statistics
    assert out.shape == (3, 7)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_width_keeps_key_names(arch):
    default = _default_state_dict(arch)
    tiny = BUILDERS[arch](width=TINY).state_dict()
    assert list(tiny) == list(default)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_width_reads_back_from_first_conv(arch):
    sd = BUILDERS[arch](num_classes=5, width=8).state_dict()
    first = "features.0.weight" if arch == "vgg16" else "conv1.weight"
    last = "classifier.weight" if arch == "vgg16" else "linear.weight"
    assert sd[first].shape[0] == 8
    assert sd[last].shape[0] == 5


def test_width_scales_channels_proportionally():
    # ResNet: planes width * (1, 2, 4, 8).
    sd = resnet34.ResNet34(width=8).state_dict()
    assert [sd[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5)] == [8, 16, 32, 64]
    assert sd["linear.weight"].shape == (10, 64)
    # VGG: cfg * width / 64 (64 -> 8, 128 -> 16, 256 -> 32, 512 -> 64).
    sd = vgg.VGG("VGG16", width=8).state_dict()
    assert [sd[f"features.{n}.weight"].shape[0] for n in (0, 7, 14, 24, 40)] == [8, 16, 32, 64, 64]
    assert sd["classifier.weight"].shape == (10, 64)
    # MobileNetV2: everything * width / 32 (16 -> 4, 320 -> 80, 1280 -> 320; expansion 6 kept).
    sd = mobilenetv2.MobileNetV2(width=8).state_dict()
    assert sd["layers.0.conv3.weight"].shape[0] == 4
    assert sd["layers.1.conv1.weight"].shape[0] == 6 * 4
    assert sd["conv2.weight"].shape[:2] == (320, 80)
    assert sd["linear.weight"].shape == (10, 320)


def test_mobilenetv2_width_1_rounds_to_at_least_one_channel():
    model = mobilenetv2.MobileNetV2(num_classes=3, width=1)
    sd = model.state_dict()
    assert sd["layers.0.conv3.weight"].shape[0] == 1  # 16 / 32 = 0.5 -> at least 1
    assert len(sd) == 344  # shortcut positions do not depend on width
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name, n_convs", [("VGG11", 8), ("VGG13", 10), ("VGG16", 13), ("VGG19", 16)])
def test_vgg_configs(name, n_convs):
    model = vgg.VGG(name, num_classes=4, width=TINY)
    assert len(model.state_dict()) == 7 * n_convs + 2
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_vgg_unknown_name():
    with pytest.raises(ValueError, match="VGG17"):
        vgg.VGG("VGG17")


@pytest.mark.parametrize("file", ["resnet34.py", "vgg.py", "mobilenetv2.py"])
def test_files_import_only_torch(file):
    tree = ast.parse((MODELS_DIR / file).read_text())
    assert ast.get_docstring(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            assert node.module == "__future__" or node.module.split(".")[0] == "torch"
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] == "torch" for alias in node.names)
