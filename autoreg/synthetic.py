"""Synthetic image pairs with exactly known ground-truth transforms.

Tests and the quickstart example need registration problems whose answer is known
without shipping external data. This module draws a small anatomical-looking phantom
(body, tissue blobs, multi-scale texture), warps it with a known transform and adds
independent acquisition noise to each image.

Conventions (ITK's): the ground-truth ``transform`` maps FIXED physical points to
MOVING physical points, so ``moving(transform(x)) ~ fixed(x)``. Sizes are given in
SimpleITK order ``(x, y[, z])``; points are physical ``(x, y[, z])``.
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "TRANSFORM_KINDS",
    "MODALITIES",
    "SyntheticPair",
    "phantom",
    "make_pair",
    "write_pair",
]

TRANSFORM_KINDS = ("translation", "rigid", "affine", "bspline")
MODALITIES = ("t1", "pd")

# Tissue intensities per modality. The PD ordering is a non-monotonic remapping of
# the T1 ordering (CSF < dense < GM < WM < fat  vs  dense < WM < GM < fat < CSF),
# so a T1/PD pair needs a multi-modal metric such as mutual information.
_INTENSITY = {
    "t1": {"fat": 215.0, "wm": 165.0, "gm": 110.0, "dense": 70.0, "csf": 35.0},
    "pd": {"fat": 180.0, "wm": 115.0, "gm": 160.0, "dense": 55.0, "csf": 220.0},
}
_NOISE_SIGMA = 2.5  # acquisition noise (Rician magnitude), on the 0..255 scale
_BSPLINE_MESH = 5
_MOVING_GROW_X = 1.0625  # the moving grid is a little wider than the fixed one


@dataclass(frozen=True)
class SyntheticPair:
    """A registration problem with its exact answer.

    ``transform`` maps fixed physical points to moving physical points (ITK's
    convention), and ``moving_points[i] == transform.TransformPoint(fixed_points[i])``.
    """

    fixed: sitk.Image
    moving: sitk.Image
    transform: sitk.Transform
    fixed_points: np.ndarray
    moving_points: np.ndarray


@dataclass(frozen=True)
class _Anatomy:
    """Modality-independent phantom: painted tissue memberships and texture, numpy (z, y, x) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    layers: tuple[tuple[str, np.ndarray], ...]  # (tissue, membership in 0..1), painted in order
    body: np.ndarray  # body membership in 0..1
    texture: np.ndarray  # multiplicative texture factor around 1


# --------------------------------------------------------------------------- helpers


def _check_size(size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3):
        raise ValueError(f"size must have 2 or 3 entries, got {size!r}")
    if min(size) < 8:
        raise ValueError(f"each size entry must be >= 8, got {size!r}")
    return size


