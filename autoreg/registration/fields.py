"""Displacement fields: a dense field with local support moved by gradient descent (ITK's, or ANTs SyN's symmetric
scheme) or by one of SimpleITK's Demons filters, level by level on the field's own grid."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import SimpleITK as sitk

from .core import Clock, Halt, itk_seed
from .frame import Frame
from .method import LevelTracker, changed, close, execute, prepared_level, stage_method
from .pyramid import axis_factors, inside_share, sampled_points, sampling_fraction, sigmas_of


def field_shape(size, voxel, shrink: int, grid: float) -> list[int]:
    """Field voxels per axis at a level: as fine as the level's voxels (``axis_factors``), no finer than ``grid``
    (both in the units of ``voxel``, the fixed image's spacing); the cost model sizes fields by it too."""
    voxel = np.asarray(voxel, float)
    step = np.maximum(voxel * axis_factors(voxel, shrink), grid)
    return [int(n) for n in np.maximum(1, np.round(np.asarray(size) * voxel / step))]


def field_grid(frame: Frame, stage: Any, shrink: int) -> tuple[list[int], list[float], list[float]]:
    """(size, origin, spacing) of a displacement field covering the fixed image at one level: as fine as the level's
    voxels, but no finer than the stage's ``grid_spacing`` (in the normalised frame a fixed voxel is one unit)."""
    t = stage.transform
    grid = t.grid_spacing * (frame.k if t.spacing_units == "mm" else 1.0)
    fixed = frame.fixed
    voxel = np.asarray(fixed.GetSpacing(), float)
    size = np.asarray(field_shape(fixed.GetSize(), voxel, shrink, grid))
    spacing = np.asarray(fixed.GetSize()) * voxel / size  # the field spans exactly the fixed image's extent
    # the first field voxel's centre, half a field voxel inside the fixed image's edge, along the image's axes
    start = -0.5 * voxel + 0.5 * spacing
    direction = np.asarray(fixed.GetDirection()).reshape(fixed.GetDimension(), fixed.GetDimension())
    origin = np.asarray(fixed.GetOrigin()) + direction @ start
    return [int(n) for n in size], [float(o) for o in origin], [float(s) for s in spacing]


def run_field(
    stage: Any,
    index: int,
    frame: Frame,
    moving_initial: sitk.Transform,
    tracker: LevelTracker,
    seed: int,
    threads: int,
    clock: Clock,
) -> tuple[sitk.Transform, str]:
    """A dense displacement field with local support over prepared levels (ANTs' Gaussian displacement field): at
    each level the field lives on that level's grid (see ``field_grid``), its updates and total Gaussian-smoothed
    (variances in field voxels). ``continue``: it starts from the previous level's field, resampled; ``compose``: a
    new field is optimised after the earlier levels' and merged with them on this level's grid."""
    if stage.optimizer.kind == "demons":
        return _run_demons(stage, frame, moving_initial, tracker, clock)
    if stage.transform.symmetric:
        return _run_symmetric(stage, index, frame, moving_initial, tracker, seed, threads, clock)
    sigmas, _ = sigmas_of(stage, frame.k)
    direction = frame.fixed.GetDirection()
    previous: sitk.DisplacementFieldTransform | None = None
    optimized: sitk.DisplacementFieldTransform | None = None
    stop = ""
    for level, (shrink, sigma) in enumerate(zip(stage.pyramid.shrink_factors, sigmas)):
        size, origin, spacing = field_grid(frame, stage, shrink)
        voxels = int(np.prod(size))
        clock.check(tracker.level_need(level) if tracker.level_need is not None else 0.0)
        compose = previous is not None and stage.transform.across_levels == "compose"
        field = sitk.Image(size, sitk.sitkVectorFloat64, frame.dim)
        field.SetOrigin(origin)
        field.SetSpacing(spacing)
        field.SetDirection(direction)
        level_initial = moving_initial
        if compose:  # the levels before, applied before the moving initial transform
            level_initial = sitk.CompositeTransform(moving_initial)
            level_initial.AddTransform(previous)
        elif previous is not None:  # continue: the previous level's field, resampled onto this grid
            field = sitk.Resample(
                previous.GetDisplacementField(), field, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
            )
        optimized = sitk.DisplacementFieldTransform(field)
        optimized.SetSmoothingGaussianOnUpdate(
            varianceForUpdateField=stage.transform.variance_for_update_field,
            varianceForTotalField=stage.transform.variance_for_total_field,
        )
        fixed = frame.levels.image("fixed", shrink, sigma)
        rm = stage_method(stage, threads, step=_field_step(stage, min(fixed.GetSpacing())))
        inside = prepared_level(rm, stage, index, frame, shrink, voxels, seed)
        if sampling_fraction(stage.sampling, voxels, inside) >= 1.0:
            rm.SetMetricSamplingStrategy(rm.NONE)  # points for every voxel: every voxel, without sampling's jitter
        rm.SetVirtualDomain(size, origin, spacing, direction)  # a local-support transform's grid is the domain
        rm.SetMovingInitialTransform(level_initial)
        rm.SetInitialTransform(optimized, inPlace=True)
        tracker.attach(rm, optimized, itk_levels=False)
        tracker.start_level(level, samples=sampled_points(stage.sampling, voxels, inside), voxels=voxels)
        stop = execute(rm, tracker, fixed, frame.levels.image("moving", shrink, sigma))
        if compose:  # x -> previous(optimized(x)), sampled on this level's grid
            both = sitk.CompositeTransform(previous)
            both.AddTransform(optimized)
            merged = sitk.TransformToDisplacementField(both, sitk.sitkVectorFloat64, size, origin, spacing, direction)
            optimized = tracker.optimized = sitk.DisplacementFieldTransform(merged)
        close(tracker, stop)
        previous = optimized
    assert optimized is not None
    return optimized, stop


def _field_step(stage: Any, level_spacing: float) -> float | None:
    """A displacement stage's bound on each update in the frame's units (``transform.gradient_step`` voxels of the
    level's images), or None for the optimizer's own."""
    step = stage.transform.gradient_step
    return None if step is None else step * level_spacing


#: Histogram matching before Demons: bins, and quantiles matched (ITK's Demons example uses 7).
MATCH_HISTOGRAM_LEVELS, MATCH_POINTS = 256, 7

_DEMONS = {
    "fast_symmetric_forces": sitk.FastSymmetricForcesDemonsRegistrationFilter,
    "diffeomorphic": sitk.DiffeomorphicDemonsRegistrationFilter,
}


def _run_demons(
    stage: Any, frame: Frame, moving_initial: sitk.Transform, tracker: LevelTracker, clock: Clock
) -> tuple[sitk.Transform, str]:
    """The displacement field found by one of SimpleITK's Demons filters, level by level: the moving level image
    warped by the stages before, both images on the field's grid, the field carried up the pyramid."""
    sigmas, _ = sigmas_of(stage, frame.k)
    o, t = stage.optimizer, stage.transform
    previous: sitk.Image | None = None
    optimized: sitk.Transform | None = None
    stop = ""
    for level, (shrink, sigma) in enumerate(zip(stage.pyramid.shrink_factors, sigmas)):
        size, origin, spacing = field_grid(frame, stage, shrink)
        clock.check(tracker.level_need(level) if tracker.level_need is not None else 0.0)
        grid = sitk.Image(size, sitk.sitkFloat32)
        grid.SetOrigin(origin)
        grid.SetSpacing(spacing)
        grid.SetDirection(frame.fixed.GetDirection())
        fixed = sitk.Resample(
            frame.levels.image("fixed", shrink, sigma), grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        moving = sitk.Resample(
            frame.levels.image("moving", shrink, sigma), grid, moving_initial, sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        if o.match_histograms != "off":
            moving = sitk.HistogramMatching(
                moving, fixed, MATCH_HISTOGRAM_LEVELS, MATCH_POINTS, o.match_histograms == "above_mean"
            )
        field = (
            sitk.Resample(previous, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            if previous is not None
            else sitk.Image(size, sitk.sitkVectorFloat64, frame.dim)
        )
        field.CopyInformation(grid)
        demons = _DEMONS[o.variant]()
        demons.SetNumberOfIterations(o.number_of_iterations)
        demons.SetSmoothDisplacementField(t.variance_for_total_field > 0)
        demons.SetStandardDeviations(float(np.sqrt(t.variance_for_total_field)) or 1.0)
        demons.SetSmoothUpdateField(t.variance_for_update_field > 0)
        demons.SetUpdateFieldStandardDeviations(float(np.sqrt(t.variance_for_update_field)) or 1.0)
        demons.SetMaximumUpdateStepLength(o.maximum_update_step_length)
        demons.SetIntensityDifferenceThreshold(o.intensity_difference_threshold)
        demons.SetMaximumRMSError(o.maximum_rms_error)
        tracker.start_level(level, samples=int(np.prod(size)), voxels=int(np.prod(size)))
        count = [0]

        def on_iteration(count: list[int] = count, demons: sitk.DiffeomorphicDemonsRegistrationFilter = demons) -> None:
            count[0] += 1
            try:
                clock.check()
            except Halt as halt:
                tracker.halt = halt
                demons.StopRegistration()

        demons.AddCommand(sitk.sitkIterationEvent, on_iteration)
        field = demons.Execute(fixed, moving, field)
        if tracker.halt is not None:
            raise tracker.halt
        optimized = sitk.DisplacementFieldTransform(sitk.Image(field))
        tracker.optimized, tracker.iterations, tracker.metric_value = optimized, count[0], demons.GetMetric()
        stop = f"Demons ({o.variant}): {count[0]} iterations, RMS change {demons.GetRMSChange():.3g}"
        close(tracker, stop)
        previous = field
    assert optimized is not None
    return optimized, stop


def _grid(size: list[int], origin: list[float], spacing: list[float], direction: tuple, pixel: int, dim: int = 0):
    """An empty image on a field's grid: scalar (``dim`` 0) or a zero vector field of ``dim`` components."""
    image = sitk.Image(size, pixel, dim) if dim else sitk.Image(size, pixel)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _through(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A transform of a copy of ``field`` (SimpleITK's transform takes its image's buffer and empties it)."""
    return sitk.DisplacementFieldTransform(sitk.Image(field))


def _warped(image: sitk.Image | None, grid: sitk.Image, tx: sitk.Transform, mask: bool = False) -> sitk.Image | None:
    if image is None:
        return None
    if mask:
        return sitk.Resample(image, grid, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.Resample(image, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _metric_step(
    gradient: Any,
    fixed: sitk.Image,
    moving: sitk.Image,
    masks: tuple[sitk.Image | None, sitk.Image | None],
    variance: float,
    sampling: tuple[float, int] | None,
    threads: int,
) -> tuple[sitk.Image, float]:
    """The metric's descent direction at each voxel of ``fixed``'s grid (both images already on it), smoothed by a
    Gaussian of ``variance`` field voxels, and the metric's value: one unit step of ITK's gradient descent on a zero
    field."""
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
    field.CopyInformation(fixed)
    tx = sitk.DisplacementFieldTransform(field)
    tx.SetSmoothingGaussianOnUpdate(varianceForUpdateField=variance, varianceForTotalField=0.0)
    rm = stage_method(gradient, threads)
    if masks[0] is not None:
        rm.SetMetricFixedMask(masks[0])
    if masks[1] is not None:
        rm.SetMetricMovingMask(masks[1])
    if sampling is None:
        rm.SetMetricSamplingStrategy(rm.NONE)
    else:
        rm.SetMetricSamplingPercentage(*sampling)
    rm.SetInitialTransform(tx, inPlace=True)
    rm.Execute(fixed, moving)
    return tx.GetDisplacementField(), rm.GetMetricValue()


def _advanced(field: sitk.Image, direction: sitk.Image, step: float, total_variance: float) -> sitk.Image:
    """``field`` after a step along ``direction`` scaled so that its largest displacement is ``step`` (ANTs': the
    update is smoothed first, then scaled), composed as x -> field(x + update(x)), then smoothed as a whole."""
    update = sitk.GetArrayFromImage(direction)
    largest = float(np.sqrt((update**2).sum(axis=-1)).max())
    if largest > 0:
        update *= step / largest
    scaled = sitk.GetImageFromArray(update, isVector=True)
    scaled.CopyInformation(field)
    both = sitk.CompositeTransform([_through(field), sitk.DisplacementFieldTransform(scaled)])
    out = sitk.TransformToDisplacementField(
        both, sitk.sitkVectorFloat64, field.GetSize(), field.GetOrigin(), field.GetSpacing(), field.GetDirection()
    )
    if total_variance > 0:
        sigma = float(np.sqrt(total_variance)) * min(field.GetSpacing())
        out = sitk.Cast(sitk.SmoothingRecursiveGaussian(out, sigma), sitk.sitkVectorFloat64)
    return out


def _converged(values: list[float], window: int, minimum: float) -> bool:
    """The metric fell by less than ``minimum`` of its size per iteration, on average over the last ``window``."""
    if len(values) < window:
        return False
    first, last = values[-window], values[-1]
    return (first - last) / (window - 1) < minimum * max(abs(first), 1e-12)


#: ANTs SyN's inversion of each half-way field: iterations and the largest and mean error left (voxels).
INVERT_ITERATIONS, INVERT_MAX_ERROR, INVERT_MEAN_ERROR = 20, 0.1, 0.001


def _run_symmetric(
    stage: Any,
    index: int,
    frame: Frame,
    moving_initial: sitk.Transform,
    tracker: LevelTracker,
    seed: int,
    threads: int,
    clock: Clock,
) -> tuple[sitk.Transform, str]:
    """ANTs SyN's symmetric scheme: both images move toward a midpoint, each along its own metric gradient by
    ``gradient_step`` voxels per iteration, so neither side alone carries the deformation; the field returned maps
    fixed to moving through the midpoint (the moving half after the inverse of the fixed half), on the level's grid.
    From the landmarks' affine it ended 0.2-1.4 px below ITK's one-sided descent on the histology pairs
    (``benchmarks/landmark_floor.py``)."""
    sigmas, _ = sigmas_of(stage, frame.k)
    t, o = stage.transform, stage.optimizer
    # one unit step of plain gradient descent gives the smoothed descent direction; the step length is set here
    unit_step = changed(
        o,
        learning_rate=1.0,
        number_of_iterations=1,
        estimate_learning_rate="never",
        maximum_step_size_in_physical_units=0.0,
        scales="none",
    )
    # the field's derivative needs the gradient of the image it warps (the "moving" one of each pass), not the other's
    gradient = changed(stage, optimizer=unit_step, metric=changed(stage.metric, use_fixed_image_gradient_filter=False))
    direction = frame.fixed.GetDirection()
    halves: tuple[sitk.Image, sitk.Image] | None = None  # middle -> fixed, middle -> moving
    optimized: sitk.Transform | None = None
    stop = ""
    for level, (shrink, sigma) in enumerate(zip(stage.pyramid.shrink_factors, sigmas)):
        size, origin, spacing = field_grid(frame, stage, shrink)
        voxels = int(np.prod(size))
        clock.check(tracker.level_need(level) if tracker.level_need is not None else 0.0)
        grid = _grid(size, origin, spacing, direction, sitk.sitkFloat32)
        zero = _grid(size, origin, spacing, direction, sitk.sitkVectorFloat64, frame.dim)
        if halves is None:
            to_fixed, to_moving = zero, sitk.Image(zero)
        else:  # the previous level's halves, resampled onto this grid
            to_fixed, to_moving = (
                sitk.Resample(h, zero, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64) for h in halves
            )
        fixed, moving = frame.levels.image("fixed", shrink, sigma), frame.levels.image("moving", shrink, sigma)
        fixed_mask = frame.levels.mask("fixed", shrink) if stage.use_masks else None
        moving_mask = frame.levels.mask("moving", shrink) if stage.use_masks else None
        inside = inside_share(fixed_mask)
        sampling = None  # every voxel, also where the stage's points cover the whole level
        if sampling_fraction(stage.sampling, voxels, inside) < 1.0:
            sampling = (sampling_fraction(stage.sampling, voxels, inside), itk_seed(seed, index))
        step = t.gradient_step * min(fixed.GetSpacing())
        tracker.start_level(level, samples=sampled_points(stage.sampling, voxels, inside), voxels=voxels)
        values: list[float] = []
        stop = f"{o.number_of_iterations} iterations"
        last = 0.0
        for iteration in range(o.number_of_iterations):
            tracker.clock.check(last)
            t_iteration = time.perf_counter()
            to_moving_tx = sitk.CompositeTransform([moving_initial, _through(to_moving)])
            fixed_mid, moving_mid = _warped(fixed, grid, _through(to_fixed)), _warped(moving, grid, to_moving_tx)
            masks = (
                _warped(fixed_mask, grid, _through(to_fixed), mask=True),
                _warped(moving_mask, grid, to_moving_tx, mask=True),
            )
            toward_fixed, value = _metric_step(
                gradient, fixed_mid, moving_mid, masks, t.variance_for_update_field, sampling, threads
            )
            toward_moving, _ = _metric_step(
                gradient, moving_mid, fixed_mid, masks[::-1], t.variance_for_update_field, sampling, threads
            )
            to_moving = _advanced(to_moving, toward_fixed, step, t.variance_for_total_field)
            to_fixed = _advanced(to_fixed, toward_moving, step, t.variance_for_total_field)
            values.append(value)
            tracker.iterations, tracker.metric_value = iteration + 1, value
            if tracker.t_first is None:
                tracker.t_first = time.perf_counter()
            last = time.perf_counter() - t_iteration
            if _converged(values, o.convergence_window_size, o.convergence_minimum_value):
                stop = f"converged after {iteration + 1} iterations"
                break
        halves = (to_fixed, to_moving)
        inverse = sitk.InvertDisplacementField(
            to_fixed,
            maximumNumberOfIterations=INVERT_ITERATIONS,
            maxErrorToleranceThreshold=INVERT_MAX_ERROR,
            meanErrorToleranceThreshold=INVERT_MEAN_ERROR,
            enforceBoundaryCondition=False,  # pinning the inverse's edge to zero folds the edge voxels
        )
        through = sitk.CompositeTransform([_through(to_moving), sitk.DisplacementFieldTransform(inverse)])
        optimized = tracker.optimized = sitk.DisplacementFieldTransform(
            sitk.TransformToDisplacementField(through, sitk.sitkVectorFloat64, size, origin, spacing, direction)
        )
        close(tracker, f"symmetric: {stop}")
    assert optimized is not None
    return optimized, f"symmetric: {stop}"
