"""Reading what a PAIR.yaml points to: images, masks and landmarks, checked for consistency, cached per process.

Every problem becomes a ``UserError`` naming PAIR.yaml and the key whose file is at fault.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .config import PairSpec
from .errors import UserError, special_file
from .landmarks import read_landmarks
from .quiet import captured_stderr
from .registration import (
    SLICE_PLANE_KEY,
    as_scalar_float,
    in_pixels,
    mask_on_grid,
    single_slice_as_2d,
    slice_plane,
)

log = logging.getLogger(__name__)

#: Landmarks may sit this many voxels outside the image grid's centres (half a voxel is the grid's edge).
_INSIDE_TOLERANCE_VOXELS = 0.5 + 1e-6
#: An image to register needs at least this many voxels on every axis.
MIN_IMAGE_AXIS = 4
#: A recipe applied to images whose spacing or size differs more than this factor on an axis from every fixed image
#: it was tuned on gets a warning: its pyramid, sampling and grid were chosen for other data.
FIT_WARN_RATIO = 4.0
#: Named in the error for a file no reader takes; the README's list of formats says the same.
SUPPORTED_FORMATS = "NIfTI, NRRD, MHA/MHD, PNG, TIFF, JPEG, BMP, DICOM... or a folder holding one DICOM series"
#: At most this many series are listed in the error for a folder that holds several.
_SERIES_LISTED = 5


@dataclass(frozen=True)
class MaskCoverage:
    """Where a mask lies: the share of its image's voxels it covers, and of its own voxels inside the image."""

    of_image: float
    inside_image: float


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
    fixed_mask_coverage: MaskCoverage | None = None
    moving_mask_coverage: MaskCoverage | None = None
    #: Landmarks kept aside for the honest score (``objective.report_fraction``): never seen by the search.
    report_fixed_points: np.ndarray | None = None
    report_moving_points: np.ndarray | None = None
    #: Their rows in the landmark files (0-based); the selection points are the other rows, in order.
    report_rows: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.fixed.GetDimension()

    @property
    def every_fixed_point(self) -> np.ndarray | None:
        """The fixed landmarks of both sets (selection, then report): where pictures centre their views."""
        if self.fixed_points is None or self.report_fixed_points is None:
            return self.fixed_points
        return np.vstack([self.fixed_points, self.report_fixed_points])

    @property
    def has_landmarks(self) -> bool:
        return self.fixed_points is not None


def _short_itk_error(err: Exception) -> str:
    """The reason in an ITK exception, without the source file and object address ('ITK ERROR: X(0x..): reason')."""
    text = str(err).strip().splitlines()
    for line in text:
        if "ITK ERROR" in line or "ERROR:" in line:
            reason = line.split("): ", 1)[1] if "): " in line else line.split("ERROR:", 1)[-1]
            return reason.strip() or line.strip()
    return text[-1].strip() if text else type(err).__name__


def _read_any(path: Path, *, source: str, key: str) -> sitk.Image:
    """A file SimpleITK reads, or a folder holding one DICOM series, as a scalar float32 2D or 3D image."""
    if not path.exists():
        raise UserError(f"image file not found: {path}", file=source, key=key)
    special = special_file(path)
    if special:
        raise UserError(f"{path} is {special}; expected an image file or a DICOM folder", file=source, key=key)
    if path.is_dir():
        image = _read_series(path, source=source, key=key)
    else:
        try:
            with captured_stderr(f"reading {path}"):
                image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            reason = _short_itk_error(err)
            if "Unable to determine ImageIO reader" in str(err):
                reason = f"not a format SimpleITK reads; supported: {SUPPORTED_FORMATS}"
            raise UserError(f"cannot read image {path} ({reason})", file=source, key=key) from None
    if image.GetDimension() not in (2, 3):
        raise UserError(f"{path} is {image.GetDimension()}D; expected a 2D or 3D image", file=source, key=key)
    image = in_pixels(image, str(path))
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        log.info("%s has %d components; registering its luminance", path, ncomp)
    return as_scalar_float(image)


