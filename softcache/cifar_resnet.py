"""CIFAR ResNets: resnet8/14/20/32/44/56/110 of He et al. (2016, sec. 4.2) and the wide resnet8x4 / resnet32x4
used in the RepDistiller benchmarks (Tian et al., "Contrastive Representation Distillation", ICLR 2020).

A 3x3 stem, three stages of `n` basic blocks (depth = 6n + 2) at strides 1, 2, 2, global average pooling and
a linear classifier. Shortcuts that change shape use a 1x1 convolution + BN (option B). Module names are the
feature layers students and teachers tap: `conv1`, `layer1`, `layer2`, `layer3`, `fc`; `layer3.pre_relu` is a
stage's output before its last block's final ReLU (softcache.models.PRE_RELU).
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()  # the block's last activation, a module so that `LAYER.pre_relu` can tap its input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """`[B, 3, H, W]` -> logits `[B, num_classes]`; stage outputs `layer1..3` are `[B, C_k, H / s_k, W / s_k]`."""

    def __init__(self, blocks: int, widths: tuple[int, int, int, int], num_classes: int = 10):
        super().__init__()
        stem, *stages = widths
        self.conv1 = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        cin, layers = stem, []
        for k, width in enumerate(stages):
            layers.append(nn.Sequential(*[BasicBlock(cin if b == 0 else width, width, 2 if (k and b == 0) else 1)
                                          for b in range(blocks)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)

# name -> (blocks per stage, (stem, stage1, stage2, stage3) widths)
CIFAR_RESNETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (1, _NARROW),
    "resnet14": (2, _NARROW),
    "resnet20": (3, _NARROW),
    "resnet32": (5, _NARROW),
    "resnet44": (7, _NARROW),
    "resnet56": (9, _NARROW),
    "resnet110": (18, _NARROW),
    "resnet8x4": (1, _WIDE),
    "resnet32x4": (5, _WIDE),
}


def cifar_resnet(name: str, num_classes: int) -> CifarResNet:
    blocks, widths = CIFAR_RESNETS[name]
    return CifarResNet(blocks, widths, num_classes)
