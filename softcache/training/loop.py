"""The epoch loop every trainer shares: SGD with a per-step cosine schedule, evaluation each epoch, the run
folder's metrics, checkpoint and results.

    fit            the loop: resume, train every epoch, evaluate, checkpoint, finish
    train_epoch    one pass over the training batches with a step object (training/steps.py)
    evaluate       top-1 and cross-entropy on the test split
    Checkpoint     what RUN/checkpoint.pt holds, written whole after every epoch and read to resume

Rerunning the same command on an unfinished run continues from its checkpoint and ends with the model an
uninterrupted run would have (bit-identical on CPU): every batch, view and target is a function of (seed,
epoch), and the checkpoint holds the rest of the state.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from softcache import distributed, progress
from softcache.config import OptimConfig
from softcache.device import autocast, model_inputs
from softcache.errors import SoftcacheError
from softcache.runs import CHECKPOINT
from softcache.store import where

log = logging.getLogger(__name__)

# A training step: batch -> (named loss terms incl. 'loss', logits [B, K], labels [B]); see training/steps.py
Step = Callable[[tuple], tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]


def save_atomic(value: Any, path: Path) -> None:
    """torch.save, written whole (`where.replace_atomically`); a failed write (a full disk: torch raises a
    RuntimeError for it) is one line, and the run stays resumable from the checkpoint before it."""
    try:
        where.replace_atomically(path, lambda f: torch.save(value, f))
    except (OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise SoftcacheError(f"cannot write '{path}' ({reason}); is the disk full? Free space and rerun the same "
                             "command: the run continues after its last finished epoch") from None


def _write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    where.replace_atomically(path, lambda f: f.write(text))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, mean: Sequence[float], std: Sequence[float],
             device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` over `loader` (batches of views, labels, ...)."""
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for batch in progress.track(loader, what="evaluate", unit="batch"):
        views, labels = batch[:2]
        x, labels = model_inputs(views, mean, std, device), labels.to(device)
        with autocast(device, torch.bfloat16):
            logits = model(x)
        loss += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return 100.0 * correct / max(1, count), loss / max(1, count)


