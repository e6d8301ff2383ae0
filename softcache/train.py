"""The trainers: plain cross-entropy (train-teacher, and the no-KD baseline), students from a cache
(train-student) and students with the teacher in the loop (train-online). Each sets up its data, model and
step object (training/steps.py) and hands them to the shared epoch loop (training/loop.py), in a run folder
(runs.py: config.json, metrics.jsonl, model.pt, summary.json, checkpoint.pt while unfinished).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from softcache import distributed
from softcache.batches import (OnlineTargets, PairedBatches, Targets, augmented_batches, eval_batches,
                               student_data)
from softcache.config import OnlineConfig, OptimConfig, StudentConfig, TeacherConfig, ViewOptions, to_json
from softcache.data import Source, check_data_matches, load_source, recorded_source
from softcache.device import check_device, prepare_model
from softcache.dump import resolve_image_size
from softcache.errors import SoftcacheError
from softcache.losses import FEATURE_LOSSES, DistillLoss, resolve_options, resolve_weights, route_pairs, split_pair
from softcache.losses.registry import DISTILL_HEAD_LOSSES, FULL_LOGIT_LOSSES, STANDARDIZED, TWO_VIEW_LOSSES
from softcache.losses.simkd import PROJECTOR, SimKDStudent
from softcache.models import (INPUT_GRADIENT, Tapped, build_model, check_classes, check_layers, check_published_head,
                              classifier_name, input_norm, is_pretrained, load_weights, teacher_params)
from softcache.weights import check_weights_file
from softcache.planner import DATA_PATHS, IMAGE_PATHS
from softcache.runs import run_folder
from softcache.training.loop import fit
from softcache.training.steps import CEStep, DistillStep
from softcache.store import MAIN, CacheReader, feature_name, open_cache, stream_augment, stream_prefix
from softcache.store.manifest import stored_params
from softcache.streaming import StreamingTargets
from softcache.views import Augment

log = logging.getLogger(__name__)

def wrap(module: nn.Module, world: distributed.World, device: torch.device, unused: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel under torchrun (gradients averaged over the ranks in backward),
    else itself. Buffers are not broadcast: BatchNorm statistics are each rank's own (or global, with
    --sync-bn), and loss state such as CRD's memories stays what each rank computed. `unused`: some steps leave
    parameters without a gradient (an initialisation stage, ft's frozen paraphraser, simkd's unused student
    head), which DDP must then look for."""
    if world.size <= 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch asks rank-local buffers to keep broadcast_buffers=False for now
        warnings.simplefilter("ignore", FutureWarning)
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                                   find_unused_parameters=unused)


def sync_batchnorm(model: nn.Module, sync_bn: bool, world: distributed.World, device: str) -> nn.Module:
    """BatchNorm layers with statistics over the global batch under torchrun with --sync-bn (SyncBatchNorm on
    CUDA, `distributed.GlobalBatchNorm` on CPU)."""
    return distributed.sync_batchnorm(model, torch.device(device)) if sync_bn and world.size > 1 else model


def train_classifier(model: nn.Module, train_source: Source, test_source: Source, out: str | Path, *,
                     augment: Augment, optim: OptimConfig = OptimConfig(), device: str = "cpu", seed: int = 0,
                     overwrite: bool = False, config: Mapping[str, Any] | None = None,
                     data_path: str = "auto", world: distributed.World = distributed.World(),
                     since: float | None = None, label_smoothing: float = 0.0) -> dict[str, Any]:
    """Cross-entropy training on fresh views of `augment` each epoch (see `augmented_batches`); under torchrun
    (`world`) with DistributedDataParallel, `optim.batch_size` being the global batch; `label_smoothing` ε smooths
    the one-hot targets."""
    since = time.perf_counter() if since is None else since
    check_batch_fits(train_source, optim.batch_size)
    distributed.check_global_batch(optim.batch_size, world)
    model = sync_batchnorm(model, optim.sync_bn, world, device)
    with run_folder(out, config or {}, kind="teacher", overwrite=overwrite, world=world) as run:
        torch.manual_seed(seed)
        dev = torch.device(device)
        model = prepare_model(model, dev)
        forward = wrap(model, world, dev)
        train_loader = augmented_batches(train_source, augment, batch_size=optim.batch_size, seed=seed,
                                         workers=optim.workers, device=dev, data_path=data_path, world=world)
        mean, std = input_norm(model, train_source)
        return fit(model, CEStep(forward, mean=mean, std=std, device=dev, label_smoothing=label_smoothing),
                   params=list(model.parameters()),
                   train_loader=train_loader,
                   test_loader=eval_batches(test_source, augment.for_model(model), batch_size=optim.batch_size,
                                            workers=optim.workers, device=dev, data_path=data_path)
                   if world.main else None,
                   optim=optim, mean=mean, std=std, device=dev, out=run, world=world, since=since)


