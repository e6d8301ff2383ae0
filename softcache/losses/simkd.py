"""SimKD: the student borrows the teacher's classifier (Chen et al., "Knowledge Distillation with the Reused Teacher
Classifier", CVPR 2022), as its official code runs it.

The student's last map passes a trained projector to the teacher's width; the teacher's classifier (stored once
in the cache, `dump-teacher --teacher-head`, and frozen) classifies its average-pooled output. The loss is the
MSE of the projected map to the teacher's (`SimKDLoss`), alone (`--loss simkd`: the reference trains with
neither CE nor KD). The student that trains, is evaluated and is saved is `SimKDStudent`: the student, the
projector and the teacher's head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softcache.losses.features import match_spatial

PROJECTOR = "simkd_projector"  # the module of a SimKDStudent whose output the simkd pair reads


class SimKDLoss(nn.Module):
    """`mean((projected − t)²)`, the larger map average-pooled to the smaller's size (`SimKDStudent` already pools
    the student's to the teacher's). `forward(projected [B, Ct, H, W], t [B, Ct, H', W']) -> []`."""

    def forward(self, projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(projected.float(), teacher.float())
        return F.mse_loss(s, t)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SimKDStudent(nn.Module):
    """`student` with SimKD's projector after its layer `layer` and the teacher's classifier on top.

    The student's modules keep their names (they are registered here under them, so pairs and checkpoints name
    them as in the student alone), beside `simkd_projector` (1x1 conv Cs → Ct/f, 3x3 conv Ct/f → Ct/f, 1x1 conv →
    Ct, each with BN and ReLU, f = 2) and `simkd_head` (the teacher's classifier, frozen). The student's map is
    average-pooled to the teacher's size `teacher_size` where larger, as the reference pools the larger of the two.
    `forward(x) -> logits [B, K]` of the teacher's head.
    """

    def __init__(self, student: nn.Module, layer: str, student_channels: int, teacher_channels: int,
                 teacher_size: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor, factor: int = 2):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a child: its children are ours, under their names
        for name, child in student.named_children():
            self.add_module(name, child)
        for name, param in student.named_parameters(recurse=False):  # e.g. a ViT's class token
            self.register_parameter(name, param)
        for name, buffer in student.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        mid = teacher_channels // factor
        self.simkd_projector = nn.Sequential(*_conv_bn_relu(student_channels, mid, 1), *_conv_bn_relu(mid, mid, 3),
                                             *_conv_bn_relu(mid, teacher_channels, 1))
        self.simkd_head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.simkd_head.weight.copy_(torch.as_tensor(weight))
            self.simkd_head.bias.copy_(torch.as_tensor(bias))
        self.simkd_head.requires_grad_(False)
        self.layer, self.teacher_size = layer, tuple(teacher_size)
        self._map: torch.Tensor | None = None
        dict(student.named_modules())[layer].register_forward_hook(self._keep)

    def train(self, mode: bool = True) -> SimKDStudent:
        super().train(mode)
        self.student.training = mode  # the student's own forward may read it
        return self

    def _keep(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self._map = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.student(x)  # its own head's logits are not used
        f, self._map = self._map, None
        if f.shape[-1] > self.teacher_size[-1]:
            f = F.adaptive_avg_pool2d(f, self.teacher_size)
        projected = self.simkd_projector(f)
        return self.simkd_head(torch.flatten(F.adaptive_avg_pool2d(projected, 1), 1))