def _read_series(folder: Path, *, source: str, key: str) -> sitk.Image:
    """The one DICOM series in ``folder``; none or several is a user error that says what the folder holds."""
    reader = sitk.ImageSeriesReader()
    try:
        with captured_stderr(f"looking for DICOM series in {folder}"):
            ids = list(reader.GetGDCMSeriesIDs(str(folder)))
            files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in ids}
    except RuntimeError as err:
        raise UserError(f"cannot read folder {folder} ({_short_itk_error(err)})", file=source, key=key) from None
    if not ids:
        raise UserError(
            f"{folder} is a folder without a DICOM series; expected an image file or a folder holding one DICOM series",
            file=source,
            key=key,
        )
    if len(ids) > 1:
        listed = "; ".join(f"{uid} ({_series_label(files[uid])})" for uid in ids[:_SERIES_LISTED])
        more = f"; and {len(ids) - _SERIES_LISTED} more" if len(ids) > _SERIES_LISTED else ""
        raise UserError(
            f"{folder} holds {len(ids)} DICOM series: {listed}{more}; put each series in a folder of its own",
            file=source,
            key=key,
        )
    reader.SetFileNames(files[ids[0]])
    try:
        with captured_stderr(f"reading the DICOM series in {folder}"):
            image = reader.Execute()
    except RuntimeError as err:
        raise UserError(
            f"cannot read the DICOM series in {folder} ({_short_itk_error(err)})", file=source, key=key
        ) from None
    log.info("%s: DICOM series %s, %d file(s)", folder, ids[0], len(files[ids[0]]))
    return image


def _series_label(files: Sequence[str]) -> str:
    """'12 files, "T1 axial"': how a user tells series apart (the description from the first file, if any)."""
    label = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        with captured_stderr(f"reading the header of {files[0]}"):
            reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            description = reader.GetMetaData("0008|103e").strip()[:40]
            if description:
                label += f', "{description}"'
    except RuntimeError:
        pass
    return label


def check_intensities(image: sitk.Image, *, what: str, source: str = "", key: str = "") -> None:
    """Refuse NaN/Inf voxels and constant images: the initializer hangs on the first, divides by zero on the second."""
    a = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(a)
    n_bad = int(a.size - np.count_nonzero(finite))
    if n_bad:
        first = np.unravel_index(int(np.flatnonzero(~finite)[0]), a.shape)[::-1]  # numpy (z, y, x) -> ITK (x, y, z)
        raise UserError(
            f"{what} has {n_bad} NaN or infinite voxel{'s' if n_bad != 1 else ''} (the first at index "
            f"{tuple(int(i) for i in first)}); expected finite intensities",
            file=source,
            key=key,
        )
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        raise UserError(
            f"{what} is constant (every voxel is {lo:g}); registration needs intensities that vary",
            file=source,
            key=key,
        )


