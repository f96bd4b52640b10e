"""Synthetic pairs: exact landmarks, the warp direction, determinism, and the quickstart data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoreg.synthetic import TRANSFORM_KINDS, SyntheticPair, make_pair, phantom, write_pair

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
SIZES = {"2d": (96, 96), "3d": (32, 32, 32)}


def _sample(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Linearly interpolated intensities of ``image`` at physical ``points``."""
    return np.array([image.EvaluateAtPhysicalPoint([float(v) for v in p], sitk.sitkLinear) for p in points])


def _read_points(path: Path) -> tuple[str, np.ndarray]:
    header, *rows = path.read_text().splitlines()
    return header, np.array([[float(v) for v in row.split(",")] for row in rows])


@pytest.fixture(scope="module", params=[(d, k) for d in SIZES for k in TRANSFORM_KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request: pytest.FixtureRequest) -> SyntheticPair:
    dim, kind = request.param
    return make_pair(SIZES[dim], transform=kind, seed=3, n_landmarks=40)


def test_landmarks_follow_the_ground_truth_exactly(pair: SyntheticPair) -> None:
    dim = pair.fixed.GetDimension()
    assert pair.fixed_points.shape == pair.moving_points.shape == (40, dim)
    mapped = np.array([pair.transform.TransformPoint(p.tolist()) for p in pair.fixed_points])
    np.testing.assert_array_equal(mapped, pair.moving_points)
    # the pair is not trivial: points moved by at least a voxel on average
    assert np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1).mean() > 1.0


def test_landmarks_lie_inside_the_body_away_from_the_border(pair: SyntheticPair) -> None:
    size = np.array(pair.fixed.GetSize())
    extent = (size - 1) * np.array(pair.fixed.GetSpacing())
    rel = pair.fixed_points / extent
    assert rel.min() >= 0.10 and rel.max() <= 0.90
    assert _sample(pair.fixed, pair.fixed_points).min() > 20.0  # background is ~0..10


def test_images_correspond_in_the_ground_truth_direction(pair: SyntheticPair) -> None:
    fixed = _sample(pair.fixed, pair.fixed_points)
    true = np.abs(fixed - _sample(pair.moving, pair.moving_points)).mean()
    # the displacement applied the wrong way round (T^-1 for a translation)
    reversed_pts = 2 * pair.fixed_points - pair.moving_points
    wrong_way = np.abs(fixed - _sample(pair.moving, reversed_pts)).mean()
    unrelated = np.abs(fixed - _sample(pair.moving, np.roll(pair.moving_points, 7, axis=0))).mean()
    assert true < 5.0, true  # noise sigma 2.5 per image, plus interpolation
    assert true < 0.25 * wrong_way, (true, wrong_way)
    assert true < 0.25 * unrelated, (true, unrelated)


@pytest.mark.parametrize("dim", list(SIZES))
def test_bspline_deformation_is_in_the_images(dim: str) -> None:
    pair = make_pair(SIZES[dim], transform="bspline", seed=4, n_landmarks=60)
    composite = sitk.CompositeTransform(pair.transform)
    assert composite.GetNumberOfTransforms() == 2
    affine = composite.GetNthTransform(0)  # applied last: transform = affine(bspline(x))
    affine_pts = np.array([affine.TransformPoint(p.tolist()) for p in pair.fixed_points])
    shift = np.linalg.norm(pair.moving_points - affine_pts, axis=1)
    assert 0.3 < shift.max() <= 3.3  # 2..3 voxels at most, through a near-identity matrix
    fixed = _sample(pair.fixed, pair.fixed_points)
    true = np.abs(fixed - _sample(pair.moving, pair.moving_points)).mean()
    affine_only = np.abs(fixed - _sample(pair.moving, affine_pts)).mean()
    assert true < 0.7 * affine_only, (true, affine_only)


def test_image_properties(pair: SyntheticPair) -> None:
    for image in (pair.fixed, pair.moving):
        assert image.GetPixelID() == sitk.sitkFloat32
        assert image.GetOrigin() == (0.0,) * image.GetDimension()
        arr = sitk.GetArrayFromImage(image)
        assert arr.min() >= 0.0 and arr.max() <= 255.0
        assert np.median(arr[(0, -1), ...]) < 10.0  # background near 0 at the border
        assert arr.max() > 150.0


@pytest.mark.parametrize("dim", list(SIZES))
def test_same_seed_same_pair_other_seed_other_pair(dim: str) -> None:
    a = make_pair(SIZES[dim], transform="bspline", seed=5, multimodal=True, n_landmarks=5)
    b = make_pair(SIZES[dim], transform="bspline", seed=5, multimodal=True, n_landmarks=5)
    c = make_pair(SIZES[dim], transform="bspline", seed=6, multimodal=True, n_landmarks=5)
    for x, y in ((a.fixed, b.fixed), (a.moving, b.moving)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y))
    np.testing.assert_array_equal(a.fixed_points, b.fixed_points)
    np.testing.assert_array_equal(a.moving_points, b.moving_points)
    assert a.transform.GetParameters() == b.transform.GetParameters()
    assert not np.array_equal(sitk.GetArrayFromImage(a.fixed), sitk.GetArrayFromImage(c.fixed))
    assert not np.array_equal(a.fixed_points, c.fixed_points)


