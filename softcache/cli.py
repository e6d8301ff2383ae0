"""The `softcache` command: a thin click layer that builds a config and calls one library function."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

import click

from softcache import __version__
from softcache.config import (DumpConfig, OnlineConfig, OptimConfig, StudentConfig, TeacherConfig, ViewOptions,
                              default_device)
from softcache.errors import SoftcacheError
from softcache.names import AUTO_SPELLINGS, BACKENDS, POLICIES, TARGET_KINDS
from softcache.losses.registry import MAP_LOSSES, TOKEN_LOSSES, VECTOR_LOSSES
from softcache.losses.routing import PAIR_REDUCTIONS
from softcache.names import LOSS_NAMES as LOSSES
from softcache.planner import DATA_PATHS, IMAGE_PATHS


class SoftcacheGroup(click.Group):
    """Expected errors become one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SoftcacheError as err:
            raise click.ClickException(str(err)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as err:
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
            click.echo(f"Error: {err.format_message()}{hint}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


# ---------------------------------------------------------------- options, defined once

MODEL_EXAMPLES = "resnet56, resnet18, timm:NAME[,KEY=VALUE,...], hf:PATH_OR_ID, package.module:callable"


def _option(*names: str, **kwargs: Any) -> Callable:
    """click.option showing its default, unless its help says the default in words ("[default: ...]")."""
    return click.option(*names, show_default="[default:" not in kwargs.get("help", ""), **kwargs)


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    """A comma-separated list with no empty and no repeated entry."""
    if not value:
        return ()
    items = [v.strip() for v in value.split(",")]
    if "" in items:
        raise click.BadParameter(f"'{value}' has an empty entry; "
                                 "give names separated by single commas (e.g. layer2,layer3)")
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise click.BadParameter(f"'{repeated[0]}' is given twice in '{value}'; give each once")
    return tuple(items)


def _losses(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    terms = _names(ctx, param, value)
    unknown = [t for t in terms if t not in LOSSES]
    if unknown or not terms:
        raise click.BadParameter(f"unknown loss '{unknown[0] if unknown else value}'; "
                                 f"valid: {', '.join(sorted(LOSSES))}")
    return terms


def _pairs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in value:
        student, sep, teacher = item.partition("=")
        if not sep or not student.rpartition(":")[2] or not teacher:
            raise click.BadParameter(f"'{item}' is not [TERM:]S_LAYER=T_LAYER (e.g. layer3=layer3, at:layer2=layer2)")
        term, colon, _ = student.partition(":")
        if colon and term not in LOSSES:
            raise click.BadParameter(f"'{item}' names loss '{term}'; valid: {', '.join(sorted(LOSSES))}")
        out.append((student, teacher))
    return tuple(out)


def _weights(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    out = []
    for item in value:
        term, sep, weight = item.partition("=")
        try:
            out.append((term, float(weight)))
        except ValueError:
            raise click.BadParameter(f"'{item}' is not TERM=WEIGHT (e.g. kd=0.9)") from None
        if not sep:
            raise click.BadParameter(f"'{item}' is not TERM=WEIGHT (e.g. kd=0.9)")
        if term not in LOSSES:
            raise click.BadParameter(f"unknown loss '{term}' in '{item}'; valid: {', '.join(sorted(LOSSES))}")
        if out[-1][1] < 0:
            raise click.BadParameter(f"'{item}': a loss weight must be >= 0")
    return tuple(out)


def _loss_options(ctx: click.Context, param: click.Parameter,
                  value: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """`TERM.KEY=VALUE` entries; whether TERM is active and has KEY is checked with the other loss settings."""
    out = []
    for item in value:
        name, sep, number = item.partition("=")
        term, dot, key = name.partition(".")
        try:
            out.append((name, float(number)))
        except ValueError:
            sep = ""
        if not sep or not dot or not key:
            raise click.BadParameter(f"'{item}' is not TERM.KEY=VALUE (e.g. dkd.beta=2)")
        if term not in LOSSES:
            raise click.BadParameter(f"'{item}' names loss '{term}'; valid: {', '.join(sorted(LOSSES))}")
    return tuple(out)


def _settings_help() -> str:
    """Every term's own settings with their defaults, for --loss-option's help."""
    from softcache.losses.registry import REGISTRY
    return "; ".join(f"{term}: " + ", ".join(f"{k}={v:g}" for k, v in spec.options.items())
                     for term, spec in REGISTRY.items() if spec.options)


label_smoothing = _option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                          help="ce: label smoothing epsilon (the one-hot target becomes (1 - eps) onehot + eps / K)")


def _streams(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in value:
        name, sep, spec = item.partition(":")
        if not sep or not name:
            raise click.BadParameter(f"'{item}' is not NAME:KEY=VALUE,... (e.g. strong:aa=rand-m9-n2,reprob=0.25)")
        out.append((name, spec))
    return tuple(out)


def _free_run(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--out of a training run, looked at first (an eager option, before --device imports torch): another
    process writing that run folder is refused in a fraction of a second. The lock itself is taken later."""
    from softcache.locks import refuse_if_held, run_lock_path
    if value is not None and not ctx.resilient_parsing:
        refuse_if_held(run_lock_path(value), f"run folder '{value}'")
    return value


def _free_cache(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--out of a dump, looked at first, as `_free_run` does for a run folder."""
    from softcache.locks import cache_lock_path, refuse_if_held
    from softcache.store import where
    if value is not None and not ctx.resilient_parsing and not where.is_url(value):
        refuse_if_held(cache_lock_path(value), f"cache '{value}'")
    return value


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from softcache.device import check_device
    try:
        return check_device(value)
    except SoftcacheError as err:
        raise click.BadParameter(str(err)) from None


device = _option("--device", default=default_device, callback=_device,  # called only when needed
                 help="torch device: cuda when available, else cpu")
seed = _option("--seed", type=int, default=0, help="seed for views, order and initialisation")
data = _option("--data", required=True, metavar="SPEC",
               help="cifar10[:ROOT], cifar100[:ROOT], imagefolder:ROOT or synthetic[:N]")
download = _option("--download", is_flag=True, help="let torchvision download cifar10/cifar100")
def _policy(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A crop policy name, or a user's pipeline as package.module:callable."""
    module, colon, attr = value.partition(":")
    if value in POLICIES or (colon and module and attr):
        return value
    raise click.BadParameter(f"'{value}' is not a policy; valid: {', '.join(POLICIES)}, or package.module:callable "
                             "(your own pipeline, called as callable(image_size=S))")


augment = _option("--augment", default="cifar", callback=_policy, metavar="POLICY|MODULE:CALLABLE",
                  help=f"crop policy ({', '.join(POLICIES)}) or your own pipeline, package.module:callable, called "
                       "as callable(image_size=S) -> transform of a uint8 [3, H, W] image to [3, S, S]")


def view_options(f: Callable) -> Callable:
    """Pixel work and mixing after the crop, in timm's spelling (softcache.pixels, softcache.mixing)."""
    d = ViewOptions()
    probability = click.FloatRange(0, 1)
    for opt in reversed([
        _option("--aa", "auto_augment", default=d.auto_augment, metavar="SPEC",
                help=f"auto-augment after the crop: {', '.join(AUTO_SPELLINGS)} (e.g. rand-m9-n2) [default: none]"),
        _option("--color-jitter", type=click.FloatRange(min=0), default=d.color_jitter,
                help="ColorJitter strength (brightness, contrast, saturation); 0: off"),
        _option("--reprob", type=probability, default=d.reprob, help="RandomErasing probability; 0: off"),
        _option("--mixup", type=float, default=None, metavar="ALPHA",
                help="Mixup with Beta(ALPHA, ALPHA) [default: off]"),
        _option("--cutmix", type=float, default=None, metavar="ALPHA",
                help="CutMix with Beta(ALPHA, ALPHA) [default: off]"),
        _option("--mix-prob", type=probability, default=d.mix_prob, help="probability that a view is mixed"),
        _option("--mix-switch-prob", type=probability, default=d.mix_switch_prob,
                help="with --mixup and --cutmix: probability of CutMix rather than Mixup"),
    ]):
        f = opt(f)
    return f
image_size = _option("--image-size", type=click.IntRange(min=1), default=None,
                     help="view side in pixels [default: 224 for imagenet, else the source size]")
overwrite = _option("--overwrite", is_flag=True, help="replace a finished output")
workers = _option("--workers", type=click.IntRange(min=0), default=OptimConfig.workers,
                  help="DataLoader worker processes")


def optim_options(f: Callable) -> Callable:
    """Training-schedule options shared by train-teacher and train-student."""
    d = OptimConfig()
    for opt in reversed([
        _option("--epochs", type=click.IntRange(min=1), default=d.epochs, help="passes over the training set"),
        _option("--batch-size", type=click.IntRange(min=1), default=d.batch_size, help="images per step"),
        _option("--lr", type=click.FloatRange(min=0, min_open=True), default=d.lr,
                help="peak learning rate (cosine schedule)"),
        _option("--momentum", type=float, default=d.momentum, help="SGD momentum"),
        _option("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay"),
        workers,
        _option("--sync-bn", is_flag=True, help="under torchrun: SyncBatchNorm (statistics over the global batch)"),
    ]):
        f = opt(f)
    return f


def training_options(f: Callable) -> Callable:
    """Everything train-teacher and train-student share: the schedule, the run folder, device, seed."""
    for opt in reversed([optim_options, _option("--out", required=True, type=click.Path(file_okay=False),
                                                is_eager=True, callback=_free_run, help="run folder"),
                         device, seed, download, overwrite]):
        f = opt(f)
    return f


def _optim(kw: dict[str, Any]) -> OptimConfig:
    return OptimConfig(**{k: kw.pop(k) for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "workers",
                                                 "sync_bn")})


def loss_options(f: Callable) -> Callable:
    """The loss terms and their settings, shared by train-student and train-online."""
    for opt in reversed([
        _option("--loss", "losses", default="kd", callback=_losses,
                help=f"comma-separated terms from {', '.join(sorted(LOSSES))}"),
        _option("--pair", "pairs", multiple=True, callback=_pairs, metavar="[TERM:]S_LAYER=T_LAYER",
                help="student layer distilled from a teacher layer, for every pair loss it fits (feature maps: "
                     f"{', '.join(MAP_LOSSES)}; embeddings: {', '.join(VECTOR_LOSSES)}; ViT tokens: "
                     f"{', '.join(TOKEN_LOSSES)}) or, with TERM:, that loss only; repeatable"),
        _option("--pair-reduce", type=click.Choice(PAIR_REDUCTIONS), default=StudentConfig.pair_reduce,
                help="a loss over several pairs: their sum (RepDistiller) or their mean"),
        _option("--alpha", type=click.FloatRange(0, 1), default=StudentConfig.alpha,
                help="kd (and deit, deit-soft) weight; the hard-label ce gets 1 - alpha"),
        _option("--temperature", type=click.FloatRange(min=0, min_open=True), default=StudentConfig.temperature,
                help="kd temperature T"),
        _option("--beta", type=click.FloatRange(min=0), default=StudentConfig.beta, help="at weight"),
        _option("--hint-weight", type=click.FloatRange(min=0), default=StudentConfig.hint_weight,
                help="fitnets weight"),
        _option("--weight", "weights", multiple=True, callback=_weights, metavar="TERM=W",
                help="override a term's weight; repeatable"),
        _option("--loss-option", "loss_options", multiple=True, callback=_loss_options, metavar="TERM.KEY=V",
                help=f"a term's own setting; repeatable. Defaults (the reference code's CIFAR-100 values; warmup: "
                     f"epochs over which the term's weight ramps to its value): {_settings_help()}"),
        _option("--kd-standardize", is_flag=True,
                help="kd and dkd on per-sample standardized logits (logit standardization, Sun et al. 2024)"),
        _option("--learn-temperature", is_flag=True,
                help="kd and dkd at a learned temperature, trained adversarially with a cosine curriculum (CTKD)"),
        label_smoothing,
    ]):
        f = opt(f)
    return f


# ---------------------------------------------------------------- commands

@click.group(cls=SoftcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="softcache")
@click.option("-v", "--verbose", is_flag=True, help="more detail: log messages besides the progress lines")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars or lines; results and errors only")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="an option of the object store's file system (fsspec), e.g. endpoint_url=http://host:9000; "
                   "repeatable [default: credentials from the environment]")
def cli(verbose: bool, quiet: bool, storage_options: tuple[str, ...]) -> None:
    """Run the teacher once, cache its outputs on replayable views, distill many students from the cache.

    Progress goes to stderr: tqdm bars on a terminal, plain lines (one per epoch and per stage, and at least
    every 30 s) when stderr is a file. Results go to stdout."""
    from softcache import progress
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other; give one")
    progress.set_level(progress.QUIET if quiet else progress.NORMAL)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if storage_options:
        from softcache.store import where
        options = {}
        for item in storage_options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SoftcacheError(f"--storage-option '{item}' is not KEY=VALUE (e.g. endpoint_url=http://host:9000)")
            options[key] = value
        where.set_storage_options(options)


def _check_run_first(cfg: Any) -> None:
    """What refuses a training run, checked before the data and models are loaded: a finished run (without
    --overwrite), an unfinished one made with other settings."""
    from softcache.config import to_json
    from softcache.runs import check_resumable
    check_resumable(cfg.out, to_json(cfg), overwrite=cfg.overwrite)


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _report(summary: dict[str, Any], out: str) -> None:
    if not summary:  # a torchrun rank other than 0: rank 0 reports
        return
    click.echo(f"test_acc {summary['test_acc']:.2f}% (best {summary['best_test_acc']:.2f}%) after "
               f"{summary['epochs']} epochs, {summary['wall_s']:.1f} s -> {out}")


@cli.command("train-teacher")
@_option("--model", required=True, help=f"model name, e.g. {MODEL_EXAMPLES}")
@data
@augment
@view_options
@image_size
@_option("--data-path", type=click.Choice(IMAGE_PATHS), default=TeacherConfig.data_path,
         help="resident: images decoded once, views gathered on the device (cifar, none); loader: DataLoader workers")
@label_smoothing
@training_options
def train_teacher_cmd(**kw: Any) -> None:
    """Train a model with plain cross-entropy (a teacher, or the no-KD baseline)."""
    cfg = TeacherConfig(optim=_optim(kw), **kw)
    _check_run_first(cfg)
    from softcache.train import train_teacher_from_config
    _report(train_teacher_from_config(cfg), cfg.out)


@cli.command("dump-teacher")
@_option("--teacher", required=True, multiple=True,
         help=f"teacher model name, e.g. {MODEL_EXAMPLES}; repeat for an ensemble (features come from the first)")
@_option("--weights", multiple=True,
         help="teacher weights file (RUN/model.pt, a state_dict, .safetensors, a timm checkpoint), one per --teacher; "
              "none when every teacher is pretrained=true")
@data
@augment
@view_options
@_option("--views", default="1", help="views per sample, or 'all' (finite policies: cifar has 162)")
@_option("--layers", default="", callback=_names,
         help="comma-separated feature layers to store: module names, 'embedding' (the classifier's input), "
              "LAYER.pre_relu (LAYER's output before its final ReLU), 'input_gradient' (the input-gradient "
              "attention map of the teacher's top class, for gat) [default: logits only]")
@_option("--logits", default=DumpConfig.logits, metavar="FORMAT", help="fp16, bf16, fp32, topk:K or sampled:K[:TAU]")
@_option("--targets", type=click.Choice(TARGET_KINDS), default=DumpConfig.targets,
         help="per layer: the feature map, or only its attention map (for at)")
@_option("--teacher-head", is_flag=True,
         help="store the teacher's classifier once in the cache, for simkd (LAYER.pre_relu layers store the "
              "BatchNorm before their ReLU, for ofd, without asking)")
@_option("--temperature", type=click.FloatRange(min=0, min_open=True), default=DumpConfig.temperature,
         help="sampled logits: the temperature they are drawn at")
@_option("--stream", "streams", multiple=True, callback=_streams, metavar="NAME:KEY=VALUE,...",
         help="a named view stream besides the main one, of the same samples, with its own teacher outputs, e.g. "
              "strong:aa=rand-m9-n2,reprob=0.25 (keys: augment, aa, color_jitter, reprob, mixup, cutmix, mix_prob, "
              "mix_switch_prob; crops from the main --augment unless given); repeatable [default: none]")
@_option("--format", type=click.Choice(BACKENDS), default=None,
         help="cache backend [default: hdf5 for a .h5 --out, else zarr]")
@_option("--shard-mb", type=click.FloatRange(min=0.001), default=DumpConfig.shard_mb,
         help="shard size (the unit written whole and resumed from) of the largest array, in MiB")
@_option("--writer-threads", type=click.IntRange(min=0), default=DumpConfig.writer_threads,
         help="shards compressed and written at once (0: every core, up to 8)")
@image_size
@_option("--batch-size", type=click.IntRange(min=1), default=DumpConfig.batch_size,
         help="teacher images per forward pass")
@workers
@_option("--data-path", type=click.Choice(IMAGE_PATHS), default=DumpConfig.data_path,
         help="resident: images decoded once, views gathered on the device (crop-only views); "
              "loader: DataLoader workers")
@_option("--out", required=True, type=click.Path(), is_eager=True, callback=_free_cache,
         help="cache folder (zarr) or .h5 file (hdf5)")
@device
@seed
@download
@_option("--overwrite", is_flag=True, help="replace the cache at --out; the new one is built beside it (CACHE.new) "
                                           "and swapped in only when complete")
def dump_teacher_cmd(**kw: Any) -> None:
    """Run the teacher once over replayable views and write its outputs to a cache
    (reused or resumed when it can be)."""
    from softcache.dump import dump_from_config
    from softcache.store import open_cache
    result = dump_from_config(DumpConfig(**kw))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return
    reader = open_cache(result.path)
    total = sum(row["bytes"] for row in reader.describe())
    n, v = reader.shape("views/flip")
    resumed = (f"resumed: {result.resumed_from} samples were committed, {result.computed_shards} shards computed"
               if result.resumed_from else "")
    said = {"reuse": "reused (same cache id, no teacher run)", "resume": resumed,
            "replace": "complete, replacing the old cache" + (f" ({resumed})" if resumed else "")}
    click.echo(f"cache {reader.manifest['id']} {said.get(result.action, 'complete')}: {result.path} "
               f"({n} samples x {v} views, {total / 2**20:.1f} MiB)")


@cli.command("train-student")
@_option("--cache", required=True, type=click.Path(), help="cache folder written by dump-teacher")
@_option("--student", required=True, help=f"student model name, e.g. {MODEL_EXAMPLES}")
@_option("--data", default=None, metavar="SPEC", help="dataset spec [default: the one recorded in the cache]")
@loss_options
@_option("--teachers", default=StudentConfig.teachers,
         help="several cached teachers: 'mean' of their probabilities, or one name")
@_option("--stream", default=StudentConfig.stream, metavar="NAME",
         help="the cache's view stream the student replays (dump-teacher --stream)")
@_option("--target-stream", default=None, metavar="NAME",
         help="the stream whose teacher outputs are the targets [default: --stream]")
@_option("--strong-stream", default=None, metavar="NAME",
         help="mlkd: the stream of each sample's strong view, replayed beside --stream's (the weak one), the "
              "student and the cached teacher on both [default: none]")
@_option("--image-size", type=click.IntRange(min=1), default=None, help="student input side [default: the teacher's]")
@_option("--data-path", type=click.Choice(DATA_PATHS), default=StudentConfig.data_path,
         help="resident: images and targets in memory, views replayed on the device; loader: a DataLoader replays "
              "views, targets in memory; stream: targets streamed from the store [default auto: the first that fits]")
@training_options
def train_student_cmd(**kw: Any) -> None:
    """Train a student from a cache (KD, FitNets, AT, ... every --loss term). No teacher is built or loaded."""
    cfg = StudentConfig(optim=_optim(kw), **kw)
    _check_run_first(cfg)
    from softcache.train import train_student_from_config
    _report(train_student_from_config(cfg), cfg.out)


@cli.command("train-online")
@_option("--teacher", required=True, help=f"teacher model name, e.g. {MODEL_EXAMPLES}")
@_option("--weights", "teacher_weights", default=None,
         help="teacher weights file (e.g. RUN/model.pt); none for a pretrained=true teacher")
@_option("--student", required=True, help=f"student model name, e.g. {MODEL_EXAMPLES}")
@_option("--data", default=None, metavar="SPEC", help="dataset spec [default: the one recorded in --views-from]")
@augment
@view_options
@image_size
@_option("--views-from", default=None, type=click.Path(), metavar="CACHE",
         help="replay this cache's stored views as train-student would, targets computed online [default: fresh "
              "views of --augment each epoch]")
@_option("--strong-stream", default=None, metavar="NAME",
         help="mlkd, with --views-from: that cache's stream of each sample's strong view [default: none]")
@loss_options
@_option("--data-path", type=click.Choice(IMAGE_PATHS), default=OnlineConfig.data_path,
         help="resident: images decoded once, views gathered on the device; loader: DataLoader workers")
@training_options
def train_online_cmd(**kw: Any) -> None:
    """Train a student with the teacher in the loop (online KD): the baseline a cache replaces,
    same losses and run folder."""
    cfg = OnlineConfig(optim=_optim(kw), **kw)
    _check_run_first(cfg)
    from softcache.train import train_online_from_config
    _report(train_online_from_config(cfg), cfg.out)


@cli.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
@_option("--root", default=None, help="folder for the stages' outputs [default: the recipe's defaults.root]")
@_option("--device", default=None, help="device for every stage [default: the recipe's, else cuda when available]")
@_option("--seed", type=int, default=None, help="seed for every stage [default: the recipe's, else 0]")
@_option("--set", "sets", multiple=True, metavar="KEY=VALUE",
         help="a value (TOML: 3, 0.1, true, or text) for KEY in every stage that has it, over the recipe's, e.g. "
              "--set epochs=1 --set data=imagefolder:data/cifar10-jpeg; repeatable")
@_option("--download", is_flag=True, help="let torchvision download cifar10/cifar100 (--set download=true)")
def run_cmd(pipeline: str, root: str | None, device: str | None, seed: int | None, sets: tuple[str, ...],
            download: bool) -> None:
    """Run a TOML pipeline: train-teacher, dump-teacher, train-student stages; finished stages are skipped.
    Ends with the accuracy and cost tables, and writes ROOT/report.md and ROOT/report.png."""
    from softcache.pipeline import format_table, load_pipeline, run_pipeline
    from softcache.report import cost_table, write_report
    recipe = load_pipeline(pipeline, root=root, device=device, seed=seed,
                           sets={**_settings(sets), **({"download": True} if download else {})})
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports for all
    rows = run_pipeline(recipe, echo=click.echo if main_rank else lambda line: None)
    if not main_rank:
        return
    report, md, png = write_report(recipe.root)
    click.echo("\n" + format_table(rows) + "\n\n" + cost_table(report) + f"\n\nreport: {md}, {png}")


def _settings(items: tuple[str, ...]) -> dict[str, Any]:
    """--set KEY=VALUE items: VALUE read as a TOML value (a number, a boolean, a list), else taken as text."""
    import tomllib
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{item}' is not KEY=VALUE (e.g. epochs=1)", param_hint="'--set'")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@cli.command("report")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
def report_cmd(root: str) -> None:
    """Write ROOT/report.md and ROOT/report.png: accuracy of every run under ROOT, and what the cache cost against
    the teacher in the loop."""
    from softcache.report import cost_table, write_report
    report, md, png = write_report(root)
    click.echo(cost_table(report) + f"\n\nreport: {md}, {png}")


@cli.command("ensemble")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@_option("--data", default=None, metavar="SPEC", help="dataset spec [default: the first run's]")
@_option("--batch-size", type=click.IntRange(min=1), default=256, help="images per forward pass")
@_option("--save", default=None, type=click.Path(dir_okay=False), help="write every run's test softmax (.npz)")
@workers
@device
def ensemble_cmd(runs: tuple[str, ...], data: str | None, batch_size: int, save: str | None, workers: int,
                 device: str) -> None:
    """Top-1 of the mean softmax of several finished runs on the test split (the Born-Again ensemble)."""
    if save and not Path(save).resolve().parent.is_dir():  # before the computing, not after it
        raise click.BadParameter(f"the folder of '{save}' does not exist; create it or give another file",
                                 param_hint="--save")
    import numpy as np
    from softcache.ensemble import ensemble
    result = ensemble(runs, data=data, device=device, batch_size=batch_size, workers=workers)
    for run, acc in zip(result.runs, result.accuracy):
        click.echo(f"{acc:7.2f}%  {run}")
    click.echo(f"{result.ensemble_accuracy:7.2f}%  ensemble of {len(result.runs)} (mean of softmax outputs)")
    if save:
        np.savez(save, probs=result.probs, labels=result.labels, runs=np.array([str(r) for r in result.runs]))


@cli.command("inspect")
@click.argument("cache", type=click.Path())
@_option("--json", "as_json", is_flag=True, help="print everything as one JSON object: the full manifest, the arrays, "
                                                  "the dump's recorded cost")
def inspect_cmd(cache: str, as_json: bool) -> None:
    """Show a cache: a summary (teacher, data, views, targets, size, what the dump cost), then its arrays
    (shapes, dtypes, bytes on disk and per sample, compression)."""
    from softcache.store import open_cache
    from softcache.store.manifest import describe_augment
    reader = open_cache(cache)
    rows = reader.describe()
    if as_json:
        arrays = [{**r, "shape": list(r["shape"])} for r in rows]
        click.echo(json.dumps({"path": str(reader.path), "manifest": reader.manifest, "arrays": arrays,
                               "cost": reader.cost}, indent=2))
        return
    m, n = reader.manifest, reader.shape("labels")[0]
    total, raw = sum(r["bytes"] for r in rows), sum(r["raw_bytes"] for r in rows)
    aug, data, storage = m["augment"], m["dataset"], m["storage"]
    teachers = ", ".join(f"{t['name']} ({t.get('arch', t['name'])}, weights sha256 {t['weights_sha256'][:12]})"
                         for t in m["teachers"])
    logits = storage["logits"]["format"] + "".join(f" {k}={v}" for k, v in storage["logits"].items() if k != "format")
    layers = f"; {storage['targets']}: {', '.join(m['layers'])}" if m["layers"] else ""
    cost = reader.cost
    spent = "not recorded (a cache from before softcache recorded it)"
    if cost and cost.get("teacher_s"):
        spent = (f"{cost['wall_s']:,.1f} s on {', '.join(cost['devices']) or '?'}; teacher forward "
                 f"{cost['views'] / cost['teacher_s']:,.0f} views/s")
    summary = [("cache", f"{m['id']} {'complete' if m.get('complete') else 'INCOMPLETE'}: {reader.path}"),
               ("teacher", teachers),
               *[("input", f"{t['name']}: mean {_floats(t['input']['mean'])}, std {_floats(t['input']['std'])} "
                           f"({t['input']['source']})") for t in m["teachers"] if t.get("input")],
               ("dataset", f"{data['spec']} ({n:,} samples, {len(data['classes'])} classes)"),
               ("views", f"{describe_augment(aug)}, {aug['num_views']} per sample, "
                         f"{aug['image_size']}x{aug['image_size']}, seed {aug['seed']}"
                         + "".join(f"; stream {name}: {describe_augment({**aug, 'pixels': {}, 'mix': {}, **st})}"
                                   for name, st in m.get("streams", {}).items())),
               ("targets", f"logits {logits}{layers}"),
               ("size", f"{total / 2**20:,.1f} MiB on disk ({total / max(1, n):,.0f} B/sample, "
                        f"{raw / max(1, total):.1f}x compression), shards of {reader.shard_samples():,} samples"),
               ("dump", spent),
               ("created", f"{m.get('created', '?')}, softcache {m.get('softcache_version', '?')}")]
    for key, value in summary:
        click.echo(f"{key:<8} {value}")
    width = max(len(r["name"]) for r in rows + [{"name": "total"}])
    shape_w = max(len(str(tuple(r["shape"]))) for r in rows)
    click.echo(f"\n{'array':<{width}} {'shape':<{shape_w}} {'dtype':<8} {'chunk':>6} {'shard':>6} {'on disk':>12} "
               f"{'B/sample':>10} {'ratio':>6}")
    for r in rows:
        click.echo(f"{r['name']:<{width}} {tuple(r['shape'])!s:<{shape_w}} {r['dtype']:<8} {r['chunks']:>6} "
                   f"{r['shards']:>6} {r['bytes']:>12,} {r['bytes_per_sample']:>10.1f} "
                   f"{r['raw_bytes'] / max(1, r['bytes']):>5.1f}x")
    click.echo(f"{'total':<{width}} {'':<{shape_w}} {'':<8} {'':>6} {'':>6} {total:>12,} {total / max(1, n):>10.1f} "
               f"{raw / max(1, total):>5.1f}x")
    click.echo("\n(the full manifest: softcache inspect --json CACHE)")


@cli.command("ls")
@click.argument("root", type=click.Path(), default=".")
def ls_cmd(root: str) -> None:
    """List the caches under ROOT: id, teacher, dataset, views, layers, size, complete (yes, NO, DAMAGED), then
    what is wrong with each that cannot be used."""
    from softcache.store.listing import ls_lines
    for line in ls_lines(root):
        click.echo(line)


@cli.command("verify")
@click.argument("cache", type=click.Path())
@_option("--teacher", default=None, help="the cache's (first) teacher model name, to recompute targets")
@_option("--weights", default=None, help="its weights file (none for a pretrained=true teacher)")
@_option("--samples", type=click.IntRange(min=1), default=16, help="random (sample, view) pairs to recompute")
@_option("--tolerance", type=click.FloatRange(min=0), default=1e-2, help="largest acceptable |recomputed - cached|")
@_option("--data", default=None, metavar="SPEC", help="dataset spec [default: the one recorded in the cache]")
@device
@seed
def verify_cmd(cache: str, teacher: str | None, weights: str | None, samples: int, tolerance: float,
               data: str | None, device: str, seed: int) -> None:
    """Check a cache: complete, every chunk's checksum, and (given the teacher) recomputed targets."""
    from softcache.verify import verdict, verify_cache
    from softcache.models import is_pretrained
    alone = teacher is not None and weights is None and not is_pretrained(teacher)
    if (weights is not None and teacher is None) or alone:
        raise click.UsageError("--teacher and --weights go together (a pretrained=true teacher takes no --weights)")
    report, lines = verify_cache(cache, teacher=teacher, weights=weights, samples=samples, seed=seed, device=device,
                                 data=data)
    for line in lines:
        click.echo(line)
    failure = verdict(report, tolerance)
    if failure:
        raise SoftcacheError(failure)
    click.echo("ok")


@cli.command("bench")
@_option("--teacher", default="resnet56", help="teacher model name")
@_option("--weights", default=None, help="teacher state_dict [default: random weights; speed does not depend on them]")
@_option("--student", default="resnet20", help="student model name")
@_option("--data", default="imagefolder:data/cifar10-jpeg", metavar="SPEC", help="dataset spec (its training split)")
@_option("--layer", default="layer3", help="the feature layer for (b) and the AT/FitNets rows")
@augment
@view_options
@_option("--views", type=click.IntRange(min=1), default=2, help="views per sample in the dumped caches")
@_option("--image-size", type=click.IntRange(min=1), default=None,
         help="view side [default: the teacher's input size for imagenet, else the images' own]")
@_option("--batch-size", type=click.IntRange(min=1), default=512, help="images per step")
@_option("--steps", type=click.IntRange(min=1), default=50,
         help="timed steps per measurement and round (after 5 warm-up steps)")
@_option("--rounds", type=click.IntRange(min=1), default=3,
         help="interleaved rounds over all rows; medians and per-round ratios are reported")
@_option("--data-path", type=click.Choice(DATA_PATHS), default="auto",
         help="the student rows' data path (one row is always streamed)")
@workers
@_option("--out", default="runs/bench", type=click.Path(file_okay=False), help="folder for the caches and bench.json")
@device
@seed
def bench_cmd(**kw: Any) -> None:
    """Measure teacher inference, dump, and student training (CE, cached KD/AT/FitNets, online KD) in one process."""
    from types import SimpleNamespace
    from softcache.bench import format_bench, run_bench
    views = SimpleNamespace(augment=kw.pop("augment"), image_size=kw.pop("image_size"),
                            **{f: kw.pop(f) for f in ViewOptions.__dataclass_fields__})
    click.echo(format_bench(run_bench(**kw, views_options=views)))


def main() -> None:
    cli()
