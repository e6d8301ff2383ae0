"""`softcache run PIPELINE.toml`: train-teacher, dump-teacher and train-student stages from one recipe.

    [defaults]          keys shared by every stage that has them (data, device, seed, workers, batch_size ...)
    root = "runs/x"     where relative `out` paths land (relative to the working directory)
    [teacher]           a TeacherConfig: model, augment, epochs ... (out defaults to "teacher")
    [dump]              a DumpConfig: augment, views, layers ... (teacher, weights default to [teacher]'s)
    [[student]]         a StudentConfig each, with a `name`: student, loss, pairs = {s = "t"}, epochs ...

A stage whose complete output exists (summary.json, or a complete cache with the same id) is skipped, so a
rerun resumes; an interrupted dump continues from its committed shards. A finished output made with other
settings than the recipe's is refused, naming what differs.
"""
from __future__ import annotations

import json
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from softcache.config import DumpConfig, OptimConfig, StudentConfig, TeacherConfig, to_json
from softcache.errors import SoftcacheError
from softcache.store.manifest import differences

_OPTIM_KEYS = {f.name for f in fields(OptimConfig)}


@dataclass(frozen=True)
class Pipeline:
    """The stages of one recipe, in order."""

    teacher: TeacherConfig | None
    dump: DumpConfig | None
    students: tuple[tuple[str, StudentConfig], ...]


# Recipe keys whose TOML form differs from the config field's type; the rest take the field's type.
_RAW_TYPES = {StudentConfig: {"loss": "list[str]", "pairs": "dict[str, str]", "weights": "dict[str, float]"},
              DumpConfig: {"layers": "list[str]", "teacher": "str | list[str]", "weights": "str | list[str]",
                           "views": "int | str"}}
