"""`softcache report ROOT`: what the runs under ROOT reached, and what the cache cost against the teacher in the loop.

Everything comes from the files the stages wrote: each run folder's config.json, metrics.jsonl and summary.json,
and each cache's manifest, shard record (`CacheReader.cost`: the dump's wall time and the teachers' forward
seconds, summed over its shards) and size on disk. Nothing is re-run or timed here.

The online cost of a cached student is an estimate made of measured rates only: its own wall time, plus the
training views it saw (summary.json `images`) at the teacher forward rate its cache's dump measured (views
computed / teacher seconds, on the dump's device). A student whose terms need no teacher (ce alone) costs the
same either way. A train-online run is a measured online cost and is reported as such.

    report.md    the runs, the configurations (mean and spread over seeds) and the cost table
    report.png   test accuracy per epoch, final accuracy per configuration, the cost picture
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from softcache.errors import SoftcacheError
from softcache.runs import read_run

REPORT_KINDS = {"teacher": "teacher", "student": "cached", "online": "online"}  # a run's kind, as reported
NO_TEACHER_TERMS = {"ce"}  # terms a student trains on without any teacher output
IGNORED_CONFIG = ("seed", "out", "overwrite", "workers", "data_path", "download", "device")


@dataclass
class Run:
    """One finished run folder."""

    path: Path
    name: str                     # its path under ROOT
    kind: str                     # teacher (cross-entropy) | cached | online
    model: str
    losses: str
    seed: int
    config: dict[str, Any]
    summary: dict[str, Any]
    curve: list[tuple[int, float]]  # (epoch, test_acc)

    @property
    def images(self) -> int:
        """Training views seen (summary.json's `images`; 0 for a run written before it was recorded, which
        then gets no online estimate)."""
        return int(self.summary.get("images", 0))

    @cached_property
    def weights_sha256(self) -> str | None:
        """Of the run's model.pt (what a dump records of its teacher), or None without one."""
        from softcache.models import file_sha256
        model = self.path / "model.pt"
        return file_sha256(model) if model.is_file() else None

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "teacher" and not set(self.losses.split("+")) <= NO_TEACHER_TERMS

    @property
    def group(self) -> str:
        """Runs that differ only in seed (and in where or how they ran) form one configuration."""
        config = {k: v for k, v in self.config.items() if k not in IGNORED_CONFIG}
        config["optim"] = {k: v for k, v in config.get("optim", {}).items() if k != "workers"}
        return json.dumps({"kind": self.kind, **config}, sort_keys=True)


@dataclass
class Cache:
    path: Path
    name: str
    num_samples: int
    num_views: int
    bytes: int
    cost: dict[str, Any] | None   # the dump's recorded cost (None: a cache from before it was recorded)
    teacher_sha256: list[str] = field(default_factory=list)  # of the weights files its teachers came from

    @property
    def teacher_rate(self) -> float | None:
        """Views per second of the teachers' forward passes, as the dump measured them."""
        if not self.cost or not self.cost.get("teacher_s"):
            return None
        return self.cost["views"] / self.cost["teacher_s"]


