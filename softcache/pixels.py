"""The pixel work of a view after its crop: RandAugment / TrivialAugment / AutoAugment, colour jitter, random
erasing (torchvision's transforms v2), or a user's whole pipeline (`--augment package.module:callable`), run with
torch's generator seeded per view, so a view is a pure function of (image, box, flip, seed) and replays exactly.

    Pixels        the settings (a frozen dataclass, recorded in the cache manifest)
    parse_auto    timm's spelling of the auto-augment policies -> a v2 transform
    run_seeded    a transform under torch's default generator seeded with a view's seed
    checksum      CRC-32 of a view's uint8 pixels, what a replay is checked against
    identity      what identifies a pipeline's draws: its repr, its source's hash, torch's and torchvision's versions

torchvision's v2 transforms draw every random number from torch's default CPU generator, so seeding it per view
makes them replayable; a pipeline drawing from Python's `random` or NumPy's global generator is not, and the
dump refuses it (it draws the first batch twice) and a replay catches it (the checksum).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import re
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torchvision.transforms import v2 as T

from softcache.errors import SoftcacheError
from softcache.imports import import_callable

Transform = Callable[[torch.Tensor], torch.Tensor]

# timm's names for the auto-augment policies (timm.data.auto_augment), with torchvision's implementations
AUTO_POLICIES = {
    "trivialaugment": lambda: T.TrivialAugmentWide(),
    "ta_wide": lambda: T.TrivialAugmentWide(),
    "autoaugment": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
    "original": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
    "autoaugment-imagenet": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
    "autoaugment-cifar10": lambda: T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
    "autoaugment-svhn": lambda: T.AutoAugment(T.AutoAugmentPolicy.SVHN),
}
AUTO_SPELLINGS = ("rand-mM-nN", *AUTO_POLICIES)  # what --aa takes (names.AUTO_SPELLINGS, checked by a test)


def parse_auto(spec: str) -> T.Transform:
    """`--aa SPEC` -> a v2 transform. `rand-m9-n2` is RandAugment with 2 ops at magnitude 9 on timm's 0-10 scale
    (torchvision's RandAugment with 11 magnitude bins, so m9 is 90% of each op's range, as in timm; keys in any
    order, defaults m9 and n2); the other names are AUTO_POLICIES. Unlike timm, every chosen op is applied
    (timm applies each with probability 0.5) and the op set is torchvision's; timm's magnitude noise (`mstd`)
    and its other keys have no torchvision counterpart and are refused."""
    if spec in AUTO_POLICIES:
        return AUTO_POLICIES[spec]()
    parts = spec.split("-")
    if parts[0] != "rand":
        raise SoftcacheError(f"unknown --aa '{spec}'; valid: {', '.join(AUTO_SPELLINGS)} (e.g. rand-m9-n2)")
    settings = {"m": 9, "n": 2}
    for part in parts[1:]:
        key, value = part[:1], part[1:]
        if key not in settings or not value.isdigit():
            raise SoftcacheError(f"--aa '{spec}': '{part}' is not m<magnitude> or n<ops> (e.g. rand-m9-n2); timm's "
                                 "mstd, inc, p and w keys have no torchvision RandAugment counterpart")
        settings[key] = int(value)
    if not 0 <= settings["m"] <= 10 or settings["n"] < 1:
        raise SoftcacheError(f"--aa '{spec}': the magnitude must be 0-10 (timm's scale) and the number of ops at "
                             "least 1")
    return T.RandAugment(num_ops=settings["n"], magnitude=settings["m"], num_magnitude_bins=11)


@dataclass(frozen=True)
class Pixels:
    """The pixel pipeline of a view: a user's callable (applied to the whole image, instead of the crop policy),
    then the named ops in timm's order: auto-augment, colour jitter, random erasing."""

    user: str = ""              # package.module:callable, called as callable(image_size=S); '' for none
    auto_augment: str = ""      # --aa: rand-m9-n2, trivialaugment, autoaugment[-cifar10|-svhn]; '' for none
    color_jitter: float = 0.0   # --color-jitter: ColorJitter(brightness=contrast=saturation=this)
    reprob: float = 0.0         # --reprob: RandomErasing probability (erased pixels are 0)

    def __post_init__(self) -> None:
        if self.color_jitter < 0:
            raise SoftcacheError(f"--color-jitter must be >= 0, got {self.color_jitter:g}")
        if not 0 <= self.reprob <= 1:
            raise SoftcacheError(f"--reprob is a probability: it must be in [0, 1], got {self.reprob:g}")
        if self.auto_augment:
            parse_auto(self.auto_augment)

    @property
    def active(self) -> bool:
        """Whether views go through any pixel work besides the crop."""
        return bool(self.user or self.auto_augment or self.color_jitter or self.reprob)

    def ops(self) -> T.Transform | None:
        """The named ops after the crop, one v2 Compose, or None."""
        ops = []
        if self.auto_augment:
            ops.append(parse_auto(self.auto_augment))
        if self.color_jitter:
            ops.append(T.ColorJitter(self.color_jitter, self.color_jitter, self.color_jitter))
        if self.reprob:
            ops.append(T.RandomErasing(p=self.reprob, value=0))
        return T.Compose(ops) if ops else None

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "auto_augment": self.auto_augment, "color_jitter": self.color_jitter,
                "reprob": self.reprob}