@dataclass
class Checkpoint:
    """Where the loop stands after a finished epoch; with the modules, optimizer, schedule and random state
    it is RUN/checkpoint.pt."""

    epoch: int = 0                # epochs finished
    step: int = 0                 # optimizer steps taken
    best: float = 0.0             # best test accuracy so far
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, one record per epoch
    wall_s: float = 0.0           # wall time of earlier attempts (a resumed run adds its own)

    def save(self, path: Path, modules: Mapping[str, nn.Module], opt: torch.optim.Optimizer, sched: Any,
             device: torch.device, wall_s: float) -> None:
        save_atomic({"epoch": self.epoch, "step": self.step, "best": self.best, "records": self.records,
                     "wall_s": wall_s, "modules": {name: m.state_dict() for name, m in modules.items()},
                     "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, path)

    @classmethod
    def resume(cls, path: Path, modules: Mapping[str, nn.Module], opt: torch.optim.Optimizer, sched: Any,
               device: torch.device) -> Checkpoint:
        """Load `path` into the modules, optimizer, schedule and random state; a fresh start without one."""
        if not path.exists():
            return cls()
        state = torch.load(path, map_location=device, weights_only=False)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        return cls(state["epoch"], state["step"], state["best"], state["records"], state["wall_s"])


class BatchTrace:
    """SOFTCACHE_TRACE_BATCHES=FILE: every rank writes each step's samples and views to FILE.<rank> (debugging,
    and the tests that check torchrun ranks visit what one process visits)."""

    def __init__(self, world: distributed.World):
        path = os.environ.get("SOFTCACHE_TRACE_BATCHES")
        self.file = open(f"{path}.{world.rank}", "a") if path else None  # noqa: SIM115 (closed by close())
        self.rank = world.rank

    def write(self, epoch: int, step: int, batch: tuple) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"rank": self.rank, "epoch": epoch, "step": step,
                                        "index": batch[2].tolist(), "view": batch[3].tolist()}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train_epoch(step: Step, loader: Iterable, opt: torch.optim.Optimizer, sched: Any, state: Checkpoint, *,
                epoch: int, what: str, device: torch.device, world: distributed.World, trace: BatchTrace,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                schedule: bool = True) -> dict[str, Any]:
    """One pass of `step` over `loader`, stepping the optimizer and (unless `schedule` is False: an
    initialisation epoch, at the constant peak rate) the schedule; `state.step` counts the steps.
    Returns the epoch's sums over every rank (loss terms weighted by batch size, correct, seen) and its time."""
    sums: dict[str, torch.Tensor] = {}
    correct, seen, started = torch.zeros((), device=device), 0, time.perf_counter()
    for batch in progress.track(loader, what=what, unit="batch"):
        trace.write(epoch, state.step, batch)
        terms, logits, labels = step(batch)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if schedule:
            sched.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if on_step is not None:
            on_step(state.step, {name: value.item() for name, value in terms.items()})
        state.step += 1
    seconds = time.perf_counter() - started
    if world.size > 1:  # the epoch's sums over every rank's share
        names = sorted(sums)
        total = distributed.all_reduce_sum(torch.stack([sums[k] for k in names] + [correct.float(),
                                                       torch.tensor(float(seen), device=device)]), world)
        sums, correct, seen = dict(zip(names, total[:len(names)])), total[-2], int(total[-1].item())
    return {"sums": sums, "correct": correct, "seen": seen, "seconds": seconds}


def epoch_record(epoch: int, lr: float, done: dict[str, Any], test_acc: float, test_loss: float,
                 stage: str = "main") -> dict[str, Any]:
    """The metrics.jsonl line of a finished epoch (an initialisation epoch's says `"stage": "init"`)."""
    seen = done["seen"]
    return {"epoch": epoch + 1, **({"stage": stage} if stage != "main" else {}), "lr": lr,
            **{f"train_{k}": (v / seen).item() for k, v in done["sums"].items()},
            "train_acc": 100.0 * done["correct"].item() / max(1, seen), "test_acc": test_acc, "test_loss": test_loss,
            "epoch_s": round(done["seconds"], 3), "images": seen, "images_per_s": round(seen / done["seconds"], 1)}


def fit(model: nn.Module, step: Step, *, params: Sequence[nn.Parameter], train_loader: Any, test_loader: Iterable,
        optim: OptimConfig, mean: Sequence[float], std: Sequence[float], device: torch.device, out: Path,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        modules: Mapping[str, nn.Module] | None = None, world: distributed.World = distributed.World(),
        since: float | None = None, init_epochs: int = 0) -> dict[str, Any]:
    """SGD + momentum with a per-step cosine schedule; evaluate each epoch; write metrics, model.pt, summary.json.

    `init_epochs` come first: the step's initialisation stage (`step.set_epoch` tells it), at the constant peak
    rate; the optimizer's momentum is cleared when the `optim.epochs` main epochs begin (RepDistiller's init()
    has an optimizer of its own), and the cosine schedule spans the main epochs only.

    `step(batch) -> (named loss terms incl. 'loss', logits [B, K], labels [B])` runs the forward pass;
    `train_loader` has `set_epoch` and `__len__` (EpochBatches, ResidentReplay). After every epoch
    `out/checkpoint.pt` holds `modules` (default: the model; add regressors), the optimizer, the schedule and
    the random state; a run folder holding one continues from it. Under torchrun (`world`) every rank trains on
    its share of each global batch (gradients averaged by DDP in the step's modules), the epoch's sums are added
    up over the ranks, and rank 0 alone evaluates and writes the run folder.
    """
    modules = dict(modules or {"model": model})
    opt = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, optim.epochs * len(train_loader)))
    started = time.perf_counter() if since is None else since  # `since`: when the stage began (set-up included)
    state = Checkpoint.resume(out / CHECKPOINT, modules, opt, sched, device)
    if state.epoch and world.main:
        _write_metrics(out / "metrics.jsonl", state.records)  # drops a line written after the last checkpoint
        log.info("resuming %s after epoch %d of %d", out, state.epoch, init_epochs + optim.epochs)
    test_acc = state.records[-1]["test_acc"] if state.records else 0.0
    trace = BatchTrace(world)
    epochs = init_epochs + optim.epochs
    for epoch in range(state.epoch, epochs):
        train_loader.set_epoch(epoch)
        if hasattr(step, "set_epoch"):  # loss stages and schedules (warm-up, a learned temperature's curriculum)
            step.set_epoch(epoch)
        if init_epochs and epoch == init_epochs:
            opt.state.clear()  # the main stage's momentum starts afresh
        model.train()
        lr = sched.get_last_lr()[0]
        stage = "init" if epoch < init_epochs else "main"
        done = train_epoch(step, train_loader, opt, sched, state, epoch=epoch, device=device, world=world,
                           trace=trace, on_step=on_step, what=f"{out.name} epoch {epoch + 1}/{epochs}",
                           schedule=stage == "main")
        if not world.main:
            continue
        test_acc, test_loss = evaluate(model, test_loader, mean=mean, std=std, device=device)
        record = epoch_record(epoch, lr, done, test_acc, test_loss, stage)
        state.epoch, state.best = epoch + 1, max(state.best, test_acc)
        state.records.append(record)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        elapsed = state.wall_s + time.perf_counter() - started
        state.save(out / CHECKPOINT, modules, opt, sched, device, wall_s=elapsed)
        progress.say(f"{out.name}: epoch {epoch + 1}/{epochs}{' (init)' if stage == 'init' else ''}, "
                     f"loss {record['train_loss']:.4f}, train "
                     f"{record['train_acc']:.2f}%, test {test_acc:.2f}%, {record['images_per_s']:,.0f} images/s, "
                     f"{elapsed:,.1f} s elapsed")
    trace.close()
    return finish(model, out, state, test_acc=test_acc, epochs=epochs, world=world,
                  wall_s=state.wall_s + time.perf_counter() - started)


def finish(model: nn.Module, out: Path, state: Checkpoint, *, test_acc: float, epochs: int,
           world: distributed.World, wall_s: float) -> dict[str, Any]:
    """The run's results, written by rank 0: model.pt, then summary.json (the run is finished), and the
    checkpoint removed. Returns the summary ({} on the other ranks)."""
    if not world.main:
        distributed.barrier(world)  # rank 0 writes the results
        return {}
    save_atomic(model.state_dict(), out / "model.pt")
    summary = {"test_acc": test_acc, "best_test_acc": state.best, "epochs": epochs, "wall_s": round(wall_s, 2),
               "images": sum(r.get("images", 0) for r in state.records)}  # training views seen, every epoch
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / CHECKPOINT).unlink(missing_ok=True)
    distributed.barrier(world)
    return summary
