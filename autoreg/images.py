"""Pictures of an alignment: fixed against (warped) moving as a checkerboard and a colour overlay, as PNG bytes.

2D pairs give one view; 3D pairs three orthogonal slices through the landmarks' centre (the image centre without
landmarks), each at a whole voxel index of the fixed image so that it can be named (``axial z=91``). Each view
is resampled onto a square-pixel grid in the fixed image's physical frame, so anisotropic voxels look right and
the moving image is sampled through the transform directly (no full 3D warp). Intensities are windowed per image
between percentiles, so modalities of any range show.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Longest side of one view in pixels: big enough to judge edges, small enough for an HTML report.
VIEW_PIXELS = 320
#: Intensity window (percentiles) for display.
WINDOW_PERCENTILES = (1.0, 99.0)
#: Checkerboard squares along the longest side of a view.
CHECKER_SQUARES = 8
#: Grey gap between panels.
GAP_PIXELS = 4

_AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
_AXIS_LETTERS = "xyz"


def physical_unit(image: sitk.Image) -> str:
    """The unit that lengths in ``image``'s physical space (TRE, landmarks) are named in: ``px`` for a 2D picture
    without geometry (spacing 1, origin 0, as PNG, JPEG and BMP files load), else ``mm`` (ITK's convention)."""
    plain = (
        image.GetDimension() == 2
        and all(s == 1.0 for s in image.GetSpacing())
        and all(o == 0.0 for o in image.GetOrigin())
    )
    return "px" if plain else "mm"


@dataclass(frozen=True)
class View:
    """One 2D view: fixed and moving intensities (floats on the same grid); for a 3D slice, its plane's name, the
    fixed image's index axis it cuts across and the index there (``size``: voxels along that axis)."""

    name: str
    fixed: np.ndarray
    moving: np.ndarray
    axis: str | None = None
    index: int | None = None
    size: int | None = None

    @property
    def label(self) -> str:
        """``axial z=91``; empty for the single view of a 2D image."""
        return f"{self.name} {self.axis}={self.index}" if self.axis is not None else ""


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint8 array as PNG with SimpleITK's PNG writer (through a temporary file)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) array, got shape {rgb.shape}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
        return path.read_bytes()


def window(
    values: np.ndarray, reference: np.ndarray | None = None, percentiles: Sequence[float] = WINDOW_PERCENTILES
) -> np.ndarray:
    """Scale to 0..1 between the percentiles of ``reference`` (default: the values), clipped."""
    ref = values if reference is None else reference
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return np.zeros_like(values, dtype=float)
    lo, hi = np.percentile(ref, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def landmark_centre(image: sitk.Image, points: np.ndarray | None) -> tuple[float, ...]:
    """The landmarks' mean (physical); the image's centre when there are none."""
    if points is not None and len(points):
        return tuple(float(c) for c in np.mean(np.asarray(points, dtype=float), axis=0))
    centre_index = [(s - 1) / 2.0 for s in image.GetSize()]
    return tuple(image.TransformContinuousIndexToPhysicalPoint(centre_index))


def _pixel_size(fixed: sitk.Image) -> float:
    """One pixel size for every view of an image (physical units): its longest extent spans ``VIEW_PIXELS``."""
    size = np.asarray(fixed.GetSize(), dtype=float)
    spacing = np.asarray(fixed.GetSpacing(), dtype=float)
    return max(float(np.max((size - 1) * spacing)), 1e-12) / (VIEW_PIXELS - 1)


def _plane_grid(fixed: sitk.Image, normal_axis: int | None, centre_index: Sequence[float]) -> sitk.Image:
    """A one-voxel-thick (3D) or flat (2D) grid with square pixels covering the fixed image's plane."""
    dim = fixed.GetDimension()
    size = np.asarray(fixed.GetSize(), dtype=float)
    spacing = np.asarray(fixed.GetSpacing(), dtype=float)
    pixel = _pixel_size(fixed)
    new_size, new_spacing, start = [], [], []
    for a in range(dim):
        if a == normal_axis:
            new_size.append(1)
            new_spacing.append(spacing[a])
            start.append(float(centre_index[a]))
        else:
            new_size.append(int(np.floor((size[a] - 1) * spacing[a] / pixel + 1e-6)) + 1)
            new_spacing.append(pixel)
            start.append(0.0)
    grid = sitk.Image([int(n) for n in new_size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in new_spacing])
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint(start))
    return grid


def _sample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """``image`` seen through ``transform`` on ``grid``, as a 2D float array (NaN outside the image)."""
    out = sitk.Resample(image, grid, transform, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).squeeze()


def views(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None, points: np.ndarray | None = None
) -> list[View]:
    """Fixed and moving-through-``transform`` (fixed -> moving points; identity if None) on matching 2D grids."""
    dim = fixed.GetDimension()
    transform = transform if transform is not None else sitk.Transform(dim, sitk.sitkIdentity)
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    if dim == 2:
        grid = _plane_grid(fixed, None, (0.0, 0.0))
        return [View("", _sample(fixed, grid, identity), _sample(moving, grid, transform))]
    centre = fixed.TransformPhysicalPointToContinuousIndex(landmark_centre(fixed, points))
    size = fixed.GetSize()
    centre = [float(np.clip(round(c), 0, s - 1)) for c, s in zip(centre, size)]  # whole voxels: a slice is named
    out = []
    for normal in (2, 1, 0):
        grid = _plane_grid(fixed, normal, centre)
        f, m = _sample(fixed, grid, identity), _sample(moving, grid, transform)
        if normal != 2:  # rows run along the third index axis: put its end (superior in LPS) on top
            f, m = np.flipud(f), np.flipud(m)
        out.append(View(_AXIS_NAMES[normal], f, m, _AXIS_LETTERS[normal], int(centre[normal]), int(size[normal])))
    return out


def _display(view: View, fixed_ref: np.ndarray, moving_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.nan_to_num(window(view.fixed, fixed_ref), nan=0.0)
    m = np.nan_to_num(window(view.moving, moving_ref), nan=0.0)
    return f, m


def checkerboard(f: np.ndarray, m: np.ndarray, squares: int = CHECKER_SQUARES) -> np.ndarray:
    """Alternate squares of fixed and moving (grey, 0..1 in, uint8 RGB out): edges must continue across squares."""
    tile = max(4, int(round(max(f.shape) / squares)))
    yy, xx = np.indices(f.shape)
    use_fixed = ((yy // tile) + (xx // tile)) % 2 == 0
    grey = np.where(use_fixed, f, m)
    return np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def colour_overlay(f: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Fixed in magenta, moving in green: aligned structures turn grey/white, misaligned ones coloured."""
    rgb = np.stack([f, m, f], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _grid_of(panels: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of RGB panels (rows may differ in size) on a dark grey canvas."""
    heights = [max(p.shape[0] for p in row) for row in panels]
    widths = [sum(p.shape[1] for p in row) + GAP_PIXELS * (len(row) - 1) for row in panels]
    canvas = np.full((sum(heights) + GAP_PIXELS * (len(panels) - 1), max(widths), 3), 40, dtype=np.uint8)
    y = 0
    for row, h in zip(panels, heights):
        x = 0
        for p in row:
            canvas[y : y + p.shape[0], x : x + p.shape[1]] = p
            x += p.shape[1] + GAP_PIXELS
        y += h + GAP_PIXELS
    return canvas


def view_rows(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None, points: np.ndarray | None = None
) -> list[tuple[View, np.ndarray]]:
    """Per view (1 in 2D, axial/coronal/sagittal in 3D): the view and one RGB row, checkerboard and colour overlay."""
    fixed_ref = _subsample(sitk.GetArrayViewFromImage(fixed))
    moving_ref = _subsample(sitk.GetArrayViewFromImage(moving))
    out = []
    for view in views(fixed, moving, transform, points):
        f, m = _display(view, fixed_ref, moving_ref)
        out.append((view, _grid_of([[checkerboard(f, m), colour_overlay(f, m)]])))
    return out


def comparison_rgb(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None, points: np.ndarray | None = None
) -> np.ndarray:
    """One RGB picture: the rows of :func:`view_rows` stacked (one in 2D; axial, coronal, sagittal in 3D)."""
    return _grid_of([[rgb] for _, rgb in view_rows(fixed, moving, transform, points)])


def comparison_png(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None, points: np.ndarray | None = None
) -> bytes:
    """``comparison_rgb`` encoded as PNG."""
    return png_bytes(comparison_rgb(fixed, moving, transform, points))


def view_pngs(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None, points: np.ndarray | None = None
) -> list[tuple[View, bytes]]:
    """:func:`view_rows` with each row encoded as PNG (a report captions each with its view's label)."""
    return [(view, png_bytes(rgb)) for view, rgb in view_rows(fixed, moving, transform, points)]


def _subsample(values: np.ndarray, limit: int = 1_000_000) -> np.ndarray:
    """At most about ``limit`` voxels for the percentile window (exact enough, fast on big volumes)."""
    flat = np.asarray(values).ravel()
    step = max(1, flat.size // limit)
    return flat[::step]
