"""Scores against hand-computed values: TRE statistics (mm and voxels), holdout NMI, folding, overlap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_pair

from autoreg.scoring import (
    HOLDOUT_MIN_OVERLAP,
    folding_fraction,
    has_deformable,
    holdout_metric,
    overlap_fraction,
    per_point_tre,
    tre,
    tre_stats,
)


def _image(size, spacing=None, direction=None, origin=None) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    if spacing is not None:
        image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    if origin is not None:
        image.SetOrigin(origin)
    return image


def _rotation_2d(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s], [s, c]])


# --- TRE --------------------------------------------------------------------------------------------------------

FIXED_2D = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [10.0, -2.0]])


def test_tre_of_identity_by_hand() -> None:
    # errors of length 5, 0, 10, 2 -> sorted 0, 2, 5, 10
    moving = FIXED_2D + np.array([[3.0, 4.0], [0.0, 0.0], [-6.0, 8.0], [0.0, 2.0]])
    stats = tre(sitk.Transform(2, sitk.sitkIdentity), FIXED_2D, moving, _image((20, 20)))
    assert stats.n == 4
    assert stats.mean == pytest.approx(17.0 / 4)
    assert stats.median == pytest.approx(3.5)
    assert stats.p90 == pytest.approx(5 + 0.7 * 5)  # numpy's linear interpolation: rank 0.9 * 3 = 2.7
    assert stats.max == pytest.approx(10.0)
    # spacing 1, identity direction: voxels are millimetres
    assert (stats.mean_vox, stats.median_vox, stats.p90_vox, stats.max_vox) == pytest.approx(
        (stats.mean, stats.median, stats.p90, stats.max)
    )
    np.testing.assert_allclose(per_point_tre(sitk.Transform(2, sitk.sitkIdentity), FIXED_2D, moving), [5, 0, 10, 2])
    assert set(stats.as_dict()) == {"mean", "median", "p90", "max", "mean_vox", "median_vox", "p90_vox", "max_vox", "n"}


def test_tre_of_a_known_translation() -> None:
    shift = np.array([3.0, -4.0])
    tx = sitk.TranslationTransform(2, shift.tolist())
    exact = tre(tx, FIXED_2D, FIXED_2D + shift, _image((20, 20)))
    assert exact.mean == pytest.approx(0.0, abs=1e-12) and exact.max == pytest.approx(0.0, abs=1e-12)
    # the convention: T maps FIXED points to MOVING points; the inverse is off by twice the shift
    wrong = tre(tx.GetInverse(), FIXED_2D, FIXED_2D + shift, _image((20, 20)))
    assert (
        wrong.mean == pytest.approx(10.0) and wrong.median == pytest.approx(10.0) and wrong.max == pytest.approx(10.0)
    )
    # the identity misses by the shift itself
    assert tre(
        sitk.Transform(2, sitk.sitkIdentity), FIXED_2D, FIXED_2D + shift, _image((20, 20))
    ).mean == pytest.approx(5)


def test_voxel_units_with_anisotropic_spacing_and_rotated_direction_2d() -> None:
    direction = _rotation_2d(30.0)
    image = _image((20, 20), spacing=(0.5, 2.0), direction=tuple(direction.ravel()), origin=(5.0, -3.0))
    # one error along each image axis: 3 mm along axis 0 (6 voxels of 0.5) and 4 mm along axis 1 (2 voxels of 2)
    errors = np.array([3.0 * direction[:, 0], 4.0 * direction[:, 1], 3.0 * direction[:, 0] + 4.0 * direction[:, 1]])
    stats = tre_stats(errors, image)
    assert stats.max == pytest.approx(5.0)
    assert stats.mean == pytest.approx((3 + 4 + 5) / 3)
    assert stats.mean_vox == pytest.approx((6 + 2 + math.hypot(6, 2)) / 3)
    assert stats.max_vox == pytest.approx(math.hypot(6, 2))
    assert stats.median_vox == pytest.approx(6.0)
    # the same through points and a translation by each error
    fixed_points = np.array([[1.0, 2.0]])
    for e, vox in zip(errors, (6.0, 2.0, math.hypot(6, 2))):
        got = tre(sitk.TranslationTransform(2, tuple(e)), fixed_points, fixed_points, image)
        assert got.mean_vox == pytest.approx(vox) and got.mean == pytest.approx(np.linalg.norm(e))


def test_voxel_units_3d() -> None:
    c, s = math.cos(math.radians(40)), math.sin(math.radians(40))
    direction = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # rotation about y
    image = _image((8, 8, 8), spacing=(0.7, 1.1, 2.0), direction=tuple(direction.ravel()))
    errors = np.array([1.4 * direction[:, 0], 2.2 * direction[:, 1], 2.0 * direction[:, 2]])
    stats = tre_stats(errors, image)
    assert stats.mean_vox == pytest.approx(2.0 * 2 / 3 + 1.0 / 3)  # 2, 2, 1 voxels
    assert stats.max == pytest.approx(2.2)


# --- holdout metric ---------------------------------------------------------------------------------------------


def test_holdout_prefers_the_true_transform_on_a_multimodal_pair() -> None:
    pair = synthetic_pair(2, "affine", multimodal=True)
    true = holdout_metric(pair.transform, pair.fixed, pair.moving)
    identity = holdout_metric(sitk.Transform(2, sitk.sitkIdentity), pair.fixed, pair.moving)
    assert true.loss < identity.loss
    assert 1.0 <= true.nmi <= 2.0 and true.loss == pytest.approx(2.0 - true.nmi)
    assert true.overlap > 0.9


def test_holdout_of_an_image_with_itself_is_zero_loss() -> None:
    fixed = synthetic_pair(2, "rigid").fixed
    score = holdout_metric(sitk.Transform(2, sitk.sitkIdentity), fixed, fixed)
    assert score.loss == pytest.approx(0.0, abs=1e-9) and score.overlap == 1.0


def test_holdout_with_no_overlap_is_the_worst_loss() -> None:
    pair = synthetic_pair(2, "rigid")
    score = holdout_metric(sitk.TranslationTransform(2, (1e4, 0.0)), pair.fixed, pair.moving)
    assert score.loss == 1.0 and score.overlap < HOLDOUT_MIN_OVERLAP


def test_holdout_with_a_mask_uses_the_mask() -> None:
    pair = synthetic_pair(2, "affine", multimodal=True)
    mask = sitk.Cast(pair.fixed > 20, sitk.sitkUInt8)
    true = holdout_metric(pair.transform, pair.fixed, pair.moving, mask)
    identity = holdout_metric(sitk.Transform(2, sitk.sitkIdentity), pair.fixed, pair.moving, mask)
    assert true.loss < identity.loss and true.overlap > 0.9


# --- folding ----------------------------------------------------------------------------------------------------


def _bspline(image: sitk.Image, mesh: int = 4) -> sitk.BSplineTransform:
    return sitk.BSplineTransformInitializer(image, [mesh] * image.GetDimension(), 3)


def test_identity_bspline_does_not_fold() -> None:
    image = _image((64, 64))
    tx = _bspline(image)
    assert not any(tx.GetParameters())
    assert folding_fraction(tx, image) == 0.0


def test_a_big_coefficient_folds() -> None:
    image = _image((64, 64))
    tx = _bspline(image)
    params = np.zeros(tx.GetNumberOfParameters())
    n = 4 + 3  # control points per axis
    params[3 * n + 3] = 200.0  # x displacement of the central control point, far more than its 16 px spacing
    tx.SetParameters(params.tolist())
    folded = folding_fraction(tx, image)
    assert 0.0 < folded < 0.5


def test_smooth_bspline_does_not_fold() -> None:
    image = _image((64, 64))
    tx = _bspline(image)
    params = np.zeros(tx.GetNumberOfParameters())
    params[3 * 7 + 3] = 2.0
    tx.SetParameters(params.tolist())
    assert folding_fraction(tx, image) == 0.0


def test_folding_of_a_large_3d_grid_reads_a_live_buffer() -> None:
    """The Jacobian image must outlive its array view: a view of a temporary read freed memory, which segfaulted
    (whole worker processes died) once the buffer was large enough to go back to the system, as a 3D brain's is."""
    image = _image((120, 120, 120))  # 6.9 MB of determinants: allocated and freed with mmap/munmap
    tx = _bspline(image)
    params = np.zeros(tx.GetNumberOfParameters())
    params[len(params) // 2] = 500.0  # one huge coefficient: some voxels fold
    tx.SetParameters(params.tolist())
    for _ in range(3):
        assert 0.0 < folding_fraction(tx, image) < 0.5


def test_has_deformable() -> None:
    image = _image((16, 16))
    affine = sitk.AffineTransform(2)
    assert not has_deformable(affine)
    assert has_deformable(_bspline(image))
    assert has_deformable(sitk.CompositeTransform([affine, _bspline(image)]))
    assert not has_deformable(sitk.CompositeTransform([affine, sitk.TranslationTransform(2)]))


# --- overlap ----------------------------------------------------------------------------------------------------


def test_overlap_of_identity_on_same_size_images_is_one() -> None:
    image = _image((40, 30), spacing=(0.5, 2.0))
    assert overlap_fraction(sitk.Transform(2, sitk.sitkIdentity), image, image) == 1.0


def test_overlap_of_a_huge_translation_is_zero() -> None:
    image = _image((40, 30))
    assert overlap_fraction(sitk.TranslationTransform(2, (1e4, -1e4)), image, image) == pytest.approx(0.0, abs=1e-9)


def test_overlap_of_half_a_shift() -> None:
    image = _image((40, 30))
    assert overlap_fraction(sitk.TranslationTransform(2, (20.0, 0.0)), image, image) == pytest.approx(0.5, abs=0.03)


def test_overlap_within_a_mask() -> None:
    image = _image((40, 30))
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask[0:10, 0:30] = 1  # the left quarter, which the shift keeps inside
    tx = sitk.TranslationTransform(2, (20.0, 0.0))
    assert overlap_fraction(tx, image, image, mask) == 1.0