def test_pd_is_a_non_monotonic_remapping_of_the_same_anatomy() -> None:
    t1_image = phantom((96, 96), seed=2, modality="t1")
    t1 = sitk.GetArrayFromImage(t1_image)
    pd = sitk.GetArrayFromImage(phantom((96, 96), seed=2, modality="pd"))
    assert np.mean((t1 > 20) != (pd > 20)) < 0.01  # same body outline
    body = sitk.BinaryErode(sitk.Cast(t1_image > 20, sitk.sitkUInt8), [4, 4])
    inner = sitk.GetArrayFromImage(body).astype(bool)
    # mean PD per T1 octile goes both down and up: no monotonic intensity mapping
    edges = np.quantile(t1[inner], np.linspace(0, 1, 9))
    bins = np.digitize(t1[inner], edges[1:-1])
    steps = np.diff([pd[inner][bins == k].mean() for k in range(8)])
    assert steps.max() > 10 and steps.min() < -10, steps
    assert abs(np.corrcoef(t1[inner], pd[inner])[0, 1]) < 0.8


def test_phantom_spacing_and_dimension() -> None:
    img = phantom((20, 24, 16), spacing=(1.5, 1.0, 2.0), seed=1)
    assert img.GetSize() == (20, 24, 16)
    assert img.GetSpacing() == (1.5, 1.0, 2.0)
    assert img.GetPixelID() == sitk.sitkFloat32
    with pytest.raises(ValueError):
        phantom((10,))
    with pytest.raises(ValueError):
        phantom((32, 32), modality="ct")
    with pytest.raises(ValueError):
        make_pair((32, 32), transform="demons")


def test_magnitude_zero_is_identity() -> None:
    pair = make_pair((64, 64), transform="affine", seed=1, magnitude=0.0, n_landmarks=5)
    np.testing.assert_allclose(pair.moving_points, pair.fixed_points, atol=1e-9)


def test_write_pair_png_and_nifti(tmp_path: Path) -> None:
    pair2 = make_pair((48, 40), transform="rigid", seed=1, n_landmarks=6)
    paths = write_pair(pair2, tmp_path / "png", fmt="png")
    assert set(paths) == {"fixed", "moving", "fixed_landmarks", "moving_landmarks"}
    png = sitk.ReadImage(str(paths["moving"]))
    assert png.GetPixelID() == sitk.sitkUInt8 and png.GetSize() == pair2.moving.GetSize()
    header, pts = _read_points(paths["moving_landmarks"])
    assert header == "x,y"
    np.testing.assert_array_equal(pts, pair2.moving_points)  # full precision round trip

    pair3 = make_pair((24, 24, 20), transform="translation", seed=1, spacing=(1, 1, 1.5), n_landmarks=6)
    with pytest.raises(ValueError):
        write_pair(pair3, tmp_path / "bad", fmt="png")
    paths = write_pair(pair3, tmp_path / "nii", fmt="nii.gz")
    nii = sitk.ReadImage(str(paths["fixed"]))
    assert nii.GetPixelID() == sitk.sitkFloat32 and nii.GetSpacing() == (1.0, 1.0, 1.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nii), sitk.GetArrayFromImage(pair3.fixed))
    header, pts = _read_points(paths["fixed_landmarks"])
    assert header == "x,y,z"
    np.testing.assert_array_equal(pts, pair3.fixed_points)


def test_quickstart_files_are_reproduced_by_make_data(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("quickstart_make_data", QUICKSTART / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.write_quickstart(tmp_path)

    for role in ("fixed", "moving"):
        new = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[role])))
        old = sitk.GetArrayFromImage(sitk.ReadImage(str(QUICKSTART / f"{role}.png")))
        assert new.dtype == old.dtype == np.uint8 and new.shape == old.shape
        np.testing.assert_array_equal(new, old)
    for role in ("fixed_landmarks", "moving_landmarks"):
        new_header, new = _read_points(paths[role])
        old_header, old = _read_points(QUICKSTART / f"{role}.csv")
        assert new_header == old_header == "x,y" and new.shape == old.shape == (20, 2)
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-9)
    assert paths["pair"].read_text() == (QUICKSTART / "pair.yaml").read_text()
    assert (QUICKSTART / "pair.yaml").read_text() == (
        "name: quickstart\n"
        "fixed: fixed.png\n"
        "moving: moving.png\n"
        "landmarks:\n"
        "  fixed: fixed_landmarks.csv\n"
        "  moving: moving_landmarks.csv\n"
        "stages: [affine]\n"
    )
