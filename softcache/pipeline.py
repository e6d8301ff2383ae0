"""`softcache run PIPELINE.toml`: train-teacher, dump-teacher and train-student stages from one recipe.

    [defaults]          keys shared by every stage that has them (data, device, seed, workers, batch_size ...)
    root = "runs/x"     where relative `out` paths land (relative to the working directory)
    [teacher]           a TeacherConfig: model, augment, epochs ... (out defaults to "teacher"); or
    [[teacher]]         several, each with a `name` (out teachers/NAME), which a dump's `teacher` names
    [dump]              a DumpConfig: augment, views, layers ... (teacher, weights default to [teacher]'s)
    [[student]]         a StudentConfig each, with a `name`: student, loss, pairs = {s = "t"}, epochs ...

A stage whose complete output exists (summary.json, or a complete cache with the same id) is skipped, so a
rerun resumes; an interrupted dump continues from its committed shards. A finished output made with other
settings than the recipe's is refused, naming what differs.
"""
from __future__ import annotations

import json
import time
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from softcache.config import DumpConfig, OnlineConfig, OptimConfig, StudentConfig, TeacherConfig, to_json
from softcache.errors import SoftcacheError
from softcache.runs import finished_run
from softcache.store import read_manifest

_OPTIM_KEYS = {f.name for f in fields(OptimConfig)}


@dataclass(frozen=True)
class Pipeline:
    """The stages of one recipe, in order."""

    teachers: tuple[tuple[str, TeacherConfig], ...]
    dumps: tuple[tuple[str, DumpConfig], ...]
    students: tuple[tuple[str, StudentConfig | OnlineConfig], ...]
    born_again: BornAgain | None = None
    root: str = "runs"   # where the stages' outputs land (what `softcache report` reads)

    @property
    def teacher(self) -> TeacherConfig | None:
        """The first (often the only) train-teacher stage."""
        return self.teachers[0][1] if self.teachers else None

    @property
    def dump(self) -> DumpConfig | None:
        """The first (often the only) dump."""
        return self.dumps[0][1] if self.dumps else None

    def stages(self) -> list[TeacherConfig | DumpConfig | StudentConfig | OnlineConfig]:
        """Every stage's configuration, in the order they run."""
        out = [t for _, t in self.teachers] + [d for _, d in self.dumps] + [s for _, s in self.students]
        if self.born_again is not None:
            out += [self.born_again.first] + [cfg for step in self.born_again.steps for cfg in step]
        return out


@dataclass(frozen=True)
class BornAgain:
    """Born-Again generations (Furlanello et al., 2018): generation 1 trained with cross-entropy, generation k
    distilled from a cache of generation k - 1, all of one architecture; then their ensemble."""

    first: TeacherConfig
    steps: tuple[tuple[DumpConfig, StudentConfig], ...]   # (cache of generation k - 1, generation k), k = 2 ...

    @property
    def runs(self) -> list[str]:
        return [self.first.out] + [student.out for _, student in self.steps]


# Recipe keys whose TOML form differs from the config field's type; the rest take the field's type.
_RAW_TYPES = {StudentConfig: {"loss": "list[str]", "pairs": "dict[str, str]", "weights": "dict[str, float]",
                              "loss_options": "dict[str, dict[str, float]]",
                              "cache": "str", "online": "bool", "seeds": "list[int]"},
              BornAgain: {"model": "str", "generations": "int", "loss": "list[str]", "views": "int | str"},
              DumpConfig: {"layers": "list[str]", "teacher": "str | list[str]", "weights": "str | list[str]",
                           "views": "int | str", "streams": "dict[str, str]"}}
_EXAMPLES = {"list[str]": 'a list of strings, e.g. ["kd", "at"]',
             "dict[str, str]": 'a table of strings, e.g. { layer3 = "layer3" }',
             "dict[str, float]": "a table of numbers, e.g. { kd = 0.9 }",
             "dict[str, dict[str, float]]": "a table of tables of numbers, e.g. { dkd = { beta = 2 } }",
             "str | list[str]": "a string or a list of strings", "int | str": 'an integer or "all"',
             "list[int]": "a list of integers, e.g. [0, 1]", "int": "an integer", "float": "a number",
             "str": "a string", "bool": "true or false", "int | None": "an integer", "str | None": "a string"}