_EXAMPLES = {"list[str]": 'a list of strings, e.g. ["kd", "at"]', "dict[str, str]": 'a table of strings, e.g. '
             '{ layer3 = "layer3" }', "dict[str, float]": "a table of numbers, e.g. { kd = 0.9 }",
             "str | list[str]": 'a string or a list of strings', "int | str": 'an integer or "all"',
             "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "int | None": "an integer", "str | None": "a string"}


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
        raise SoftcacheError(f"[{section}] needs '{missing[0]}' ({_EXAMPLES.get(kind, kind)}){_WHERE.get(missing[0], '')}")
    return cls(**kwargs)


_WHERE = {"weights": ", or a [teacher] section whose model.pt it takes", "cache": ", or a [dump] section whose cache "
          "it takes", "data": ", here or in [defaults]", "teacher": ", or a [teacher] section"}


def load_pipeline(path: str | Path, *, root: str | None = None, device: str | None = None,
                  seed: int | None = None) -> Pipeline:
    """Read a recipe; `root`, `device` and `seed` override the file's."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise SoftcacheError(f"'{path}' is not valid TOML: {err}") from None
    unknown = sorted(set(doc) - {"defaults", "teacher", "dump", "student"})
    if unknown:
        raise SoftcacheError(f"unknown section [{unknown[0]}] in '{path}'; valid: defaults, teacher, dump, student")
    if not {"teacher", "dump", "student"} & set(doc):
        raise SoftcacheError(f"'{path}' has no stage; add a [teacher], a [dump] or a [[student]] section")
    if "student" in doc and not isinstance(doc["student"], list):
        raise SoftcacheError("[student] must be an array of tables: write each student as [[student]]")
    _check_types(doc.get("defaults", {}), "defaults", (TeacherConfig, DumpConfig, StudentConfig))
    for section, cls in (("teacher", TeacherConfig), ("dump", DumpConfig)):
        if section in doc:
            _check_types(doc[section], section, (cls,))
    for k, entry in enumerate(doc.get("student", [])):
        _check_types(entry, f"student {entry.get('name', f'student{k}') if isinstance(entry, dict) else k}",
                     (StudentConfig,))
    defaults = dict(doc.get("defaults", {}))
    base = Path(root or defaults.pop("root", "runs"))
    defaults.pop("root", None)
    overrides = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}

    def with_defaults(cls: type, table: dict[str, Any]) -> dict[str, Any]:
        accepted = {f.name for f in fields(cls)} | (_OPTIM_KEYS if cls is not DumpConfig else set())
        merged = {k: v for k, v in defaults.items() if k in accepted}
        merged.update(table)
        merged.update(overrides)  # command-line values win over the recipe's
        if "out" in merged:
            merged["out"] = str(base / merged["out"])
        return merged

    teacher = dump = None
    if "teacher" in doc:
        teacher = _build(TeacherConfig, with_defaults(TeacherConfig, {"out": "teacher", **doc["teacher"]}), "teacher")
    if "dump" in doc:
        table = {"out": "cache", **doc["dump"]}
        if teacher is not None:
            table.setdefault("teacher", teacher.model)
            table.setdefault("data", teacher.data)
        table = with_defaults(DumpConfig, table)
        if teacher is not None:
            table.setdefault("weights", str(Path(teacher.out) / "model.pt"))
        table["views"] = str(table.get("views", "1"))
        table["layers"] = tuple(table.get("layers", ()))
        for key in ("teacher", "weights"):  # one or several teachers
            if isinstance(table.get(key), str):
                table[key] = (table[key],)
            elif key in table:
                table[key] = tuple(table[key])
        dump = _build(DumpConfig, table, "dump")
    students = []
    for k, entry in enumerate(doc.get("student", [])):
        entry = dict(entry)
        name = str(entry.pop("name", f"student{k}"))
        entry.setdefault("out", f"students/{name}")
        if "cache" in entry:
            entry["cache"] = str(base / entry["cache"])
        elif dump is not None:
            entry["cache"] = dump.out
        if "loss" in entry:
            entry["losses"] = tuple(entry.pop("loss"))
        entry["pairs"] = tuple(dict(entry.get("pairs", {})).items())
        entry["weights"] = tuple(dict(entry.get("weights", {})).items())
        students.append((name, _build(StudentConfig, with_defaults(StudentConfig, entry), f"student {name}")))
    return Pipeline(teacher, dump, tuple(students))


def _finished_run(out: str, config: Any = None) -> dict[str, Any] | None:
    """The summary of a finished run at `out`, or None; refuses one made with another configuration."""
    summary = Path(out) / "summary.json"
    if not summary.exists():
        return None
    if config is not None:
        recorded = json.loads((Path(out) / "config.json").read_text())
        differ = differences(recorded, json.loads(json.dumps(to_json(config))))
        if differ:
            raise SoftcacheError(f"'{out}' holds a finished run made with other settings ({', '.join(differ)} differ); "
                                 "remove it, or run the recipe with another --root")
    return json.loads(summary.read_text())


def _resuming(out: str) -> str:
    """' (resuming an unfinished run)' when `out` holds a training checkpoint: the stage continues from it."""
    return " (resuming an unfinished run)" if (Path(out) / "checkpoint.pt").exists() else ""


def run_pipeline(pipeline: Pipeline, echo=print) -> list[dict[str, Any]]:
    """Run every stage not already complete; return one row per student for the comparison table."""
    # Imported here so that reading a recipe stays cheap (and tests can patch the stages).
    from softcache.dump import dump_from_config
    from softcache.train import train_student_from_config, train_teacher_from_config

    rows = []
    if pipeline.teacher is not None:
        summary = _finished_run(pipeline.teacher.out, pipeline.teacher)
        if summary:
            echo(f"[teacher] {pipeline.teacher.out} is finished: skipped")
        else:
            echo(f"[teacher] training {pipeline.teacher.model} -> {pipeline.teacher.out}{_resuming(pipeline.teacher.out)}")
            summary = train_teacher_from_config(pipeline.teacher)
        rows.append({"name": "teacher", "student": pipeline.teacher.model, "losses": "ce", **summary})
    if pipeline.dump is not None:
        # dump_from_config itself reuses a complete cache with the same id and resumes an interrupted one
        result = dump_from_config(pipeline.dump)
        if result.action == "reuse":
            echo(f"[dump] {pipeline.dump.out} holds this cache ({result.manifest['id']}): skipped")
        else:
            echo(f"[dump] {'+'.join(pipeline.dump.teacher)} -> {pipeline.dump.out} ({result.action})")
    for name, cfg in pipeline.students:
        summary = _finished_run(cfg.out, cfg)
        if summary:
            echo(f"[student {name}] {cfg.out} is finished: skipped")
        else:
            echo(f"[student {name}] {cfg.student} with {'+'.join(cfg.losses)} -> {cfg.out}{_resuming(cfg.out)}")
            summary = train_student_from_config(cfg)
        rows.append({"name": name, "student": cfg.student, "losses": "+".join(cfg.losses), **summary})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table `softcache run` prints at the end."""
    header = f"{'run':<12} {'model':<14} {'loss':<14} {'epochs':>6} {'test_acc':>9} {'best':>7} {'wall_s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<12} {r['student']:<14} {r['losses']:<14} {r['epochs']:>6} "
                     f"{r['test_acc']:>8.2f}% {r['best_test_acc']:>6.2f}% {r['wall_s']:>8.1f}")
    return "\n".join(lines)
