"""`softcache ls`: the caches under a folder or prefix, one line each, and a note for each that cannot be used.

The state column is the reader's cheap check (`CacheReader.problems`: a stat per shard file), not the manifest's
`complete` flag alone: a complete cache with a shard gone, or one whose manifest cannot be read, is DAMAGED.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError
from softcache.store import FORMAT_VERSION, Found, feature_name, open_cache, survey, where, writing

HEADER = ("id", "teacher", "dataset", "views", "layers", "size", "complete", "path")
RIGHT = {3, 5}  # numbers
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size: float) -> str:
    """Bytes at a scale that reads: `512 B`, `1.5 KiB`, `20.5 MiB`, `5.5 GiB`."""
    for unit in UNITS[:-1]:
        if round(size, 1) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} {UNITS[-1]}"


def stored_layers(manifest: dict[str, Any]) -> str:
    """The layers a cache holds, with their kind when any is not a feature map: `layer2,layer3`,
    `layer3 (attention)`, `layer3 (attention), embedding (features)`."""
    layers = manifest.get("layers") or []
    if "targets" not in manifest.get("storage", {}):  # a cache from before --targets: feature maps
        return ",".join(layers) or "-"
    kinds: dict[str, list[str]] = {}
    for layer in layers:
        kinds.setdefault(feature_name(manifest, layer).split("/")[0], []).append(layer)
    if list(kinds) == ["features"]:
        return ",".join(kinds["features"])
    return ", ".join(f"{','.join(layers)} ({kind})" for kind, layers in kinds.items()) or "-"


def state(found: Found) -> tuple[str, str | None]:
    """The complete column (yes, NO, DAMAGED, or the format of a cache from another softcache) and a note that
    says what is wrong and what to do, if anything is."""
    m, pid = found.manifest, writing(found.path)
    writer = f"a dump is writing it now (pid {pid})" if pid is not None else None
    if m is None:  # an HDF5 file cannot be opened while it is written
        return ("NO", writer) if writer else ("DAMAGED", f"damaged: {found.damage}; re-dump it with --overwrite")
    if not m.get("complete"):
        return "NO", writer
    if m.get("format_version") != FORMAT_VERSION:
        return (f"format {m.get('format_version')}", f"this softcache reads format {FORMAT_VERSION}; re-dump it with "
                "--overwrite")
    try:
        found_problems = open_cache(found.path, check=False).problems()
    except SoftcacheError as err:
        return "DAMAGED", str(err)
    if found_problems:
        more = f" (and {len(found_problems) - 1} more)" if len(found_problems) > 1 else ""
        return "DAMAGED", (f"damaged: {found_problems[0]}{more}; run 'softcache verify {found.path}', and re-dump it "
                           "with --overwrite")
    return "yes", None


def row(found: Found, complete: str) -> tuple[str, ...]:
    m, size = found.manifest, human_size(where.total_size(found.path))
    if m is None:
        return ("-", "-", "-", "-", "-", size, complete, str(found.path))
    teachers = "+".join(t["name"] for t in m.get("teachers", [m.get("teacher", {})]))
    return (m.get("id", "-"), teachers, m["dataset"]["spec"], str(m["augment"]["num_views"]), stored_layers(m), size,
            complete, str(found.path))


def ls_lines(root: str | Path) -> list[str]:
    """The table of the caches under `root` (columns as wide as their longest cell), then one line per cache
    that cannot be used: `PATH: damaged: its root zarr.json is not valid JSON (...); re-dump it ...`."""
    if not where.exists(root):
        raise SoftcacheError(f"'{root}' does not exist; give a folder that holds caches")
    rows, notes = [], []
    for found in survey(root):
        complete, note = state(found)
        rows.append(row(found, complete))
        if note:
            notes.append(f"{found.path}: {note}")
    widths = [max(len(r[k]) for r in [HEADER, *rows]) for k in range(len(HEADER))]
    lines = []
    for r in [HEADER, *rows]:
        cells = [cell.rjust(w) if k in RIGHT else cell.ljust(w) for k, (cell, w) in enumerate(zip(r, widths))]
        lines.append(" ".join(cells[:-1]) + " " + r[-1])
    return lines + notes