def distillation_head(student: nn.Module, weights: Mapping[str, float], logits: str = "fp32") -> None:
    """With a `deit` term, switch a DeiT student (timm's `deit_*_distilled_*`) to train its distillation head
    (its forward then returns both heads' logits, `Tapped` splits them); refuse a student without one, and hard
    distillation from a `sampled` cache, which holds no argmax."""
    used = [t for t in DISTILL_HEAD_LOSSES if t in weights]
    if not used:
        return
    if not callable(getattr(student, "set_distilled_training", None)):
        raise SoftcacheError(f"{used[0]} trains a student's distillation head, and {type(student).__name__} has none; "
                             "give a DeiT student with one, e.g. timm:deit_tiny_distilled_patch16_224")
    if "deit" in used and logits == "sampled":
        raise SoftcacheError("deit (hard distillation) needs the teacher's top class, which a sampled cache does not "
                             "hold; use deit-soft, or a cache with fp16, bf16, fp32 or topk logits")
    student.set_distilled_training(True)


def check_batch_fits(source: Source, batch_size: int) -> None:
    """Epochs train on full batches only (the last partial one is dropped): refuse a training split smaller than
    one batch rather than report a run of zero steps as finished."""
    if len(source) < batch_size:
        raise SoftcacheError(f"the training split has {len(source)} samples, fewer than --batch-size {batch_size}: "
                             f"no full batch to train on; give --batch-size {len(source)} or less")


def train_student(student: nn.Module, cache: str | Path | CacheReader, train_source: Source, test_source: Source,
                  out: str | Path, *, weights: Mapping[str, float], temperature: float = 4.0,
                  pairs: Mapping[str, str] | Sequence[tuple[str, str]] | None = None, image_size: int | None = None,
                  pair_reduce: str = "sum",
                  optim: OptimConfig = OptimConfig(), device: str = "cpu", seed: int = 0, overwrite: bool = False,
                  config: Mapping[str, Any] | None = None, targets: Targets | None = None,
                  teachers: str = "mean", data_path: str = "auto", stream: str = MAIN, target_stream: str | None = None,
                  on_step: Callable[[int, dict[str, float]], None] | None = None,
                  world: distributed.World = distributed.World(), since: float | None = None,
                  settings: Mapping[str, Any] | None = None, strong_stream: str | None = None) -> dict[str, Any]:
    """Train `student` on the cache's stored views with the cached teacher targets. No teacher is involved.
    The student replays view stream `stream`; the targets are the teacher's outputs on `target_stream`'s views
    of the same (sample, slot) (default: the same stream).

    At epoch e, every sample replays stored view slot `replay_slot(V, seed, e)`; the student sees exactly the
    crop the teacher saw (resized to `image_size` if given). `settings`: DistillLoss's term options,
    standardization, learned temperature and label smoothing (`loss_settings`). `targets` replaces the cache as
    the source of
    teacher outputs (tests compare online KD this way). `data_path` (auto, resident, loader, stream) says where
    images and targets come from; see `softcache.planner`.
    """
    since = time.perf_counter() if since is None else since
    reader = cache if isinstance(cache, CacheReader) else open_cache(cache)
    manifest = reader.manifest
    target_stream = stream if target_stream is None else target_stream
    check_two_views(weights, strong_stream)
    for name in (stream, target_stream, *([strong_stream] if strong_stream else [])):
        stream_prefix(manifest, name)  # refuses a stream the cache does not have, naming those it has
    pairs = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs or [])
    check_data_matches(reader, train_source)
    missing = [t for _, t in pairs if t not in manifest["layers"]]
    if missing:
        raise SoftcacheError(f"the cache has no features for teacher layer '{missing[0]}'; cached layers: "
                             f"{', '.join(manifest['layers']) or 'none (logits only)'}")
    if pairs and not any(t in weights for t in FEATURE_LOSSES):
        raise SoftcacheError(f"--pair is given, but no loss uses it; add one of {', '.join(FEATURE_LOSSES)} to --loss "
                             f"(now: {', '.join(weights)})")
    if "fitnets" in weights and manifest["storage"]["targets"] == "attention":
        raise SoftcacheError("fitnets needs feature maps, but this cache stores attention maps only "
                             "(--targets attention); use at, or dump with --targets features")
    check_full_logits(weights, settings or {}, manifest["storage"]["logits"]["format"])
    if "gat" in weights and INPUT_GRADIENT not in manifest["layers"]:
        raise SoftcacheError("gat needs the teacher's input-gradient maps, which this cache does not hold; dump with "
                             "--layers input_gradient (beside any others)")
    if "gat" in weights and len(manifest["teachers"]) > 1 and teachers != manifest["teachers"][0]["name"]:
        raise SoftcacheError(f"gat's cached maps are the first teacher's, of its top class; give --teachers "
                             f"{manifest['teachers'][0]['name']} (not the ensemble's {teachers})")
    check_batch_fits(train_source, optim.batch_size)
    distributed.check_global_batch(optim.batch_size, world)
    student = sync_batchnorm(student, optim.sync_bn, world, device)  # before simkd's wrapper borrows its modules
    student, pairs = reuse_teacher_head(student, weights, pairs, stored_params(manifest),
                                        lambda t: reader.shape(feature_name(manifest, t, target_stream))[2:],
                                        image_size or manifest["augment"]["image_size"])
    if isinstance(student, SimKDStudent):
        student.simkd_projector = sync_batchnorm(student.simkd_projector, optim.sync_bn, world, device)
    distillation_head(student, weights, manifest["storage"]["logits"]["format"])
    student_layers = sorted({split_pair(key)[1] for key, _ in pairs})
    refuse_input_gradient_pair(student_layers)
    tapped = Tapped(student, student_layers)  # refuses an unknown student layer before anything is written
    routes, channels, kinds = plan_pairs(tapped, reader, weights, pairs,
                                         image_size or manifest["augment"]["image_size"], stream=target_stream)
    augment = Augment.from_manifest(stream_augment(manifest, stream), image_size)
    settings = {**(settings or {}), "teacher_params": stored_params(manifest)}  # what the cache holds once

    def batches(dev: torch.device, teacher_layers: list[str]) -> tuple[Any, Targets]:
        common = dict(temperature=temperature, teachers=teachers, image_size=augment.image_size,
                      batch_size=optim.batch_size, seed=seed, workers=optim.workers, device=dev, data_path=data_path,
                      targets=targets, world=world)
        loader, found, _ = student_data(reader, train_source, teacher_layers=teacher_layers, stream=stream,
                                        target_stream=target_stream, **common)
        if strong_stream is not None:  # the same samples and slots in the strong stream, with its own targets
            second, strong, _ = student_data(reader, train_source, teacher_layers=[], stream=strong_stream, **common)
            loader = PairedBatches(loader, second, strong)
        return loader, found

    return distill(student, tapped, batches, train_source, test_source, out, config=config, overwrite=overwrite,
                   augment=augment, weights=weights, temperature=temperature, routes=routes, channels=channels,
                   kinds=kinds, pair_reduce=pair_reduce, optim=optim, device=device, seed=seed, data_path=data_path,
                   on_step=on_step, world=world, since=since, settings=settings)