def _fits(value: Any, kind: str) -> bool:
    if " | " in kind:
        return any(_fits(value, k) for k in kind.split(" | "))
    if kind == "None":
        return value is None
    if kind.startswith("list["):
        return isinstance(value, list) and all(_fits(v, kind[5:-1]) for v in value)
    if kind.startswith("dict[str, "):
        return isinstance(value, dict) and all(_fits(v, kind[10:-1]) for v in value.values())
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool}.get(kind, object))


def _kind_of(cls: type, key: str) -> str | None:
    """The TOML type a recipe key must have in a section built as `cls` (None: not a key of it)."""
    if key in _RAW_TYPES.get(cls, {}):
        return _RAW_TYPES[cls][key]
    if cls is BornAgain:  # its other keys are those of the stages it builds
        return next((k for k in (_kind_of(c, key) for c in (TeacherConfig, StudentConfig, DumpConfig)) if k), None)
    hints = {**(typing.get_type_hints(OptimConfig) if cls is not DumpConfig else {}), **typing.get_type_hints(cls)}
    hint = hints.get(key)
    return None if hint is None else str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_types(table: Any, section: str, classes: tuple[type, ...]) -> None:
    """Refuse a recipe value of the wrong TOML type, naming the key and the type expected."""
    if not isinstance(table, dict):
        raise SoftcacheError(f"[{section}] must be a table of keys, got {type(table).__name__} {table!r}")
    for key, value in table.items():
        kind = next((k for k in (_kind_of(c, key) for c in classes) if k is not None), None)
        if kind is not None and not _fits(value, kind):
            got = {str: "a string", bool: "a boolean", list: "a list", dict: "a table", float: "a number",
                   int: "an integer"}.get(type(value), type(value).__name__)
            raise SoftcacheError(f"[{section}] {key} = {json.dumps(value)} is {got}; expected "
                                 f"{_EXAMPLES.get(kind, kind)}")


_STAGES = (TeacherConfig, DumpConfig, StudentConfig, OnlineConfig)
_STAGE_KEYS = _OPTIM_KEYS | {f.name for c in _STAGES for f in fields(c)}
_SHARED_KEYS = _STAGE_KEYS - {"optim", "out", "cache"}  # what [defaults] and --set may give every stage


def _check_defaults(table: Any) -> None:
    """[defaults] takes `root` and the keys some stage has, each of that stage's type."""
    _check_types(table, "defaults", (TeacherConfig, DumpConfig, StudentConfig))
    unknown = sorted(set(table) - _SHARED_KEYS - {"root"})
    if unknown:
        raise SoftcacheError(f"unknown key '{unknown[0]}' in [defaults]; valid: root, "
                             f"{', '.join(sorted(_SHARED_KEYS))}")
    if "root" in table and not isinstance(table["root"], str):
        raise SoftcacheError(f"[defaults] root = {json.dumps(table['root'])} is not a string; expected a folder, "
                             'e.g. root = "runs/x"')


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    """A config dataclass from a TOML table; optimisation keys go to its `optim`, unknown keys are refused."""
    valid = {f.name for f in fields(cls)} - {"optim"}
    has_optim = any(f.name == "optim" for f in fields(cls))
    unknown = sorted(set(table) - valid - (_OPTIM_KEYS if has_optim else set()))
    if unknown:
        options = sorted(valid | (_OPTIM_KEYS if has_optim else set()))
        raise SoftcacheError(f"unknown key '{unknown[0]}' in [{section}]; valid: {', '.join(options)}")
    kwargs = {k: v for k, v in table.items() if k in valid}
    if has_optim:
        kwargs["optim"] = OptimConfig(**{k: v for k, v in table.items() if k in _OPTIM_KEYS})
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in kwargs]
    if missing:
        kind = _kind_of(cls, missing[0])
        raise SoftcacheError(f"[{section}] needs '{missing[0]}' ({_EXAMPLES.get(kind, kind)})"
                             f"{_WHERE.get(missing[0], '')}")
    return cls(**kwargs)


_WHERE = {"weights": ", or a [teacher] section whose model.pt it takes", "cache": ", or a [dump] section whose cache "
          "it takes", "data": ", here or in [defaults]", "teacher": ", or a [teacher] section"}


