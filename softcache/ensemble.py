"""`softcache ensemble RUN [RUN ...]`: top-1 of the mean of several runs' softmax outputs on the test split.

This is the ensemble of Born-Again Networks (Furlanello et al., 2018): the generations of one architecture,
each trained from the previous, averaged. Any finished train-teacher / train-student runs can be combined.
Each run's model is rebuilt from its `config.json` and `model.pt` and evaluated at the evaluation view of
its training policy (the teacher's augmentation for a student run, from its cache).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from softcache.batches import eval_batches
from softcache.data import Source, load_source
from softcache.device import autocast, model_inputs, prepare_model
from softcache.dump import resolve_image_size
from softcache.errors import SoftcacheError
from softcache.models import build_model, load_weights
from softcache.store import read_manifest
from softcache.views import Augment


@dataclass
class Ensemble:
    runs: list[Path]
    probs: np.ndarray          # [R, N, K] each run's softmax on the test split
    labels: np.ndarray         # [N]
    accuracy: list[float]      # per run, top-1 %
    ensemble_accuracy: float   # top-1 % of the mean of the runs' probabilities


def run_model(run: Path, num_classes: int) -> tuple[nn.Module, str, int | None, str]:
    """A finished run's model (weights loaded), its policy, its input size (None: the source's) and data spec."""
    config_path, weights = run / "config.json", run / "model.pt"
    if not weights.is_file() or not config_path.is_file():
        raise SoftcacheError(f"'{run}' is not a finished training run (no model.pt and config.json); give the --out "
                             "of train-teacher or train-student runs")
    config = json.loads(config_path.read_text())
    if "model" in config:  # train-teacher
        arch, policy, size, data = config["model"], config["augment"], config.get("image_size"), config["data"]
    else:                  # train-student: the teacher's policy and view size, from its cache
        manifest = read_manifest(config["cache"]) or {}
        augment = manifest.get("augment", {})
        arch, policy = config["student"], augment.get("policy", "cifar")
        size = config.get("image_size") or augment.get("image_size")
        data = config.get("data") or manifest.get("dataset", {}).get("resolved")
    return load_weights(build_model(arch, num_classes), weights), policy, size, data


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
    runs = [Path(r) for r in runs]
    if not runs:
        raise SoftcacheError("give at least one run folder")
    first = json.loads((runs[0] / "config.json").read_text()) if (runs[0] / "config.json").is_file() else {}
    spec = data or first.get("data") or (read_manifest(first.get("cache", "")) or {}).get("dataset", {}).get("resolved")
    if spec is None:
        raise SoftcacheError(f"cannot tell the dataset of '{runs[0]}'; pass --data SPEC")
    test: Source = load_source(spec, "test")
    dev = torch.device(device)
    all_probs, accuracy, labels = [], [], None
    for run in runs:
        model, policy, size, _ = run_model(run, len(test.classes))
        augment = Augment(policy, image_size=resolve_image_size(policy, size, test))
        loader = eval_batches(test, augment, batch_size=batch_size, workers=workers, device=dev)
        probs, y = predict(prepare_model(model, dev), loader, mean=test.mean, std=test.std, device=dev)
        if labels is not None and not np.array_equal(labels, y):
            raise SoftcacheError(f"'{run}' evaluates another test split than '{runs[0]}'")
        labels = y
        all_probs.append(probs)
        accuracy.append(100.0 * float((probs.argmax(1) == y).mean()))
    stacked = np.stack(all_probs)
    joint = 100.0 * float((stacked.mean(0).argmax(1) == labels).mean())
    return Ensemble(runs, stacked, labels, accuracy, joint)
