"""A trial's seconds, predicted before it runs from its levels, samples, iterations and transform size.

The coefficients are measured on the machine the study runs on (``calibrate``: registrations and Demons iterations
on a synthetic volume, about two seconds) and the prediction is then corrected by the trials that finished
(``corrected``: the median of measured over predicted seconds), which absorbs what the probe cannot see (cache
effects of large images, optimizers that converge early). What the model knows, from ITK's source and measurements
on a 182x218x182 brain:

* per sample and iteration, a linear transform costs a few microseconds; a BSpline transform fills a dense Jacobian
  over all its parameters, so its cost grows with the number of control points;
* every level's setup passes over its voxels (sampling, the metric's histograms), and a gradient image costs about a
  microsecond per voxel;
* ITK's own pyramid smooths both full-resolution images at every level, and computes the moving image's gradient at
  full resolution; prepared levels pay only for their own (cached) voxels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .registration import BEST_STARTS, bspline_mesh, itk_threads, level_sizes, search_work
from .registration.fields import field_shape
from .registration.pyramid import sampled_points

#: Function evaluations per iteration, by optimizer (line searches evaluate several times).
EVALUATIONS_PER_ITERATION = {
    "gradient_descent": 1.0,
    "regular_step_gd": 1.0,
    "cg_line_search": 3.0,
    "lbfgsb": 1.5,
    "lbfgs2": 1.5,
    "demons": 1.0,
}
#: LBFGS2's ``number_of_iterations: 0`` means "until convergence": counted as this many.
UNBOUNDED_ITERATIONS = 500
#: Trials whose prediction is off by more than this factor either way do not correct the model (crashes, cuts).
_TRUSTED_RATIO = 20.0


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work on this machine, at ``threads`` ITK threads."""

    threads: int = 1
    setup_s_per_voxel: float = 6e-8
    gradient_s_per_voxel: float = 6e-7
    smooth_s_per_voxel: float = 2e-7
    linear_s_per_sample: float = 2.5e-6
    bspline_s_per_sample: float = 4e-6
    bspline_s_per_sample_parameter: float = 3.5e-8
    #: Gaussian smoothing of a displacement field's update and total field, per field voxel and iteration.
    field_s_per_voxel: float = 2e-7
    #: One iteration of SimpleITK's Demons filters (force, update, both smoothings), per field voxel: far cheaper
    #: than a v4 metric's sample, which priced a Demons trial at 3-7x its seconds and pruned it unrun.
    demons_s_per_voxel: float = 2e-7
    diffeomorphic_demons_s_per_voxel: float = 3.5e-7
    level_overhead_s: float = 0.01

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    # --- prediction ----------------------------------------------------------------------------------------

    def predict(
        self,
        recipe: Any,
        fixed_sizes: Sequence[tuple[int, ...]],
        spacings: Sequence[tuple[float, ...]] | None = None,
    ) -> float:
        """Seconds to register every pair (given by its fixed image's size and spacing) with ``recipe``, at most."""
        spacings = spacings or [None] * len(fixed_sizes)
        return sum(self.predict_pair(recipe, size, spacing) for size, spacing in zip(fixed_sizes, spacings))

    def predict_pair(self, recipe: Any, size: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> float:
        full = float(np.prod(size))
        seconds = self.setup_s_per_voxel * full  # the centres' initializer: one pass over the images
        search = recipe.initializer.rotation_search
        if search is not None:
            evaluations, points = search_work(search, size)
            starts = len(BEST_STARTS) if recipe.initializer.kind == "best" else 1  # each start searches
            seconds += starts * evaluations * points * self.linear_s_per_sample * 0.5  # values only, no derivatives
        for stage in recipe.stages:
            seconds += self._stage(stage, size, spacing or (1.0,) * len(size))
        return seconds

    def _stage(self, stage: Any, size: tuple[int, ...], spacing: tuple[float, ...]) -> float:
        p = stage.pyramid
        iterations = stage.optimizer.number_of_iterations or UNBOUNDED_ITERATIONS
        meshes = _bspline_meshes(stage, size) if stage.transform.kind == "bspline" else None
        seconds = 0.0
        grid = _Size(size, spacing)
        for level, level_size in enumerate(level_sizes(grid, p.shrink_factors, prepared=p.shrink_images)):
            voxels = int(np.prod(level_size))
            parameters = len(size) * int(np.prod([m + 3 for m in meshes[level]])) if meshes else None
            if stage.transform.kind == "displacement":  # the field's grid is the level's sampling domain
                step = getattr(stage.transform, "grid_spacing", 1.0)
                voxels = _field_voxels(size, spacing, p.shrink_factors[level], step)
                parameters = len(size) * voxels
            setup, iteration = self.level_seconds(
                stage,
                voxels=voxels,
                full_voxels=int(np.prod(size)),
                samples=sampled_points(stage.sampling, voxels),
                parameters=parameters,
            )
            seconds += setup + iterations * iteration
        return seconds

    def level_seconds(
        self, stage: Any, *, voxels: int, full_voxels: int, samples: int, parameters: int | None
    ) -> tuple[float, float]:
        """(setup, one iteration) of a stage's level: the engine asks before it starts a level, so that one that
        would not fit the time left is not begun (an iteration cannot be interrupted)."""
        gradient = stage.metric.use_moving_image_gradient_filter or stage.metric.use_fixed_image_gradient_filter
        setup = self.level_overhead_s + self.setup_s_per_voxel * voxels
        if stage.pyramid.shrink_images:
            setup += self.gradient_s_per_voxel * voxels if gradient else 0.0
        else:  # ITK smooths both full-resolution images and differentiates the moving one at every level
            setup += 2 * self.smooth_s_per_voxel * full_voxels + (
                self.gradient_s_per_voxel * full_voxels if gradient else 0.0
            )
        per_sample = self.linear_s_per_sample
        per_iteration = 0.0
        if stage.transform.kind == "bspline" and parameters:
            per_sample = self.bspline_s_per_sample + self.bspline_s_per_sample_parameter * parameters
        elif stage.transform.kind == "displacement" and stage.optimizer.kind == "demons":
            diffeomorphic = stage.optimizer.variant == "diffeomorphic"
            per_voxel = self.diffeomorphic_demons_s_per_voxel if diffeomorphic else self.demons_s_per_voxel
            return setup, per_voxel * voxels  # the filter at every voxel of the field, not a metric's samples
        elif stage.transform.kind == "displacement":  # local support: smoothing the field is the cost
            per_iteration = self.field_s_per_voxel * voxels
        evaluations = EVALUATIONS_PER_ITERATION.get(stage.optimizer.kind, 1.0)
        if getattr(stage.transform, "symmetric", False):
            # two metric passes per step, each on images warped afresh (their gradients too), and four field
            # resamplings: both images, both halves composed with their updates
            fresh = setup - self.level_overhead_s
            return setup, 2 * (samples * per_sample + fresh) + 4 * per_iteration
        return setup, evaluations * samples * per_sample + per_iteration

    # --- learning from finished trials ----------------------------------------------------------------------

    def corrected(self, ratios: Iterable[float]) -> float:
        """The factor to multiply predictions with: the median measured/predicted ratio of finished trials (1 with
        fewer than three)."""
        kept = [r for r in ratios if r > 0 and 1 / _TRUSTED_RATIO < r < _TRUSTED_RATIO]
        return float(np.median(kept)) if len(kept) >= 3 else 1.0

    # --- measuring ------------------------------------------------------------------------------------------

    @classmethod
    def calibrate(cls, threads: int = 1) -> CostModel:
        """Measure the coefficients here: short registrations and Demons iterations on a synthetic 64^3 volume (about
        two seconds)."""
        from .synthetic import make_pair

        pair = make_pair((64, 64, 64), transform="affine", seed=7, n_landmarks=4)
        fixed, moving = pair.fixed, pair.moving
        voxels = float(np.prod(fixed.GetSize()))
        with itk_threads(threads):
            setup = _timed(fixed, moving, sitk.AffineTransform(3), 2000, 1)
            linear = (_timed(fixed, moving, sitk.AffineTransform(3), 4000, 21) - setup) / (20 * 4000)
            gradient = max(0.0, _timed(fixed, moving, sitk.AffineTransform(3), 2000, 1, gradient=True) - setup) / voxels
            small, large = (sitk.BSplineTransformInitializer(fixed, [m] * 3) for m in (2, 5))
            b_small = (
                _timed(fixed, moving, small, 1000, 6)
                - _timed(fixed, moving, sitk.BSplineTransformInitializer(fixed, [2] * 3), 1000, 1)
            ) / (5 * 1000)
            b_large = (
                _timed(fixed, moving, large, 1000, 6)
                - _timed(fixed, moving, sitk.BSplineTransformInitializer(fixed, [5] * 3), 1000, 1)
            ) / (5 * 1000)
            t0 = time.perf_counter()
            sitk.SmoothingRecursiveGaussian(fixed, 1.0)
            smooth = (time.perf_counter() - t0) / voxels
            field = (_timed_field(fixed, moving, 6) - _timed_field(fixed, moving, 1)) / (5 * voxels)
            fixed32 = sitk.Cast(fixed, sitk.sitkFloat32)  # Demons takes both images on one grid, as the engine does
            on_grid = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            demons = {
                variant: (_timed_demons(fixed32, on_grid, variant, 4) - _timed_demons(fixed32, on_grid, variant, 1))
                / (3 * voxels)
                for variant in ("fast_symmetric_forces", "diffeomorphic")
            }
        p_small, p_large = 3 * 5**3, 3 * 8**3
        slope = max(1e-10, (b_large - b_small) / (p_large - p_small))
        return cls(
            threads=threads,
            setup_s_per_voxel=max(1e-9, setup / voxels),
            gradient_s_per_voxel=max(1e-9, gradient),
            smooth_s_per_voxel=max(1e-9, smooth),
            linear_s_per_sample=max(1e-8, linear),
            bspline_s_per_sample=max(1e-8, b_small - slope * p_small),
            bspline_s_per_sample_parameter=slope,
            field_s_per_voxel=max(1e-10, field),
            demons_s_per_voxel=max(1e-10, demons["fast_symmetric_forces"]),
            diffeomorphic_demons_s_per_voxel=max(1e-10, demons["diffeomorphic"]),
        )


class _Size:
    """Just enough of an image for ``level_sizes``."""

    def __init__(self, size: tuple[int, ...], spacing: tuple[float, ...] | None = None):
        self.size = tuple(size)
        self.spacing = tuple(spacing) if spacing is not None else (1.0,) * len(self.size)

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802 - SimpleITK's name
        return self.size

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802 - SimpleITK's name
        return self.spacing


def _field_voxels(size: tuple[int, ...], spacing: tuple[float, ...], shrink: int, grid_spacing: float) -> int:
    """Voxels of a displacement field's grid at a level, in the normalised frame (a voxel measures about one unit)."""
    voxel = np.asarray(spacing, float) / float(np.exp(np.mean(np.log(spacing))))
    return int(np.prod(field_shape(size, voxel, shrink, grid_spacing)))


def _bspline_meshes(stage: Any, size: tuple[int, ...]) -> list[list[int]]:
    """The BSpline mesh at each level (the stage's grid, or its coarse-to-fine schedule)."""
    mesh = bspline_mesh(stage, _geometry(size))
    levels = len(stage.pyramid.shrink_factors)
    if not getattr(stage.transform, "refine", False) or levels < 2:
        return [mesh] * levels
    step = 2 ** (levels - 1)
    start = [max(1, -(-m // step)) for m in mesh]
    return [[m * 2**level for m in start] for level in range(levels)]


def _geometry(size: tuple[int, ...]) -> Any:
    """A stand-in with an image's size and unit spacing (``bspline_mesh`` reads nothing else)."""

    class _G(_Size):
        def GetDimension(self) -> int:  # noqa: N802
            return len(self.size)

        def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
            return (1.0,) * len(self.size)

    return _G(size)


def _timed(
    fixed: sitk.Image, moving: sitk.Image, tx: sitk.Transform, points: int, iterations: int, *, gradient: bool = False
) -> float:
    rm = sitk.ImageRegistrationMethod()
    rm.SetMetricAsMattesMutualInformation(32)
    rm.SetMetricSamplingStrategy(rm.RANDOM)
    rm.SetMetricSamplingPercentage(min(1.0, points / float(np.prod(fixed.GetSize()))), 1)
    rm.SetMetricUseFixedImageGradientFilter(gradient)
    rm.SetMetricUseMovingImageGradientFilter(gradient)
    rm.SetOptimizerAsGradientDescent(1e-3, iterations, 1e-12, 1000, estimateLearningRate=rm.Never)
    rm.SetInitialTransform(tx, inPlace=True)
    t0 = time.perf_counter()
    rm.Execute(fixed, moving)
    return time.perf_counter() - t0


def _timed_field(fixed: sitk.Image, moving: sitk.Image, iterations: int) -> float:
    """A displacement field on the fixed grid, few samples: what its smoothing costs per iteration."""
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
    field.CopyInformation(fixed)
    tx = sitk.DisplacementFieldTransform(field)
    tx.SetSmoothingGaussianOnUpdate(1.5, 1.0)
    rm = sitk.ImageRegistrationMethod()
    rm.SetMetricAsMeanSquares()
    rm.SetMetricSamplingStrategy(rm.RANDOM)
    rm.SetMetricSamplingPercentage(0.002, 1)
    rm.SetOptimizerAsGradientDescent(1e-3, iterations, 1e-12, 1000, estimateLearningRate=rm.Never)
    rm.SetInitialTransform(tx, inPlace=True)
    t0 = time.perf_counter()
    rm.Execute(fixed, moving)
    return time.perf_counter() - t0


def _timed_demons(fixed: sitk.Image, moving: sitk.Image, variant: str, iterations: int) -> float:
    """Seconds of ``iterations`` of a Demons filter over the image, both fields smoothed (the engine's way)."""
    demons = (
        sitk.DiffeomorphicDemonsRegistrationFilter()
        if variant == "diffeomorphic"
        else sitk.FastSymmetricForcesDemonsRegistrationFilter()
    )
    demons.SetNumberOfIterations(iterations)
    demons.SetMaximumRMSError(0.0)
    demons.SetSmoothDisplacementField(True)
    demons.SetSmoothUpdateField(True)
    t0 = time.perf_counter()
    demons.Execute(fixed, moving)
    return time.perf_counter() - t0


def time_limit(predicted_s: float, *, factor: float, floor_s: float) -> float:
    """A trial's limit: ``factor`` times its prediction (the model's error and the machine's noise), at least
    ``floor_s``."""
    return max(floor_s, factor * predicted_s) if math.isfinite(predicted_s) else floor_s
