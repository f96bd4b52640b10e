"""``register(recipe, pair)``: the recipe's stages in order, one transform mapping FIXED physical points to MOVING
physical points (ITK's convention), a record per pyramid level, and every phase bounded by the clock.

A stage runs on ITK's own pyramid (one ``Execute``: version-1 recipes and the SimpleITK-notebooks default) or on
prepared pyramid levels (``pyramid.shrink_images``: one ``Execute`` per level on images smoothed and shrunk once per
worker, the BSpline grid refined exactly between levels). Before a prepared level starts, its setup is predicted from
the previous level's (seconds per voxel) and the registration stops if it would not fit the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk

from .core import (
    LINEAR_KINDS,
    Clock,
    Halt,
    LevelCallback,
    RegistrationFailed,
    RegistrationPruned,
    RegistrationResult,
    failure_reason,
    itk_seed,
    itk_threads,
    threads_of,
)
from .frame import Frame, Linear, all_parameters, compose, frame_of, unscale_transform
from .initializer import initial_linear
from .method import (
    INTERPOLATORS,
    LevelTracker,
    StopExecute,
    configure_metric,
    configure_optimizer,
    install_quiet_stop,
    one_prepared_level,
    sampling_strategy,
)
from .pyramid import (
    bspline_schedule,
    inside_share,
    level_sizes,
    refine_bspline,
    sampled_points,
    sampling_fraction,
    sigmas_of,
)


def register(
    recipe: Any,
    pair: Any,
    *,
    level_callback: LevelCallback | None = None,
    seed: int | None = None,
    time_limit: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    cost: Any = None,
) -> RegistrationResult:
    """Run ``recipe`` on ``pair``; raises ``RegistrationFailed`` with a short reason, or ``RegistrationPruned``
    when ``level_callback`` raised it. ``seed`` overrides the recipe's sampling seed; past ``time_limit`` seconds
    the registration stops and fails with reason 'time limit'; when ``should_stop()`` turns true (Ctrl-C) it stops
    likewise with reason 'interrupted'. ``cost`` (autoreg's ``CostModel``, optional) predicts each level's setup and
    first iteration, so that a level that would not fit the time left is not begun."""
    t0 = time.perf_counter()
    frame = frame_of(pair)
    seed = recipe.seed if seed is None else seed
    clock = Clock.start(time_limit, should_stop)
    where = ["the initializer"]
    with itk_threads(threads_of(recipe)):
        try:
            result = _run(recipe, frame, seed, level_callback, clock, where, cost)
        except (RegistrationPruned, RegistrationFailed):
            raise
        except Halt as halt:
            raise RegistrationFailed(halt.reason, f"stopped in {where[0]}") from None
        except MemoryError as err:
            raise RegistrationFailed("out of memory", str(err)) from None
        except RuntimeError as err:
            reason, detail = failure_reason(err)
            raise RegistrationFailed(reason, detail) from None
    result.transform = unscale_transform(result.transform, frame.k)
    result.initial_transform = unscale_transform(result.initial_transform, frame.k)
    if not np.all(np.isfinite(all_parameters(result.transform))):
        raise RegistrationFailed("diverged (non-finite transform parameters)")
    result.seconds = time.perf_counter() - t0
    return result


def _run(
    recipe: Any,
    frame: Frame,
    seed: int,
    level_callback: LevelCallback | None,
    clock: Clock,
    where: list[str],
    cost: Any,
) -> RegistrationResult:
    linear = initial_linear(recipe, frame, seed, clock)
    initial = linear.as_affine()
    result = RegistrationResult(transform=initial, initial_transform=initial)
    current_linear: sitk.Transform = initial
    deformables: list[sitk.Transform] = []
    threads = threads_of(recipe)
    for index, stage in enumerate(recipe.stages):
        kind = stage.transform.kind
        if kind in LINEAR_KINDS:
            optimized, moving_initial, factors = linear.as_kind(kind), None, None
        elif kind == "bspline":
            mesh, factors = bspline_schedule(stage, frame.fixed, frame.k)
            optimized = sitk.BSplineTransformInitializer(frame.fixed, mesh, order=3)
            moving_initial = compose([current_linear, *deformables])
        elif kind == "displacement":
            optimized, moving_initial, factors = None, compose([current_linear, *deformables]), None
        else:
            raise RegistrationFailed("unsupported stage", f"stage {index} is {kind!r}")
        need = _level_need(cost, stage, frame, optimized, factors)
        tracker = LevelTracker(stage, index, frame, moving_initial, level_callback, clock, need)
        try:
            if kind == "displacement":
                optimized, stop = _run_displacement(stage, index, frame, moving_initial, tracker, seed, threads, clock)
            elif stage.pyramid.shrink_images:
                optimized, stop = _run_prepared(
                    stage, index, frame, optimized, moving_initial, factors, tracker, seed, threads, clock
                )
            else:
                stop = _run_itk(stage, index, frame, optimized, moving_initial, factors, tracker, seed, threads)
        except Halt:
            where[0] = f"stage {index} level {max(tracker.level, 0)}"
            raise
        result.levels.extend(tracker.records)
        result.stop_conditions.append(stop)
        if kind in LINEAR_KINDS:
            linear = Linear.of(optimized)
            current_linear = optimized
        else:
            deformables.append(optimized)
    result.transform = compose([current_linear, *deformables])
    return result


def _level_need(
    cost: Any, stage: Any, frame: Frame, optimized: sitk.Transform | None, factors: list[int] | None
) -> Callable[[int], float] | None:
    """Seconds that level ``l`` of the stage needs for its setup and first iteration, by the cost model."""
    if cost is None:
        return None
    if optimized is None:  # a displacement field: its grid, samples and parameters per level
        grids = [field_grid(frame, stage, shrink) for shrink in stage.pyramid.shrink_factors]

        def need_field(level: int) -> float:
            voxels = int(np.prod(grids[level][0]))
            setup, iteration = cost.level_seconds(
                stage,
                voxels=voxels,
                full_voxels=int(np.prod(frame.fixed.GetSize())),
                parameters=frame.dim * voxels,
                samples=int(sampling_fraction(stage.sampling, voxels) * voxels),
            )
            return setup + iteration

        return need_field
    shrinks = list(stage.pyramid.shrink_factors)
    sizes = level_sizes(frame.fixed, shrinks)
    full = int(np.prod(frame.fixed.GetSize()))
    base = optimized.GetNumberOfParameters()

    def need(level: int) -> float:
        voxels = int(np.prod(sizes[level]))
        parameters = base
        if factors is not None:  # a refining BSpline grid: (mesh x f + 3)^dim points per coordinate
            mesh = sitk.BSplineTransform(optimized).GetTransformDomainMeshSize()
            parameters = frame.dim * int(np.prod([m * factors[level] // factors[0] + 3 for m in mesh]))
        setup, iteration = cost.level_seconds(
            stage,
            voxels=voxels,
            full_voxels=full,
            parameters=parameters,
            samples=int(sampling_fraction(stage.sampling, voxels) * voxels),
        )
        return setup + iteration

    return need


def _method(stage: Any, threads: int, step: float | None = None) -> sitk.ImageRegistrationMethod:
    """The stage's registration method; ``step`` replaces the optimizer's maximum step (physical units)."""
    rm = sitk.ImageRegistrationMethod()
    configure_metric(rm, stage.metric)
    rm.SetMetricSamplingStrategy(sampling_strategy(rm, stage.sampling.strategy))
    rm.SetInterpolator(INTERPOLATORS[stage.interpolator])
    if threads > 0:
        rm.SetNumberOfThreads(threads)
    optimizer = stage.optimizer
    if step is not None:
        optimizer = optimizer.model_copy(update={"maximum_step_size_in_physical_units": step})
    configure_optimizer(rm, optimizer)
    return rm


def _execute(rm: sitk.ImageRegistrationMethod, tracker: LevelTracker, fixed: sitk.Image, moving: sitk.Image) -> str:
    """``Execute``, turning a stop from an observer back into what caused it (prune or clock)."""
    install_quiet_stop()
    try:
        rm.Execute(fixed, moving)
    except RuntimeError:
        if tracker.pruned is not None:
            raise tracker.pruned from None
        if tracker.halt is not None:
            raise tracker.halt from None
        raise
    return rm.GetOptimizerStopConditionDescription()


def _close(tracker: LevelTracker, stop: str) -> None:
    try:
        tracker.close_level(tracker.final_transform(), stop)
    except StopExecute:
        assert tracker.pruned is not None
        raise tracker.pruned from None


def _run_itk(
    stage: Any,
    index: int,
    frame: Frame,
    optimized: sitk.Transform,
    moving_initial: sitk.Transform | None,
    factors: list[int] | None,
    tracker: LevelTracker,
    seed: int,
    threads: int,
) -> str:
    """The stage on ITK's own pyramid: one ``Execute`` over every level."""
    rm = _method(stage, threads)
    shrinks = list(stage.pyramid.shrink_factors)
    if stage.sampling.strategy != "none":
        if getattr(stage.sampling, "points", None) is None:
            rm.SetMetricSamplingPercentage(stage.sampling.percentage, itk_seed(seed, index))
        else:
            use_mask = stage.use_masks and frame.fixed_mask is not None
            fractions = [
                sampling_fraction(stage.sampling, int(np.prod(size)), frame.levels.inside(s) if use_mask else 1.0)
                for s, size in zip(shrinks, level_sizes(frame.fixed, shrinks))
            ]
            rm.SetMetricSamplingPercentagePerLevel(fractions, itk_seed(seed, index))
    if stage.use_masks and frame.fixed_mask is not None:
        rm.SetMetricFixedMask(frame.fixed_mask)
    if stage.use_masks and frame.moving_mask is not None:
        rm.SetMetricMovingMask(frame.moving_mask)
    sigmas, physical = sigmas_of(stage, frame.k)
    rm.SetShrinkFactorsPerLevel(shrinks)
    rm.SetSmoothingSigmasPerLevel(sigmas)
    rm.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(physical)
    if moving_initial is not None:
        rm.SetMovingInitialTransform(moving_initial)
    if factors is not None:  # a BSpline stage that refines its grid
        rm.SetInitialTransformAsBSpline(optimized, inPlace=True, scaleFactors=factors)
    else:
        rm.SetInitialTransform(optimized, inPlace=True)
    tracker.attach(rm, optimized, itk_levels=True)
    tracker.clock.check(tracker.level_need(0) if tracker.level_need is not None else 0.0)
    stop = _execute(rm, tracker, frame.fixed, frame.moving)
    _close(tracker, stop)
    return stop


def field_grid(frame: Frame, stage: Any, shrink: int) -> tuple[list[int], list[float], list[float]]:
    """(size, origin, spacing) of a displacement field covering the fixed image at one level: as fine as the level's
    voxels, but no finer than the stage's ``grid_spacing`` (in the normalised frame a fixed voxel is one unit)."""
    t = stage.transform
    grid = t.grid_spacing * (frame.k if t.spacing_units == "mm" else 1.0)
    fixed = frame.fixed
    voxel = np.asarray(fixed.GetSpacing(), float)
    spacing = np.maximum(voxel * shrink, grid)
    extent = np.asarray(fixed.GetSize()) * voxel
    size = np.maximum(1, np.round(extent / spacing)).astype(int)
    spacing = extent / size  # the field spans exactly the fixed image's extent
    # the first field voxel's centre, half a field voxel inside the fixed image's edge, along the image's axes
    start = -0.5 * voxel + 0.5 * spacing
    direction = np.asarray(fixed.GetDirection()).reshape(fixed.GetDimension(), fixed.GetDimension())
    origin = np.asarray(fixed.GetOrigin()) + direction @ start
    return [int(n) for n in size], [float(o) for o in origin], [float(s) for s in spacing]


def _run_displacement(
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
        rm = _method(stage, threads, step=_field_step(stage, min(fixed.GetSpacing())))
        inside = _prepared_level(rm, stage, index, frame, shrink, voxels, seed)
        rm.SetVirtualDomain(size, origin, spacing, direction)  # a local-support transform's grid is the domain
        rm.SetMovingInitialTransform(level_initial)
        rm.SetInitialTransform(optimized, inPlace=True)
        tracker.attach(rm, optimized, itk_levels=False)
        tracker.start_level(level, samples=sampled_points(stage.sampling, voxels, inside), voxels=voxels)
        stop = _execute(rm, tracker, fixed, frame.levels.image("moving", shrink, sigma))
        if compose:  # x -> previous(optimized(x)), sampled on this level's grid
            both = sitk.CompositeTransform(previous)
            both.AddTransform(optimized)
            merged = sitk.TransformToDisplacementField(both, sitk.sitkVectorFloat64, size, origin, spacing, direction)
            optimized = tracker.optimized = sitk.DisplacementFieldTransform(merged)
        _close(tracker, stop)
        previous = optimized
    assert optimized is not None
    return optimized, stop


def _field_step(stage: Any, level_spacing: float) -> float | None:
    """A displacement stage's bound on each update in the frame's units (``transform.gradient_step`` voxels of the
    level's images), or None for the optimizer's own."""
    step = stage.transform.gradient_step
    return None if step is None else step * level_spacing


def _prepared_level(
    rm: sitk.ImageRegistrationMethod, stage: Any, index: int, frame: Frame, shrink: int, voxels: int, seed: int
) -> float:
    """One prepared level's masks and sampling on ``rm`` (a single ITK level); returns the share of the level inside
    the fixed mask, read off the mask set on ``rm`` rather than a second one."""
    inside = inside_share(one_prepared_level(rm, frame.levels, shrink, stage.use_masks))
    if stage.sampling.strategy != "none":
        rm.SetMetricSamplingPercentage(sampling_fraction(stage.sampling, voxels, inside), itk_seed(seed, index))
    return inside


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
        _close(tracker, stop)
        previous = field
    assert optimized is not None
    return optimized, stop


def _run_prepared(
    stage: Any,
    index: int,
    frame: Frame,
    optimized: sitk.Transform,
    moving_initial: sitk.Transform | None,
    factors: list[int] | None,
    tracker: LevelTracker,
    seed: int,
    threads: int,
    clock: Clock,
) -> tuple[sitk.Transform, str]:
    """The stage on prepared levels: one ``Execute`` per level; returns the (possibly refined) transform."""
    sigmas, physical = sigmas_of(stage, frame.k)
    stop = ""
    for level, (shrink, sigma) in enumerate(zip(stage.pyramid.shrink_factors, sigmas)):
        fixed = frame.levels.image("fixed", shrink, sigma)
        moving = frame.levels.image("moving", shrink, sigma)
        voxels = int(np.prod(fixed.GetSize()))
        # stop now if this level's setup (measured at the last level, or predicted) and first iteration would not fit
        rate = tracker.setup_rate()
        clock.check(
            max(
                rate * voxels if rate is not None else 0.0,
                tracker.level_need(level) if tracker.level_need is not None else 0.0,
            )
        )
        if factors is not None and level > 0:
            for _ in range(int(round(np.log2(factors[level] / factors[level - 1])))):
                optimized = refine_bspline(optimized)
        rm = _method(stage, threads)
        inside = _prepared_level(rm, stage, index, frame, shrink, voxels, seed)
        if moving_initial is not None:
            rm.SetMovingInitialTransform(moving_initial)
        rm.SetInitialTransform(optimized, inPlace=True)
        tracker.attach(rm, optimized, itk_levels=False)
        tracker.start_level(level, samples=sampled_points(stage.sampling, voxels, inside), voxels=voxels)
        stop = _execute(rm, tracker, fixed, moving)
        _close(tracker, stop)
    return optimized, stop
