"""A tiny CIFAR network for full-size flow tests, loaded the way users load their own models:
`--model tinynet:tiny` (with this folder on PYTHONPATH)."""
from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Tiny(nn.Module):
    """Three conv blocks (32x32 -> 16x16 -> 8x8, 16/32/32 channels), global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.layer1, self.layer2, self.layer3 = _block(3, 16, 1), _block(16, 32, 2), _block(32, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny(num_classes: int = 10) -> Tiny:
    return Tiny(num_classes)


class ConvHead(nn.Module):
    """Ends in a 1x1 convolution classifier (no nn.Linear): it has no `embedding` to tap."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.layer1, self.head = _block(3, 16, 2), nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        return self.head(self.layer1(x)).mean(dim=(2, 3))


def convhead(num_classes: int = 10) -> ConvHead:
    return ConvHead(num_classes)


def five_way(num_classes: int = 10) -> Tiny:
    """Ignores `num_classes`: a model for another dataset."""
    return Tiny(5)
