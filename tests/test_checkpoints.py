"""mia.io.checkpoints and mia.models.loading: safe loading, wrappers, key checks, round trips."""
from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

from mia.io.checkpoints import load_state_dict, save_checkpoint
from mia.errors import ArchitectureError, CheckpointError
from mia.models.loading import load_victim_model
from mia.models.registry import REPO_ARCH_DIR, REPO_ARCHITECTURES, import_architecture_file, repo_builder

ARCHS = list(REPO_ARCHITECTURES)
DIRS = [REPO_ARCH_DIR]


def _tiny(arch: str, num_classes: int = 7, width: int = 8) -> torch.nn.Module:
    """A small model with non-trivial BatchNorm statistics, in eval mode."""
    model = repo_builder(arch).build(num_classes, width)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # moves running_mean / running_var away from 0 / 1
    return model.eval()


def _resnet_sd() -> dict[str, torch.Tensor]:
    return _tiny("resnet34").state_dict()


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_identical_outputs(tmp_path, arch, size):
    model = _tiny(arch)
    path = tmp_path / f"{arch}.pth"
    save_checkpoint(path, model, acc=np.float64(91.5), epoch=np.int64(12))
    loaded, info = load_victim_model(arch, path, DIRS)
    assert (info.arch, info.num_classes, info.width) == (arch, 7, 8)
    assert info.checkpoint_acc == 91.5 and isinstance(info.checkpoint_acc, float)
    assert info.epoch == 12 and isinstance(info.epoch, int)
    assert info.architecture_file == REPO_ARCH_DIR / REPO_ARCHITECTURES[arch].file
    assert info.builder_source == "repository"
    assert not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_saved_file_layout_and_no_temp_files(tmp_path):
    model = _tiny("mobilenetv2", num_classes=3, width=4)
    path = tmp_path / "sub" / "m.pth"
    save_checkpoint(path, model, acc=50.0, epoch=1)
    save_checkpoint(path, model, acc=60.0, epoch=2)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["m.pth"]
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"net", "acc", "epoch"} and (obj["acc"], obj["epoch"]) == (60.0, 2)
    assert set(obj["net"]) == set(model.state_dict())


def test_module_prefix_stripped(tmp_path):
    sd = _resnet_sd()
    path = tmp_path / "dp.pth"
    torch.save({"net": {f"module.{k}": v for k, v in sd.items()}, "acc": 80.0, "epoch": 3}, path)
    loaded, meta = load_state_dict(path)
    assert list(loaded) == list(sd)
    assert meta == {"acc": 80.0, "epoch": 3}
    _, info = load_victim_model("resnet34", path, DIRS)
    assert (info.num_classes, info.width) == (7, 8)


