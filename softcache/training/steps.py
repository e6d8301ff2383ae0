"""Training steps: small objects called on one batch, returning the step's named loss terms (`'loss'` is their
weighted sum, the one backpropagated), the logits and the labels, as timm's TrainingTask does. The loop
(training/loop.py) does the rest: backward, optimizer, schedule, sums and logs of every term.

    CEStep       cross-entropy on the labels: train-teacher, the no-KD baseline
    DistillStep  the student's terms against teacher targets, cached (train-student) or computed (train-online)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from softcache.batches import Targets
from softcache.device import autocast, model_inputs
from softcache.losses.response import CELoss

Result = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]


def mixed_labels(batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A batch of mixed views carries `(partner_labels [B], lam [B])` after its first four items."""
    if len(batch) < 6:
        return None
    return batch[4].to(device, non_blocking=True), batch[5].to(device, torch.float32, non_blocking=True)


class CEStep:
    """`batch (views [B, 3, S, S] uint8, labels [B], ...) -> ({'loss': CE}, logits [B, K], labels [B])`; for
    mixed views the CE of the mixed labels (`CELoss`)."""

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 label_smoothing: float = 0.0):
        self.model, self.mean, self.std, self.device = model, mean, std, device
        self.ce = CELoss(label_smoothing)

    def __call__(self, batch: tuple) -> Result:
        views, labels = batch[:2]
        x, labels = model_inputs(views, self.mean, self.std, self.device), labels.to(self.device, non_blocking=True)
        with autocast(self.device, torch.bfloat16):
            logits = self.model(x)
        return {"loss": self.ce(logits.float(), labels, mixed_labels(batch, self.device))}, logits, labels


class DistillStep:
    """`batch (views, labels [B], index [B], view [B][, partner_labels [B], lam [B]]) -> (terms, logits, labels)`:
    the tapped student's logits and features against the teacher targets of those (sample, view) pairs, through
    the loss terms (`DistillLoss`: each term weighted, and their sum as 'loss'; ce on the mixed labels)."""

    def __init__(self, tapped: nn.Module, criterion: nn.Module, targets: Targets, *, mean: Sequence[float],
                 std: Sequence[float], device: torch.device):
        self.tapped, self.criterion, self.targets = tapped, criterion, targets
        self.mean, self.std, self.device = mean, std, device

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss terms the epoch (their stage, warm-up ramps, the learned temperature's schedule)."""
        getattr(self.criterion, "module", self.criterion).set_epoch(epoch)  # through DistributedDataParallel

    def __call__(self, batch: tuple) -> Result:
        views, labels, index, view = batch[:4]
        x, labels = model_inputs(views, self.mean, self.std, self.device), labels.to(self.device, non_blocking=True)
        teacher, teacher_features = self.targets(views, index, view)
        with autocast(self.device, torch.bfloat16):
            logits, features = self.tapped(x)
            terms = self.criterion(logits.float(), labels, features, teacher, teacher_features, index=index,
                                   mixed=mixed_labels(batch, self.device))
        return terms, logits, labels
