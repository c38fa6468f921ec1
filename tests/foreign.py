"""Architecture files and bundles written in a challenge organiser's style, not ours (tests only).

Factories named unlike ours (``resnet_34``), torchvision's key names (``fc``, ``downsample``), no width
argument, a Wide-ResNet under a new architecture name, torchvision's own constructors, checkpoints
wrapped, bare and DataParallel-prefixed, labels stored as tensors. Small widths, so the tests are fast.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

# torchvision-style names (conv1, bn1, layerN.M.downsample, fc), 3x3 stem for 32x32, base width 4.
RESNET_FILE = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Net(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        w = 4
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        planes, blocks = w, []
        for i, n in enumerate(layers):
            out = w * 2 ** i
            stage = [Block(planes, out, 1 if i == 0 else 2)] + [Block(out, out) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            planes = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_34(num_classes):
    return Net([3, 4, 6, 3], num_classes)
'''

# A new architecture name; the class takes depth, widening and the class count, with defaults.
WRN_FILE = '''
import torch.nn as nn


class WideBasic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.conv(self.bn(x).relu())
        return out + (x if self.short is None else self.short(x))


class WideResNet(nn.Module):
    def __init__(self, depth=10, widen_factor=2, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [4, 4 * widen_factor, 8 * widen_factor, 16 * widen_factor]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBasic(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.bn(self.blocks(self.stem(x))).relu()
        return self.head(x.mean((2, 3)))
'''


def import_text(text: str, name: str):
    """Import architecture code given as text (a throwaway module, for building test checkpoints)."""
    namespace: dict = {"__name__": name}
    exec(compile(text, name, "exec"), namespace)
    return namespace


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm statistics non-trivial values (one forward in train mode); eval mode."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


def write_records(path: Path, images: np.ndarray, labels: np.ndarray, membership: np.ndarray | None,
                  label_kind: str) -> None:
    """A challenge pickle with labels as 0-dim tensors ("tensor0"), one-element tensors ("tensor1"),
    numpy integers ("numpy") or Python ints ("int"); membership as 0-dim tensors."""
    def label(y: int):
        return {"tensor0": torch.tensor(y), "tensor1": torch.tensor([y]), "numpy": np.int64(y), "int": int(y)}[label_kind]

    records = []
    for i in range(len(images)):
        rec = [torch.from_numpy(images[i].copy()), label(int(labels[i]))]
        if membership is not None:
            rec.append(torch.tensor(int(membership[i])))
        records.append(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(records, f, protocol=4)


def build_foreign_bundle(root: Path, n: int = 48, seed: int = 0) -> dict[str, torch.nn.Module]:
    """A bundle with three victims the repository has never seen (untrained models; 10 classes):

    - resnet34_toy: the bundle's own models/resnet34.py (``resnet_34``), saved as {'net': state_dict};
    - mobilenetv2_toy: torchvision's own ``mobilenet_v2`` (no architecture file), a bare state_dict;
    - wrn10_2_toy: models/wrn10_2.py (``WideResNet``), 'module.' prefixes under {'state_dict': ...}.
    Records: n eval (half members) and n test, labels as tensors / numpy ints; an answer key.
    """
    import torchvision

    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "resnet34.py").write_text(RESNET_FILE)
    (root / "models" / "wrn10_2.py").write_text(WRN_FILE)
    models = {
        "resnet34": trained_like(import_text(RESNET_FILE, "foreign_resnet")["resnet_34"](10)),
        "mobilenetv2": trained_like(torchvision.models.mobilenet_v2(num_classes=10)),
        "wrn10_2": trained_like(import_text(WRN_FILE, "foreign_wrn")["WideResNet"](num_classes=10)),
    }
    torch.save({"net": models["resnet34"].state_dict(), "acc": 50.0, "epoch": 3}, root / "models" / "resnet34_toy.pth")
    torch.save(models["mobilenetv2"].state_dict(), root / "models" / "mobilenetv2_toy.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in models["wrn10_2"].state_dict().items()}},
               root / "models" / "wrn10_2_toy.pth")
    rng = np.random.default_rng(seed)
    for i, (arch, kind) in enumerate((("resnet34", "tensor0"), ("mobilenetv2", "tensor1"), ("wrn10_2", "numpy"))):
        images = rng.standard_normal((2 * n, 3, 32, 32)).astype(np.float32)
        labels = rng.integers(0, 10, 2 * n)
        membership = np.tile([0, 1], n)
        write_records(root / "datasets" / "eval" / f"toy_{arch}.p", images[:n], labels[:n], membership[:n], kind)
        write_records(root / "datasets" / "test" / f"toy_{arch}.p", images[n:], labels[n:], None, kind)
        (root / "answers").mkdir(exist_ok=True)
        np.save(root / "answers" / f"toy_{arch}.npy", membership[n:].astype(np.int64))
    return models
