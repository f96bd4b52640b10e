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
from .fields import field_grid, run_field
from .frame import NO_OVERLAP_SHARE, Frame, Linear, all_parameters, compose, frame_of, unscale_transform
from .initializer import initial_linear
from .method import LevelTracker, close, execute, prepared_level, stage_method
from .pyramid import (
    bspline_schedule,
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
    min_overlap = NO_OVERLAP_SHARE * frame.overlap(initial)
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
        tracker = LevelTracker(stage, index, frame, moving_initial, level_callback, clock, need, min_overlap)
        try:
            if kind == "displacement":
                optimized, stop = run_field(stage, index, frame, moving_initial, tracker, seed, threads, clock)
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
    sizes = level_sizes(frame.fixed, shrinks, prepared=stage.pyramid.shrink_images)
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
    rm = stage_method(stage, threads)
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
    stop = execute(rm, tracker, frame.fixed, frame.moving)
    close(tracker, stop)
    return stop


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
        rm = stage_method(stage, threads)
        inside = prepared_level(rm, stage, index, frame, shrink, voxels, seed)
        if moving_initial is not None:
            rm.SetMovingInitialTransform(moving_initial)
        rm.SetInitialTransform(optimized, inPlace=True)
        tracker.attach(rm, optimized, itk_levels=False)
        tracker.start_level(level, samples=sampled_points(stage.sampling, voxels, inside), voxels=voxels)
        stop = execute(rm, tracker, fixed, moving)
        close(tracker, stop)
    return optimized, stop