def _load_user(spec: str) -> Callable[..., Any]:
    try:
        return import_callable(spec)
    except Exception as err:  # a user's module may fail to import in any way: name it in one line
        raise SoftcacheError(f"cannot load --augment '{spec}' ({type(err).__name__}: {err}); expected "
                             "package.module:callable, importable from here, called as callable(image_size=S)"
                             ) from None


@functools.lru_cache(maxsize=16)
def built(pixels: Pixels, image_size: int) -> tuple[Transform | None, Transform | None]:
    """`(the user's transform or None, the named ops or None)`, built once per process."""
    user = None
    if pixels.user:
        factory = _load_user(pixels.user)
        try:
            user = factory(image_size=image_size)
        except TypeError as err:
            raise SoftcacheError(f"--augment '{pixels.user}' cannot be called as {pixels.user}(image_size="
                                 f"{image_size}) ({err}); give a callable that takes image_size and returns a "
                                 "transform") from None
        if not callable(user):
            raise SoftcacheError(f"--augment '{pixels.user}' returned a {type(user).__name__}, not a transform; "
                                 "it must return a callable from a uint8 tensor [3, H, W] to [3, S, S]")
    return user, pixels.ops()


def call_user(transform: Transform, image: torch.Tensor, user: str) -> Any:
    """The user's transform on `image`; an error inside it is one line naming the callable and its input."""
    try:
        return transform(image)
    except SoftcacheError:
        raise
    except Exception as err:  # any failure of the user's code, named in one line
        raise SoftcacheError(f"--augment '{user}' failed on a uint8 tensor {list(image.shape)} ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it must take a uint8 "
                             "image tensor [3, H, W] (torchvision v2 transforms, not v1's ToTensor/PIL-only ones)"
                             ) from None


def check_output(view: Any, image_size: int, user: str) -> torch.Tensor:
    """The user's transform returned a uint8 tensor `[3, S, S]`, or a one-line refusal."""
    shape = (3, image_size, image_size)
    if isinstance(view, torch.Tensor) and view.dtype == torch.uint8 and tuple(view.shape) == shape:
        return view
    got = (f"a {view.dtype} tensor of shape {list(view.shape)}" if isinstance(view, torch.Tensor)
           else f"a {type(view).__name__}")
    raise SoftcacheError(f"--augment '{user}' returned {got}; it must return a uint8 tensor [3, {image_size}, "
                         f"{image_size}] (keep the image uint8, e.g. no ToDtype(float32), and resize to "
                         f"image_size={image_size})")


def run_seeded(transform: Callable[[torch.Tensor], Any], image: torch.Tensor, seed: int) -> Any:
    """`transform(image)` with torch's default CPU generator seeded by `seed` (and put back as it was after)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(int(seed))
    try:
        return transform(image)
    finally:
        generator.set_state(state)


def checksum(view: torch.Tensor) -> int:
    """CRC-32 (zlib.crc32) of a view's uint8 pixels `[3, S, S]` in C order: what `views/crc` stores."""
    return zlib.crc32(view.contiguous().numpy())  # the buffer itself: no copy


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a lambda's repr carries its address, which differs per process


def identity(pixels: Pixels, image_size: int) -> dict[str, Any]:
    """What determines the pipeline's pixels besides the seeds: part of the cache id. The transform's repr
    (every v2 transform prints its settings), the sha256 of a user callable's module source, and the torch and
    torchvision versions (their random draws and kernels)."""
    user, ops = built(pixels, image_size)
    text = "; ".join(_ADDRESS.sub("", repr(t)) for t in (user, ops) if t is not None)
    out = {"repr": text, "torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}
    if pixels.user:
        module = sys.modules[pixels.user.partition(":")[0]]
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):  # no source file (e.g. a compiled module): its repr stands for it
            source = text
        out["callable"] = pixels.user
        out["source_sha256"] = hashlib.sha256(source.encode()).hexdigest()
    return out


def what_changed(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """Why a replayed view can differ from the dump's: the identity keys that changed, in words."""
    recorded = recorded or {}
    changed = [f"{key} {recorded.get(key)!r} at the dump, {current.get(key)!r} now" for key in
               ("torch", "torchvision", "callable") if recorded.get(key) != current.get(key)]
    if recorded.get("source_sha256") != current.get("source_sha256"):
        changed.append(f"the source of {current.get('callable', 'the callable').partition(':')[0]} changed")
    if recorded.get("repr") != current.get("repr"):
        changed.append(f"the pipeline was {recorded.get('repr')!r} at the dump, {current.get('repr')!r} now")
    if changed:
        return "the pipeline changed since the dump: " + "; ".join(changed)
    return ("the pipeline's identity is unchanged, so it draws from a generator softcache does not seed (Python's "
            "random or NumPy's global generator): draw from torch's, as torchvision's v2 transforms do")