_SECTIONS = ("defaults", "teacher", "dump", "student", "born_again")


def load_pipeline(path: str | Path, *, root: str | None = None, device: str | None = None,
                  seed: int | None = None, sets: dict[str, Any] | None = None) -> Pipeline:
    """Read a recipe; `root`, `device` and `seed` override the file's, and `sets` (`softcache run --set`) a
    key of every stage that has it (e.g. {"epochs": 1, "data": "synthetic:200"})."""
    doc = _read_recipe(path)
    merge = _merge_from(doc, root=root, device=device, seed=seed, sets=sets)
    teachers = _teachers(doc, merge)
    dumps = _dumps(doc, merge, teachers)
    students = [(name, _student(entry, name, dumps, merge)) for entry, name in _student_entries(doc, seed)]
    born_again = _born_again(dict(doc["born_again"]), merge) if "born_again" in doc else None
    return Pipeline(tuple(teachers), tuple(dumps), tuple(students), born_again, root=str(merge.base))


def _teachers(doc: dict[str, Any], merge: _Merge) -> list[tuple[str, TeacherConfig]]:
    """The train-teacher stages by name: a lone [teacher] is `teacher` (out "teacher"), [[teacher]] tables
    their `name` (out teachers/NAME)."""
    tables, one = _tables(doc, "teacher")
    out: list[tuple[str, TeacherConfig]] = []
    for k, table in enumerate(tables):
        table = dict(table)
        name = "teacher" if one else str(table.pop("name", f"teacher{k}"))
        if any(name == other for other, _ in out):
            raise SoftcacheError(f"two [[teacher]] tables are named '{name}'; give each its own name")
        section = "teacher" if one else f"teacher {name}"
        out.append((name, _build(TeacherConfig, merge.fill(TeacherConfig, {"out": "teacher" if one else
                                                                           f"teachers/{name}", **table}), section)))
    return out


def _read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's TOML document, its sections known and their values of the types the stages take."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SoftcacheError(f"'{path}' is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise SoftcacheError(f"'{path}' is not UTF-8 text (byte {err.start}); a recipe is a TOML file, which is "
                             "UTF-8: save it as such") from None
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise SoftcacheError(f"unknown section [{unknown[0]}] in '{path}'; valid: {', '.join(_SECTIONS)}")
    if not {"teacher", "dump", "student", "born_again"} & set(doc):
        raise SoftcacheError(f"'{path}' has no stage; add a [teacher], a [dump], a [[student]] or a [born_again] "
                             "section")
    if "student" in doc and not isinstance(doc["student"], list):
        raise SoftcacheError("[student] must be an array of tables: write each student as [[student]]")
    _check_sections(doc)
    return doc


def _tables(doc: dict[str, Any], section: str) -> tuple[list[Any], bool]:
    """The recipe's tables of a section (teacher, dump), and whether it has one [section] (else [[section]]
    tables, which have names)."""
    tables = doc.get(section, [])
    one = isinstance(tables, dict)
    return ([tables] if one else tables), one


def _check_sections(doc: dict[str, Any]) -> None:
    """Each section's values of the TOML type its stage takes, before anything is built from them."""
    _check_defaults(doc.get("defaults", {}))
    teachers, one_teacher = _tables(doc, "teacher")
    for k, table in enumerate(teachers):
        name = table.get("name", k) if isinstance(table, dict) else k
        _check_types(table, "teacher" if one_teacher else f"teacher {name}", (TeacherConfig,))
    tables, one_dump = _tables(doc, "dump")
    for k, table in enumerate(tables):
        name = table.get("name", k) if isinstance(table, dict) else k
        _check_types(table, "dump" if one_dump else f"dump {name}", (DumpConfig,))
    for k, entry in enumerate(doc.get("student", [])):
        name = entry.get("name", f"student{k}") if isinstance(entry, dict) else k
        _check_types(entry, f"student {name}", (StudentConfig,))
    if "born_again" in doc:
        _check_types(doc["born_again"], "born_again", (BornAgain,))


