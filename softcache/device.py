"""Device helpers that the dump and training share: mixed precision, input normalisation, the teacher's forward.

Everything here is written not to stall the device queue: the normalisation constants are built once per
device (not per batch), host-to-device copies are asynchronous, and nothing reads a device tensor back.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from softcache.models import Tapped

_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def check_device(value: str) -> str:
    """Refuse a device string torch does not know, or CUDA on a machine without it."""
    from softcache.errors import SoftcacheError
    try:
        kind = torch.device(value).type
    except (RuntimeError, ValueError):
        raise SoftcacheError(f"'{value}' is not a torch device; e.g. cpu, cuda, cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SoftcacheError(f"device '{value}' asks for CUDA, which this machine does not have; use --device cpu")
    return value


def autocast(device: torch.device, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA, full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _mean_std(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean`, `std` as `[1, 3, 1, 1]` float32 tensors on `device`, built on the first call only (building them
    from Python lists is a blocking host-to-device copy)."""
    key = (tuple(mean), tuple(std), device.type, device.index)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device),
                           torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device))
    return _CONSTANTS[key]


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 `[B, 3, S, S]` to the float input a model sees: `(x / 255 - mean) / std`."""
    mean_t, std_t = _mean_std(mean, std, batch.device)
    return (batch.float() / 255.0 - mean_t) / std_t


def model_inputs(views: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> torch.Tensor:
    """uint8 views `[B, 3, S, S]` -> the normalised float batch on `device` (channels_last on CUDA)."""
    x = normalize(views.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, in channels_last on CUDA (what cuDNN's fastest convolutions take)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


@torch.no_grad()
def teacher_outputs(teacher: Tapped, views: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                    device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher on uint8 views `[B, 3, S, S]`: logits `[B, K]` and features `{layer: [B, C, H, W]}` in float16."""
    x = model_inputs(views, mean, std, device)
    with autocast(device):
        logits, features = teacher(x)
    return logits.half(), {name: f.half() for name, f in features.items()}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start a device-to-host copy (asynchronous on CUDA: read it only after the batch's event)."""
    return tensor.to("cpu", non_blocking=True) if tensor.is_cuda else tensor
