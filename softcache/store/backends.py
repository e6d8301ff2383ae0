"""The cache backends by name, the one place a backend is registered. `names.BACKENDS` is the torch-free copy
of the names that `--format` offers (a test checks they agree)."""
from __future__ import annotations

from pathlib import Path

from softcache.store import where
from softcache.store.base import Backend
from softcache.store.hdf5_store import HDF5Backend
from softcache.store.zarr_store import ZarrBackend

BACKENDS: dict[str, type[Backend]] = {"zarr": ZarrBackend, "hdf5": HDF5Backend}
DEFAULT = "zarr"  # for an --out that no backend's suffix claims


def by_suffix(path: where.Location) -> str:
    """The backend a new cache at `path` gets without --format: the one whose suffix it has, else DEFAULT."""
    suffix = Path(str(path)).suffix
    return next((name for name, backend in BACKENDS.items() if suffix in backend.suffixes), DEFAULT)


def recognising(path: where.Location) -> type[Backend] | None:
    """The backend whose format `path` is in (None: no backend's)."""
    return next((backend for backend in BACKENDS.values() if backend.recognises(path)), None)


def diagnose(path: where.Location) -> str | None:
    """What is wrong with `path`, whose manifest cannot be read, when it is recognisably a cache of some backend;
    None when it is none of ours."""
    return next((found for backend in BACKENDS.values() if (found := backend.diagnose(path))), None)