def reuse_teacher_head(student: nn.Module, weights: Mapping[str, float], pairs: list[tuple[str, str]],
                       params: Mapping[str, Any], teacher_shape: Callable[[str], tuple[int, ...]],
                       image_size: int) -> tuple[nn.Module, list[tuple[str, str]]]:
    """With simkd: the student wrapped with SimKD's projector and the teacher's stored classifier
    (`SimKDStudent`), and its pair rewritten to read the projector; otherwise both unchanged."""
    if "simkd" not in weights:
        return student, pairs
    mine = [(k, t) for k, t in pairs if split_pair(k)[0] == "simkd"] or \
        [(k, t) for k, t in pairs if split_pair(k)[0] is None]
    if len(mine) != 1:
        raise SoftcacheError(f"simkd reads one --pair, the student's last map and the teacher's (e.g. --pair "
                             f"simkd:layer3=layer3); it has {len(mine)}")
    if "classifier/weight" not in params:
        raise SoftcacheError("simkd reuses the teacher's classifier, which this cache does not store; "
                             "dump with --teacher-head")
    (key, t_layer), s_layer = mine[0], split_pair(mine[0][0])[1]
    check_layers(student, [s_layer])
    seen: dict[str, torch.Tensor] = {}
    hook = dict(student.named_modules())[s_layer].register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    with torch.no_grad():
        was = student.training
        student.eval()(torch.zeros(2, 3, image_size, image_size, device=next(student.parameters()).device))
        student.train(was)
    hook.remove()
    shape = tuple(teacher_shape(t_layer))
    if seen["out"].dim() != 4 or len(shape) != 3:
        raise SoftcacheError(f"simkd pairs feature maps [C, H, W]; --pair {key}={t_layer} pairs "
                             f"{list(seen['out'].shape[1:])} with {list(shape)}")
    wrapped = SimKDStudent(student, s_layer, seen["out"].shape[1], shape[0], shape[1:],
                           torch.as_tensor(params["classifier/weight"]), torch.as_tensor(params["classifier/bias"]))
    return wrapped, [(f"simkd:{PROJECTOR}", t) if (k, t) == (key, t_layer) else (k, t) for k, t in pairs]


