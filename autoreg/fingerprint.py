"""The dataset fingerprint: what the data allow, measured once, from which search ranges are derived.

Rules (principles, not tuned to any dataset):

* A pyramid level must keep at least ``MIN_AXIS_VOXELS`` voxels on every axis it shrinks: below that, smoothing
  and a BSpline grid of even a few cells have nothing left to resolve. A prepared level shrinks each axis to about
  the same voxel size (``registration.axis_factors``), so a thick-slice axis is shrunk less and limits it less.
* The metric must see at least ``MIN_SAMPLES_PER_BIN`` samples per histogram bin at the coarsest level,
  otherwise the joint histogram is mostly empty ("joint PDF summed to zero"); ``min_sampling_fraction`` turns
  that into the least sampling percentage for a given shrink factor and bin count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from .data import MaskCoverage, PairData
from .registration import axis_factors
from .registration.initializer import centred
from .scoring import overlap_fraction, tre

MIN_AXIS_VOXELS = 16
MIN_SAMPLES_PER_BIN = 10
#: The least number of metric samples regardless of bins (correlation and mean squares have none).
MIN_SAMPLES = 256
ANISOTROPY_WARN = 3.0
SMALL_OVERLAP_WARN = 0.5
#: ``check`` warns when the identity's TRE is this many times below both centred starts' (the headers align the
#: images, as one scanner's PET and CT, and centring their different fields of view would move them apart).
HEADERS_BETTER = 2.0
#: Landmarks closer than this fraction of the extent (or 3 voxels) to an image border are flagged.
BORDER_FRACTION = 0.02
#: A mask with less than this share of its voxels inside its image is flagged (wrong origin or spacing?).
MASK_INSIDE_WARN = 0.9


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    extent: tuple[float, ...]
    intensity_min: float
    intensity_p01: float
    intensity_p99: float
    intensity_max: float

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))


def image_info(image: sitk.Image) -> ImageInfo:
    a = sitk.GetArrayViewFromImage(image)
    p01, p99 = np.percentile(a, [1, 99])
    return ImageInfo(
        size=tuple(int(n) for n in image.GetSize()),
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        extent=tuple(float(n * s) for n, s in zip(image.GetSize(), image.GetSpacing())),
        intensity_min=float(a.min()),
        intensity_p01=float(p01),
        intensity_p99=float(p99),
        intensity_max=float(a.max()),
    )


def max_shrink(size: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> int:
    """The largest shrink of a prepared level that keeps ``MIN_AXIS_VOXELS`` on every axis it shrinks
    (``axis_factors``): the shortest axis's for isotropic voxels; a thick-slice axis, shrunk less, limits it less."""
    spacing = spacing or (1.0,) * len(size)
    best = 1
    for shrink in range(2, max(size) // MIN_AXIS_VOXELS + 1):
        factors = axis_factors(spacing, shrink, size)
        if any(f > 1 and n // f < MIN_AXIS_VOXELS for n, f in zip(size, factors)):
            break
        best = shrink
    return best


def level_voxels(size: tuple[int, ...], shrink: int, spacing: tuple[float, ...] | None = None) -> int:
    """Voxels of a prepared level (``axis_factors``; unit spacing: ``shrink`` on every axis)."""
    factors = axis_factors(spacing or (1.0,) * len(size), shrink, size)
    return int(np.prod([max(1, n // f) for n, f in zip(size, factors)]))


def samples_needed(bins: int | None) -> int:
    return max(MIN_SAMPLES, MIN_SAMPLES_PER_BIN * (bins or 0))


def min_sampling_fraction(size: tuple[int, ...], shrink: int, bins: int | None) -> float:
    """The least sampling fraction giving the metric enough samples at a level shrunk by ``shrink`` (capped at 1)."""
    return min(1.0, samples_needed(bins) / level_voxels(size, shrink))


def enough_samples(size: tuple[int, ...], shrink: int, bins: int | None, fraction: float) -> bool:
    """Whether sampling ``fraction`` of a level shrunk by ``shrink`` gives the metric enough samples."""
    return fraction * level_voxels(size, shrink) >= samples_needed(bins)


@dataclass(frozen=True)
class PairFingerprint:
    name: str
    dim: int
    fixed: ImageInfo
    moving: ImageInfo
    max_shrink: int
    overlap_geometry: float
    overlap_moments: float
    overlap_identity: float
    n_landmarks: int = 0
    tre_identity: float | None = None
    tre_geometry: float | None = None
    tre_moments: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    fixed_mask_coverage: MaskCoverage | None = None
    moving_mask_coverage: MaskCoverage | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _repeated_rows(fixed: np.ndarray, moving: np.ndarray) -> list[tuple[int, int]]:
    """(earlier, later) row pairs whose fixed and moving points are both the same."""
    seen: dict[bytes, int] = {}
    out = []
    for i, row in enumerate(np.hstack([fixed, moving])):
        key = np.round(row, 9).tobytes()
        if key in seen:
            out.append((seen[key], i))
        else:
            seen[key] = i
    return out


def fingerprint_pair(pair: PairData) -> PairFingerprint:
    """Measure one pair: geometry, intensities, overlap and TRE after each initializer, warnings."""
    fixed, moving = image_info(pair.fixed), image_info(pair.moving)
    geo = centred(pair.fixed, pair.moving, "geometry")
    mom = centred(pair.fixed, pair.moving, "moments")
    ov_geo = overlap_fraction(geo, pair.fixed, pair.moving, pair.fixed_mask)
    ov_mom = overlap_fraction(mom, pair.fixed, pair.moving, pair.fixed_mask)
    identity = sitk.Transform(pair.dim, sitk.sitkIdentity)
    ov_id = overlap_fraction(identity, pair.fixed, pair.moving, pair.fixed_mask)
    warnings: list[str] = []
    for which, info in (("fixed", fixed), ("moving", moving)):
        ratio = max(info.spacing) / min(info.spacing)
        if ratio > ANISOTROPY_WARN:
            warnings.append(
                f"{which} spacing {_fmt(info.spacing)} is anisotropic ({ratio:.1f}:1); the search's levels shrink "
                "its coarse axes less, a recipe on ITK's own pyramid (shrink_images: false) shrinks every axis alike"
            )
        if info.intensity_p99 <= info.intensity_p01:
            warnings.append(f"{which} image is nearly constant (1st and 99th intensity percentiles are equal)")
    ext_ratio = np.asarray(fixed.extent) / np.asarray(moving.extent)
    if np.any(ext_ratio > 3) or np.any(ext_ratio < 1 / 3):
        warnings.append(
            f"physical extents differ a lot (fixed {_fmt(fixed.extent)} vs moving {_fmt(moving.extent)}): "
            "check that both images use the same unit"
        )
    if max(ov_geo, ov_mom, ov_id) < SMALL_OVERLAP_WARN:
        warnings.append(
            f"small overlap after initialization (geometry {ov_geo:.0%}, moments {ov_mom:.0%}, as the headers place "
            f"them {ov_id:.0%}): check origins and directions"
        )
    for which, cov in (("fixed", pair.fixed_mask_coverage), ("moving", pair.moving_mask_coverage)):
        if cov is not None and cov.inside_image < MASK_INSIDE_WARN:
            warnings.append(
                f"only {cov.inside_image:.0%} of the {which} mask lies inside the {which} image: "
                "check the mask's origin, spacing and direction"
            )
    tre_id = tre_geo = tre_mom = None
    n = 0
    if pair.has_landmarks:
        assert pair.fixed_points is not None and pair.moving_points is not None
        n = len(pair.fixed_points)
        tre_id = tre(identity, pair.fixed_points, pair.moving_points, pair.fixed).mean
        tre_geo = tre(geo, pair.fixed_points, pair.moving_points, pair.fixed).mean
        tre_mom = tre(mom, pair.fixed_points, pair.moving_points, pair.fixed).mean
        if HEADERS_BETTER * tre_id < min(tre_geo, tre_mom):
            warnings.append(
                f"the headers align the images better than centring them (TRE {tre_id:.4g} as they are, "
                f"{tre_geo:.4g} after geometry, {tre_mom:.4g} after moments): initializer.kind none or best starts "
                "where the headers put them"
            )
        near = _near_border(pair.fixed_points, pair.fixed)
        if near:
            warnings.append(f"{len(near)} fixed landmark(s) lie near the image border (first: point {near[0] + 1})")
        if n < pair.dim + 1:
            warnings.append(f"only {n} landmarks: too few to tell an affine error from noise")
        twice = _repeated_rows(pair.fixed_points, pair.moving_points)
        if twice:
            warnings.append(
                f"{len(twice)} landmark row(s) repeat an earlier one in both files (first: row {twice[0][1] + 1} = row "
                f"{twice[0][0] + 1}): a copied row weighs that point twice in the TRE"
            )
    return PairFingerprint(
        name=pair.name,
        dim=pair.dim,
        fixed=fixed,
        moving=moving,
        max_shrink=max_shrink(fixed.size, fixed.spacing),
        overlap_geometry=ov_geo,
        overlap_moments=ov_mom,
        overlap_identity=ov_id,
        n_landmarks=n,
        tre_identity=tre_id,
        tre_geometry=tre_geo,
        tre_moments=tre_mom,
        warnings=tuple(warnings),
        fixed_mask_coverage=pair.fixed_mask_coverage,
        moving_mask_coverage=pair.moving_mask_coverage,
    )


def _near_border(points: np.ndarray, image: sitk.Image) -> list[int]:
    size = np.asarray(image.GetSize(), float)
    margin = np.maximum(3.0, BORDER_FRACTION * size)
    out = []
    for i, p in enumerate(points):
        idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in p)))
        if np.any(idx < margin - 0.5) or np.any(idx > size - 0.5 - margin):
            out.append(i)
    return out


def _fmt(v) -> str:
    return "x".join(f"{x:g}" for x in v)


@dataclass(frozen=True)
class DatasetFingerprint:
    """All pairs of a study; ranges use the most restrictive pair so that no setting is impossible for any."""

    pairs: tuple[PairFingerprint, ...]

    @property
    def dim(self) -> int:
        return self.pairs[0].dim

    @property
    def max_shrink(self) -> int:
        return min(p.max_shrink for p in self.pairs)

    @property
    def smallest_size(self) -> tuple[int, ...]:
        return self._smallest.size

    @property
    def smallest_spacing(self) -> tuple[float, ...]:
        """The spacing of the smallest fixed image (whose levels bound the pyramid's samples)."""
        return self._smallest.spacing

    @property
    def _smallest(self):
        return min((p.fixed for p in self.pairs), key=lambda info: int(np.prod(info.size)))

    @property
    def voxel_size(self) -> float:
        """Geometric mean spacing of the smallest pair's fixed image: the unit of the engine's normalised frame."""
        pair = min(self.pairs, key=lambda p: int(np.prod(p.fixed.size)))
        return float(np.exp(np.mean(np.log(pair.fixed.spacing))))

    @property
    def max_extent_voxels(self) -> int:
        """The longest axis of the largest pair's fixed image, in voxels."""
        return max(max(p.fixed.size) for p in self.pairs)

    @property
    def min_extent_voxels(self) -> int:
        return min(min(p.fixed.size) for p in self.pairs)

    def as_dict(self) -> dict:
        return {"pairs": [p.as_dict() for p in self.pairs], "max_shrink": self.max_shrink}


def fingerprint_dataset(pairs: list[PairData]) -> DatasetFingerprint:
    return DatasetFingerprint(tuple(fingerprint_pair(p) for p in pairs))


def provenance(pairs: list[PairData], fp: DatasetFingerprint) -> dict:
    """What a recipe was tuned on, small enough to store with it: per pair, files (with digests) and geometry."""
    from .data import file_digest

    out = []
    for pair, p in zip(pairs, fp.pairs):
        out.append(
            {
                "name": pair.name,
                "fixed": {
                    "file": pair.spec.fixed.name,
                    "sha256": file_digest(pair.spec.fixed),
                    "size": list(p.fixed.size),
                    "spacing": list(p.fixed.spacing),
                },
                "moving": {
                    "file": pair.spec.moving.name,
                    "sha256": file_digest(pair.spec.moving),
                    "size": list(p.moving.size),
                    "spacing": list(p.moving.spacing),
                },
                "landmarks": p.n_landmarks,
                "tre_before": p.tre_identity,
            }
        )
        masks = {
            which: {"file": path.name, "sha256": file_digest(path)}
            for which, path in (("fixed", pair.spec.fixed_mask), ("moving", pair.spec.moving_mask))
            if path is not None
        }
        if masks:
            out[-1]["masks"] = masks
    return {"dim": fp.dim, "pairs": out}
