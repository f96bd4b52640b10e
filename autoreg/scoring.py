"""Scores of a registration: TRE statistics, the holdout metric for pairs without landmarks, BSpline folding.

Pure functions of a transform and the pair's data; no file I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

#: Histogram bins of the holdout NMI: fixed, and deliberately unlike what trials tune (Mattes, 16-128 bins,
#: sampled, Parzen-smoothed), so that the score cannot be gamed by a trial's own metric settings.
HOLDOUT_BINS = 64
#: Below this fraction of the fixed image mapped inside the moving image, NMI says little.
HOLDOUT_MIN_OVERLAP = 0.25
#: The holdout metric and folding look at most this many voxels of the fixed grid (every k-th voxel per axis beyond
#: it), so that scoring a trial takes about a second on any volume and stays deterministic.
SCORE_VOXELS = 2_000_000


def score_stride(image: sitk.Image, limit: int = SCORE_VOXELS) -> int:
    """Every how many voxels per axis the scores look, so that at most ``limit`` voxels are seen."""
    voxels = float(np.prod(image.GetSize()))
    return max(1, int(np.ceil((voxels / limit) ** (1.0 / image.GetDimension()))))


def _subsampled(image: sitk.Image, stride: int) -> sitk.Image:
    return image if stride == 1 else sitk.Shrink(image, [stride] * image.GetDimension())


@dataclass(frozen=True)
class TREStats:
    """Target registration error statistics, in physical units and in voxels of the fixed image."""

    mean: float
    median: float
    p90: float
    max: float
    mean_vox: float
    median_vox: float
    p90_vox: float
    max_vox: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def transform_points(tx: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(c) for c in p)) for p in points], dtype=float)


def tre_vectors(tx: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """T(fixed_i) - moving_i for each landmark (ITK convention: T maps fixed points to moving points)."""
    return transform_points(tx, fixed_points) - moving_points


def tre_stats(errors: np.ndarray, fixed: sitk.Image) -> TREStats:
    """Statistics of error vectors (n, dim); voxel units measure each vector on the fixed image's grid axes."""
    dim = fixed.GetDimension()
    direction = np.asarray(fixed.GetDirection()).reshape(dim, dim)
    spacing = np.asarray(fixed.GetSpacing())
    in_voxels = (errors @ direction) / spacing  # direction is orthonormal: D^T e, per axis / spacing
    mm = np.linalg.norm(errors, axis=1)
    vox = np.linalg.norm(in_voxels, axis=1)
    return TREStats(
        mean=float(mm.mean()),
        median=float(np.median(mm)),
        p90=float(np.percentile(mm, 90)),
        max=float(mm.max()),
        mean_vox=float(vox.mean()),
        median_vox=float(np.median(vox)),
        p90_vox=float(np.percentile(vox, 90)),
        max_vox=float(vox.max()),
        n=int(len(mm)),
    )


def tre(tx: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray, fixed: sitk.Image) -> TREStats:
    return tre_stats(tre_vectors(tx, fixed_points, moving_points), fixed)


def per_point_tre(tx: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(tre_vectors(tx, fixed_points, moving_points), axis=1)


def overlap_fraction(tx: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, fixed_mask=None) -> float:
    """Fraction of the fixed image (or its mask) that ``tx`` maps inside the moving image."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, fixed, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayViewFromImage(inside)
    if fixed_mask is not None:
        m = sitk.GetArrayViewFromImage(fixed_mask) > 0
        return float(a[m].mean()) if m.any() else 0.0
    return float(a.mean())


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class HoldoutScore:
    """``loss = 2 - NMI`` (0 best, 1 independent images) over the overlap, and the overlap itself."""

    loss: float
    nmi: float
    overlap: float


def holdout_metric(tx: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, fixed_mask=None) -> HoldoutScore:
    """Normalised mutual information (Studholme) at full resolution, ``HOLDOUT_BINS`` bins.

    NMI rather than MI because it does not grow with the overlap's size; every voxel (every k-th per axis beyond
    ``SCORE_VOXELS``) rather than a random sample so the score has no randomness; intensities binned between the 0.5th
    and 99.5th percentiles of each image.
    """
    stride = score_stride(fixed)
    fixed = _subsampled(fixed, stride)
    warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    w = sitk.GetArrayViewFromImage(warped).ravel()
    f = sitk.GetArrayViewFromImage(fixed).ravel()
    valid = np.isfinite(w)
    if fixed_mask is not None:
        mask = sitk.GetArrayViewFromImage(_subsampled(fixed_mask, stride)).ravel() > 0
        valid &= mask
        overlap = float(valid.sum() / max(1, mask.sum()))
    else:
        overlap = float(valid.mean())
    if valid.sum() < HOLDOUT_BINS * 4 or overlap < HOLDOUT_MIN_OVERLAP:
        return HoldoutScore(loss=1.0, nmi=1.0, overlap=overlap)
    fv, wv = f[valid], w[valid]
    m = sitk.GetArrayViewFromImage(moving).ravel()
    frange = np.percentile(f, [0.5, 99.5])
    mrange = np.percentile(m, [0.5, 99.5])
    if frange[1] <= frange[0] or mrange[1] <= mrange[0]:
        return HoldoutScore(loss=1.0, nmi=1.0, overlap=overlap)
    joint, _, _ = np.histogram2d(fv, wv, bins=HOLDOUT_BINS, range=[frange, mrange])
    joint /= joint.sum()
    hf = _entropy(joint.sum(axis=1))
    hm = _entropy(joint.sum(axis=0))
    hj = _entropy(joint.ravel())
    nmi = (hf + hm) / hj if hj > 0 else 1.0
    return HoldoutScore(loss=float(2.0 - nmi), nmi=float(nmi), overlap=overlap)


def folding_fraction(tx: sitk.Transform, fixed: sitk.Image) -> float:
    """Fraction of fixed-grid voxels where the transform's Jacobian determinant is <= 0 (the warp folds); on a grid
    of every k-th voxel beyond ``SCORE_VOXELS`` (a fold narrower than k voxels may then go unseen)."""
    grid = _subsampled(fixed, score_stride(fixed))
    field = sitk.TransformToDisplacementField(
        tx,
        sitk.sitkVectorFloat64,
        grid.GetSize(),
        grid.GetOrigin(),
        grid.GetSpacing(),
        grid.GetDirection(),
    )
    # keep the image alive while its array view is read: a view of a temporary reads freed memory, which
    # segfaulted on a 182x218x182 brain (the freed buffer had been returned to the system)
    det = sitk.DisplacementFieldJacobianDeterminant(field)
    return float((sitk.GetArrayViewFromImage(det) <= 0).mean())


def has_deformable(tx: sitk.Transform) -> bool:
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        return any(has_deformable(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms()))
    return tx.GetName() in ("BSplineTransform", "DisplacementFieldTransform")