def refuse_input_gradient_pair(student_layers: Sequence[str]) -> None:
    """`input_gradient` is a teacher's pseudo-layer; the student's map is gat's own, not a pair's."""
    if INPUT_GRADIENT in student_layers:
        raise SoftcacheError(f"'{INPUT_GRADIENT}' is a teacher's cached map, not a student layer: --loss gat takes "
                             "the student's input-gradient map itself, with no --pair")


def check_two_views(weights: Mapping[str, float], strong_stream: str | None) -> None:
    """A two-view term (mlkd) needs the strong view stream, and the strong stream a term that reads it."""
    needs = [t for t in TWO_VIEW_LOSSES if t in weights]
    if needs and strong_stream is None:
        raise SoftcacheError(f"{needs[0]} learns from a weak and a strong view of every sample: dump with a strong "
                             "stream (e.g. --stream strong:aa=rand-m9-n2,reprob=0.25) and give --strong-stream strong")
    if strong_stream is not None and not needs:
        raise SoftcacheError(f"--strong-stream {strong_stream} feeds {', '.join(TWO_VIEW_LOSSES)}, which --loss does "
                             f"not have ({', '.join(weights)}); add mlkd or drop --strong-stream")


def check_full_logits(weights: Mapping[str, float], settings: Mapping[str, Any], logits: str) -> None:
    """Refuse a term that reads the teacher's whole logit vector with a cache that holds part of it (`topk`,
    `sampled`), naming why; KD itself is exact or unbiased from those."""
    if logits not in ("topk", "sampled"):
        return
    why = {"dkd": "its non-target distribution needs every class's logit",
           "dist": "its Pearson correlations run over every class's probability"}
    needs = [(t, why.get(t, "it reads every class's logit")) for t in weights if t in FULL_LOGIT_LOSSES]
    if "gat" in weights and logits == "sampled":
        needs.append(("gat", "the student's map is of the teacher's top class, which a sampled cache does not hold"))
    changed = [t for t in STANDARDIZED if t in weights]
    if settings.get("standardize") and changed:
        needs.append(("--kd-standardize", "the mean and std of the logits need every class's logit"))
    if settings.get("learn_temperature") and changed:
        needs.append(("--learn-temperature", f"a {logits} cache holds KD at the dump's temperatures only"))
    if needs:
        term, reason = needs[0]
        raise SoftcacheError(f"{term} needs the teacher's full logits, and this cache stores {logits} logits "
                             f"({reason}); dump with --logits fp16 (or bf16, fp32)")


def loss_settings(cfg: StudentConfig | OnlineConfig, weights: Mapping[str, float]) -> dict[str, Any]:
    """DistillLoss's settings beyond the weights, from a student stage's configuration (checked)."""
    changed = [t for t in STANDARDIZED if t in weights]
    for flag, on in (("--kd-standardize", cfg.kd_standardize), ("--learn-temperature", cfg.learn_temperature)):
        if on and not changed:
            raise SoftcacheError(f"{flag} changes {' and '.join(STANDARDIZED)}, and --loss has neither "
                                 f"({', '.join(cfg.losses)}); add kd or dkd")
    if not 0 <= cfg.label_smoothing < 1:
        raise SoftcacheError(f"label_smoothing = {cfg.label_smoothing}: give an epsilon in [0, 1)")
    if cfg.label_smoothing and "ce" not in weights:
        raise SoftcacheError("--label-smoothing smooths the ce term, which --loss does not have; add ce")
    return {"options": resolve_options(weights, cfg.loss_options), "standardize": cfg.kd_standardize,
            "learn_temperature": cfg.learn_temperature, "label_smoothing": cfg.label_smoothing}


