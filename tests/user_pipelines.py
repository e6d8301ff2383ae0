"""Users' own augmentation pipelines, loaded as `--augment user_pipelines:NAME` (with this folder on PYTHONPATH),
each called as `NAME(image_size=S)`: good ones, and the mistakes softcache must refuse."""
from __future__ import annotations

import random

import torch
from torchvision.transforms import v2


def full(image_size: int) -> v2.Transform:
    """A recipe of today: RandomResizedCrop, flip, RandAugment, ColorJitter, RandomErasing."""
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandAugment(num_ops=2, magnitude=9), v2.ColorJitter(0.4, 0.4, 0.4),
                       v2.RandomErasing(p=0.5, value=0)])


def python_random(image_size: int):
    """Flips with Python's global generator, which softcache does not seed: not replayable."""
    def flip(image: torch.Tensor) -> torch.Tensor:
        return v2.functional.horizontal_flip(image) if random.random() < 0.5 else image
    return v2.Compose([v2.Resize(image_size, antialias=True), flip])


def float_output(image_size: int) -> v2.Transform:
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.ToDtype(torch.float32, scale=True)])


def wrong_size(image_size: int) -> v2.Transform:
    return v2.Resize(image_size + 4, antialias=True)


def no_image_size() -> v2.Transform:
    return v2.RandomHorizontalFlip()


def v1_to_tensor(image_size: int):
    """torchvision v1's ToTensor, which takes PIL images or arrays, not the uint8 tensors softcache passes."""
    from torchvision import transforms
    return transforms.ToTensor()