def test_bare_state_dict_accepted(tmp_path):
    sd = _tiny("vgg16").state_dict()
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    loaded, meta = load_state_dict(path)
    assert meta == {}
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    _, info = load_victim_model("vgg16", path, DIRS)
    assert info.checkpoint_acc is None and info.epoch is None


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_other_wrappers_accepted(tmp_path, wrapper):
    sd = _resnet_sd()
    path = tmp_path / "w.pth"
    torch.save({wrapper: sd, "epoch": torch.tensor(5), "optimizer": {"lr": 0.1}}, path)
    loaded, meta = load_state_dict(path)
    assert list(loaded) == list(sd)
    assert meta == {"epoch": 5}


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    sd = _resnet_sd()
    del sd["layer3.1.bn2.weight"]
    sd["extra.head.weight"] = torch.zeros(3)
    sd["layer1.0.conv1.weight"] = torch.zeros(8, 8, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save({"net": sd}, path)
    with pytest.raises(ArchitectureError) as err:
        load_victim_model("resnet34", path, DIRS)
    message = str(err.value)
    assert str(path) in message and "ResNet34 (repository resnet34.py): (num_classes=7, width=8)" in message
    assert "1 missing keys" in message and "layer3.1.bn2.weight" in message
    # the first difference per builder: then torchvision's resnet34 (no 'linear' classifier)
    assert "torchvision.models.resnet34: its classifier 'fc.weight' is not in the checkpoint" in message
    del sd["extra.head.weight"], sd["layer1.0.conv1.weight"]
    sd["layer3.1.bn2.weight"] = _resnet_sd()["layer3.1.bn2.weight"]
    sd["layer1.0.conv1.weight"] = torch.zeros(8, 8, 5, 5)
    torch.save({"net": sd}, path)
    with pytest.raises(ArchitectureError, match=r"1 mis-shaped keys: layer1\.0\.conv1\.weight checkpoint "
                                                r"\(8, 8, 5, 5\) vs model \(8, 8, 3, 3\)"):
        load_victim_model("resnet34", path, DIRS)


def test_mismatch_lists_are_truncated_with_counts(tmp_path):
    sd = {k: v for k, v in _resnet_sd().items() if not k.startswith("layer4.")}
    path = tmp_path / "cut.pth"
    torch.save(sd, path)
    n_layer4 = sum(k.startswith("layer4.") and not k.endswith("num_batches_tracked") for k in _resnet_sd())
    with pytest.raises(ArchitectureError, match=rf"{n_layer4} missing keys.*\.\.\. \({n_layer4} in all\)"):
        load_victim_model("resnet34", path, DIRS)


def test_missing_num_batches_tracked_tolerated(tmp_path):
    model = _tiny("resnet34")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"net": sd}, path)
    loaded, _ = load_victim_model("resnet34", path, DIRS)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_whole_pickled_model_needs_trust(tmp_path, monkeypatch):
    # The classes must be importable by name for pickle: register the by-path module for this test.
    module = import_architecture_file(REPO_ARCH_DIR / "resnet34.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    model = module.ResNet34(num_classes=4, width=4)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    model.eval()
    path = tmp_path / "whole.pth"
    torch.save(model, path)

    with pytest.raises(CheckpointError) as err:
        load_victim_model("resnet34", path, DIRS)
    message = str(err.value)
    assert str(path) in message
    assert "arbitrary code" in message and "--trust-checkpoints" in message and "ResNet" in message

    loaded, info = load_victim_model("resnet34", path, DIRS, trust=True)
    assert (info.num_classes, info.width) == (4, 4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pickled_module_in_wrapper_with_trust(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"net": torch.nn.Sequential(torch.nn.Linear(2, 3)), "acc": 1.0}, path)
    with pytest.raises(CheckpointError, match="trust"):
        load_state_dict(path)
    sd, meta = load_state_dict(path, trust=True)
    assert list(sd) == ["0.weight", "0.bias"] and meta == {"acc": 1.0}


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{path.name}: checkpoint file is empty"):
        load_state_dict(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.pth"
    save_checkpoint(path, _tiny("mobilenetv2", width=4), acc=1.0, epoch=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}: not a readable checkpoint"):
        load_victim_model("mobilenetv2", path, DIRS)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", pickle.dumps([1, 2, 3], protocol=2)])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=path.name):
        load_state_dict(path)


def test_dict_without_weights_lists_its_keys(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"acc": 1.0, "epoch": 2}, path)
    with pytest.raises(CheckpointError, match=r"no weights found.*'acc', 'epoch'"):
        load_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_import_gives_fresh_modules_each_time():
    a = import_architecture_file(REPO_ARCH_DIR / "vgg.py")
    b = import_architecture_file(REPO_ARCH_DIR / "vgg.py")
    assert a is not b and a.__name__ != b.__name__
    assert a.VGG is not b.VGG


def test_expanded_tensor_is_refused_before_anything_is_built(tmp_path):
    # 3 KB on disk, 2,000,000 classes claimed: must not build a 2 GB model to find out
    sd = _tiny("resnet34").state_dict()
    sd["linear.weight"] = torch.zeros(sd["linear.weight"].shape[1]).expand(2_000_000, -1)
    path = tmp_path / "bomb.pth"
    torch.save({"net": sd}, path)
    with pytest.raises(CheckpointError, match=r"'linear.weight'.*expanded or overlapping"):
        load_victim_model("resnet34", path, DIRS)