def distill(student: nn.Module, tapped: Tapped, batches: Callable[[torch.device, list[str]], tuple[Any, Targets]],
            train_source: Source, test_source: Source, out: str | Path, *, config: Mapping[str, Any] | None,
            overwrite: bool, augment: Augment, weights: Mapping[str, float], temperature: float,
            routes: dict[str, list[tuple[str, str]]], channels: dict[tuple[str, str], tuple[int, int]],
            kinds: dict[tuple[str, str], str], pair_reduce: str, optim: OptimConfig, device: str, seed: int,
            data_path: str = "auto",
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            world: distributed.World = distributed.World(), since: float | None = None,
            kind: str = "student", settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The training of a student (train-student and train-online alike) in the run folder `out`:
    `batches(device, teacher layers) -> (training batches, their teacher targets)`; the loss terms, routed as
    `plan_pairs` says; `fit`."""
    labels, (mean, std) = train_source.labels, input_norm(student, train_source)
    with run_folder(out, config or {}, kind=kind, overwrite=overwrite, world=world) as run:
        torch.manual_seed(seed)
        dev = torch.device(device)
        tapped = prepare_model(tapped, dev)
        teacher_layers = {t for used in routes.values() for _, t in used} | ({INPUT_GRADIENT} if "gat" in weights
                                                                             else set())
        train_loader, targets = batches(dev, sorted(teacher_layers))
        strong = train_loader.targets if isinstance(train_loader, PairedBatches) else None
        criterion = DistillLoss(weights, temperature=temperature, routes=routes, channels=channels,
                                reduce=pair_reduce, labels=labels, seed=seed, kinds=kinds,
                                **(settings or {})).to(dev)
        criterion = sync_batchnorm(criterion, optim.sync_bn, world, device)  # FitNets regressors hold BatchNorm too
        unused = criterion.init_epochs > 0 or any(t in weights for t in ("ft", "simkd"))
        step = DistillStep(wrap(tapped, world, dev, unused), wrap(criterion, world, dev, unused), targets, mean=mean,
                           std=std, device=dev, strong_targets=strong)
        try:
            return fit(student, step, params=list(tapped.parameters()) + list(criterion.parameters()),
                       modules={"model": student, "criterion": criterion},
                       train_loader=train_loader,
                       test_loader=eval_batches(test_source, augment.for_model(student), batch_size=optim.batch_size,
                                                workers=optim.workers, device=dev,
                                                data_path="loader" if data_path == "loader" else "auto")
                       if world.main else None,
                       optim=optim, mean=mean, std=std, device=dev, out=run, on_step=on_step, world=world, since=since,
                       init_epochs=criterion_init_epochs(criterion))
        finally:
            for found in (targets, strong):  # a streaming reader runs ahead into the next epoch: stop it
                if isinstance(found, StreamingTargets):
                    found.close()


def criterion_init_epochs(criterion: nn.Module) -> int:
    """The initialisation epochs of a (possibly wrapped) DistillLoss."""
    return getattr(criterion, "module", criterion).init_epochs


def plan_pairs(tapped: Tapped, teacher: CacheReader | Mapping[str, tuple[int, ...]], weights: Mapping[str, float],
               pairs: Sequence[tuple[str, str]], image_size: int, stream: str = MAIN
               ) -> tuple[dict[str, list[tuple[str, str]]], dict[tuple[str, str], tuple[int, int]],
                          dict[tuple[str, str], str]]:
    """Which pairs each loss term uses (`route_pairs`), each pair's `(student C, teacher C)` (`D` for tokens) and
    kind (map, attention, vector, tokens), from one probe forward of the student (on its current device) and the
    teacher's outputs: a cache (its arrays' shapes), or `{layer: shape of one sample's output}` for a teacher run
    online."""
    with torch.no_grad():
        tapped.eval()
        device = next(tapped.parameters()).device
        _, probe = tapped(torch.zeros(2, 3, image_size, image_size, device=device))
    attention = isinstance(teacher, CacheReader) and teacher.manifest["storage"]["targets"] == "attention"
    kinds, channels, planned = {}, {}, []
    for key, t in pairs:
        s = split_pair(key)[1]
        if isinstance(teacher, CacheReader):
            shape = teacher.shape(feature_name(teacher.manifest, t, stream))[2:]  # [N, V, ...] -> one view's
        else:
            shape = teacher[t]
        t_kind = {1: "vector", 2: "attention" if attention else "tokens"}.get(len(shape), "map")
        s_kind = {2: "vector", 3: "tokens"}.get(probe[s].dim(), "map")
        if s_kind != t_kind and not (s_kind, t_kind) == ("map", "attention"):
            raise SoftcacheError(f"--pair {key}={t} pairs a student {_KIND_WORDS[s_kind]} "
                                 f"{list(probe[s].shape[1:])} with a teacher {_KIND_WORDS[t_kind]} {list(shape)}; "
                                 "pair like with like (maps with maps, tokens with tokens, embeddings with embeddings)")
        if t_kind == "attention" and probe[s].shape[-1] < shape[-1]:
            t = pooled_map(teacher, key, t, tuple(probe[s].shape[-2:]), tuple(shape[-2:]), stream)
        kinds[(s, t)] = t_kind
        channels[(s, t)] = (probe[s].shape[-1], shape[-1]) if t_kind == "tokens" else (probe[s].shape[1], shape[0])
        planned.append((key, t))
    return route_pairs(list(weights), planned, kinds), channels, kinds


_KIND_WORDS = {"vector": "embedding", "map": "feature map", "attention": "attention map", "tokens": "token feature"}


def pooled_map(reader: CacheReader, key: str, layer: str, student: tuple[int, int], teacher: tuple[int, int],
               stream: str = MAIN) -> str:
    """The cached attention map that makes AT exact for a student map smaller than the teacher's: the one of the
    teacher feature pooled by the size ratio (`layer@k`, see `targets.feature_targets`); other ratios are refused."""
    k = teacher[0] // student[0]
    name = f"{layer}@{k}"
    if teacher != (student[0] * k, student[1] * k) or feature_name(reader.manifest, name, stream) not in reader.names():
        raise SoftcacheError(f"--pair {key}={layer}: the student map is {student[0]}x{student[1]}, "
                             f"the cached attention map {teacher[0]}x{teacher[1]}; "
                             "an attention-only cache holds exact maps for students "
                             f"2x or 4x smaller only; dump with --targets features for other sizes")
    return name


def build_criterion(tapped: Tapped, reader: CacheReader, *, weights: Mapping[str, float], temperature: float,
                    pairs: Mapping[str, str] | Sequence[tuple[str, str]], image_size: int, device: torch.device,
                    reduce: str = "sum") -> DistillLoss:
    """The student's loss terms; FitNets regressors are sized from the student's and the cached teacher's channels."""
    pairs = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    routes, channels, kinds = plan_pairs(tapped, reader, weights, pairs, image_size)
    return DistillLoss(weights, temperature=temperature, routes=routes, channels=channels, reduce=reduce,
                       kinds=kinds).to(device)


