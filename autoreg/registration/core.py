"""What every part of the engine shares: failures, per-level records, the clock that bounds a registration, seeds
and threads. The engine imports nothing of autoreg outside this package, so ``export --format python`` can ship it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

LINEAR_KINDS = ("translation", "rigid", "similarity", "affine")


class RegistrationFailed(Exception):
    """A registration that could not run to its end; ``reason`` is short and groupable ('time limit',
    'interrupted', 'joint PDF summed to zero'...)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RegistrationPruned(Exception):
    """Raised by a level callback to stop a hopeless registration at a coarse level (or, naming ``pair``, a trial
    that is worse than the best after that pair)."""

    def __init__(self, stage: int, level: int, pair: str | None = None):
        self.stage = stage
        self.level = level
        self.pair = pair
        super().__init__(f"pruned after pair {pair}" if pair else f"pruned after stage {stage} level {level}")


class Halt(Exception):
    """The clock ran out ('time limit') or a stop was asked for ('interrupted')."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class Clock:
    """A registration's deadline (``time.monotonic``) and stop request, checked between and inside every phase."""

    deadline: float | None = None
    should_stop: Callable[[], bool] | None = None

    @classmethod
    def start(cls, time_limit: float | None, should_stop: Callable[[], bool] | None = None) -> Clock:
        return cls(None if time_limit is None else time.monotonic() + time_limit, should_stop)

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def check(self, needed_s: float = 0.0) -> None:
        """Raise ``Halt`` when a stop was asked for, the time is up, or the next ``needed_s`` seconds would not fit."""
        if self.should_stop is not None and self.should_stop():
            raise Halt("interrupted")
        if self.deadline is not None and time.monotonic() + needed_s > self.deadline:
            raise Halt("time limit")


@dataclass
class LevelRecord:
    """What one pyramid level of one stage did; TRE is that of the whole transform at the level's end."""

    stage: int
    level: int
    transform: str
    shrink: int
    sigma: float
    iterations: int = 0
    metric_value: float = float("nan")
    seconds: float = 0.0
    tre_mean: float | None = None
    stop_condition: str | None = None
    #: Sample points the metric drew at this level, and the level's voxels (the cost model's inputs).
    samples: int | None = None
    voxels: int | None = None
    parameters: int | None = None
    #: Seconds before the first iteration (smoothing, gradient images, sampling, scales).
    setup_seconds: float | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class RegistrationResult:
    transform: sitk.Transform
    initial_transform: sitk.Transform
    levels: list[LevelRecord] = field(default_factory=list)
    stop_conditions: list[str] = field(default_factory=list)
    seconds: float = 0.0


#: Called at the end of every pyramid level with its record and a getter of the whole transform so far (in the
#: data's physical frame); it may raise ``RegistrationPruned`` to stop the registration.
LevelCallback = Callable[[LevelRecord, Callable[[], sitk.Transform]], None]


def threads_of(recipe: Any) -> int:
    """ITK threads a recipe asks for: 1 when deterministic, else its ``threads`` (0: ITK's default)."""
    return 1 if recipe.deterministic else int(recipe.threads)


def itk_seed(seed: int, stage_index: int) -> int:
    """The sampling seed ITK gets: never 0, which SimpleITK reads as 'use the wall clock'."""
    return (seed + stage_index) % (2**31 - 2) + 1


@contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Set ITK's global default thread count for the duration (0 keeps the current one)."""
    if n <= 0:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def as_scalar_float(image: sitk.Image) -> sitk.Image:
    """The image as float32 scalars; colour (RGB/RGBA) becomes ITU-R BT.601 luminance, other vectors their mean."""
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        channels = [sitk.Cast(sitk.VectorIndexSelectionCast(image, i), sitk.sitkFloat32) for i in range(ncomp)]
        if ncomp in (3, 4):
            image = channels[0] * 0.299 + channels[1] * 0.587 + channels[2] * 0.114
        else:
            image = sum(channels[1:], channels[0]) / float(ncomp)
    return sitk.Cast(image, sitk.sitkFloat32)


