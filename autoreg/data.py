"""Reading what a PAIR.yaml points to: images, masks and landmarks, checked for consistency, cached per process.

Every problem becomes a ``UserError`` naming PAIR.yaml and the key whose file is at fault.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .config import PairSpec
from .errors import UserError
from .landmarks import read_landmarks
from .registration import as_scalar_float

log = logging.getLogger(__name__)

#: Landmarks may sit this many voxels outside the image grid's centres (half a voxel is the grid's edge).
_INSIDE_TOLERANCE_VOXELS = 0.5 + 1e-6


@dataclass(frozen=True, eq=False)
class PairData:
    """One loaded pair: float32 images, optional uint8 masks, optional (n, dim) physical landmarks."""

    spec: PairSpec
    fixed: sitk.Image
    moving: sitk.Image
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.fixed.GetDimension()

    @property
    def has_landmarks(self) -> bool:
        return self.fixed_points is not None


def _short_itk_error(err: Exception) -> str:
    text = str(err).strip().splitlines()
    for line in text:
        if "ITK ERROR" in line or "ERROR:" in line:
            return line.split(":")[-1].strip() or line.strip()
    return text[-1].strip() if text else type(err).__name__


def read_image(path: Path, *, source: str, key: str, pixel=sitk.sitkFloat32) -> sitk.Image:
    """Read one image as a scalar image of ``pixel`` type; colour images become luminance."""
    if not path.exists():
        raise UserError(f"image file not found: {path}", file=source, key=key)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise UserError(f"cannot read image {path} ({_short_itk_error(err)})", file=source, key=key) from None
    if image.GetDimension() not in (2, 3):
        raise UserError(f"{path} is {image.GetDimension()}D; expected a 2D or 3D image", file=source, key=key)
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        log.info("%s has %d components; registering its luminance", path, ncomp)
        image = as_scalar_float(image)
    if min(image.GetSize()) < 4:
        raise UserError(f"{path} has size {image.GetSize()}; every axis needs at least 4 voxels", file=source, key=key)
    return sitk.Cast(image, pixel)


def _read_mask(path: Path, image: sitk.Image, *, source: str, key: str) -> sitk.Image:
    mask = read_image(path, source=source, key=key, pixel=sitk.sitkFloat32)
    if mask.GetSize() != image.GetSize():
        raise UserError(
            f"mask size {mask.GetSize()} differs from its image's size {image.GetSize()}", file=source, key=key
        )
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    mask.CopyInformation(image)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise UserError(f"mask {path} is empty (no voxel > 0)", file=source, key=key)
    return mask


def outside_points(points: np.ndarray, image: sitk.Image, tolerance: float = _INSIDE_TOLERANCE_VOXELS) -> list[int]:
    """Indices of the points that lie outside the image's grid (more than ``tolerance`` voxels off)."""
    size = np.asarray(image.GetSize(), dtype=float)
    out = []
    for i, p in enumerate(points):
        idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in p)))
        if np.any(idx < -tolerance) or np.any(idx > size - 1 + tolerance):
            out.append(i)
    return out


def _read_points(path: Path, image: sitk.Image, dim: int, *, source: str, key: str) -> np.ndarray:
    """``read_landmarks``, its errors re-worded to name PAIR.yaml and the key first, then the landmark file."""
    try:
        return read_landmarks(path, image=image, dim=dim, key=key)
    except UserError as err:
        if not source:
            raise
        raise UserError(f"{err.file or path}: {err.detail}", file=source, key=key) from None


def load_pair(spec: PairSpec) -> PairData:
    """Load and check one pair; cached so a worker process reads each file once."""
    return _load_pair_cached(spec)


@functools.lru_cache(maxsize=32)
def _load_pair_cached(spec: PairSpec) -> PairData:
    src = spec.source
    fixed = read_image(spec.fixed, source=src, key=spec.key_of("fixed"))
    moving = read_image(spec.moving, source=src, key=spec.key_of("moving"))
    if fixed.GetDimension() != moving.GetDimension():
        raise UserError(
            f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D",
            file=src,
            key=spec.key_of("moving"),
        )
    dim = fixed.GetDimension()
    fixed_points = moving_points = None
    if spec.has_landmarks:
        assert spec.fixed_landmarks is not None and spec.moving_landmarks is not None
        kf, km = spec.key_of("landmarks.fixed"), spec.key_of("landmarks.moving")
        fixed_points = _read_points(spec.fixed_landmarks, fixed, dim, source=src, key=kf)
        moving_points = _read_points(spec.moving_landmarks, moving, dim, source=src, key=km)
        if len(fixed_points) != len(moving_points):
            raise UserError(
                f"{len(moving_points)} points but landmarks.fixed has {len(fixed_points)}; row i must match row i",
                file=src,
                key=km,
            )
        if len(fixed_points) == 0:
            raise UserError("no landmarks in the file", file=src, key=kf)
        for pts, img, key, which in ((fixed_points, fixed, kf, "fixed"), (moving_points, moving, km, "moving")):
            bad = outside_points(pts, img)
            if bad:
                i = bad[0]
                coords = ", ".join(f"{c:g}" for c in pts[i])
                raise UserError(
                    f"point {i + 1} ({coords}) lies outside the {which} image"
                    + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                    file=src,
                    key=key,
                )
    fixed_mask = moving_mask = None
    if spec.fixed_mask is not None:
        fixed_mask = _read_mask(spec.fixed_mask, fixed, source=src, key=spec.key_of("masks.fixed"))
    if spec.moving_mask is not None:
        moving_mask = _read_mask(spec.moving_mask, moving, source=src, key=spec.key_of("masks.moving"))
    return PairData(spec, fixed, moving, fixed_points, moving_points, fixed_mask, moving_mask)


def load_images(fixed: str | Path, moving: str | Path) -> PairData:
    """A pair from two image paths alone (``autoreg apply``), with no landmarks or masks."""
    spec = PairSpec(name="pair", fixed=Path(fixed), moving=Path(moving), source="")
    f = read_image(spec.fixed, source=str(fixed), key="")
    m = read_image(spec.moving, source=str(moving), key="")
    if f.GetDimension() != m.GetDimension():
        raise UserError(
            f"fixed image is {f.GetDimension()}D but moving image is {m.GetDimension()}D", file=str(moving)
        )
    return PairData(spec, f, m)


def file_digest(path: Path, length: int = 16) -> str:
    """A short SHA-256 of a file's bytes: which data a recipe was tuned on, without the data."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