def check_training(cfg: TeacherConfig | StudentConfig | OnlineConfig) -> None:
    """A training stage's values that need no data or model, checked before anything is loaded (and by
    `softcache run` for every stage before its first stage runs)."""
    o = cfg.optim
    for name, value, low in (("epochs", o.epochs, 1), ("batch_size", o.batch_size, 1), ("workers", o.workers, 0),
                             ("lr", o.lr, 0), ("weight_decay", o.weight_decay, 0), ("momentum", o.momentum, 0)):
        if value < low:
            raise SoftcacheError(f"{name} = {value}: it must be at least {low}")
    valid = DATA_PATHS if isinstance(cfg, StudentConfig) else IMAGE_PATHS
    if cfg.data_path not in valid:
        raise SoftcacheError(f"data_path '{cfg.data_path}'; valid: {', '.join(valid)}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise SoftcacheError(f"image_size = {cfg.image_size}: give a positive number of pixels")
    if not isinstance(cfg, StudentConfig):
        augment = Augment.from_options(cfg, cfg.image_size or 1)
        if cfg.data_path == "resident" and not (augment.finite and augment.plain):
            raise SoftcacheError(f"--data-path resident needs crop-only views (cifar, none) without pixel work; "
                                 f"'{augment.describe()}' views are made by DataLoader workers: use --data-path "
                                 "loader (or auto)")
    if not isinstance(cfg, TeacherConfig):
        loss_settings(cfg, resolve_weights(cfg.losses, alpha=cfg.alpha, beta=cfg.beta, hint_weight=cfg.hint_weight,
                                           overrides=dict(cfg.weights)))
    elif not 0 <= cfg.label_smoothing < 1:
        raise SoftcacheError(f"label_smoothing = {cfg.label_smoothing}: give an epsilon in [0, 1)")
    check_device(cfg.device)


def train_teacher_from_config(cfg: TeacherConfig) -> dict[str, Any]:
    """The train-teacher command."""
    since = time.perf_counter()  # the run's wall time includes loading data and models
    check_training(cfg)
    train_source = load_source(cfg.data, "train", download=cfg.download)
    test_source = load_source(cfg.data, "test", download=cfg.download)
    augment = Augment.from_options(cfg, resolve_image_size(cfg.augment, cfg.image_size, train_source, cfg.model))
    augment.probe(train_source)
    world = distributed.init(cfg.device)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what --seed fixes
    model = build_model(cfg.model, num_classes=len(train_source.classes))
    check_classes(model, cfg.model, len(train_source.classes), augment.image_size)
    return train_classifier(model, train_source, test_source, cfg.out, augment=augment, optim=cfg.optim,
                            device=distributed.local_device(cfg.device, world), seed=cfg.seed,
                            overwrite=cfg.overwrite, config=to_json(cfg), data_path=cfg.data_path, world=world,
                            since=since, label_smoothing=cfg.label_smoothing)


def train_student_from_config(cfg: StudentConfig) -> dict[str, Any]:
    """The train-student command: the cache names the dataset unless `cfg.data` overrides it."""
    since = time.perf_counter()  # the run's wall time includes loading data and models
    check_training(cfg)
    reader = open_cache(cfg.cache)
    if cfg.data:
        train_source = load_source(cfg.data, "train", download=cfg.download)
        test_source = load_source(cfg.data, "test", download=cfg.download)
    else:
        train_source = recorded_source(reader.manifest["dataset"], "train", download=cfg.download)
        test_source = recorded_source(reader.manifest["dataset"], "test", download=cfg.download)
    weights = resolve_weights(cfg.losses, alpha=cfg.alpha, beta=cfg.beta, hint_weight=cfg.hint_weight,
                              overrides=dict(cfg.weights))
    world = distributed.init(cfg.device)
    torch.manual_seed(cfg.seed)  # the initial weights are part of what --seed fixes
    student = build_model(cfg.student, num_classes=len(train_source.classes))
    check_classes(student, cfg.student, len(train_source.classes),
                  cfg.image_size or reader.manifest["augment"]["image_size"])
    return train_student(student, reader, train_source, test_source, cfg.out, weights=weights,
                         temperature=cfg.temperature, pairs=list(cfg.pairs), image_size=cfg.image_size,
                         pair_reduce=cfg.pair_reduce, world=world, optim=cfg.optim,
                         device=distributed.local_device(cfg.device, world), seed=cfg.seed, overwrite=cfg.overwrite,
                         config=to_json(cfg), teachers=cfg.teachers, data_path=cfg.data_path, stream=cfg.stream,
                         target_stream=cfg.target_stream, since=since, settings=loss_settings(cfg, weights),
                         strong_stream=cfg.strong_stream)


def train_online(student: nn.Module, teacher: nn.Module, train_source: Source, test_source: Source, out: str | Path, *,
                 augment: Augment, weights: Mapping[str, float], temperature: float = 4.0,
                 pairs: Sequence[tuple[str, str]] = (), pair_reduce: str = "sum", views_from: CacheReader | None = None,
                 optim: OptimConfig = OptimConfig(), device: str = "cpu", seed: int = 0, overwrite: bool = False,
                 config: Mapping[str, Any] | None = None, data_path: str = "auto",
                 on_step: Callable[[int, dict[str, float]], None] | None = None,
                 world: distributed.World = distributed.World(), since: float | None = None,
                 settings: Mapping[str, Any] | None = None, strong_stream: str | None = None) -> dict[str, Any]:
    """Train `student` with `teacher` run on every batch (online KD): the baseline the cache replaces, with
    train-student's losses and outputs. Views are fresh each epoch (`augmented_batches`), or with `views_from`
    the stored views of that cache replayed exactly as train-student replays them (same batches, same loss
    values up to the cache's float16 rounding, which the online teacher's outputs share)."""
    since = time.perf_counter() if since is None else since
    pairs = list(pairs)
    if pairs and not any(t in weights for t in FEATURE_LOSSES):
        raise SoftcacheError(f"--pair is given, but no loss uses it; add one of {', '.join(FEATURE_LOSSES)} to --loss "
                             f"(now: {', '.join(weights)})")
    if views_from is not None:
        check_data_matches(views_from, train_source)
    check_two_views(weights, strong_stream)
    if strong_stream is not None and views_from is None:
        raise SoftcacheError("train-online replays a strong view stream from --views-from CACHE only; give the cache")
    check_batch_fits(train_source, optim.batch_size)
    distributed.check_global_batch(optim.batch_size, world)
    teacher_layers = sorted({t for _, t in pairs} | ({INPUT_GRADIENT} if "gat" in weights else set()))
    check_layers(teacher, teacher_layers)
    dev = torch.device(device)
    t_mean, t_std = input_norm(teacher, train_source)
    online = OnlineTargets(teacher, teacher_layers, mean=t_mean, std=t_std, device=dev)
    with torch.no_grad():  # one sample's output shape per teacher layer, for the pairs and the regressors
        _, probe = online(torch.zeros(1, 3, augment.image_size, augment.image_size, dtype=torch.uint8), None, None)
    student = sync_batchnorm(student, optim.sync_bn, world, device)
    student, pairs = reuse_teacher_head(student, weights, pairs,
                                        teacher_params(teacher, [], head=classifier_name(teacher) is not None),
                                        lambda t: tuple(probe[t].shape[1:]), augment.image_size)
    if isinstance(student, SimKDStudent):
        student.simkd_projector = sync_batchnorm(student.simkd_projector, optim.sync_bn, world, device)
    distillation_head(student, weights)
    refuse_input_gradient_pair([split_pair(key)[1] for key, _ in pairs])
    tapped = Tapped(student, sorted({split_pair(key)[1] for key, _ in pairs}))
    routes, channels, kinds = plan_pairs(tapped, {t: tuple(f.shape[1:]) for t, f in probe.items()}, weights, pairs,
                                         augment.image_size)
    # what a cache would hold of the teacher once, taken from the teacher itself
    settings = {**(settings or {}), "teacher_params": teacher_params(teacher, teacher_layers,
                                                                     head=classifier_name(teacher) is not None)}

    def batches(dev: torch.device, layers: list[str]) -> tuple[Any, Targets]:
        if views_from is not None:
            common = dict(temperature=temperature, teachers="mean", image_size=augment.image_size,
                          batch_size=optim.batch_size, seed=seed, workers=optim.workers, device=dev,
                          data_path=data_path, targets=online, world=world)
            loader, _, _ = student_data(views_from, train_source, teacher_layers=layers, **common)
            if strong_stream is not None:
                second, _, _ = student_data(views_from, train_source, teacher_layers=[], stream=strong_stream, **common)
                loader = PairedBatches(loader, second, online)
        else:
            loader = augmented_batches(train_source, augment, batch_size=optim.batch_size, seed=seed,
                                       workers=optim.workers, device=dev,
                                       data_path="auto" if data_path == "stream" else data_path, world=world)
        return loader, online

    return distill(student, tapped, batches, train_source, test_source, out, config=config, overwrite=overwrite,
                   augment=augment, weights=weights, temperature=temperature, routes=routes, channels=channels,
                   kinds=kinds, pair_reduce=pair_reduce, optim=optim, device=device, seed=seed, data_path=data_path,
                   on_step=on_step, world=world, since=since, kind="online", settings=settings)


def train_online_from_config(cfg: OnlineConfig) -> dict[str, Any]:
    """The train-online command."""
    since = time.perf_counter()  # the run's wall time includes loading data and models
    check_training(cfg)
    if cfg.views_from is None and cfg.data is None:
        raise SoftcacheError("train-online needs --data SPEC (or --views-from CACHE, whose dataset it takes)")
    if cfg.teacher_weights:
        check_weights_file(cfg.teacher_weights)
    elif not is_pretrained(cfg.teacher):
        raise SoftcacheError(f"train-online needs --weights for teacher '{cfg.teacher}' (its model.pt, a state_dict "
                             "or a .safetensors file), unless it is a zoo model with pretrained=true")
    reader = open_cache(cfg.views_from) if cfg.views_from else None
    if cfg.data:
        train_source = load_source(cfg.data, "train", download=cfg.download)
        test_source = load_source(cfg.data, "test", download=cfg.download)
    else:
        train_source = recorded_source(reader.manifest["dataset"], "train", download=cfg.download)
        test_source = recorded_source(reader.manifest["dataset"], "test", download=cfg.download)
    if reader is not None:  # the cache's policy, pixel work, mixing and view size
        given = [f.name for f in fields(ViewOptions) if getattr(cfg, f.name) != f.default]
        if given:
            raise SoftcacheError(f"--views-from replays the cache's own views ({reader.manifest['augment']['policy']}"
                                 f" and its pixel work and mixing); drop --{given[0].replace('_', '-')}")
        augment = Augment.from_manifest(reader.manifest["augment"], cfg.image_size)
    else:
        augment = Augment.from_options(cfg, resolve_image_size(cfg.augment, cfg.image_size, train_source,
                                                               cfg.teacher))
        augment.probe(train_source)
    weights = resolve_weights(cfg.losses, alpha=cfg.alpha, beta=cfg.beta, hint_weight=cfg.hint_weight,
                              overrides=dict(cfg.weights))
    world = distributed.init(cfg.device)
    if not cfg.teacher_weights:
        check_published_head(cfg.teacher, len(train_source.classes))
    teacher = build_model(cfg.teacher, len(train_source.classes), weights_follow=bool(cfg.teacher_weights))
    if cfg.teacher_weights:
        load_weights(teacher, cfg.teacher_weights)
    torch.manual_seed(cfg.seed)  # the student's initial weights, as train-student makes them
    student = build_model(cfg.student, num_classes=len(train_source.classes))
    for model, name in ((teacher, cfg.teacher), (student, cfg.student)):
        check_classes(model, name, len(train_source.classes), augment.image_size)
    return train_online(student, teacher, train_source, test_source, cfg.out, augment=augment, weights=weights,
                        temperature=cfg.temperature, pairs=list(cfg.pairs), pair_reduce=cfg.pair_reduce,
                        views_from=reader, optim=cfg.optim, device=distributed.local_device(cfg.device, world),
                        seed=cfg.seed, overwrite=cfg.overwrite, config=to_json(cfg), data_path=cfg.data_path,
                        world=world, since=since, settings=loss_settings(cfg, weights), strong_stream=cfg.strong_stream)