#: Picture files whose resolution tag ITK reads as spacing though it is a print size (JFIF density, in dots per inch):
#: PNG and BMP load in pixels whatever theirs says, and a JPEG loads the same way here.
PRINT_RESOLUTION_SUFFIXES = (".jpg", ".jpeg")


def in_pixels(image: sitk.Image, path: str) -> sitk.Image:
    """A JPEG in pixels (spacing 1, origin 0), as PNG and BMP load: its 72 dpi would read as 0.35 mm pixels."""
    dim = image.GetDimension()
    if dim == 2 and str(path).lower().endswith(PRINT_RESOLUTION_SUFFIXES):
        image.SetSpacing((1.0,) * dim)
        image.SetOrigin((0.0,) * dim)
    return image


#: Metadata a 2D image read from a one-slice volume keeps: the slice's plane ``z`` and thickness, so that 3D
#: landmarks placed on that slice (3D Slicer's) can be read as the 2D points they are.
SLICE_PLANE_KEY = "autoreg.slice_plane"


def slice_plane(image: sitk.Image) -> tuple[float, float] | None:
    """(z, thickness) of a volume one slice thick whose slice lies across z (None for any other image)."""
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        return None
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    if not np.allclose(np.abs(normal), (0.0, 0.0, 1.0), atol=1e-6):
        return None
    return float(image.GetOrigin()[2]), float(image.GetSpacing()[2])


def single_slice_as_2d(image: sitk.Image) -> sitk.Image:
    """A 3D image one slice thick (a single DICOM file, a 2D NIfTI) as the 2D image it is; others unchanged."""
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        return image
    size = (*image.GetSize()[:2], 0)
    d = np.asarray(image.GetDirection()).reshape(3, 3)[:2, :2]
    if np.allclose(d.T @ d, np.eye(2), atol=1e-6):
        return sitk.Extract(image, size, (0, 0, 0), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    # an oblique slice: its in-plane axes have no 2D direction; keep its in-plane spacing, drop its orientation
    return sitk.Extract(image, size, (0, 0, 0), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)


def mask_on_grid(mask: sitk.Image, image: sitk.Image) -> sitk.Image:
    """A mask (voxels > 0) on its image's grid by physical geometry: nearest neighbour, identity, 0 outside; so a mask
    drawn on a sub-box or on another grid lands where it belongs (autoreg's readers and the exported script)."""
    binary = sitk.Cast(as_scalar_float(mask) > 0, sitk.sitkUInt8)
    identity = sitk.Transform(image.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(binary, image, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


# --- failure reasons ---------------------------------------------------------------------------------------------

#: Why a registration whose optimizer stepped the images apart stopped (``frame.NO_OVERLAP_SHARE``); a study prunes
#: such a trial at that level rather than fail it, since its sampler learns from pruned trials, not failed ones.
NO_OVERLAP = "no overlap"

_REASONS = [
    (re.compile(r"joint pdf summed to zero", re.I), "joint PDF summed to zero"),
    (
        re.compile(
            r"samples map outside moving image|no valid points|all samples map outside|"
            r"must have 1 or more points",
            re.I,
        ),
        "too few samples inside the moving image (little overlap or too sparse sampling)",
    ),
    (re.compile(r"bad_alloc|out of memory|failed to allocate|MemoryError", re.I), "out of memory"),
    (re.compile(r"not positive definite|singular", re.I), "singular matrix"),
]


def failure_reason(err: BaseException) -> tuple[str, str]:
    """(short groupable reason, the exception's last meaningful text) for a registration exception."""
    text = str(err)
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason, _itk_message(text)
    return _itk_message(text) or type(err).__name__, text[-500:]


def _itk_message(text: str) -> str:
    m = re.findall(r"ITK ERROR: [^:]*: ([^\n]*)", text)
    if m:
        return m[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
