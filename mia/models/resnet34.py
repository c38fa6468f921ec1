"""ResNet-34 for small images.

Paper: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

State_dict keys follow kuangliu/pytorch-cifar's ``ResNet34`` (218 keys with 10 classes), so its
checkpoints load unchanged: ``conv1``, ``bn1``, ``layer1.0-2``, ``layer2.0-3``, ``layer3.0-5``,
``layer4.0-2`` (each block ``conv1, bn1, conv2, bn2``; projection shortcut ``shortcut.0/.1`` where
the shape changes), ``linear``.

Input (n, 3, H, W) float32 with H, W in {32, 64, ...}; output logits (n, num_classes).
This file imports only torch: it is loaded by path, like a bundle's own architecture files (one layout
among several that mia.models.registry recognises; nothing assumes a challenge uses it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Blocks per stage for ResNet-34 (paper, Table 1).
RESNET34_BLOCKS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            # Projection shortcut (paper option B) where the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet with four stages of ``planes = width * (1, 2, 4, 8)`` channels."""

    def __init__(self, block: type[BasicBlock], num_blocks: tuple[int, ...], num_classes: int = 10,
                 width: int = 64):
        super().__init__()
        self.in_planes = width
        # 7x7 stride-2 conv + max pool -> one 3x3 stride-1 conv, for 32x32 inputs (as kuangliu).
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        # Adaptive average pooling instead of avg_pool2d(4): same keys, any input size >= 8x8.
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> logits (n, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.pool(out), 1)
        return self.linear(out)


def ResNet34(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-34; ``width`` = channels of conv1 and layer1 (64 in the paper)."""
    return ResNet(BasicBlock, RESNET34_BLOCKS, num_classes=num_classes, width=width)