@dataclass(frozen=True)
class _Merge:
    """Where a stage's values come from besides its own table, lowest first: [defaults], `--set`, and the
    command line's --device / --seed."""

    defaults: dict[str, Any]    # [defaults] less `root`
    sets: dict[str, Any]        # `softcache run --set KEY=VALUE`, each a key some stage has
    overrides: dict[str, Any]   # --device, --seed when given
    base: Path                  # where relative `out` paths land

    def fill(self, cls: type, table: dict[str, Any]) -> dict[str, Any]:
        """`table` completed for a stage built as `cls`, with its `out` under the root."""
        accepted = {f.name for f in fields(cls)} | (_OPTIM_KEYS if cls is not DumpConfig else set())
        merged = {k: v for k, v in self.defaults.items() if k in accepted}
        merged.update(table)
        merged.update({k: v for k, v in self.sets.items() if k in accepted})
        merged.update(self.overrides)  # command-line values win over the recipe's
        if "out" in merged:
            merged["out"] = str(self.base / merged["out"])
        return merged


def _merge_from(doc: dict[str, Any], *, root: str | None, device: str | None, seed: int | None,
                sets: dict[str, Any] | None) -> _Merge:
    """The recipe's [defaults] with the command line's values; a `--set` key no stage has, or of the wrong
    type, is refused."""
    defaults = dict(doc.get("defaults", {}))
    base = Path(root or defaults.pop("root", "runs"))
    defaults.pop("root", None)
    overrides = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    sets = dict(sets or {})
    for key, value in sets.items():
        if key not in _SHARED_KEYS:
            raise SoftcacheError(f"--set {key}: no stage has the key '{key}'; valid: "
                                 f"{', '.join(sorted(_SHARED_KEYS))}")
        _check_types({key: value}, f"--set {key}", (TeacherConfig, DumpConfig, StudentConfig))
    return _Merge(defaults, sets, overrides, base)


def _dumps(doc: dict[str, Any], merge: _Merge,
           teachers: list[tuple[str, TeacherConfig]]) -> list[tuple[str, DumpConfig]]:
    """The dump stages by name: a lone [dump] is `cache` (out "cache"), [[dump]] tables are their `name` or
    cacheK (out caches/NAME). A dump's teacher is the recipe's train-teacher stage (the one there is, or the one
    its `teacher` names among several [[teacher]] tables), else the model its `teacher` names."""
    tables, one_dump = _tables(doc, "dump")
    stages = dict(teachers)
    dumps: list[tuple[str, DumpConfig]] = []
    for k, table in enumerate(tables):
        table = dict(table)
        name = str(table.pop("name", "cache" if len(tables) == 1 else f"cache{k}"))
        section = "dump" if one_dump else f"dump {name}"
        table.setdefault("out", "cache" if len(tables) == 1 and name == "cache" else f"caches/{name}")
        if any(name == other for other, _ in dumps):
            raise SoftcacheError(f"two [[dump]] tables are named '{name}'; give each its own name")
        named = table.get("teacher")
        if isinstance(named, str) and named in stages:
            teacher = stages[table.pop("teacher")]
        elif len(teachers) > 1 and named is None:
            raise SoftcacheError(f"[{section}] names no teacher, and the recipe has several [[teacher]] tables: "
                                 f"give teacher = one of {', '.join(stages)}")
        else:
            one = teachers[0][1] if len(teachers) == 1 else None
            teacher = one if one is not None and named in (None, one.model) else None
        dumps.append((name, _build_dump(merge, table, section, teacher)))
    return dumps


def _build_dump(merge: _Merge, table: dict[str, Any], section: str, teacher: TeacherConfig | None) -> DumpConfig:
    """A dump-teacher stage; with `teacher` (the train-teacher stage) its model, data and model.pt are the
    defaults of the dump's teacher, data and weights."""
    table = dict(table)
    if teacher is not None:
        table.setdefault("teacher", teacher.model)
        table.setdefault("data", teacher.data)
    table = merge.fill(DumpConfig, table)
    if teacher is not None:
        table.setdefault("weights", str(Path(teacher.out) / "model.pt"))
    from softcache.models import is_pretrained  # torch: only once a recipe is built
    named = table.get("teacher", ())
    if "weights" not in table and named and not all(map(is_pretrained, [named] if isinstance(named, str) else named)):
        raise SoftcacheError(f"[{section}] needs 'weights' ({_EXAMPLES['str | list[str]']}){_WHERE['weights']}, "
                             "unless every teacher is pretrained=true")
    table["views"] = str(table.get("views", "1"))
    table["layers"] = tuple(table.get("layers", ()))
    table["streams"] = tuple(dict(table.get("streams", {})).items())
    for key in ("teacher", "weights"):  # one or several teachers
        if isinstance(table.get(key), str):
            table[key] = (table[key],)
        elif key in table:
            table[key] = tuple(table[key])
    return _build(DumpConfig, table, section)


