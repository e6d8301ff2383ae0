"""No host synchronisation per training step: counted on CPU, as the calls that would stall a CUDA queue."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import softcache.train as train_module
from softcache.config import OptimConfig
from softcache.data import load_source
from softcache.losses import resolve_weights
from softcache.models import build_model
from softcache.train import train_student

READS_BACK = {"item", "numpy", "tolist", "cpu", "nonzero", "unique", "masked_select", "__bool__", "__int__",
              "__float__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Records, per training step, every torch call that would make the host wait for a CUDA device: reading a
    tensor back (`.item()`, `.cpu()`, `.numpy()`, `.tolist()`, truth tests, data-dependent shapes), a
    host-to-device copy that is not `non_blocking`, a tensor built on a device from host data."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[str]] = [[]]  # calls before the first step, then one list per step

    def mark_step(self) -> None:
        self.steps.append([])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_device = any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs
        if (name in READS_BACK
                or (name in ("to", "cuda") and to_device and not kwargs.get("non_blocking", False))
                or (name in ("as_tensor", "tensor") and "device" in kwargs)
                or (name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                  for a in (args[1] if isinstance(args[1], tuple) else (args[1],))))):
            self.steps[-1].append(name)
        return func(*args, **kwargs)


def test_the_counter_sees_what_would_synchronise():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item()
        x[x > 2]
        x.to("cpu")
        x.to("cpu", non_blocking=True)  # not counted
        x * 2                           # not counted
        bool(x[0] > 1)
    assert counter.steps == [["item", "__getitem__", "to", "__bool__"]]


@pytest.mark.parametrize("data_path", ["resident", "stream"])
def test_student_steps_never_synchronise(small_cache, tmp_path, monkeypatch, data_path):
    counter = SyncCounter()
    real_step = train_module.DistillStep

    def marking_step(*args, **kwargs):
        step_loss = real_step(*args, **kwargs)

        def step(batch):
            counter.mark_step()
            return step_loss(batch)
        return step

    monkeypatch.setattr(train_module, "DistillStep", marking_step)
    source, test_source = load_source("synthetic:20", "train"), load_source("synthetic:20", "test")
    torch.manual_seed(0)
    with counter:
        train_student(build_model("resnet8", 10), small_cache, source, test_source, tmp_path / data_path,
                      weights=resolve_weights(["kd", "at", "fitnets"], alpha=0.9, beta=1000, hint_weight=100),
                      pairs={"layer3": "layer3", "layer2": "layer2"}, data_path=data_path,
                      optim=OptimConfig(epochs=1, batch_size=2, workers=0))
    steps = counter.steps[1:]
    assert len(steps) == 10  # 20 samples, batches of 2
    # each step's calls run from its batch's arrival to the next batch; the last one also holds the epoch's
    # end (metrics, evaluation), which synchronises once an epoch by design
    assert steps[1:-1] == [[]] * 8, steps
