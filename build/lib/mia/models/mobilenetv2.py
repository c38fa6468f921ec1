"""MobileNetV2 for small images.

Paper: M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2: Inverted Residuals and
Linear Bottlenecks", CVPR 2018.

State_dict keys follow kuangliu/pytorch-cifar's ``MobileNetV2`` (344 keys with 10 classes):
``conv1``, ``bn1``, ``layers.0-16`` (each ``conv1-3, bn1-3``; a 1x1-conv shortcut ``shortcut.0/.1``
at ``layers.0, 1, 10, 16``), ``conv2``, ``bn2``, ``linear``; no conv has a bias.

Input (n, 3, H, W) float32 with H, W multiples of 8; output logits (n, num_classes).
This file imports only torch: it is loaded by path, like a bundle's own architecture files (one layout
among several that mia.models.registry recognises; nothing assumes a challenge uses it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_WIDTH = 32
# (expansion, out_planes at width 32, num_blocks, stride of the first block)
CFG = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 -> 1 for 32x32 inputs (as kuangliu)
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
LAST_PLANES = 1280  # channels of conv2 at width 32


def _scale(channels: int, width: int) -> int:
    """Channel count at ``width`` (rounded half up, at least 1)."""
    return max(1, int(channels * width / DEFAULT_WIDTH + 0.5))


class Block(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, project: bool):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if project:
            # Departure (kuangliu's): the paper has no residual where channels change; here a
            # 1x1 conv + BN shortcut is added where stride == 1 and in_planes != out_planes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))  # ReLU, not the paper's ReLU6 (as kuangliu)
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """MobileNetV2; ``width`` = channels of conv1 (32 in the paper), all channels scale with it."""

    def __init__(self, num_classes: int = 10, width: int = DEFAULT_WIDTH):
        super().__init__()
        first = _scale(DEFAULT_WIDTH, width)
        last = _scale(LAST_PLANES, width)
        # stride 2 -> 1 for 32x32 inputs (as kuangliu)
        self.conv1 = nn.Conv2d(3, first, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.layers = self._make_layers(width)
        self.conv2 = nn.Conv2d(_scale(CFG[-1][1], width), last, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        # Adaptive average pooling instead of a fixed avg_pool2d: same keys, 32x32 and 64x64 inputs.
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(last, num_classes)

    @staticmethod
    def _make_layers(width: int) -> nn.Sequential:
        layers = []
        in_paper = DEFAULT_WIDTH  # channel counts at width 32 decide where shortcuts go, so the
        for expansion, out_paper, num_blocks, stride in CFG:  # key set is the same at every width
            for s in [stride] + [1] * (num_blocks - 1):
                project = s == 1 and in_paper != out_paper
                layers.append(Block(_scale(in_paper, width), _scale(out_paper, width), expansion, s, project))
                in_paper = out_paper
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> logits (n, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = torch.flatten(self.pool(out), 1)
        return self.linear(out)
