"""Issue 12 item 9: a 3D benchmark set with exact ground truth, built from the real brain volumes in ../shared/data.

    python benchmarks/make_3d_set.py [--out benchmarks/data3d] [--seed 0] [--only rot3d,mmdef3d] [--shrink 1]
    python benchmarks/make_3d_set.py --check [--out benchmarks/data3d]

Each case is a folder with fixed.nii.gz, moving.nii.gz, fixed_landmarks.csv, moving_landmarks.csv (x,y,z, LPS
physical mm, row i <-> row i), pair.yaml (for ``autoreg tune``), SOURCE.json (every parameter, the seed, the
source's digest) and SOURCE.txt (the same in words); the synthetic cases also hold T as ground_truth.tfm (linear)
or ground_truth.h5 (mmdef3d: a composite with a displacement field, which the text format would hold in ~20 MB).

Convention (autoreg's, ITK's): the ground-truth transform T maps FIXED physical points to MOVING physical points,
``moving(T(x)) ~ fixed(x)``, and TRE_i = |T(fixed_i) - moving_i|. The moving landmarks are T(fixed landmarks), so T
has TRE 0 by construction. Source: the MNI152 volume (fixed.nii.gz of the AFIDs pair, a skull-stripped, near
left-right symmetric brain) for both images of every synthetic case, so that T is the only difference (plus the
intensity remapping and noise of mmdef3d, and the slice thickness of aniso3d).

* ``rot3d``    fixed = MNI; moving = MNI resampled through T^-1, T a 30-45 deg rotation about an oblique axis
               through the brain's centre plus a 10-20 mm shift. Stages [rigid].
* ``affine3d`` the same with T affine: scalings 0.90-0.94, 0.97-1.03 and 1.08-1.15 along the three axes (in a
               seeded order), shears of 0.04-0.08, an 8-12 deg rotation, a 5-15 mm shift.
               Stages [affine].
* ``mmdef3d``  T = A(D(x)): D a dense displacement field (white noise smoothed by a 20 mm Gaussian, on a 3 mm
               grid, linearly interpolated) scaled to a 3 mm mean displacement in the brain, A a small affine
               (2-5 deg, scalings 0.97-1.03, 2-5 mm). fixed = MNI resampled through T (the warped image is the
               FIXED one here because D has no exact inverse: so T itself is exact); moving = MNI with its intensities
               remapped non-monotonically (CSF bright, grey matter mid, white matter dark: T2-like) plus noise.
               Stages [affine, deformable].
* ``aniso3d``  fixed = MNI; moving at 1 x 1 x 3 mm: MNI resampled through T^-1 (a rigid 8-15 deg rotation and
               shift) on a 1 mm grid aligned with the moving grid, smoothed along z with a Gaussian slice
               profile of FWHM 3 mm, then every third slice kept. Stages [affine].
* ``afids``    the real AFIDs pair (MNI152 / Colin27) and its 32 real landmarks, copied as is (no ground-truth
               transform; see its SOURCE.txt for its ~1.5 mm landmark uncertainty). Stages [affine, deformable].

Landmarks of the synthetic cases: 40 points by farthest-point sampling (seeded start) over the voxels at least
10 mm inside the fixed image's brain mask, each moved by a seeded sub-voxel jitter. ``--check`` loads every case
through autoreg's own config and data code and shows that ``autoreg.scoring.tre`` of T is ~0, that the identity
gives the initial TRE recorded at build time, and that the images agree with T: Mattes MI of fixed against moving
through T beats moving through T shifted by 2 voxels along each axis, the identity, and (linear cases) T^-1.
``--shrink K`` builds from the source shrunk K times (the test's fast copy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, require_shared_data  # noqa: E402

log = logging.getLogger("make_3d_set")

SOURCE_PAIR = "afids_mni152nlin6asym_colin27_t1"
CASES = ("rot3d", "affine3d", "mmdef3d", "aniso3d", "afids")
STAGES = {
    "rot3d": ["rigid"],
    "affine3d": ["affine"],
    "mmdef3d": ["affine", "deformable"],
    "aniso3d": ["affine"],
    "afids": ["affine", "deformable"],
}
DEFAULT_OUT = REPO / "benchmarks" / "data3d"
N_LANDMARKS = 40
#: Landmarks lie at least this deep inside the brain mask (mm): inside the brain, not on its edge.
LANDMARK_DEPTH_MM = 10.0
#: The moving grid holds the transformed brain with this margin (mm), so nothing of the brain is cut.
GRID_MARGIN_MM = 10.0
#: The brain mask: voxels above this fraction of the 99th percentile of the non-zero voxels.
BRAIN_FRACTION = 0.12
#: mmdef3d's mean displacement in the brain (mm), the smoothing of its random field (mm) and the field's grid
#: (mm). A smoothed noise field rather than a BSpline: a BSpline would lie in the span of autoreg's own BSpline
#: stage (an "inverse crime" that favours it; the first set had one and the default recipe beat both peers).
DEFORM_MEAN_MM = 3.0
DEFORM_SIGMA_MM = 20.0
DEFORM_FIELD_SPACING_MM = 3.0
#: mmdef3d's remapping of MNI intensities (as fractions of the brain's 99th percentile) to a T2/PD-like ordering:
#: background dark, CSF bright, grey matter mid, white matter dark, fat mid; noise in the remapped units.
REMAP_KNOTS = (0.0, 0.13, 0.33, 0.60, 0.78, 0.96, 1.10)
REMAP_VALUES = (0.0, 50.0, 1000.0, 700.0, 600.0, 300.0, 450.0)
REMAP_NOISE = 20.0
ANISO_FACTOR = 3  # moving slice spacing = 3 x the source's z spacing
ANISO_FWHM_FACTOR = 1.0  # slice profile FWHM in slice spacings


# ------------------------------------------------------------------------------------------------ geometry


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' rotation about a (normalised) axis."""
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def affine(matrix: np.ndarray, centre: np.ndarray, shift: np.ndarray) -> sitk.AffineTransform:
    """T(x) = M (x - c) + c + t, ITK's centred affine."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in np.asarray(matrix).ravel()])
    tx.SetCenter([float(v) for v in centre])
    tx.SetTranslation([float(v) for v in shift])
    return tx


def map_points(tx: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint([float(c) for c in p]) for p in points], dtype=float)


def index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Continuous indices (n, 3) in x, y, z order -> physical points, vectorised."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index_xyz * np.asarray(image.GetSpacing())) @ d.T


def random_oblique_axis(rng: np.random.Generator, min_component: float = 0.3) -> np.ndarray:
    """A unit axis with every component at least ``min_component`` in size: oblique, not near any image axis."""
    while True:
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        if np.all(np.abs(u) >= min_component):
            return u


def random_shift(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    u = rng.normal(size=3)
    return u / np.linalg.norm(u) * rng.uniform(low, high)


def grid_containing(points: np.ndarray, like: sitk.Image, spacing: tuple[float, ...]) -> sitk.Image:
    """An empty float image with ``like``'s direction and the given spacing whose extent holds ``points`` plus
    GRID_MARGIN_MM on every side."""
    d = np.asarray(like.GetDirection()).reshape(3, 3)
    local = points @ d  # coordinates along the grid's axes
    lo = local.min(axis=0) - GRID_MARGIN_MM
    hi = local.max(axis=0) + GRID_MARGIN_MM
    sp = np.asarray(spacing, float)
    size = [int(np.ceil((h - low_) / s)) + 1 for low_, h, s in zip(lo, hi, sp)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in sp])
    grid.SetDirection(like.GetDirection())
    grid.SetOrigin([float(v) for v in d @ lo])
    return grid


# ------------------------------------------------------------------------------------------------ images


def read_source(shrink: int) -> tuple[sitk.Image, Path]:
    """The MNI volume (float32), shrunk ``shrink`` times with anti-aliasing for the test's fast copy."""
    path = SHARED_DATA / SOURCE_PAIR / "fixed.nii.gz"
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if shrink > 1:
        sigma = [0.5 * shrink * s for s in image.GetSpacing()]
        smooth = sitk.SmoothingRecursiveGaussian(image, sigma)
        image = sitk.Shrink(smooth, [shrink] * 3)
    return image, path