def _student_entries(doc: dict[str, Any], seed: int | None) -> list[tuple[dict[str, Any], str]]:
    """Each [[student]] table with its name; `seeds = [0, 1]` gives one per seed, named NAME_sSEED."""
    entries = []
    for k, entry in enumerate(doc.get("student", [])):
        entry = dict(entry)
        name = str(entry.pop("name", f"student{k}"))
        seeds = entry.pop("seeds", None)
        if seeds is not None and "seed" in entry:
            raise SoftcacheError(f"[student {name}] has both seed and seeds; give one")
        if seeds is not None and seed is not None:
            raise SoftcacheError(f"--seed {seed} would give every run of [student {name}] (seeds = {seeds}) one seed; "
                                 "run the recipe without --seed, or give its students one seed each")
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise SoftcacheError(f"[student {name}] seeds = {seeds} repeats a seed; give each once")
        entries += [({**entry, "seed": s}, f"{name}_s{s}") for s in seeds] if seeds is not None else [(entry, name)]
    return entries


def _student(entry: dict[str, Any], name: str, dumps: list[tuple[str, DumpConfig]],
             merge: _Merge) -> StudentConfig | OnlineConfig:
    """The stage of one student entry (out defaults to students/NAME): a train-student reading its cache, or
    with `online = true` a train-online running the teacher of the dump it names."""
    entry = dict(entry)
    online = entry.pop("online", False)
    entry.setdefault("out", f"students/{name}")
    named = dict(dumps)
    if online:  # the teacher in the loop: the dump it would otherwise read names teacher, data and policy
        dump = named.get(entry.get("cache", ""), dumps[0][1] if len(dumps) == 1 else None)
        if dump is None:
            raise SoftcacheError(f"[student {name}] online = true needs cache = the [[dump]] whose teacher it runs "
                                 f"({', '.join(named) or 'the recipe has no [dump]'})")
        return _build_student(merge, entry, name, online=dump)
    return _build_student(merge, _with_cache(entry, name, dumps, merge.base), name)


def _with_cache(entry: dict[str, Any], name: str, dumps: list[tuple[str, DumpConfig]], base: Path) -> dict[str, Any]:
    """`entry` with its `cache` a path: a [[dump]]'s name, a cache already under the root, or the recipe's
    only dump when it names none."""
    named = dict(dumps)
    entry = dict(entry)
    dump = named.get(entry.get("cache")) or (dumps[0][1] if "cache" not in entry and len(dumps) == 1 else None)
    if dump is not None:  # a stream the dump will not store is refused before any stage runs
        streams = ["main", *(stream for stream, _ in dump.streams)]
        for key in ("stream", "target_stream"):
            if entry.get(key) is not None and entry[key] not in streams:
                raise SoftcacheError(f"[student {name}] {key} = \"{entry[key]}\" is not a view stream of its cache; "
                                     f"its [dump] has: {', '.join(streams)}")
    if "cache" in entry and entry["cache"] in named:
        entry["cache"] = named[entry["cache"]].out
    elif "cache" in entry:
        if read_manifest(base / entry["cache"]) is None:
            defined = ", ".join(named) or "none"
            raise SoftcacheError(f"[student {name}] cache = \"{entry['cache']}\" names no [[dump]] of this recipe "
                                 f"(defined: {defined}) and no cache under '{base}'")
        entry["cache"] = str(base / entry["cache"])
    elif len(dumps) == 1:
        entry["cache"] = dumps[0][1].out
    elif dumps:
        raise SoftcacheError(f"[student {name}] needs cache = one of {', '.join(named)} (the recipe has several "
                             "[[dump]] tables)")
    return entry


