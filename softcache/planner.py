"""Where a stage's images and cached targets live, decided in one place for the dump, training, evaluation
and bench: `plan(...) -> DataPlan`.

Images are *resident* (decoded once and held on the device, padded by what the policy's crops reach past the
edge; each view is then a gather: softcache.resident) or come from a DataLoader replaying each view on CPU
workers (*loader*, any view, resizing included). Cached targets are held in memory (*resident*) or streamed
from the store (*stream*, softcache.streaming). `--data-path`:

    resident  images and targets in memory (crop-only views, one image size), refused otherwise
    loader    a DataLoader for the images, targets in memory
    stream    targets streamed; images resident when they fit and the views are crops, else a DataLoader
    auto      whatever fits in RESIDENT_BYTES, images and targets together
"""
from __future__ import annotations

from dataclasses import dataclass

from softcache.errors import SoftcacheError

DATA_PATHS = ("auto", "resident", "loader", "stream")     # a stage that reads cached targets (train-student)
IMAGE_PATHS = ("auto", "resident", "loader")              # the others: images only (dump, train-teacher, online)
RESIDENT_BYTES = 4 << 30  # what a stage may hold on the device: decoded images and cached targets together


@dataclass(frozen=True)
class DataPlan:
    images: str           # resident | loader
    targets: str = "-"    # resident | stream; '-' for a stage that reads no cached targets

    def __str__(self) -> str:
        return f"{self.images} images, {self.targets} targets"


def image_bytes(count: int, side: int, pad: int) -> int:
    """Bytes of `count` uint8 RGB images of `side x side`, held padded by `pad` on every edge."""
    return count * 3 * (side + 2 * pad) ** 2


def plan(data_path: str, *, crops: bool, images: int, targets: int = 0, stage_targets: bool = False,
         what: str = "these views") -> DataPlan:
    """The plan for `--data-path data_path` given whether every view is a crop of the output size (`crops`),
    the bytes the resident images would take (`images`, padding included: `image_bytes`) and the bytes of the
    cached targets (`targets`); `stage_targets`: the stage reads cached targets (train-student)."""
    if data_path not in DATA_PATHS or (data_path == "stream" and not stage_targets):
        valid = DATA_PATHS if stage_targets else IMAGE_PATHS
        raise SoftcacheError(f"unknown data path '{data_path}'; valid: {', '.join(valid)}")
    if data_path == "resident" and not crops:
        raise SoftcacheError(f"--data-path resident needs crop-only views of images of one size (cifar, none); "
                             f"{what} are resized or differ in size: use --data-path loader")
    held = "resident" if stage_targets else "-"
    if data_path == "resident":
        return DataPlan("resident", held)
    if data_path == "loader":
        return DataPlan("loader", held)
    fits = crops and images <= RESIDENT_BYTES
    if data_path == "stream" or targets > RESIDENT_BYTES:
        return DataPlan("resident" if fits else "loader", "stream")
    return DataPlan("resident" if fits and images + targets <= RESIDENT_BYTES else "loader", held)
