"""VGG-11/13/16/19 with batch normalisation, for small images.

Paper: K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015. Batch norm after every conv: S. Ioffe, C. Szegedy, ICML 2015.

State_dict keys follow kuangliu/pytorch-cifar's ``VGG`` (VGG16: 93 keys): ``features.N`` with each
conv (with bias) at N followed by its BatchNorm at N+1, and a single ``classifier`` Linear.

Input (n, 3, H, W) float32 with H, W multiples of 32; output logits (n, num_classes).
This file imports only torch: it is loaded by path, like a bundle's own architecture files (one layout
among several that mia.models.registry recognises; nothing assumes a challenge uses it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Output channels of each 3x3 conv at width 64 (the paper's); 'M' = 2x2 max pool.
CFG: dict[str, list[int | str]] = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "VGG19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
DEFAULT_WIDTH = 64


def _scale(channels: int, width: int) -> int:
    """Channel count at ``width`` (rounded half up, at least 1)."""
    return max(1, int(channels * width / DEFAULT_WIDTH + 0.5))


class VGG(nn.Module):
    """VGG named by ``vgg_name`` (a key of CFG); ``width`` = channels of the first conv."""

    def __init__(self, vgg_name: str, num_classes: int = 10, width: int = DEFAULT_WIDTH):
        super().__init__()
        if vgg_name not in CFG:
            raise ValueError(f"unknown VGG {vgg_name!r}; known: {sorted(CFG)}")
        cfg = [x if x == "M" else _scale(x, width) for x in CFG[vgg_name]]
        self.features = self._make_layers(cfg)
        # The paper's three fully connected layers -> one Linear, for 32x32 inputs (as kuangliu).
        self.classifier = nn.Linear(cfg[-2], num_classes)

    @staticmethod
    def _make_layers(cfg: list[int | str]) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for x in cfg:
            if x == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, x, kernel_size=3, padding=1),
                           nn.BatchNorm2d(x),
                           nn.ReLU(inplace=True)]
                in_channels = x
        # Adaptive average pooling instead of AvgPool2d(1): same index, no parameters, and 64x64
        # inputs (2x2 maps here) still give one feature vector per image.
        layers.append(nn.AdaptiveAvgPool2d((1, 1)))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> logits (n, num_classes)."""
        out = torch.flatten(self.features(x), 1)
        return self.classifier(out)