def brain_mask(image: sitk.Image) -> sitk.Image:
    a = sitk.GetArrayViewFromImage(image)
    threshold = BRAIN_FRACTION * float(np.percentile(a[a > 0], 99))
    mask = sitk.BinaryThreshold(image, threshold, 1e30, 1, 0)
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    return sitk.BinaryFillhole(mask)


def brain_points(image: sitk.Image, step: int = 3) -> np.ndarray:
    """Physical points of every ``step``-th brain voxel along each axis: for bounding boxes and displacement stats."""
    m = sitk.GetArrayFromImage(brain_mask(image))[::step, ::step, ::step]
    zyx = np.argwhere(m) * step
    return index_to_physical(image, zyx[:, ::-1].astype(float))


def resample(image: sitk.Image, grid: sitk.Image, tx: sitk.Transform) -> sitk.Image:
    """image(tx(y)) on ``grid`` with cubic BSpline interpolation, clipped at 0 (no negative overshoot)."""
    out = sitk.Resample(image, grid, tx, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return sitk.Clamp(out, sitk.sitkFloat32, 0.0)


def remap_intensities(image: sitk.Image, rng: np.random.Generator) -> tuple[sitk.Image, dict]:
    """Non-monotonic T1 -> T2/PD-like lookup (piecewise linear) plus Gaussian noise, clipped at 0."""
    a = sitk.GetArrayFromImage(image)
    ref = float(np.percentile(a[a > 0], 99))
    b = np.interp(a / ref, REMAP_KNOTS, REMAP_VALUES).astype(np.float32)
    b += rng.normal(0.0, REMAP_NOISE, size=b.shape).astype(np.float32)
    np.clip(b, 0.0, None, out=b)
    out = sitk.GetImageFromArray(b)
    out.CopyInformation(image)
    return out, {
        "reference_p99": ref,
        "knots_fraction_of_reference": list(REMAP_KNOTS),
        "values": list(REMAP_VALUES),
        "noise_sigma": REMAP_NOISE,
    }


def anisotropic(source: sitk.Image, tx_inverse: sitk.Transform, grid: sitk.Image) -> tuple[sitk.Image, dict]:
    """source(T^-1(y)) on ``grid`` (z spacing ANISO_FACTOR x the source's): resampled on a grid as fine as the
    source along z and aligned with ``grid``, smoothed along z (Gaussian slice profile), every ANISO_FACTOR-th slice
    kept."""
    sz = grid.GetSpacing()[2] / ANISO_FACTOR
    fine = sitk.Image(
        [grid.GetSize()[0], grid.GetSize()[1], ANISO_FACTOR * (grid.GetSize()[2] - 1) + 1], sitk.sitkFloat32
    )
    fine.SetSpacing([grid.GetSpacing()[0], grid.GetSpacing()[1], sz])
    fine.SetOrigin(grid.GetOrigin())
    fine.SetDirection(grid.GetDirection())
    fine = resample(source, fine, tx_inverse)
    fwhm = ANISO_FWHM_FACTOR * grid.GetSpacing()[2]
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    smooth = sitk.RecursiveGaussian(fine, float(sigma), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, 2)
    # slices 0, k, 2k, ... of the fine grid lie exactly on the grid's slices
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(smooth)[::ANISO_FACTOR])
    out.CopyInformation(grid)
    return out, {
        "slice_profile": "Gaussian",
        "fwhm_mm": fwhm,
        "sigma_mm": float(sigma),
        "fine_z_spacing_mm": sz,
        "kept_every": ANISO_FACTOR,
    }


