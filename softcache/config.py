"""Frozen configurations, one per stage; the CLI and TOML pipeline files both build these.

Every run folder and cache records the configuration that made it as JSON (`to_json`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any



def default_device() -> str:
    import torch  # here, not at the top: reading a configuration (and `softcache --help`) needs no torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class OptimConfig:
    """How a model is trained (teacher or student alike)."""

    epochs: int = 30            # passes over the training set
    batch_size: int = 128       # images per step
    lr: float = 0.1             # peak learning rate; cosine decay to 0 over all steps
    momentum: float = 0.9       # SGD momentum
    weight_decay: float = 5e-4  # L2 on all parameters
    workers: int = 2            # DataLoader worker processes (0: load in the main process)
    sync_bn: bool = False       # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)


@dataclass(frozen=True, kw_only=True)
class ViewOptions:
    """The pixel work and mixing of views besides the crop policy (`augment`), shared by the stages that draw
    views: train-teacher, dump-teacher, train-online (see softcache.pixels, softcache.mixing)."""

    auto_augment: str = ""          # --aa: rand-m9-n2 (RandAugment), trivialaugment, autoaugment[-cifar10]
    color_jitter: float = 0.0       # ColorJitter(brightness=contrast=saturation=this); 0: off
    reprob: float = 0.0             # RandomErasing probability; 0: off
    mixup: float | None = None      # Mixup Beta(alpha, alpha); None: off
    cutmix: float | None = None     # CutMix Beta(alpha, alpha); None: off
    mix_prob: float = 1.0           # probability that a view is mixed (Mixup or CutMix on)
    mix_switch_prob: float = 0.5    # both on: probability of CutMix rather than Mixup


@dataclass(frozen=True)
class TeacherConfig(ViewOptions):
    """train-teacher: plain cross-entropy training (also the no-KD baseline)."""

    model: str                      # model name (see softcache.models)
    data: str                       # dataset spec (see softcache.data)
    out: str                        # run folder
    augment: str = "cifar"          # crop policy (cifar, imagenet, none) or a package.module:callable pipeline
    image_size: int | None = None   # view side in pixels; None: 224 for imagenet, else the source size
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_smoothing: float = 0.0    # label smoothing epsilon of the cross-entropy (the no-KD baseline the seed uses)
    device: str = field(default_factory=default_device)
    seed: int = 0
    data_path: str = "auto"         # resident (views gathered on the device) | loader (DataLoader workers) | auto
    download: bool = False          # allow torchvision to download cifar10/cifar100
    overwrite: bool = False         # replace a finished run folder


@dataclass(frozen=True)
class DumpConfig(ViewOptions):
    """dump-teacher: run the teacher once over replayable views and cache its outputs."""

    teacher: tuple[str, ...]        # teacher model name(s); features are taken from the first
    data: str                       # dataset spec; the training split is dumped
    out: str                        # cache folder (zarr) or .h5 file (hdf5)
    weights: tuple[str, ...] = ()   # one weights file per teacher; none when every teacher is pretrained=true
    augment: str = "cifar"          # crop policy (cifar, imagenet, none) or a package.module:callable pipeline
    views: str = "1"                # views per sample: a number, or 'all' for a finite policy
    layers: tuple[str, ...] = ()    # feature layers to store besides the logits
    image_size: int | None = None   # view side in pixels; None: 224 for imagenet, else the source size
    logits: str = "fp16"            # fp16 | bf16 | fp32 | topk:K | sampled:K[:TAU] (see softcache.targets)
    targets: str = "features"       # features | attention: what is stored per layer
    teacher_head: bool = False      # store the teacher's classifier once in the cache (simkd reuses it)
    temperature: float = 4.0        # sampled logits only: the temperature p_T is drawn at
    format: str | None = None       # zarr | hdf5; None: hdf5 for a .h5/.hdf5 --out, else zarr
    shard_mb: float = 64.0          # target size of one shard (the unit written whole) of the largest array
    writer_threads: int = 0         # shards compressed and written at once; 0: every core, up to 8
    batch_size: int = 256           # teacher images per forward pass
    workers: int = 2                # DataLoader worker processes
    data_path: str = "auto"         # resident (views gathered on the device) | loader (DataLoader workers) | auto
    device: str = field(default_factory=default_device)
    seed: int = 0                   # seeds the views: views of sample i are a function of (seed, i)
    download: bool = False
    overwrite: bool = False         # replace a cache made with other options
    streams: tuple[tuple[str, str], ...] = ()  # named view streams besides the main one: (name, "aa=...,reprob=...")


@dataclass(frozen=True)
class StudentConfig:
    """train-student: distill from a cache; no teacher is built or loaded."""

    cache: str                      # cache folder written by dump-teacher
    student: str                    # student model name
    out: str                        # run folder
    data: str | None = None         # dataset spec; None: the one recorded in the cache
    losses: tuple[str, ...] = ("kd",)                 # active terms: ce, kd, fitnets, at
    pairs: tuple[tuple[str, str], ...] = ()           # (student layer or TERM:layer, teacher layer), pair losses
    pair_reduce: str = "sum"        # a term over several pairs: their sum (RepDistiller) or mean
    alpha: float = 0.9              # kd: weight of the soft term; the hard-label ce gets 1 - alpha
    temperature: float = 4.0        # kd: softmax temperature T (the loss carries T^2)
    beta: float = 1000.0            # at: weight of the attention-transfer term
    hint_weight: float = 100.0      # fitnets: weight of the hint term
    weights: tuple[tuple[str, float], ...] = ()       # explicit per-term weights, overriding the above
    loss_options: tuple[tuple[str, float], ...] = ()  # (TERM.KEY, value): a term's own settings, e.g. dkd.beta
    kd_standardize: bool = False    # kd, dkd on standardized logits (logit standardization, Sun et al. 2024)
    learn_temperature: bool = False  # kd, dkd at a learned temperature (CTKD, Li et al. 2023)
    label_smoothing: float = 0.0    # ce: label smoothing epsilon
    teachers: str = "mean"          # several cached teachers: 'mean' of their probabilities, or one name
    stream: str = "main"            # the cache's view stream the student replays
    target_stream: str | None = None  # the stream whose teacher outputs are the targets; None: `stream`
    strong_stream: str | None = None  # mlkd: the stream of each sample's strong view (beside `stream`'s weak one)
    data_path: str = "auto"         # resident | loader | stream | auto (see softcache.planner)
    image_size: int | None = None   # student input side; None: the size the teacher saw
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = field(default_factory=default_device)
    seed: int = 0                   # seeds the order and the replayed view of each sample per epoch
    download: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class OnlineConfig(ViewOptions):
    """train-online: a student trained with the teacher in the loop (the online-KD baseline a cache replaces).

    The loss options are train-student's. Views are fresh each epoch, drawn from the policy as train-teacher
    draws them, unless `views_from` names a cache: then the student replays that cache's stored views in the
    order train-student would, and only the targets are computed online."""

    teacher: str                    # teacher model name
    student: str                    # student model name
    out: str                        # run folder
    teacher_weights: str | None = None  # its weights file (e.g. RUN/model.pt); None: a pretrained=true teacher
    data: str | None = None         # dataset spec; None: the one recorded in `views_from`
    augment: str = "cifar"          # crop policy or package.module:callable pipeline (fresh views)
    image_size: int | None = None   # view side in pixels; None: 224 for imagenet, else the source size
    views_from: str | None = None   # a cache whose stored views are replayed instead of fresh ones
    strong_stream: str | None = None  # mlkd: with views_from, its stream of each sample's strong view
    losses: tuple[str, ...] = ("kd",)
    pairs: tuple[tuple[str, str], ...] = ()
    pair_reduce: str = "sum"
    alpha: float = 0.9
    temperature: float = 4.0
    beta: float = 1000.0
    hint_weight: float = 100.0
    weights: tuple[tuple[str, float], ...] = ()
    loss_options: tuple[tuple[str, float], ...] = ()
    kd_standardize: bool = False
    learn_temperature: bool = False
    label_smoothing: float = 0.0
    data_path: str = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    device: str = field(default_factory=default_device)
    seed: int = 0
    download: bool = False
    overwrite: bool = False


def to_json(config: Any) -> dict[str, Any]:
    """A configuration as plain JSON types (tuples become lists)."""
    return dataclasses.asdict(config)
