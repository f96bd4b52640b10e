"""Pyramid levels: their sizes and sample counts, the prepared (smoothed and shrunk) images of each level, and the
BSpline grid of each level.

Prepared levels (``pyramid.shrink_images``) are built where a level starts (``LevelImages`` says why they are not
kept): both images are averaged down by the level's shrink factor (``BinShrink``: the average is the anti-aliasing) and
then smoothed on the small grid, where ITK's own pyramid smooths both full-resolution images and computes their
gradient again at every level of every registration (seconds per level on a large 3D volume).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk


def axis_factors(spacing, shrink: int, size=None) -> list[int]:
    """A prepared level's shrink per axis: every axis to about ``shrink`` times the finest voxel, so that an axis
    already coarser is shrunk less (nnU-Net plans its pooling so): 0.3 x 0.3 x 6 mm at shrink 4 is 4, 4, 1, where
    one factor for every axis left a 10-slice slab no pyramid at all. Isotropic voxels: ``shrink`` on every axis."""
    finest = min(spacing)
    factors = [max(1, int(round(shrink * finest / s))) for s in spacing]
    return factors if size is None else [min(f, int(n)) for f, n in zip(factors, size)]


def level_sizes(image: sitk.Image, shrink_factors, prepared: bool = False) -> list[tuple[int, ...]]:
    """The grid size of each pyramid level: ITK's shrink (``max(1, n // s)`` voxels on every axis), or with
    ``prepared`` the prepared levels' shrink per axis (``axis_factors``)."""
    size = image.GetSize()
    if not prepared:
        return [tuple(max(1, n // s) for n in size) for s in shrink_factors]
    spacing = image.GetSpacing()
    return [tuple(max(1, n // f) for n, f in zip(size, axis_factors(spacing, s, size))) for s in shrink_factors]


def sampling_fraction(sampling: Any, voxels: int, inside: float = 1.0) -> float:
    """The fraction of a level's voxels that the metric samples: the percentage, or ``points`` capped by the level
    (``inside``: the share of the level within the fixed mask, since ITK drops samples outside it)."""
    if sampling.strategy == "none":
        return 1.0
    points = getattr(sampling, "points", None)
    if points is None:
        return float(sampling.percentage)
    return min(1.0, points / max(1.0, voxels * max(inside, 1e-6)))


def sampled_points(sampling: Any, voxels: int, inside: float = 1.0) -> int:
    """About how many points the metric evaluates at a level."""
    return int(round(sampling_fraction(sampling, voxels, inside) * voxels * inside))


def sigmas_of(stage: Any, k: float) -> tuple[list[float], bool]:
    """The stage's smoothing sigmas in the normalised frame, and whether they are physical (else voxel units)."""
    p = stage.pyramid
    if p.sigma_units == "mm":
        return [s * k for s in p.smoothing_sigmas], True
    return list(p.smoothing_sigmas), False


class LevelImages:
    """Prepared pyramid levels of one pair in its normalised frame: fixed, moving and masks per (shrink, sigma).

    Each call builds its image anew. Keeping them for the next registration made a recipe's result depend on what
    the process had registered before, though every kept image was bit-identical to a new one: replayed in one
    process, 6 of 9 ki67 trials changed (12.7 -> 26.6 px for one), and 1 of 9 still did when only one registration
    shared them; built anew, all 9 equal runs of their recipes in fresh processes. A level costs one ``BinShrink``
    and one small smoothing, a fraction of its registration."""

    def __init__(self, frame: Any):
        self.frame = frame

    def factors(self, which: str, shrink: int) -> list[int]:
        """Per-axis shrink of ``which`` image: the fixed one's by ``axis_factors``, the moving one's so that its level
        voxels are about ``shrink`` times the fixed image's finest voxel (one unit for isotropic voxels)."""
        fixed = self.frame.fixed
        if which.startswith("fixed"):
            return axis_factors(fixed.GetSpacing(), shrink, fixed.GetSize())
        image = self.frame.moving
        target = shrink * min(fixed.GetSpacing())
        return [max(1, min(n, int(round(target / s)))) for n, s in zip(image.GetSize(), image.GetSpacing())]

    def image(self, which: str, shrink: int, sigma: float) -> sitk.Image:
        """``fixed`` or ``moving`` averaged down by ``shrink`` and smoothed by ``sigma`` (normalised units)."""
        return _smooth(self.shrunk(which, shrink), sigma)

    def shrunk(self, which: str, shrink: int) -> sitk.Image:
        source = self.frame.fixed if which == "fixed" else self.frame.moving
        factors = self.factors(which, shrink)
        if all(f == 1 for f in factors):
            return source
        return sitk.BinShrink(source, factors)

    def mask(self, which: str, shrink: int) -> sitk.Image | None:
        """The fixed or moving mask on that image's level grid (a voxel is inside when most of its bin is)."""
        source = self.frame.fixed_mask if which == "fixed" else self.frame.moving_mask
        if source is None:
            return None
        factors = self.factors(which, shrink)
        if all(f == 1 for f in factors):
            return source
        mean = sitk.BinShrink(sitk.Cast(source, sitk.sitkFloat32), factors)
        return sitk.Cast(mean >= 0.5, sitk.sitkUInt8)

    def inside(self, shrink: int) -> float:
        """The share of the fixed level's voxels inside the fixed mask (1 without a mask)."""
        return inside_share(self.mask("fixed", shrink))


def inside_share(mask: sitk.Image | None) -> float:
    """The share of a level mask's voxels inside it (1 without a mask)."""
    return 1.0 if mask is None else float(np.mean(sitk.GetArrayViewFromImage(mask) > 0))


def _smooth(image: sitk.Image, sigma: float) -> sitk.Image:
    if sigma <= 0:
        return image
    return sitk.SmoothingRecursiveGaussian(image, float(sigma))


# --- BSpline grids -----------------------------------------------------------------------------------------------


def bspline_mesh(stage: Any, fixed: sitk.Image, k: float = 1.0) -> list[int]:
    """Mesh cells per axis: given, or the fixed extent divided by the control-point spacing."""
    from .core import RegistrationFailed

    grid = stage.transform
    if getattr(grid, "mesh_size", None) is not None:
        mesh = list(grid.mesh_size)
        if len(mesh) == 1:
            mesh = mesh * fixed.GetDimension()
        if len(mesh) != fixed.GetDimension():
            raise RegistrationFailed(
                "bad bspline mesh", f"mesh_size has {len(mesh)} entries for a {fixed.GetDimension()}D image"
            )
        return mesh
    # ``fixed`` is in the normalised frame: a voxel measures 1 / frame_scale(fixed) (1 for isotropic data).
    if grid.spacing_units == "mm":
        spacing = grid.control_point_spacing * k
    else:
        spacing = grid.control_point_spacing * float(np.exp(np.mean(np.log(fixed.GetSpacing()))))
    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    return [max(1, int(round(e / spacing))) for e in extent]


def bspline_schedule(stage: Any, fixed: sitk.Image, k: float = 1.0) -> tuple[list[int], list[int] | None]:
    """The grid a BSpline stage starts from and, with ``refine``, the per-level scale factors that double it.

    Without refinement: the stage's mesh, no factors. With it, over L levels: the mesh divided by 2^(L-1) (at least
    one cell per axis) and factors 1, 2, ..., 2^(L-1), so the finest level has the stage's grid, rounded up to a
    multiple of 2^(L-1)."""
    mesh = bspline_mesh(stage, fixed, k)
    levels = len(stage.pyramid.shrink_factors)
    if not getattr(stage.transform, "refine", False) or levels < 2:
        return mesh, None
    step = 2 ** (levels - 1)
    return [max(1, -(-m // step)) for m in mesh], [2**level for level in range(levels)]


#: A cubic B-spline as a sum of half-width ones: B(t) = sum_r w_r B(2t - r), r = -2..2.
_HALVING = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 8.0


def refine_bspline(tx: sitk.BSplineTransform) -> sitk.BSplineTransform:
    """The same cubic BSpline mapping on a grid with twice the cells per axis (exact inside the domain).

    Control point j of a mesh of M cells sits at ``origin + (j - 1) h``; on the refined grid point i sits at
    ``origin + (i - 1) h / 2``, and coefficient ``d_i = sum_j c_j w_(i - 2j + 1)``, axis by axis."""
    tx = sitk.BSplineTransform(tx)
    dim = tx.GetDimension()
    mesh = list(tx.GetTransformDomainMeshSize())
    coarse = np.asarray(tx.GetParameters(), dtype=float).reshape((dim, *[m + 3 for m in reversed(mesh)]))
    fine = coarse
    for axis, m in enumerate(reversed(mesh)):  # numpy axis 1 is the last image axis
        n_in, n_out = m + 3, 2 * m + 3
        op = np.zeros((n_out, n_in))
        for i in range(n_out):
            for j in range(n_in):
                r = i - 2 * j + 1
                if -2 <= r <= 2:
                    op[i, j] = _HALVING[r + 2]
        fine = np.moveaxis(np.tensordot(op, np.moveaxis(fine, axis + 1, 0), axes=(1, 0)), 0, axis + 1)
    out = sitk.BSplineTransform(dim, 3)
    out.SetTransformDomainOrigin(tx.GetTransformDomainOrigin())
    out.SetTransformDomainPhysicalDimensions(tx.GetTransformDomainPhysicalDimensions())
    out.SetTransformDomainDirection(tx.GetTransformDomainDirection())
    out.SetTransformDomainMeshSize([2 * m for m in mesh])
    out.SetParameters(tuple(fine.ravel()))
    return out