def _build_student(merge: _Merge, entry: dict[str, Any], name: str,
                   online: DumpConfig | None = None) -> StudentConfig | OnlineConfig:
    """A train-student stage, or with `online` (the dump it would read) the train-online stage that runs
    that dump's (first) teacher in the loop on fresh views of the dump's policy instead."""
    entry = dict(entry)
    if "loss" in entry:
        entry["losses"] = tuple(entry.pop("loss"))
    entry["pairs"] = tuple(dict(entry.get("pairs", {})).items())
    entry["weights"] = tuple(dict(entry.get("weights", {})).items())
    options = dict(entry.get("loss_options", {}))
    entry["loss_options"] = tuple((f"{term}.{key}", value) for term, table in options.items()
                                  for key, value in table.items())
    if online is None:
        return _build(StudentConfig, merge.fill(StudentConfig, entry), f"student {name}")
    entry.pop("cache", None)
    entry = {"teacher": online.teacher[0], "teacher_weights": online.weights[0] if online.weights else None,
             "data": online.data, "augment": online.augment, "image_size": online.image_size, **entry}
    return _build(OnlineConfig, merge.fill(OnlineConfig, entry), f"student {name}")


def _born_again(table: dict[str, Any], merge: _Merge) -> BornAgain:
    """The stages of `[born_again]`: model, generations (>= 2), loss (generations 2 on, default kd), views (of
    each generation's cache), and any key of train-teacher / train-student / dump-teacher for every stage."""
    if "model" not in table:
        raise SoftcacheError("[born_again] needs 'model' (a string), the architecture of every generation")
    model, generations = table.pop("model"), table.pop("generations", 3)
    if generations < 2:
        raise SoftcacheError(f"[born_again] generations = {generations}; a Born-Again run needs at least 2")
    loss, views = table.pop("loss", ["kd"]), table.pop("views", 1)
    teacher_keys = {f.name for f in fields(TeacherConfig)} | _OPTIM_KEYS
    student_keys = {f.name for f in fields(StudentConfig)} | _OPTIM_KEYS
    dump_keys = {f.name for f in fields(DumpConfig)}
    unknown = sorted(set(table) - teacher_keys - student_keys - dump_keys - {"out"})
    if unknown:
        raise SoftcacheError(f"unknown key '{unknown[0]}' in [born_again]; valid: model, generations, loss, views, and "
                             "the keys of [teacher], [[student]] and [dump]")
    root = table.pop("out", "born_again")
    pick = lambda keys: {k: v for k, v in table.items() if k in keys}
    first = _build(TeacherConfig, merge.fill(TeacherConfig, {**pick(teacher_keys), "model": model,
                                                             "out": f"{root}/gen1"}), "born_again")
    steps, previous = [], first
    for k in range(2, generations + 1):
        dump = _build_dump(merge, {**pick(dump_keys - {"teacher", "weights", "layers", "batch_size"}),
                                   "views": views, "out": f"{root}/gen{k - 1}_cache"}, "born_again", previous)
        student = _build_student(merge, {**pick(student_keys - {"cache", "student"}), "cache": dump.out,
                                         "student": model, "loss": loss, "out": f"{root}/gen{k}"}, f"gen{k}")
        steps.append((dump, student))
        previous = TeacherConfig(model=model, data=first.data, out=student.out)  # where generation k's weights are
    return BornAgain(first, tuple(steps))


def _resuming(out: str) -> str:
    """' (resuming an unfinished run)' when `out` holds a training checkpoint: the stage continues from it."""
    return " (resuming an unfinished run)" if (Path(out) / "checkpoint.pt").exists() else ""


def run_pipeline(pipeline: Pipeline, echo=print) -> list[dict[str, Any]]:
    """Run every stage not already complete; return one row per student for the comparison table."""
    # Imported here (and in each stage) so that reading a recipe stays cheap, and tests can patch the stages.
    from softcache.dump import check_dump
    from softcache.train import check_training

    for stage in pipeline.stages():  # every stage's values, before the first stage spends any time
        (check_dump if isinstance(stage, DumpConfig) else check_training)(stage)
    rows = [_teacher_stage(cfg, name if name == "teacher" else f"teacher {name}", echo)
            for name, cfg in pipeline.teachers]
    for name, cfg in pipeline.dumps:
        _dump_stage(cfg, "dump" if len(pipeline.dumps) == 1 else f"dump {name}", echo)
    for name, cfg in pipeline.students:
        rows.append(_student_stage(cfg, name, f"student {name}", echo))
    if pipeline.born_again is not None:
        rows += _born_again_stages(pipeline.born_again, echo)
    return rows


