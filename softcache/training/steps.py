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
from softcache.losses.response import CELoss, teacher_argmax
from softcache.models import INPUT_GRADIENT, input_gradient_map

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
                 std: Sequence[float], device: torch.device, strong_targets: Targets | None = None):
        self.tapped, self.criterion, self.targets = tapped, criterion, targets
        self.mean, self.std, self.device = mean, std, device
        self.strong_targets = strong_targets  # a second view of each sample (PairedBatches): mlkd
        # gat: the student's input-gradient map is taken here (through DistributedDataParallel's wrapper)
        self.input_gradient = getattr(getattr(criterion, "module", criterion), "input_gradient", False)

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss terms the epoch (their stage, warm-up ramps, the learned temperature's schedule)."""
        getattr(self.criterion, "module", self.criterion).set_epoch(epoch)  # through DistributedDataParallel

    def __call__(self, batch: tuple) -> Result:
        second = None
        if self.strong_targets is not None:  # the second stream's batch of the same samples and slots, last
            batch, second = batch[:-1], batch[-1]
        views, labels, index, view = batch[:4]
        x, labels = model_inputs(views, self.mean, self.std, self.device), labels.to(self.device, non_blocking=True)
        teacher, teacher_features = self.targets(views, index, view)
        gradient = self.input_gradient
        if gradient:
            x.requires_grad_(True)
        with autocast(self.device, torch.bfloat16):
            logits, features = self.tapped(x)
            if gradient:  # gat: the student's input-gradient map of the teacher's top class, kept in the graph
                score = logits.float().gather(1, teacher_argmax(teacher).to(logits.device)[:, None]).sum()
                (grad,) = torch.autograd.grad(score, x, create_graph=True)
                features = {**features, INPUT_GRADIENT: input_gradient_map(grad)}
            strong = None
            if second is not None:  # the student on the strong views too, in a forward of its own (its BN batch)
                strong_logits, _ = self.tapped(model_inputs(second[0], self.mean, self.std, self.device))
                strong = (strong_logits.float(), self.strong_targets(second[0], second[2], second[3])[0])
            terms = self.criterion(logits.float(), labels, features, teacher, teacher_features, index=index,
                                   mixed=mixed_labels(batch, self.device), strong=strong)
        return terms, logits, labels
