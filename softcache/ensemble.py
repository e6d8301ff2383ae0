"""`softcache ensemble RUN [RUN ...]`: top-1 of the mean of several runs' softmax outputs on the test split.

This is the ensemble of Born-Again Networks (Furlanello et al., 2018): the generations of one architecture,
each trained from the previous, averaged. Any finished train-teacher, train-student or train-online runs
can be combined.
Each run's model is rebuilt from its `config.json` and `model.pt` and evaluated at the evaluation view of
its training policy (the teacher's augmentation for a student run, from its cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from softcache.batches import eval_batches
from softcache.data import Source, load_source
from softcache.device import autocast, model_inputs, prepare_model
from softcache.dump import resolve_image_size
from softcache.errors import SoftcacheError
from softcache.models import build_model, input_norm, load_weights
from softcache.runs import RunInfo, read_run
from softcache.views import Augment


@dataclass
class Ensemble:
    runs: list[Path]
    probs: np.ndarray          # [R, N, K] each run's softmax on the test split
    labels: np.ndarray         # [N]
    accuracy: list[float]      # per run, top-1 %
    ensemble_accuracy: float   # top-1 % of the mean of the runs' probabilities


def finished_runs(paths: Sequence[str | Path]) -> list[RunInfo]:
    """The runs at `paths`; refuses one that is not a finished training run."""
    runs = []
    for path in map(Path, paths):
        run = read_run(path)
        if run is None or run.summary is None or not (path / "model.pt").is_file():
            raise SoftcacheError(f"'{path}' is not a finished training run (no model.pt, config.json and "
                                 "summary.json); give the --out of train-teacher, train-student or train-online runs")
        runs.append(run)
    return runs


def run_model(run: RunInfo, num_classes: int) -> nn.Module:
    """A finished run's model, its weights loaded."""
    return load_weights(build_model(run.model, num_classes, weights_follow=True), run.path / "model.pt")


@torch.no_grad()
def predict(model: nn.Module, loader, *, mean: Sequence[float], std: Sequence[float],
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs `[N, K]` (float32) and labels `[N]` of `model` over `loader`, in the loader's order."""
    model.eval()
    probs, labels = [], []
    for batch in loader:
        views, y = batch[:2]
        with autocast(device, torch.bfloat16):
            logits = model(model_inputs(views, mean, std, device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def ensemble(runs: Sequence[str | Path], *, data: str | None = None, device: str = "cpu", batch_size: int = 256,
             workers: int = 2) -> Ensemble:
    """Evaluate every run on the test split of `data` (default: the first run's dataset) and average them."""
    if not runs:
        raise SoftcacheError("give at least one run folder")
    runs = finished_runs(runs)
    specs = {run.data for run in runs}
    if data is None and len(specs) > 1:
        raise SoftcacheError("the runs were trained on different datasets ("
                             + "; ".join(f"{run.path}: {run.data}" for run in runs)
                             + "); pass --data SPEC to evaluate every one on that test split")
    spec = data or runs[0].data
    if spec is None:
        raise SoftcacheError(f"cannot tell the dataset of '{runs[0].path}'; pass --data SPEC")
    test: Source = load_source(spec, "test")
    dev = torch.device(device)
    all_probs, accuracy, labels = [], [], None
    for run in runs:
        model = run_model(run, len(test.classes))
        augment = Augment(run.policy, image_size=resolve_image_size(run.policy, run.image_size, test, run.model))
        loader = eval_batches(test, augment.for_model(model), batch_size=batch_size, workers=workers, device=dev)
        mean, std = input_norm(model, test)
        probs, y = predict(prepare_model(model, dev), loader, mean=mean, std=std, device=dev)
        if labels is not None and not np.array_equal(labels, y):
            raise SoftcacheError(f"'{run.path}' evaluates another test split than '{runs[0].path}'")
        labels = y
        all_probs.append(probs)
        accuracy.append(100.0 * float((probs.argmax(1) == y).mean()))
    stacked = np.stack(all_probs)
    joint = 100.0 * float((stacked.mean(0).argmax(1) == labels).mean())
    return Ensemble([run.path for run in runs], stacked, labels, accuracy, joint)