def _teacher_stage(cfg: TeacherConfig, name: str, echo) -> dict[str, Any]:
    """Train the teacher unless its run is finished; its row of the table."""
    from softcache.train import train_teacher_from_config

    summary = finished_run(cfg.out, to_json(cfg))
    if summary:
        echo(f"[{name}] {cfg.out} is finished: skipped")
    else:
        echo(f"[{name}] training {cfg.model} -> {cfg.out}{_resuming(cfg.out)}")
        summary = train_teacher_from_config(cfg)
    return {"name": name, "student": cfg.model, "losses": "ce", **summary}


def _dump_stage(cfg: DumpConfig, name: str, echo) -> None:
    """Dump the teacher's outputs, or say that the cache is already there."""
    from softcache.dump import dump_from_config

    # dump_from_config itself reuses a complete cache with the same id and resumes an interrupted one
    result = dump_from_config(cfg)
    if result.action == "reuse":
        echo(f"[{name}] {cfg.out} holds this cache ({result.manifest['id']}): skipped")
    else:
        echo(f"[{name}] {'+'.join(cfg.teacher)} -> {cfg.out} ({result.action})")


def _student_stage(cfg: StudentConfig | OnlineConfig, name: str, label: str, echo) -> dict[str, Any]:
    """Train a student (from its cache, or online) unless its run is finished; its row of the table."""
    from softcache.train import train_online_from_config, train_student_from_config

    online = isinstance(cfg, OnlineConfig)
    losses = "+".join(cfg.losses) + (" online" if online else "")
    summary = finished_run(cfg.out, to_json(cfg))
    if summary:
        echo(f"[{label}] {cfg.out} is finished: skipped")
    else:
        teacher = f" ({cfg.teacher} in the loop)" if online else ""
        echo(f"[{label}] {cfg.student} with {'+'.join(cfg.losses)}{teacher} -> {cfg.out}{_resuming(cfg.out)}")
        summary = (train_online_from_config if online else train_student_from_config)(cfg)
    return {"name": name, "student": cfg.student, "losses": losses, **summary}


def _born_again_stages(ban: BornAgain, echo) -> list[dict[str, Any]]:
    """Each generation in turn (the cache of the one before first), then their ensemble; one row each."""
    rows = [_teacher_stage(ban.first, "gen1", echo)]
    for k, (dump, student) in enumerate(ban.steps, start=2):
        _dump_stage(dump, f"gen{k - 1} dump", echo)
        rows.append(_student_stage(student, f"gen{k}", f"gen{k}", echo))
    return rows + [_ensemble_stage(ban, echo)]


def _ensemble_stage(ban: BornAgain, echo) -> dict[str, Any]:
    """Evaluate the generations' mean prediction; its row of the table (timed here: no run folder records it)."""
    from softcache.ensemble import ensemble

    started = time.perf_counter()
    result = ensemble(ban.runs, data=ban.first.data, device=ban.first.device,
                      batch_size=ban.first.optim.batch_size, workers=ban.first.optim.workers)
    echo(f"[ensemble] {len(ban.runs)} generations: {result.ensemble_accuracy:.2f}%")
    return {"name": "ensemble", "student": ban.first.model, "losses": f"mean({len(ban.runs)})",
            "epochs": None, "test_acc": result.ensemble_accuracy, "best_test_acc": None,
            "wall_s": time.perf_counter() - started}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table `softcache run` prints at the end."""
    header = f"{'run':<12} {'model':<14} {'loss':<14} {'epochs':>6} {'test_acc':>9} {'best':>7} {'wall_s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        epochs = "-" if r["epochs"] is None else str(r["epochs"])
        best = "-" if r["best_test_acc"] is None else f"{r['best_test_acc']:.2f}%"
        lines.append(f"{r['name']:<12} {r['student']:<14} {r['losses']:<14} {epochs:>6} "
                     f"{r['test_acc']:>8.2f}% {best:>7} {r['wall_s']:>8.1f}")
    return "\n".join(lines)