def _same_dimension(fixed: sitk.Image, moving: sitk.Image, *, source: str | None, key: str) -> None:
    if fixed.GetDimension() != moving.GetDimension():
        raise UserError(
            f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D (a volume one slice "
            "thick is read as a 2D image)",
            file=source,
            key=key,
        )


def read_image(path: Path, *, source: str, key: str, pixel=sitk.sitkFloat32) -> sitk.Image:
    """Read one image to register as a scalar image of ``pixel`` type (colour becomes luminance), checked for use; a
    volume one slice thick is its 2D slice, which keeps the slice's plane for 3D landmarks (``SLICE_PLANE_KEY``)."""
    raw = _read_any(path, source=source, key=key)
    plane = slice_plane(raw)
    image = single_slice_as_2d(raw)
    if min(image.GetSize()) < MIN_IMAGE_AXIS:
        raise UserError(
            f"{path} has size {image.GetSize()}; every axis needs at least {MIN_IMAGE_AXIS} voxels",
            file=source,
            key=key,
        )
    check_intensities(image, what=str(path), source=source, key=key)
    image = sitk.Cast(image, pixel)
    if plane is not None:
        image.SetMetaData(SLICE_PLANE_KEY, " ".join(repr(v) for v in plane))
    return image


def place_mask(
    mask: sitk.Image, image: sitk.Image, *, what: str, source: str = "", key: str = ""
) -> tuple[sitk.Image, MaskCoverage]:
    """The mask (voxels > 0) resampled onto its image's grid by physical geometry: nearest neighbour, identity
    transform, 0 outside. A mask may cover a sub-box of its image; one that is empty or misses the image is refused."""
    if image.GetDimension() == 2:
        mask = single_slice_as_2d(mask)
    if mask.GetDimension() != image.GetDimension():
        raise UserError(
            f"mask {what} is {mask.GetDimension()}D but its image is {image.GetDimension()}D", file=source, key=key
        )
    binary = sitk.Cast(as_scalar_float(mask) > 0, sitk.sitkUInt8)
    n_mask = int(np.count_nonzero(sitk.GetArrayViewFromImage(binary)))
    if n_mask == 0:
        raise UserError(f"mask {what} is empty (no voxel > 0)", file=source, key=key)
    identity = sitk.Transform(image.GetDimension(), sitk.sitkIdentity)
    on_grid = mask_on_grid(binary, image)
    n_on_grid = int(np.count_nonzero(sitk.GetArrayViewFromImage(on_grid)))
    domain = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    domain.CopyInformation(image)
    inside = sitk.Resample(domain, binary, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8) * binary
    n_inside = int(np.count_nonzero(sitk.GetArrayViewFromImage(inside)))
    if n_on_grid == 0:
        if n_inside:
            problem = "covers no voxel centre of its image (it is thinner than the image's voxels)"
        else:
            problem = (
                f"lies outside its image (mask spans {_bounds(binary)}, image spans {_bounds(image)} in physical "
                "coordinates); check the mask's origin, spacing and direction"
            )
        raise UserError(f"mask {what} {problem}", file=source, key=key)
    coverage = MaskCoverage(of_image=n_on_grid / int(np.prod(image.GetSize())), inside_image=n_inside / n_mask)
    return on_grid, coverage


def _bounds(image: sitk.Image) -> str:
    """The physical bounding box of an image's voxels (their outer edges), as '[x0, x1] x [y0, y1]'."""
    size = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([(-0.5 if bit else n - 0.5) for bit, n in zip(bits, size)])
            for bits in np.ndindex(*(2,) * image.GetDimension())
        ]
    )
    return " x ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(corners.min(axis=0), corners.max(axis=0)))


def read_mask(path: Path, image: sitk.Image, *, source: str, key: str) -> tuple[sitk.Image, MaskCoverage]:
    """A mask file (or DICOM series folder) placed on ``image``'s grid by ``place_mask``: tune, check and apply."""
    return place_mask(_read_any(path, source=source, key=key), image, what=str(path), source=source, key=key)


def outside_points(points: np.ndarray, image: sitk.Image, tolerance: float = _INSIDE_TOLERANCE_VOXELS) -> list[int]:
    """Indices of the points that lie outside the image's grid (more than ``tolerance`` voxels off)."""
    size = np.asarray(image.GetSize(), dtype=float)
    out = []
    for i, p in enumerate(points):
        idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in p)))
        if np.any(idx < -tolerance) or np.any(idx > size - 1 + tolerance):
            out.append(i)
    return out