# ------------------------------------------------------------------------------------------------ landmarks


def sample_landmarks(fixed: sitk.Image, rng: np.random.Generator, n: int = N_LANDMARKS) -> np.ndarray:
    """``n`` physical points spread over the brain: farthest-point sampling (seeded start) over the voxels at least
    LANDMARK_DEPTH_MM inside the brain mask, then a seeded sub-voxel jitter."""
    depth = sitk.SignedMaurerDistanceMap(
        brain_mask(fixed), insideIsPositive=True, squaredDistance=False, useImageSpacing=True
    )
    zyx = np.argwhere(sitk.GetArrayFromImage(depth) >= LANDMARK_DEPTH_MM)
    if len(zyx) < n:
        raise RuntimeError(f"only {len(zyx)} voxels lie {LANDMARK_DEPTH_MM} mm inside the brain")
    if len(zyx) > 20000:
        zyx = zyx[rng.choice(len(zyx), 20000, replace=False)]
    pts = index_to_physical(fixed, zyx[:, ::-1].astype(float))
    chosen = [int(rng.integers(len(pts)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(pts - pts[chosen[-1]], axis=1))
    jitter = rng.uniform(-0.5, 0.5, size=(n, 3))
    idx = zyx[chosen][:, ::-1].astype(float) + jitter
    return index_to_physical(fixed, idx)


def tre_summary(errors: np.ndarray) -> dict:
    mm = np.linalg.norm(errors, axis=1)
    return {
        "mean": float(mm.mean()),
        "median": float(np.median(mm)),
        "p90": float(np.percentile(mm, 90)),
        "max": float(mm.max()),
    }


# ------------------------------------------------------------------------------------------------ cases


def linear_transform(name: str, rng: np.random.Generator, centre: np.ndarray) -> tuple[sitk.AffineTransform, dict]:
    """T for the linear cases, its parameters drawn from the seeded ranges of the module docstring."""
    axis = random_oblique_axis(rng)
    if name == "rot3d":
        deg = rng.uniform(30, 45)
        matrix, shift, extra = rotation_matrix(axis, deg), random_shift(rng, 10, 20), {}
    elif name == "affine3d":
        deg = rng.uniform(8, 12)
        # one axis shrunk, one kept, one stretched (in a seeded order), and every shear clearly non-zero: an
        # unmistakably affine case, not a near-rigid draw
        scales = rng.permutation([rng.uniform(0.90, 0.94), rng.uniform(0.97, 1.03), rng.uniform(1.08, 1.15)])
        shear = np.eye(3)
        shear[0, 1], shear[0, 2], shear[1, 2] = rng.uniform(0.04, 0.08, size=3) * rng.choice([-1, 1], size=3)
        matrix = rotation_matrix(axis, deg) @ shear @ np.diag(scales)
        shift = random_shift(rng, 5, 15)
        extra = {"scales": scales.tolist(), "shear_upper": shear.tolist(), "matrix_order": "R @ Shear @ diag(scales)"}
    elif name == "aniso3d":
        deg = rng.uniform(8, 15)
        matrix, shift, extra = rotation_matrix(axis, deg), random_shift(rng, 5, 15), {}
    else:
        raise ValueError(name)
    tx = affine(matrix, centre, shift)
    return tx, {
        "kind": "affine",
        "formula": "T(x) = M (x - c) + c + t",
        "rotation_axis": axis.tolist(),
        "rotation_deg": float(deg),
        "M": np.asarray(matrix).tolist(),
        "c": centre.tolist(),
        "t": shift.tolist(),
        **extra,
    }


def deformable_transform(
    fixed: sitk.Image, rng: np.random.Generator, centre: np.ndarray, brain: np.ndarray
) -> tuple[sitk.CompositeTransform, dict]:
    """T(x) = A(D(x)): D(x) = x + u(x), u Gaussian-smoothed white noise on a DEFORM_FIELD_SPACING_MM grid over the
    fixed image (linearly interpolated), scaled to a mean of DEFORM_MEAN_MM in the brain; then a small affine A."""
    spacing = max(DEFORM_FIELD_SPACING_MM, *fixed.GetSpacing())
    extent = [(n - 1) * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    size = [int(np.ceil(e / spacing)) + 1 for e in extent]
    # noise on a grid padded by 3 sigma, cropped after smoothing: near a border fewer samples are averaged, so
    # an unpadded field is several times larger there (and folds)
    pad = int(np.ceil(3 * DEFORM_SIGMA_MM / spacing))
    components = []
    for _ in range(3):
        noise = sitk.GetImageFromArray(rng.normal(size=[n + 2 * pad for n in size[::-1]]))
        noise.SetSpacing([spacing] * 3)
        smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, DEFORM_SIGMA_MM))
        components.append(smooth[pad:-pad, pad:-pad, pad:-pad])
    u = np.stack(components, axis=-1)

    def field_transform(values: np.ndarray) -> sitk.DisplacementFieldTransform:
        field = sitk.GetImageFromArray(values.astype(np.float64), isVector=True)
        field.SetSpacing([spacing] * 3)
        field.SetOrigin(fixed.GetOrigin())
        field.SetDirection(fixed.GetDirection())
        return sitk.DisplacementFieldTransform(field)

    raw = np.linalg.norm(map_points(field_transform(u), brain) - brain, axis=1)
    scale = DEFORM_MEAN_MM / float(raw.mean())
    u *= scale
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field_transform(u).GetDisplacementField()))
    disp = raw * scale
    axis = random_oblique_axis(rng)
    deg = rng.uniform(2, 5)
    scales = rng.uniform(0.97, 1.03, size=3)
    shift = random_shift(rng, 2, 5)
    lin = affine(rotation_matrix(axis, deg) @ np.diag(scales), centre, shift)
    tx = sitk.CompositeTransform([lin, field_transform(u)])  # applies the last first: T(x) = A(D(x))
    return tx, {
        "kind": "composite",
        "formula": "T(x) = A(D(x)), D(x) = x + u(x)",
        "field": {
            "what": "Gaussian-smoothed white noise per component, linearly interpolated",
            "grid_spacing_mm": spacing,
            "grid_size": size,
            "smoothing_sigma_mm": DEFORM_SIGMA_MM,
            "noise_padding_voxels": pad,
            "noise_to_mm_scale": scale,
            "brain_displacement_mean_mm": float(disp.mean()),
            "brain_displacement_max_mm": float(disp.max()),
            "brain_displacement_p90_mm": float(np.percentile(disp, 90)),
            "jacobian_min": float(jac.min()),
            "jacobian_max": float(jac.max()),
        },
        "A": {
            "rotation_axis": axis.tolist(),
            "rotation_deg": float(deg),
            "scales": scales.tolist(),
            "c": centre.tolist(),
            "t": shift.tolist(),
            "formula": "M = R @ diag(scales)",
        },
    }