@dataclass
class Report:
    root: Path
    runs: list[Run]
    caches: list[Cache]

    def cache_of(self, run: Run) -> Cache | None:
        """The cache a student read: its recorded path, from the working directory or from ROOT, or else the
        one cache under ROOT of that name."""
        target = run.config.get("cache")
        if not target:
            return None
        for wanted in (Path(target), self.root / target):
            found = [c for c in self.caches if c.path.resolve() == wanted.resolve()]
            if found:
                return found[0]
        named = [c for c in self.caches if c.path.name == Path(target).name]
        return named[0] if len(named) == 1 else None

    def online_estimate(self, run: Run) -> float | None:
        """Seconds the cached run would have taken with its teacher in the loop (None: no measured rate)."""
        if run.kind != "cached":
            return None
        if not run.needs_teacher:
            return float(run.summary["wall_s"])
        cache = self.cache_of(run)
        if cache is None or cache.teacher_rate is None or not run.images:
            return None
        return float(run.summary["wall_s"]) + run.images / cache.teacher_rate

    def costs(self) -> dict[str, Any]:
        """The amortisation: one row per stage, the totals with the cache and the estimate without it."""
        rows = []
        for run in self.runs:
            if run.kind == "teacher" and self._is_teacher(run):
                rows.append({"stage": f"train-teacher {run.name}", "wall_s": run.summary["wall_s"], "bytes": None,
                             "per_sample": None, "online_s": run.summary["wall_s"], "kind": "teacher"})
        for cache in self.caches:
            wall = cache.cost["wall_s"] if cache.cost else None
            rate = cache.teacher_rate
            rows.append({"stage": f"dump-teacher {cache.name}", "wall_s": wall, "bytes": cache.bytes,
                         "per_sample": cache.bytes / max(1, cache.num_samples), "online_s": 0.0, "kind": "dump",
                         "rate": rate, "devices": (cache.cost or {}).get("devices", [])})
        for run in self.runs:
            if run.kind == "cached":
                rows.append({"stage": f"train-student {run.name}", "wall_s": run.summary["wall_s"], "bytes": None,
                             "per_sample": None, "online_s": self.online_estimate(run), "kind": "student"})
            elif run.kind == "teacher" and not self._is_teacher(run):
                rows.append({"stage": f"train-teacher {run.name} (baseline)", "wall_s": run.summary["wall_s"],
                             "bytes": None, "per_sample": None, "online_s": run.summary["wall_s"], "kind": "student"})
        known = (all(r["wall_s"] is not None and r["online_s"] is not None for r in rows)
                 and any(r["kind"] == "student" for r in rows))  # no student yet: nothing to compare
        cached = sum(r["wall_s"] for r in rows if r["wall_s"] is not None)
        online = sum(r["online_s"] for r in rows if r["online_s"] is not None)
        measured = [r for r in self.runs if r.kind == "online"]
        return {"rows": rows, "cached_s": cached, "online_s": online if known else None,
                "saving": online / cached if known and cached > 0 else None,
                "measured_online": [{"run": r.name, "wall_s": r.summary["wall_s"], "images": r.images}
                                    for r in measured]}

    def _is_teacher(self, run: Run) -> bool:
        """A cross-entropy run whose weights some cache was dumped from (else it is a baseline student)."""
        return run.weights_sha256 is not None and any(run.weights_sha256 in c.teacher_sha256 for c in self.caches)

    def configurations(self) -> list[dict[str, Any]]:
        """Final test accuracy per configuration: mean, spread (min..max) and count over its seeds."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.group, []).append(run)
        out = []
        for runs in groups.values():
            accs = [float(r.summary["test_acc"]) for r in runs]
            out.append({"label": _label([r.name for r in runs]), "kind": runs[0].kind, "model": runs[0].model,
                        "losses": runs[0].losses, "runs": [r.name for r in runs], "seeds": [r.seed for r in runs],
                        "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
                        "std": _std(accs), "accs": accs})
        return out


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _label(names: Sequence[str]) -> str:
    """A configuration's name: its run's, or what its seeds' run names share (students/kd_s0, kd_s1 -> students/kd)."""
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return re.sub(r"[_-]?(s|seed)?[_-]*$", "", prefix) or names[0]


def collect(root: str | Path) -> Report:
    """The finished runs and the complete caches under `root`."""
    from softcache.store import find_caches, open_cache, where
    root = Path(root)
    if not root.is_dir():
        raise SoftcacheError(f"'{root}' is not a folder; give the folder that holds the runs (a recipe's root)")
    caches = []
    for path, manifest in find_caches(root):
        if not manifest.get("complete"):
            continue
        reader = open_cache(path)
        n, v = reader.shape("views/flip")
        caches.append(Cache(Path(path), _relative(Path(path), root), n, v, where.total_size(path), reader.cost,
                            [t.get("weights_sha256", "") for t in manifest.get("teachers", [])]))
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        run = read_run(summary_path.parent)
        try:
            metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line]
        except (AttributeError, OSError, ValueError):
            continue  # not a run folder (or a damaged one): nothing to report from it
        if run.summary is None:
            continue
        losses = "+".join(run.config.get("losses", ["ce"]))
        runs.append(Run(run.path, _relative(run.path, root), REPORT_KINDS[run.kind], run.model, losses,
                        int(run.config.get("seed", 0)), run.config, run.summary,
                        [(m["epoch"], m["test_acc"]) for m in metrics]))
    if not runs and not caches:
        raise SoftcacheError(f"'{root}' holds no finished run (summary.json) and no complete cache")
    return Report(root, runs, caches)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def cost_table(report: Report) -> str:
    """The amortisation table, in plain text (`softcache run` prints it)."""
    costs = report.costs()
    w = max([len(r["stage"]) for r in costs["rows"]] + [12])
    header = f"{'stage':<{w}} {'wall_s':>9} {'MiB':>9} {'B/sample':>9} {'online_s':>9}"
    lines = [header, "-" * len(header)]
    for r in costs["rows"]:
        per_sample = "-" if r["per_sample"] is None else f"{r['per_sample']:,.0f}"
        lines.append(f"{r['stage']:<{w}} {_seconds(r['wall_s']):>9} {_mib(r['bytes']):>9} {per_sample:>9} "
                     f"{_seconds(r['online_s']):>9}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<{w}} {_seconds(costs['cached_s']):>9} {'':>9} {'':>9} {_seconds(costs['online_s']):>9}")
    lines.append(_saving_line(report, costs))
    return "\n".join(lines)