def require_inside(points: np.ndarray, image: sitk.Image, *, which: str, source: str | None, key: str) -> None:
    """Landmarks off their image's grid are a user error (a wrong unit, origin or file), not a TRE to report."""
    bad = outside_points(points, image)
    if bad:
        i = bad[0]
        coords = ", ".join(f"{c:g}" for c in points[i])
        spacing = "x".join(f"{v:.4g}" for v in image.GetSpacing())
        raise UserError(
            f"point {i + 1} ({coords}) lies outside the {which} image"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + f", which spans {_bounds(image)} at spacing {spacing}: landmarks are physical coordinates",
            file=source,
            key=key,
        )


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
    _same_dimension(fixed, moving, source=src, key=spec.key_of("moving"))
    dim = fixed.GetDimension()
    fixed_points = moving_points = None
    if spec.has_landmarks:
        assert spec.fixed_landmarks is not None and spec.moving_landmarks is not None
        kf, km = spec.key_of("landmarks.fixed"), spec.key_of("landmarks.moving")
        fixed_points = _read_points(spec.fixed_landmarks, fixed, dim, source=src, key=kf)
        moving_points = _read_points(spec.moving_landmarks, moving, dim, source=src, key=km)
        if len(fixed_points) != len(moving_points):
            raise UserError(
                f"{spec.moving_landmarks} has {len(moving_points)} points but {kf} ({spec.fixed_landmarks}) has "
                f"{len(fixed_points)}; row i of one must be the same point as row i of the other",
                file=src,
                key=km,
            )
        if len(fixed_points) == 0:
            raise UserError("no landmarks in the file", file=src, key=kf)
        require_inside(fixed_points, fixed, which="fixed", source=src, key=kf)
        require_inside(moving_points, moving, which="moving", source=src, key=km)
    fixed_mask = moving_mask = fixed_cov = moving_cov = None
    if spec.fixed_mask is not None:
        fixed_mask, fixed_cov = read_mask(spec.fixed_mask, fixed, source=src, key=spec.key_of("masks.fixed"))
    if spec.moving_mask is not None:
        moving_mask, moving_cov = read_mask(spec.moving_mask, moving, source=src, key=spec.key_of("masks.moving"))
    return PairData(spec, fixed, moving, fixed_points, moving_points, fixed_mask, moving_mask, fixed_cov, moving_cov)


def load_images(
    fixed: str | Path, moving: str | Path, fixed_mask: str | Path | None = None, moving_mask: str | Path | None = None
) -> PairData:
    """A pair from image paths alone (``autoreg apply``), masks read as ``load_pair`` reads them; no landmarks.
    Errors name the option (--fixed, --moving, --fixed-mask, --moving-mask)."""
    spec = PairSpec(
        name="pair",
        fixed=Path(fixed),
        moving=Path(moving),
        fixed_mask=Path(fixed_mask) if fixed_mask else None,
        moving_mask=Path(moving_mask) if moving_mask else None,
    )
    f = read_image(spec.fixed, source="", key="--fixed")
    m = read_image(spec.moving, source="", key="--moving")
    _same_dimension(f, m, source=None, key="--moving")
    fm = mm = fc = mc = None
    if spec.fixed_mask is not None:
        fm, fc = read_mask(spec.fixed_mask, f, source="", key="--fixed-mask")
    if spec.moving_mask is not None:
        mm, mc = read_mask(spec.moving_mask, m, source="", key="--moving-mask")
    return PairData(spec, f, m, fixed_mask=fm, moving_mask=mm, fixed_mask_coverage=fc, moving_mask_coverage=mc)


def file_digest(path: Path, length: int = 16) -> str:
    """A short SHA-256 of a file's bytes (of a folder: its files' names and bytes, as a DICOM series is read):
    which data a recipe was tuned on, without the data."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if file != Path(path):
            h.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


# --- a recipe against the data it is applied to ----------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``: recipe parts read the same whether they are models or plain dicts."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _tuned_fixed_images(provenance: Any) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
    """(spacing, size) of each fixed image listed in a recipe's provenance; [] where it lists none readable."""
    pairs = _get(_get(provenance, "fingerprint") or {}, "pairs") if isinstance(provenance, dict) else None
    out = []
    for p in pairs if isinstance(pairs, list) else []:
        fixed = _get(p, "fixed") if isinstance(p, dict) else None
        try:
            spacing = tuple(float(v) for v in fixed["spacing"])
            size = tuple(int(v) for v in fixed["size"])
        except (TypeError, KeyError, ValueError):
            continue
        out.append((spacing, size))
    return out