def write_case(
    folder: Path,
    name: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_pts: np.ndarray,
    moving_pts: np.ndarray,
    meta: dict,
    tx: sitk.Transform | None,
) -> None:
    import yaml

    from autoreg.landmarks import write_landmarks_csv

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(fixed, str(folder / "fixed.nii.gz"), useCompression=True)
    sitk.WriteImage(moving, str(folder / "moving.nii.gz"), useCompression=True)
    write_landmarks_csv(folder / "fixed_landmarks.csv", fixed_pts)
    write_landmarks_csv(folder / "moving_landmarks.csv", moving_pts)
    if tx is not None:
        sitk.WriteTransform(tx, str(folder / ground_truth_name(tx)))
    pair = {
        "name": name,
        "fixed": "fixed.nii.gz",
        "moving": "moving.nii.gz",
        "landmarks": {"fixed": "fixed_landmarks.csv", "moving": "moving_landmarks.csv"},
        "stages": STAGES[name],
    }
    (folder / "pair.yaml").write_text(yaml.safe_dump(pair, sort_keys=False), encoding="utf-8")
    meta = {
        **meta,
        "images": {
            k: {
                "size": list(im.GetSize()),
                "spacing": list(im.GetSpacing()),
                "origin": list(im.GetOrigin()),
                "direction": list(im.GetDirection()),
            }
            for k, im in (("fixed", fixed), ("moving", moving))
        },
        "ground_truth_file": ground_truth_name(tx) if tx is not None else None,
        "n_landmarks": int(len(fixed_pts)),
        "initial_tre_mm": tre_summary(fixed_pts - moving_pts),
    }
    (folder / "SOURCE.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (folder / "SOURCE.txt").write_text(source_text(name, meta), encoding="utf-8")


def ground_truth_name(tx: sitk.Transform) -> str:
    return "ground_truth.h5" if tx.GetName() == "CompositeTransform" else "ground_truth.tfm"


def source_text(name: str, meta: dict) -> str:
    lines = [
        f"Case {name} of the autoreg 3D benchmark set, made by benchmarks/make_3d_set.py "
        f"(seed {meta['seed']}, shrink {meta['shrink']}).",
        f"Source volume: {meta['source']} (sha256 {meta['source_sha256'][:16]}...).",
        meta["how"],
        "Convention: T maps fixed physical points (LPS mm) to moving ones; moving(T(x)) ~ fixed(x); "
        "moving_landmarks = T(fixed_landmarks); TRE_i = |T(fixed_i) - moving_i|.",
        f"Initial TRE (identity), mm: {json.dumps(meta['initial_tre_mm'])}.",
        "Every parameter (transform, grids, remapping, landmark sampling) is in SOURCE.json; T is in "
        f"{meta['ground_truth_file']} (SimpleITK.ReadTransform)."
        if meta.get("transform")
        else "",
    ]
    return "\n".join(ln for ln in lines if ln) + "\n"


def build_case(name: str, out: Path, seed: int, shrink: int) -> dict:
    """Build one case folder; returns its SOURCE.json content."""
    t0 = time.perf_counter()
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    if name == "afids":
        return copy_afids(folder, seed, shrink)
    # one independent, reproducible stream per case, whatever else is built
    rng = np.random.default_rng([seed, CASES.index(name)])
    source, source_path = read_source(shrink)
    brain = brain_points(source)
    centre = brain.mean(axis=0)
    meta: dict = {
        "case": name,
        "seed": seed,
        "shrink": shrink,
        "source": f"{SOURCE_PAIR}/fixed.nii.gz",
        "source_sha256": sha256(source_path),
        "stages": STAGES[name],
        "landmark_sampling": {
            "n": N_LANDMARKS,
            "depth_mm": LANDMARK_DEPTH_MM,
            "brain_fraction_of_p99": BRAIN_FRACTION,
            "method": "farthest-point over a seeded 20000-voxel subset, seeded start, jitter U(-0.5, 0.5) voxel",
        },
    }
    if name == "mmdef3d":
        tx, meta["transform"] = deformable_transform(source, rng, centre, brain)
        fixed = resample(source, source, tx)
        moving, meta["intensity_remap"] = remap_intensities(source, rng)
        meta["how"] = (
            "fixed = source resampled through T on the source grid (cubic BSpline interpolation); "
            "moving = source with intensities remapped non-monotonically plus Gaussian noise."
        )
    else:
        tx, meta["transform"] = linear_transform(name, rng, centre)
        inverse = tx.GetInverse()
        fixed = source
        spacing = list(source.GetSpacing())
        if name == "aniso3d":
            spacing[2] *= ANISO_FACTOR
        grid = grid_containing(map_points(tx, brain), source, tuple(spacing))
        if name == "aniso3d":
            moving, meta["anti_aliasing"] = anisotropic(source, inverse, grid)
        else:
            moving = resample(source, grid, inverse)
        meta["how"] = (
            "fixed = source; moving = source resampled through T^-1 (exact inverse) on a grid holding the "
            f"transformed brain plus {GRID_MARGIN_MM} mm (cubic BSpline interpolation)"
            + (
                "; anti-aliased along z (Gaussian slice profile) before keeping every third slice."
                if name == "aniso3d"
                else "."
            )
        )
    fixed_pts = sample_landmarks(fixed, rng)
    moving_pts = map_points(tx, fixed_pts)
    write_case(folder, name, fixed, moving, fixed_pts, moving_pts, meta, tx)
    log.info("%s built in %.1f s", name, time.perf_counter() - t0)
    return json.loads((folder / "SOURCE.json").read_text())


def copy_afids(folder: Path, seed: int, shrink: int) -> dict:
    """The real pair as is (the shrunk test copy shrinks its images and keeps the landmarks)."""
    src = SHARED_DATA / SOURCE_PAIR
    fixed = sitk.ReadImage(str(src / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(src / "moving.nii.gz"))
    if shrink > 1:
        fixed, moving = (sitk.Shrink(im, [shrink] * 3) for im in (fixed, moving))
    from autoreg.landmarks import read_landmarks

    fp = read_landmarks(src / "fixed_landmarks.csv", dim=3)
    mp = read_landmarks(src / "moving_landmarks.csv", dim=3)
    meta = {
        "case": "afids",
        "seed": seed,
        "shrink": shrink,
        "source": SOURCE_PAIR,
        "source_sha256": sha256(src / "fixed.nii.gz"),
        "stages": STAGES["afids"],
        "how": "the real AFIDs pair (fixed MNI152, moving Colin27) and its 32 real landmarks, copied as is; "
        "no ground-truth transform. The original SOURCE.txt follows.",
        "transform": None,
    }
    write_case(folder, "afids", fixed, moving, fp, mp, meta, None)
    if shrink == 1:  # byte copies: the real files, not a re-encoding
        for f in ("fixed.nii.gz", "moving.nii.gz", "fixed_landmarks.csv", "moving_landmarks.csv"):
            shutil.copyfile(src / f, folder / f)
    with open(folder / "SOURCE.txt", "a", encoding="utf-8") as fh:
        fh.write("\n" + (src / "SOURCE.txt").read_text(encoding="utf-8"))
    return json.loads((folder / "SOURCE.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, seed: int = 0, shrink: int = 1, only: list[str] | None = None) -> dict[str, dict]:
    out.mkdir(parents=True, exist_ok=True)
    return {name: build_case(name, out, seed, shrink) for name in CASES if not only or name in only}


def ensure(out: Path, name: str) -> Path:
    """Case ``name``'s folder under ``out``, built (seed 0, full size) only when it holds no pair.yaml yet."""
    if not (out / name / "pair.yaml").is_file():
        build(out, only=[name])
    return out / name


# ------------------------------------------------------------------------------------------------ check


def mattes(fixed: sitk.Image, moving: sitk.Image, tx: sitk.Transform, mask: sitk.Image) -> float:
    """Mattes MI (ITK's sign: lower is better) of fixed against moving resampled through tx onto the fixed grid,
    over the fixed brain mask, on a fixed random sample so that values are comparable. (Resampled first: ITK's
    metric refuses a composite ending in a displacement field whose grid is not the fixed image's.)"""
    warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, 7)
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.Transform(3, sitk.sitkIdentity))
    return float(reg.MetricEvaluate(fixed, warped))


def check_case(folder: Path) -> dict:
    """Load a case through autoreg's config and data code; TRE of T and of the identity; MI of the images at T."""
    from autoreg.config import load_config
    from autoreg.data import load_pair
    from autoreg.scoring import tre

    meta = json.loads((folder / "SOURCE.json").read_text())
    pair = load_pair(load_config(folder / "pair.yaml").pairs[0])
    identity = sitk.Transform(3, sitk.sitkIdentity)
    before = tre(identity, pair.fixed_points, pair.moving_points, pair.fixed)
    row = {
        "case": folder.name,
        "fixed_size": list(pair.fixed.GetSize()),
        "fixed_spacing": list(pair.fixed.GetSpacing()),
        "moving_size": list(pair.moving.GetSize()),
        "moving_spacing": list(pair.moving.GetSpacing()),
        "n": before.n,
        "identity": before.as_dict(),
        "identity_matches_build": abs(before.mean - meta["initial_tre_mm"]["mean"]) < 1e-6,
    }
    if not meta.get("ground_truth_file"):
        return row
    gt_path = folder / meta["ground_truth_file"]
    gt = sitk.ReadTransform(str(gt_path))
    row["ground_truth_tre"] = tre(gt, pair.fixed_points, pair.moving_points, pair.fixed).as_dict()
    mask = brain_mask(pair.fixed)
    step = 2.0 * max(pair.fixed.GetSpacing())
    others: dict[str, sitk.Transform] = {"identity": identity}
    for axis in range(3):
        for sign in (-1, 1):
            delta = [0.0, 0.0, 0.0]
            delta[axis] = sign * step
            others[f"T shifted {sign * step:+g} mm along {'xyz'[axis]}"] = sitk.CompositeTransform(
                [gt, sitk.TranslationTransform(3, delta)]
            )
    if meta["transform"]["kind"] == "affine":
        others["T^-1 (the other convention)"] = gt.GetInverse()
    at_gt = mattes(pair.fixed, pair.moving, gt, mask)
    values = {k: mattes(pair.fixed, pair.moving, t, mask) for k, t in others.items()}
    row["mi_at_truth"] = at_gt
    row["mi_others"] = values
    row["truth_is_best"] = all(at_gt < v for v in values.values())
    return row


def check(out: Path) -> list[dict]:
    rows = [check_case(out / name) for name in CASES if (out / name / "pair.yaml").exists()]
    return rows


def print_check(rows: list[dict]) -> bool:
    print(
        "| case | fixed size @ spacing | moving size @ spacing | n | initial TRE mean / median / p90 / max (mm) "
        "| TRE of T (mm) | MI at T best |"
    )
    print("|---|---|---|---:|---|---:|---|")
    ok = True
    for r in rows:
        i = r["identity"]
        gt = r.get("ground_truth_tre")
        fmt = "{}x{}x{} @ {:g}x{:g}x{:g}"
        line = (
            f"| {r['case']} | {fmt.format(*r['fixed_size'], *r['fixed_spacing'])} | "
            f"{fmt.format(*r['moving_size'], *r['moving_spacing'])} | {r['n']} | "
            f"{i['mean']:.2f} / {i['median']:.2f} / {i['p90']:.2f} / {i['max']:.2f} |"
        )
        if gt:
            worst = min(r["mi_others"].values())
            line += f" {gt['max']:.1e} | {r['truth_is_best']} ({r['mi_at_truth']:.4f} vs best other {worst:.4f}) |"
            ok &= gt["max"] < 1e-3 and r["truth_is_best"]
        else:
            line += " - (real landmarks) | - |"
        ok &= r["identity_matches_build"]
        print(line)
    print("conventions OK" if ok else "CHECK FAILED")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=int, default=1, help="shrink the source K times (fast test copies)")
    ap.add_argument("--only", default="", help="comma-separated cases (default: all of " + ", ".join(CASES) + ")")
    ap.add_argument("--check", action="store_true", help="only check the cases already built in --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require_shared_data()
    out = Path(args.out)
    if not args.check:
        t0 = time.perf_counter()
        build(out, args.seed, args.shrink, [c for c in args.only.split(",") if c] or None)
        print(f"# built in {time.perf_counter() - t0:.0f} s under {out}")
    ok = print_check(check(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