def _saving_line(report: Report, costs: dict[str, Any]) -> str:
    rates = [f"{c.teacher_rate:,.0f} views/s on {', '.join(c.cost.get('devices') or ['?'])}"
             + (f" for {c.name}" if len(report.caches) > 1 else "") for c in report.caches if c.teacher_rate]
    if not any(r["kind"] == "student" for r in costs["rows"]):
        return "no student has been trained yet: nothing to compare the cache with"
    if costs["saving"] is None:
        return ("online_s: no estimate (a cache without a recorded teacher rate, or a run without an image count); "
                "re-dump with this version to record it")
    return (f"with the cache {_seconds(costs['cached_s'])} s, "
            f"with the teacher in the loop ~{_seconds(costs['online_s'])} s (estimate): saving {costs['saving']:.2f}x\n"
            f"online_s estimate: a student's time + its training views at the teacher forward rate the dump measured "
            f"({'; '.join(rates) or 'no teacher needed'})")


def markdown(report: Report) -> str:
    """report.md: the runs, the configurations and the cost table."""
    out = [f"# softcache report: {report.root}", "", "## Runs", "",
           "| run | kind | model | loss | seed | epochs | test acc | best | wall s | train views |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report.runs:
        s = r.summary
        out.append(f"| {r.name} | {r.kind} | {r.model} | {r.losses} | {r.seed} | {s['epochs']} | "
                   f"{s['test_acc']:.2f}% | {s['best_test_acc']:.2f}% | {s['wall_s']:,.1f} | {r.images:,} |")
    out += ["", "## Configurations (final test accuracy over seeds)", "",
            "| configuration | kind | model | loss | seeds | mean | min | max | std |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for c in report.configurations():
        out.append(f"| {c['label']} | {c['kind']} | {c['model']} | {c['losses']} | {len(c['accs'])} | "
                   f"{c['mean']:.2f}% | {c['min']:.2f}% | {c['max']:.2f}% | {c['std']:.2f} |")
    costs = report.costs()
    out += ["", "## Cost: the cache against the teacher in the loop", "",
            "| stage | wall s | on disk MiB | bytes/sample | teacher in the loop s |", "|---|---:|---:|---:|---:|"]
    for r in costs["rows"]:
        per_sample = "-" if r["per_sample"] is None else f"{r['per_sample']:,.0f}"
        out.append(f"| {r['stage']} | {_seconds(r['wall_s'])} | {_mib(r['bytes'])} | {per_sample} | "
                   f"{_seconds(r['online_s'])} |")
    out.append(f"| **total** | **{_seconds(costs['cached_s'])}** | | | **{_seconds(costs['online_s'])}** |")
    out += ["", _saving_line(report, costs)]
    if costs["measured_online"]:
        out += ["", "Measured online runs (the teacher in the loop): " + ", ".join(
            f"{m['run']} {m['wall_s']:,.1f} s" for m in costs["measured_online"]) + "."]
    return "\n".join(out) + "\n"


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
KIND_COLORS = {"teacher": "#7f7f7f", "dump": "#ff7f0e", "student": "#1f77b4", "forward": "#d62728"}


def figure(report: Report, path: str | Path) -> Path:
    """report.png: accuracy per epoch, final accuracy per configuration, and the cost picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = report.configurations()
    fig = Figure(figsize=(16, 5.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    curves, finals, cost = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1.0, 1.1]})
    color_of = {c["label"]: COLORS[k % len(COLORS)] for k, c in enumerate(configs)}  # one per configuration
    _plot_curves(curves, report.runs, configs, color_of)
    _plot_finals(finals, configs, color_of)
    _plot_cost(cost, report)
    path = Path(path)
    fig.savefig(path)
    return path


def _plot_curves(ax, runs: list[Run], configs: list[dict[str, Any]], color_of: dict[str, str]) -> None:
    """Test accuracy per epoch: a configuration's colour, one line style per seed, one legend entry each."""
    from matplotlib.ticker import MaxNLocator

    by_run = {name: c for c in configs for name in c["runs"]}
    styles = ["-", "--", ":", "-."]
    for run in runs:
        config = by_run[run.name]
        k = config["runs"].index(run.name)
        epochs, accs = zip(*run.curve) if run.curve else ((), ())
        ax.plot(epochs, accs, styles[k % len(styles)], color=color_of[config["label"]], lw=1.6,
                marker="o" if len(epochs) <= 20 else None, ms=3, label=config["label"] if k == 0 else None)
    ax.set(title="Test accuracy per epoch", xlabel="epoch", ylabel="test accuracy (%)")
    last = max([e for run in runs for e, _ in run.curve] + [1])
    ax.set_xlim(0.5, last + 0.5)
    if last <= 15:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if configs:
        ax.legend(fontsize=8, loc="lower right", ncol=1 if len(configs) <= 8 else 2)


def _plot_finals(ax, configs: list[dict[str, Any]], color_of: dict[str, str]) -> None:
    """Final test accuracy per configuration: a bar at the mean, min..max as its error bar, a dot per seed."""
    ys = range(len(configs))
    means = [c["mean"] for c in configs]
    spread = [[c["mean"] - c["min"] for c in configs], [c["max"] - c["mean"] for c in configs]]
    ax.barh(list(ys), means, xerr=spread, color=[color_of[c["label"]] for c in configs], alpha=0.85,
            capsize=3, height=0.6)
    top = min(100.0, max([c["max"] for c in configs] + [1.0]))
    for y, c in zip(ys, configs):
        ax.plot(c["accs"], [y] * len(c["accs"]), "k.", ms=5)
        seeds = f" (n={len(c['accs'])})" if len(c["accs"]) > 1 else ""
        ax.text(c["max"] + 0.03 * top, y, f"{c['mean']:.1f}%{seeds}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{c['label']}\n{c['model']}: {c['losses']}" for c in configs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.3)  # room for the labels right of the bars
    ax.set_xticks([t for t in ax.get_xticks() if t <= 100])
    ax.set(title="Final test accuracy (mean; bar: min..max over seeds)", xlabel="test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)


def _plot_cost(ax, report: Report) -> None:
    """Wall time as stacked bars: the stages with the cache, and (when estimated) the same with the teacher in
    the loop, its forward passes hatched; the estimate's rates in the axis label."""
    from matplotlib.patches import Patch

    costs = report.costs()
    bars = _cost_bars(costs["rows"], costs["online_s"] is not None)
    for k, (_, segments) in enumerate(bars):
        left = 0.0
        for kind, seconds in segments:
            ax.barh(k, seconds, left=left, color=KIND_COLORS[kind], edgecolor="white", height=0.55,
                    hatch="//" if kind == "forward" else None)
            left += seconds
        ax.text(left, k, f"  {left:,.0f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=9)
    ax.invert_yaxis()
    width = max(sum(s for _, s in segments) for _, segments in bars)
    ax.set_xlim(0, width * 1.3 if width else 1)
    title = "Wall time: teacher, dump, students"
    if costs["saving"] is not None:
        title += f"\nthe cache saves {costs['saving']:.2f}x"
    ax.set(title=title, xlabel="wall time (s)\n\n" + "\n".join(textwrap.wrap(_cost_note(report, costs), 70)))
    ax.xaxis.label.set_fontsize(8.5)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=KIND_COLORS["teacher"], label="teacher training"),
                       Patch(color=KIND_COLORS["dump"], label="dump (teacher once)"),
                       Patch(color=KIND_COLORS["student"], label="students"),
                       Patch(facecolor=KIND_COLORS["forward"], hatch="//", label="teacher forward in the loop")],
              fontsize=7.5, loc="center", ncol=2)


def _cost_bars(rows: list[dict[str, Any]], estimated: bool) -> list[tuple[str, list[tuple[str, float]]]]:
    """(label, [(kind, seconds), ...]) per bar: every stage with the cache; with `estimated`, the teachers, the
    students and the teacher forward passes they would have run in the loop."""
    bars = [("with the cache", [(r["kind"], r["wall_s"] or 0.0) for r in rows])]
    if estimated:
        online = [("teacher", r["wall_s"]) for r in rows if r["kind"] == "teacher"]
        online += [("student", sum(r["wall_s"] for r in rows if r["kind"] == "student")),
                   ("forward", sum(r["online_s"] - r["wall_s"] for r in rows if r["kind"] == "student"))]
        bars.append(("teacher in the loop\n(estimate)", online))
    return bars


def _cost_note(report: Report, costs: dict[str, Any]) -> str:
    """How the online estimate was made (the teacher rates measured), and the measured online runs."""
    rates = [f"{c.teacher_rate:,.0f} views/s ({', '.join(c.cost.get('devices') or ['?'])})"
             for c in report.caches if c.teacher_rate]
    note = ("estimate: each student's wall time + its training views at the teacher forward rate the dump "
            "measured, " + ("; ".join(rates) or "none recorded"))
    if costs["measured_online"]:
        note += ". Measured online runs: " + ", ".join(f"{m['run']} {m['wall_s']:,.1f} s"
                                                       for m in costs["measured_online"])
    return note


def write_report(root: str | Path) -> tuple[Report, Path, Path]:
    """Write ROOT/report.md and ROOT/report.png; returns the report and both paths."""
    report = collect(root)
    md = Path(root) / "report.md"
    md.write_text(markdown(report))
    return report, md, figure(report, Path(root) / "report.png")