def _check_spacing(spacing: Sequence[float] | None, dim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * dim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != dim or min(spacing) <= 0:
        raise ValueError(f"spacing must have {dim} positive entries, got {spacing!r}")
    return spacing


def _sub_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent, reproducible random stream per purpose (transform, noise, landmarks)."""
    return np.random.default_rng([int(seed), stream])


def _normalized_coords(size: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Per ITK axis, the voxel-centre coordinate scaled to -1..1 across the image extent.

    Arrays have numpy shape ``size[::-1]``; entry ``i`` is ITK axis ``i``.
    """
    dim = len(size)
    shape = size[::-1]
    coords = []
    for i in range(dim):
        c = np.linspace(-1.0, 1.0, size[i]) if size[i] > 1 else np.zeros(1)
        view = [1] * dim
        view[dim - 1 - i] = size[i]
        coords.append(np.broadcast_to(c.reshape(view), shape))
    return coords


def _axis_rotation(axis: np.ndarray, angle: float, dim: int) -> np.ndarray:
    """Rotation by ``angle`` radians (2D), or about ``axis`` (3D, Rodrigues)."""
    if dim == 2:
        return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    if dim == 2:
        a = rng.uniform(0.0, 2.0 * math.pi)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _soft_ellipsoid(
    coords: list[np.ndarray],
    center: np.ndarray,
    semi_axes: np.ndarray,
    rotation: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Membership 0..1 of a rotated ellipsoid with a smooth edge about ``edge`` wide (normalized units)."""
    dim = len(coords)
    r2 = np.zeros(coords[0].shape)
    for j in range(dim):  # coordinate along the ellipsoid's own axis j
        local = sum(rotation[i, j] * (coords[i] - center[i]) for i in range(dim))
        r2 = r2 + (local / semi_axes[j]) ** 2
    signed = (np.sqrt(r2) - 1.0) * float(np.mean(semi_axes))
    return 1.0 / (1.0 + np.exp(np.clip(signed / edge, -50.0, 50.0)))


def _smoothed_noise(rng: np.random.Generator, size: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    img = sitk.GetImageFromArray(rng.normal(size=size[::-1]).astype(np.float32))
    img = sitk.SmoothingRecursiveGaussian(img, sigma_voxels)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    return (arr - arr.mean()) / max(float(arr.std()), 1e-12)


def _anatomy(size: tuple[int, ...], spacing: tuple[float, ...], seed: int) -> _Anatomy:
    """Draw the tissue geometry and texture once, so both modalities share one anatomy."""
    rng = np.random.default_rng(seed)
    dim = len(size)
    coords = _normalized_coords(size, spacing)
    extent = np.array([s * sp for s, sp in zip(size, spacing)])
    # one voxel, in normalized units (the smooth edge is about a voxel wide: partial volume)
    edge = 0.6 * float(np.mean(2.0 * np.array(spacing) / extent))

    body_axes = rng.uniform(0.66, 0.80, size=dim)
    body_center = rng.uniform(-0.03, 0.03, size=dim)
    body_rot = _axis_rotation(rng.normal(size=3), rng.uniform(-0.25, 0.25), dim)
    body = _soft_ellipsoid(coords, body_center, body_axes, body_rot, edge)
    inner = _soft_ellipsoid(coords, body_center, body_axes * 0.88, body_rot, edge)

    layers: list[tuple[str, np.ndarray]] = [("fat", body), ("wm", inner)]
    n_blobs = int(rng.integers(5, 9))
    kinds = ("gm", "gm", "dense", "csf", "csf", "gm", "dense", "csf")
    for k in range(n_blobs):
        axes = body_axes * rng.uniform(0.08, 0.28, size=dim)
        # keep the blob centre well inside the inner body
        direction = rng.normal(size=dim)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(0.15, 0.70)
        center = body_center + body_rot @ (direction * radius * body_axes * 0.88)
        rot = _random_rotation(rng, dim)
        blob = _soft_ellipsoid(coords, center, axes, rot, edge) * inner
        layers.append((kinds[k % len(kinds)], blob))

    # Texture at several scales so that mutual information has structure at each:
    # a smooth low-frequency modulation, a mid-scale and a fine (about voxel) scale.
    low = np.zeros(size[::-1])
    for _ in range(4):
        freq = rng.uniform(0.3, 1.2, size=dim) * rng.choice([-1.0, 1.0], size=dim)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        low = low + np.cos(math.pi * sum(f * c for f, c in zip(freq, coords)) + phase)
    low /= 2.0
    mid = _smoothed_noise(rng, size, 3.0)
    fine = _smoothed_noise(rng, size, 1.0)
    texture = 1.0 + 0.10 * low + 0.07 * mid + 0.06 * fine
    return _Anatomy(size, spacing, tuple(layers), body, texture)


def _render(anatomy: _Anatomy, modality: str) -> sitk.Image:
    """Paint the anatomy with a modality's tissue intensities; float32 image, origin 0."""
    if modality not in _INTENSITY:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    table = _INTENSITY[modality]
    arr = np.zeros(anatomy.size[::-1])
    for tissue, membership in anatomy.layers:
        arr = arr * (1.0 - membership) + table[tissue] * membership
    arr = np.clip(arr * anatomy.texture, 0.0, 255.0)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(anatomy.spacing)
    return img


def _add_noise(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """Rician (magnitude) noise as in MR: non-negative, background stays near 0."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    re = arr + rng.normal(0.0, _NOISE_SIGMA, size=arr.shape)
    im = rng.normal(0.0, _NOISE_SIGMA, size=arr.shape)
    out = sitk.GetImageFromArray(np.clip(np.hypot(re, im), 0.0, 255.0).astype(np.float32))
    out.CopyInformation(image)
    return out


# ------------------------------------------------------------------------ transforms


def _rotation_matrix(rng: np.random.Generator, dim: int, magnitude: float) -> np.ndarray:
    """A rotation by 8..12 degrees (times ``magnitude``) about a random axis / sign."""
    angle = math.radians(rng.uniform(8.0, 12.0)) * rng.choice([-1.0, 1.0]) * magnitude
    return _axis_rotation(rng.normal(size=3), angle, dim)


def _linear_transform(
    kind: str,
    rng: np.random.Generator,
    center: np.ndarray,
    extent: np.ndarray,
    magnitude: float,
) -> sitk.Transform:
    """Translation / rigid / affine ground truth about the fixed image centre."""
    dim = len(center)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    translation = direction * rng.uniform(0.06, 0.10) * float(np.min(extent)) * magnitude
    if kind == "translation":
        return sitk.TranslationTransform(dim, translation.tolist())
    rotation = _rotation_matrix(rng, dim, magnitude)
    if kind == "rigid":
        tx: sitk.Transform = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
        tx.SetCenter(center.tolist())
        tx.SetMatrix(rotation.ravel().tolist())
        tx.SetTranslation(translation.tolist())
        return tx
    scale = 1.0 + rng.uniform(0.02, 0.05, size=dim) * rng.choice([-1.0, 1.0], size=dim) * magnitude
    shear = np.eye(dim)
    for i in range(dim):
        for j in range(i + 1, dim):
            shear[i, j] = rng.uniform(-0.04, 0.04) * magnitude
    matrix = rotation @ shear @ np.diag(scale)
    affine = sitk.AffineTransform(dim)
    affine.SetCenter(center.tolist())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(translation.tolist())
    return affine


def _bspline(fixed: sitk.Image, rng: np.random.Generator, magnitude: float) -> sitk.BSplineTransform:
    """A smooth cubic BSpline over the fixed domain, max displacement 2..3 voxels (times ``magnitude``).

    The two outer layers of control points are zero, so the deformation fades out at the
    image border.
    """
    dim = fixed.GetDimension()
    tx = sitk.BSplineTransformInitializer(fixed, [_BSPLINE_MESH] * dim, 3)
    n = _BSPLINE_MESH + 3
    coeffs = rng.normal(size=(dim,) + (n,) * dim)
    interior = (slice(None),) + (slice(2, n - 2),) * dim
    mask = np.zeros_like(coeffs)
    mask[interior] = 1.0
    coeffs *= mask
    tx.SetParameters(coeffs.ravel().tolist())
    field = sitk.TransformToDisplacementField(
        tx,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    peak = float(np.max(np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)))
    target = rng.uniform(2.0, 3.0) * float(np.mean(fixed.GetSpacing())) * magnitude
    scale = target / peak if peak > 0 else 0.0
    tx.SetParameters((coeffs.ravel() * scale).tolist())
    return tx


def _inverse_bspline(bspline: sitk.BSplineTransform, fixed: sitk.Image) -> sitk.Transform:
    """Numerical inverse of a BSpline as a displacement field on a padded fixed grid."""
    size = fixed.GetSize()
    spacing = fixed.GetSpacing()
    pad = [max(4, int(math.ceil(0.15 * s))) for s in size]
    origin = [o - p * sp for o, p, sp in zip(fixed.GetOrigin(), pad, spacing)]
    grid = [s + 2 * p for s, p in zip(size, pad)]
    field = sitk.TransformToDisplacementField(
        bspline, sitk.sitkVectorFloat64, grid, origin, spacing, fixed.GetDirection()
    )
    inverse = sitk.InvertDisplacementField(
        field,
        maximumNumberOfIterations=100,
        maxErrorToleranceThreshold=1e-4,
        meanErrorToleranceThreshold=1e-6,
        enforceBoundaryCondition=True,
    )
    return sitk.DisplacementFieldTransform(inverse)


# ------------------------------------------------------------------------- landmarks


def _landmarks(
    rng: np.random.Generator,
    n: int,
    body: np.ndarray,
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fixed points inside the body, >= 10% of the extent from the border, whose
    images under ``transform`` also lie inside the moving grid (>= 5% from its border)."""
    dim = fixed.GetDimension()
    spacing = np.array(fixed.GetSpacing())
    origin = np.array(fixed.GetOrigin())
    size = np.array(fixed.GetSize())
    extent = (size - 1) * spacing
    m_origin = np.array(moving.GetOrigin())
    m_extent = (np.array(moving.GetSize()) - 1) * np.array(moving.GetSpacing())
    fixed_pts: list[np.ndarray] = []
    moving_pts: list[np.ndarray] = []
    for _ in range(1000):
        if len(fixed_pts) >= n:
            break
        cand = origin + extent * rng.uniform(0.10, 0.90, size=(4 * n, dim))
        for p in cand:
            idx = np.rint((p - origin) / spacing).astype(int)
            if body[tuple(idx[::-1])] < 0.9:
                continue
            q = np.array(transform.TransformPoint(p.tolist()))
            rel = (q - m_origin) / m_extent
            if np.any(rel < 0.05) or np.any(rel > 0.95):
                continue
            fixed_pts.append(p)
            moving_pts.append(q)
            if len(fixed_pts) >= n:
                break
    if len(fixed_pts) < n:
        raise RuntimeError("could not place the requested landmarks inside the body")
    return np.array(fixed_pts, dtype=np.float64).reshape(n, dim), np.array(moving_pts, dtype=np.float64).reshape(n, dim)


# ------------------------------------------------------------------------ public API


def phantom(
    size: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    modality: str = "t1",
) -> sitk.Image:
    """A noise-free anatomical-looking 2D or 3D float32 image, intensities about 0..255.

    A body ellipse/ellipsoid with a bright outer layer, 5-8 internal tissue blobs and
    texture at low, mid and fine scales; background 0. ``modality="pd"`` paints the
    same anatomy (same ``seed``) with a non-monotonic remapping of the tissue
    intensities, so a T1/PD pair is multi-modal. Origin 0, identity direction.
    """
    size = _check_size(size)
    spacing = _check_spacing(spacing, len(size))
    return _render(_anatomy(size, spacing, seed), modality)


def make_pair(
    size: Sequence[int],
    *,
    transform: str = "affine",
    seed: int = 0,
    multimodal: bool = False,
    spacing: Sequence[float] | None = None,
    n_landmarks: int = 20,
    magnitude: float = 1.0,
) -> SyntheticPair:
    """A fixed/moving pair with ground truth ``transform`` (fixed -> moving points) and landmarks.

    ``transform`` is one of ``TRANSFORM_KINDS``; "bspline" is an affine composed with a
    smooth deformation (``CompositeTransform([affine, bspline])``: bspline applied first).
    Typical sizes at ``magnitude=1``: translation 6-10% of the extent, rotation 8-12
    degrees, scale and shear 2-5%, BSpline displacement 2-3 voxels.

    The moving image is the anatomy resampled through the inverse of the ground truth,
    so ``moving(transform(x)) ~ fixed(x)`` (exact for the linear kinds, up to a numerical
    inverse of the deformation for "bspline"). The moving grid is a little wider than
    the fixed one along x. ``multimodal=True`` renders the moving image as PD and the
    fixed one as T1. Each image gets independent Rician noise.
    """
    size = _check_size(size)
    dim = len(size)
    spacing = _check_spacing(spacing, dim)
    if transform not in TRANSFORM_KINDS:
        raise ValueError(f"transform must be one of {TRANSFORM_KINDS}, got {transform!r}")
    if n_landmarks < 1:
        raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
    if not (0.0 <= magnitude <= 3.0):
        raise ValueError(f"magnitude must be within 0..3, got {magnitude}")

    anatomy = _anatomy(size, spacing, seed)
    fixed_clean = _render(anatomy, "t1")
    moving_anatomy = _render(anatomy, "pd") if multimodal else fixed_clean

    extent = np.array(size) * np.array(spacing)
    center = (np.array(size) - 1) / 2.0 * np.array(spacing)
    rng_tx = _sub_rng(seed, 1)
    kind = "affine" if transform == "bspline" else transform
    linear = _linear_transform(kind, rng_tx, center, extent, magnitude)
    ground_truth: sitk.Transform = linear
    inverse = linear.GetInverse()  # exact for the linear kinds
    if transform == "bspline":
        bspline = _bspline(fixed_clean, rng_tx, magnitude)
        ground_truth = sitk.CompositeTransform([linear, bspline])  # linear(bspline(x))
        inverse = sitk.CompositeTransform([_inverse_bspline(bspline, fixed_clean), inverse])

    moving_grid = sitk.Image([int(round(size[0] * _MOVING_GROW_X)), *size[1:]], sitk.sitkFloat32)
    moving_grid.SetSpacing(spacing)
    moving_clean = sitk.Resample(
        moving_anatomy,
        moving_grid,
        inverse,
        sitk.sitkBSpline,
        0.0,
        sitk.sitkFloat32,
    )
    moving_clean = sitk.Clamp(moving_clean, sitk.sitkFloat32, 0.0, 255.0)

    rng_noise = _sub_rng(seed, 2)
    fixed = _add_noise(fixed_clean, rng_noise)
    moving = _add_noise(moving_clean, rng_noise)
    fixed_points, moving_points = _landmarks(_sub_rng(seed, 3), n_landmarks, anatomy.body, fixed, moving, ground_truth)
    return SyntheticPair(fixed, moving, ground_truth, fixed_points, moving_points)


def _write_points(path: Path, points: np.ndarray) -> None:
    header = ",".join("xyz"[: points.shape[1]])
    lines = [header] + [",".join(repr(float(v)) for v in row) for row in points]
    path.write_text("\n".join(lines) + "\n")


def write_pair(pair: SyntheticPair, folder: str | Path, *, fmt: str = "png") -> dict[str, Path]:
    """Write images and landmark CSVs; return their paths by role.

    Keys: ``fixed``, ``moving``, ``fixed_landmarks``, ``moving_landmarks``. ``fmt="png"``
    (2D only) stores uint8 (clamped to 0..255) and needs spacing 1 and origin 0, since PNG
    keeps neither; ``fmt="nii.gz"`` keeps float32 and the geometry. The CSVs have a header
    ``x,y[,z]`` and floats written at full (round-trip) precision.
    """
    if fmt not in ("png", "nii.gz"):
        raise ValueError(f"fmt must be 'png' or 'nii.gz', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for role, image in (("fixed", pair.fixed), ("moving", pair.moving)):
        path = folder / f"{role}.{fmt}"
        if fmt == "png":
            if image.GetDimension() != 2:
                raise ValueError("PNG holds 2D images only; use fmt='nii.gz' for 3D")
            if not (np.allclose(image.GetSpacing(), 1.0) and np.allclose(image.GetOrigin(), 0.0)):
                raise ValueError("PNG keeps no spacing/origin: needs spacing 1 and origin 0")
            arr = np.clip(np.rint(sitk.GetArrayFromImage(image)), 0, 255).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
        else:
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(path), useCompression=True)
        paths[role] = path
    for role, points in (("fixed", pair.fixed_points), ("moving", pair.moving_points)):
        path = folder / f"{role}_landmarks.csv"
        _write_points(path, points)
        paths[f"{role}_landmarks"] = path
    return paths
