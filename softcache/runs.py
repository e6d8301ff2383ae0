"""The run folder of a training command, in one place: its lock, `config.json` (the configuration and the run's
kind), the rules for resuming it, and reading a run back (`report`, `ensemble` and `run` ask it, not the keys).

    RUN/config.json     {"kind": "teacher" | "student" | "online", ...the stage's configuration}
    RUN/metrics.jsonl   one line per epoch
    RUN/model.pt        the final weights
    RUN/summary.json    written last: the run is finished
    RUN/checkpoint.pt   while it is unfinished: what continuing needs
    RUN/.lock           held (flock) while a process writes the run
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

from softcache.errors import SoftcacheError
from softcache.locks import WriterLock, file_in_the_way, run_lock_path
from softcache.store import differences, local_only, read_manifest

KINDS = ("teacher", "student", "online")  # train-teacher (cross-entropy), train-student (cache), train-online
CHECKPOINT = "checkpoint.pt"
# What a rerun may change and still continue an unfinished run: how data reaches the model, not what it computes.
MAY_CHANGE_ON_RESUME = ("optim.workers", "data_path", "download", "overwrite")


def changed(recorded: Mapping[str, Any], config: Mapping[str, Any], *, resuming: bool) -> list[str]:
    """The dotted keys in which `config` differs from a run's recorded configuration (its kind aside); resuming
    an unfinished run, the keys of MAY_CHANGE_ON_RESUME do not count."""
    found = differences({k: v for k, v in recorded.items() if k != "kind"},
                        {k: v for k, v in json.loads(json.dumps(config)).items() if k != "kind"})
    return [key for key in found if not (resuming and key in MAY_CHANGE_ON_RESUME)]


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about itself (see `read_run`)."""

    path: Path
    kind: str                     # one of KINDS
    config: dict[str, Any]        # the recorded configuration, without its kind
    summary: dict[str, Any] | None  # summary.json: None while the run is unfinished

    @property
    def model(self) -> str:
        """The architecture the run trained."""
        return self.config["model"] if self.kind == "teacher" else self.config["student"]

    @property
    def cache(self) -> dict[str, Any]:
        """The manifest of the cache whose views the run replayed ({} for fresh views, or a cache gone)."""
        path = self.config.get("cache") if self.kind == "student" else self.config.get("views_from")
        return (read_manifest(path) or {}) if path else {}

    @property
    def policy(self) -> str:
        """The augmentation policy of the views it trained on (and so of its evaluation view)."""
        return self.cache.get("augment", {}).get("policy") or self.config.get("augment", "cifar")

    @property
    def image_size(self) -> int | None:
        """The input side it trained at; None: the source's."""
        return self.config.get("image_size") or self.cache.get("augment", {}).get("image_size")

    @property
    def data(self) -> str | None:
        """The dataset spec it trained on (the one recorded in its cache unless it named one)."""
        return self.config.get("data") or self.cache.get("dataset", {}).get("resolved")


def _kind_of(config: Mapping[str, Any]) -> str | None:
    """The recorded kind; run folders written before it was recorded are told apart by their keys."""
    if "kind" in config:
        return config["kind"]
    if "teacher_weights" in config:
        return "online"
    if "cache" in config:
        return "student"
    return "teacher" if "model" in config else None


def read_run(path: str | Path) -> RunInfo | None:
    """The run at `path`, finished or not, or None when `path` holds no readable run folder."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = _kind_of(config) if isinstance(config, dict) else None
    if kind not in KINDS:
        return None
    return RunInfo(path, kind, {k: v for k, v in config.items() if k != "kind"}, summary)


def finished_run(out: str | Path, config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The summary of a finished run at `out`, or None; refuses one made with another configuration."""
    run = read_run(out)
    if run is None or run.summary is None:
        return None
    differ = changed(run.config, config, resuming=False) if config is not None else []
    if differ:
        raise SoftcacheError(f"'{out}' holds a finished run made with other settings ({', '.join(differ)} differ); "
                             "remove it, or run the recipe with another --root")
    return run.summary


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SoftcacheError(f"--out '{out}' is a file; give a folder for the run")
    if read_manifest(out) is not None:
        raise SoftcacheError(f"--out '{out}' is a softcache cache; give a folder for the run, not the cache")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = file_in_the_way(out)
        reason = f"'{blocker}' is a file, not a folder" if blocker else err.strerror
        raise SoftcacheError(f"cannot create the run folder '{out}' ({reason}); give --out a folder that can be "
                             "written") from None


def check_resumable(out: str | Path, config: Mapping[str, Any], *, overwrite: bool) -> None:
    """Refuse, before anything is loaded, what `prepare_run` would refuse: a finished run without `overwrite`,
    and an unfinished one made with other settings. Takes no lock (the writer's check under its lock decides)."""
    out = local_only(out)
    if overwrite:
        return
    if (out / "summary.json").exists():
        raise SoftcacheError(f"'{out}' holds a finished run (summary.json); pass --overwrite or choose another --out")
    if (out / CHECKPOINT).exists():
        try:
            recorded = json.loads((out / "config.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            recorded = None
        recorded = recorded if isinstance(recorded, dict) else None
        differ = changed(recorded, config, resuming=True) if recorded is not None else []
        if recorded is None or differ:
            raise SoftcacheError(f"'{out}' holds an unfinished run made with other settings "
                                 f"({', '.join(differ) or 'config.json unreadable'} differ); rerun it with its own "
                                 "settings to continue it, pass --overwrite to start over, or choose another --out")


@contextlib.contextmanager
def prepare_run(out: str | Path, config: Mapping[str, Any], *, kind: str, overwrite: bool) -> Iterator[Path]:
    """`with prepare_run(...) as run:` creates the run folder and holds its writer lock (`RUN/.lock`) while the
    run writes; refuses a finished run (it has summary.json) unless `overwrite`, a folder another process is
    writing to, and an unfinished run made with other settings (it continues one made with the same)."""
    assert kind in KINDS, f"unknown run kind {kind!r}; valid: {', '.join(KINDS)}"
    out = local_only(out)
    check_resumable(out, config, overwrite=overwrite)  # before the folder is touched; again under the lock
    _make_folder(out)
    with WriterLock(run_lock_path(out), f"run folder '{out}'"):
        check_resumable(out, config, overwrite=overwrite)
        if overwrite or not (out / CHECKPOINT).exists():
            (out / CHECKPOINT).unlink(missing_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "summary.json").unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps({"kind": kind, **json.loads(json.dumps(config))}, indent=2) + "\n")
        yield out


@contextlib.contextmanager
def run_folder(out: str | Path, config: Mapping[str, Any], *, kind: str, overwrite: bool, world: Any) -> Iterator[Path]:
    """`prepare_run` on rank 0 of `world` (the one writer of the run folder); the other ranks wait until it is
    ready."""
    from softcache import distributed  # here: reading run folders (report, recipes) needs no torch
    with (prepare_run(out, config, kind=kind, overwrite=overwrite) if world.main
          else contextlib.nullcontext(Path(out))) as run:
        distributed.barrier(world)
        yield run