def _worst_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return max(max(x / y, y / x) if x > 0 and y > 0 else float("inf") for x, y in zip(a, b))


def tuned_masks(provenance: Any) -> str:
    """Which masks the study behind a recipe registered with, in words ("fixed and moving masks"; "" for none)."""
    fingerprint = _get(provenance, "fingerprint") if isinstance(provenance, dict) else None
    pairs = _get(fingerprint, "pairs") if isinstance(fingerprint, dict) else None
    kinds = {
        which
        for p in (pairs if isinstance(pairs, list) else [])
        if isinstance(p, dict) and isinstance(p.get("masks"), dict)
        for which in ("fixed", "moving")
        if which in p["masks"]
    }
    ordered = [k for k in ("fixed", "moving") if k in kinds]
    return f"{' and '.join(ordered)} mask{'s' if len(ordered) > 1 else ''}" if ordered else ""


def check_recipe_fits(recipe: Any, pairs: Sequence[PairData], *, source: str) -> list[str]:
    """Refuse a recipe made for another dimension (its provenance, a stage's BSpline mesh_size); return warning
    lines: the recipe was tuned with masks and a pair has none, and one per pair whose fixed image differs more than
    ``FIT_WARN_RATIO`` x in spacing or size on some axis from every fixed image the recipe was tuned on."""
    provenance = _get(recipe, "provenance")
    fingerprint = _get(provenance, "fingerprint") if isinstance(provenance, dict) else None
    tuned_dim = _get(fingerprint, "dim") if isinstance(fingerprint, dict) else None
    for pair in pairs:
        if isinstance(tuned_dim, int) and tuned_dim != pair.dim:
            raise UserError(
                f"the recipe was tuned on {tuned_dim}D images but {pair.spec.fixed} is {pair.dim}D",
                file=source,
                key="provenance.fingerprint.dim",
            )
        for i, stage in enumerate(_get(recipe, "stages") or ()):
            mesh = _get(_get(stage, "transform"), "mesh_size")
            if mesh is not None and len(mesh) != pair.dim:
                raise UserError(
                    f"mesh_size has {len(mesh)} entries but {pair.spec.fixed} is {pair.dim}D",
                    file=source,
                    key=f"stages[{i}].transform.mesh_size",
                )
    tuned = [(sp, sz) for sp, sz in _tuned_fixed_images(provenance) if len(sp) == len(sz)]
    warnings = []
    masked = tuned_masks(provenance)
    unmasked = [p for p in pairs if p.fixed_mask is None and p.moving_mask is None]
    if masked and unmasked:
        warnings.append(
            f"{source}: the recipe was tuned with {masked}, but {unmasked[0].spec.fixed} is registered without any; "
            "give them (--fixed-mask, --moving-mask, or masks: in PAIR.yaml) to register as it was tuned"
        )
    for pair in pairs:
        spacing, size = pair.fixed.GetSpacing(), pair.fixed.GetSize()
        near = [(sp, sz) for sp, sz in tuned if len(sp) == pair.dim]
        if not near:
            continue
        worst = [max(_worst_ratio(spacing, sp), _worst_ratio(size, sz)) for sp, sz in near]
        if min(worst) > FIT_WARN_RATIO:
            sp, sz = near[int(np.argmin(worst))]
            warnings.append(
                f"{source}: {pair.spec.fixed} (spacing {_fmt(spacing)}, size {_fmt(size)}) differs more than "
                f"{FIT_WARN_RATIO:g}x on an axis from the images the recipe was tuned on (nearest: spacing {_fmt(sp)}, "
                f"size {_fmt(sz)}); its pyramid, sampling and grid may not suit it"
            )
    return warnings


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{v:.4g}" for v in values)
