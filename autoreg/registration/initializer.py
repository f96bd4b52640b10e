"""Where the first transform starts: the images' centres (geometry), their centres of mass (moments) or identity,
then optionally a grid search of rotation and shift at a coarse level (large rotations defeat gradients).

The search costs (2a+1)^r (2s+1)^d metric evaluations (r rotation angles, d shift axes): in 3D a modest grid is
hundreds of thousands. A recipe's ``max_evaluations`` caps it, coarsening the grid until it fits, and the search
runs on a prepared coarse level with a fixed number of sample points, so its cost no longer depends on image size.
Every evaluation checks the clock.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import SimpleITK as sitk

from .core import LINEAR_KINDS, Clock, Halt, itk_seed
from .frame import Frame, Linear
from .method import StopExecute, configure_metric, install_quiet_stop

log = logging.getLogger(__name__)

#: The coarse level of a budgeted search keeps about this many voxels on the shortest axis.
SEARCH_AXIS_VOXELS = 48
#: Sample points of a budgeted search (the whole level when it has fewer).
SEARCH_POINTS = 8192


def initial_linear(recipe: Any, frame: Frame, seed: int, clock: Clock | None = None) -> Linear:
    """The initializer: centres (geometry/moments) or identity, then the optional coarse rotation search; ``best``
    runs both centres and keeps the start that the first linear stage's metric prefers."""
    clock = clock or Clock()
    init = recipe.initializer
    first_linear = next((s for s in recipe.stages if s.transform.kind in LINEAR_KINDS), None)
    kinds = ("geometry", "moments") if init.kind == "best" else (init.kind,)
    starts = [_start(kind, recipe, frame, first_linear, seed, clock) for kind in kinds]
    if len(starts) == 1 or first_linear is None:
        return starts[0]
    values = [coarse_metric_value(state, frame, first_linear, seed) for state in starts]
    log.debug("initializer 'best': metric values %s for %s", values, kinds)
    return starts[int(np.argmin(values))]


def _start(kind: str, recipe: Any, frame: Frame, first_linear: Any, seed: int, clock: Clock) -> Linear:
    clock.check()
    if kind == "none":
        state = Linear.identity(frame.dim, frame.center())
    else:
        how = (sitk.CenteredTransformInitializerFilter.GEOMETRY if kind == "geometry"
               else sitk.CenteredTransformInitializerFilter.MOMENTS)
        state = Linear.of(sitk.CenteredTransformInitializer(frame.fixed, frame.moving, sitk.AffineTransform(frame.dim),
                                                            how))
    search = getattr(recipe.initializer, "rotation_search", None)
    if search is not None and first_linear is not None and first_linear.transform.kind != "translation":
        state = rotation_search(search, frame, state, first_linear, seed, clock)
    return state


def _coarse_method(frame: Frame, stage: Any, seed: int) -> tuple[sitk.ImageRegistrationMethod, sitk.Image, sitk.Image]:
    """A method that evaluates the stage's metric (values only) on a coarse prepared level, a fixed sample."""
    rm = sitk.ImageRegistrationMethod()
    configure_metric(rm, stage.metric)
    rm.SetMetricUseFixedImageGradientFilter(False)
    rm.SetMetricUseMovingImageGradientFilter(False)
    rm.SetInterpolator(sitk.sitkLinear)
    shrink = max(1, min(frame.fixed.GetSize()) // SEARCH_AXIS_VOXELS)
    levels = frame.levels
    fixed, moving = levels.image("fixed", shrink, shrink / 2.0), levels.image("moving", shrink, shrink / 2.0)
    voxels = int(np.prod(fixed.GetSize()))
    if voxels > SEARCH_POINTS:
        rm.SetMetricSamplingStrategy(rm.RANDOM)
        rm.SetMetricSamplingPercentage(SEARCH_POINTS / voxels, itk_seed(seed, 0))
    else:
        rm.SetMetricSamplingStrategy(rm.NONE)
    if stage.use_masks:
        fixed_mask, moving_mask = levels.mask("fixed", shrink), levels.mask("moving", shrink)
        if fixed_mask is not None:
            rm.SetMetricFixedMask(fixed_mask)
        if moving_mask is not None:
            rm.SetMetricMovingMask(moving_mask)
    rm.SetShrinkFactorsPerLevel([1])
    rm.SetSmoothingSigmasPerLevel([0.0])
    return rm, fixed, moving


def coarse_metric_value(state: Linear, frame: Frame, stage: Any, seed: int) -> float:
    """The first linear stage's metric at a start, on the coarse level the rotation search uses (lower is better;
    a start that leaves too little overlap to measure counts as the worst)."""
    rm, fixed, moving = _coarse_method(frame, stage, seed)
    rm.SetInitialTransform(state.as_affine())
    try:
        return float(rm.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return float("inf")


def search_grid(search: Any, dim: int) -> tuple[int, float, int]:
    """(angle steps each side, angle step in degrees, shift steps each side), coarsened to ``max_evaluations``."""
    n_rot = 1 if dim == 2 else 3
    angles = max(1, int(math.floor(search.max_angle_deg / search.step_deg + 1e-9)))
    shifts = search.shift_steps if search.max_shift_fraction > 0 else 0
    budget = getattr(search, "max_evaluations", None)
    step = search.step_deg
    if budget is not None:
        while (2 * angles + 1) ** n_rot * (2 * shifts + 1) ** dim > budget and (angles > 1 or shifts > 0):
            if shifts > 0 and (2 * shifts + 1) ** dim >= (2 * angles + 1) ** n_rot:
                shifts -= 1
            else:
                angles -= 1
                step = search.max_angle_deg / angles
    return angles, step, shifts


def rotation_search(search: Any, frame: Frame, state: Linear, stage: Any, seed: int, clock: Clock) -> Linear:
    """The best pose on a grid of rotations (and shifts) about the current centre, by the first linear stage's
    metric. Version-1 recipes (no ``max_evaluations``) run the whole grid on ITK's coarse level, every voxel."""
    dim = frame.dim
    rigid = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
    rigid.SetCenter(tuple(state.center))
    rigid.SetTranslation(tuple(state.translation))
    n_rot = 1 if dim == 2 else 3
    angles, step_deg, shifts = search_grid(search, dim)
    step = math.radians(step_deg)
    extent = np.array([n * s for n, s in zip(frame.fixed.GetSize(), frame.fixed.GetSpacing())])
    shift_scale = (search.max_shift_fraction * float(np.min(extent)) / shifts) / step if shifts > 0 else 1.0
    rm = sitk.ImageRegistrationMethod()
    configure_metric(rm, stage.metric)
    # the grid needs metric values only: no gradient images (the values do not depend on them)
    rm.SetMetricUseFixedImageGradientFilter(False)
    rm.SetMetricUseMovingImageGradientFilter(False)
    rm.SetInterpolator(sitk.sitkLinear)
    budgeted = getattr(search, "max_evaluations", None) is not None
    if budgeted:
        shrink = max(1, min(frame.fixed.GetSize()) // SEARCH_AXIS_VOXELS)
        levels = frame.levels
        fixed, moving = levels.image("fixed", shrink, shrink / 2.0), levels.image("moving", shrink, shrink / 2.0)
        fixed_mask, moving_mask = levels.mask("fixed", shrink), levels.mask("moving", shrink)
        voxels = int(np.prod(fixed.GetSize()))
        if voxels > SEARCH_POINTS:
            rm.SetMetricSamplingStrategy(rm.RANDOM)
            rm.SetMetricSamplingPercentage(SEARCH_POINTS / voxels, itk_seed(seed, 0))
        else:
            rm.SetMetricSamplingStrategy(rm.NONE)
        rm.SetShrinkFactorsPerLevel([1])
        rm.SetSmoothingSigmasPerLevel([0.0])
    else:  # version 1: ITK's own coarse level (~64 voxels across), every voxel
        fixed, moving, fixed_mask, moving_mask = frame.fixed, frame.moving, frame.fixed_mask, frame.moving_mask
        shrink = max(1, int(min(frame.fixed.GetSize()) // 64))
        rm.SetMetricSamplingStrategy(rm.NONE)
        rm.SetShrinkFactorsPerLevel([shrink])
        rm.SetSmoothingSigmasPerLevel([shrink / 2.0])
        rm.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    if stage.use_masks and fixed_mask is not None:
        rm.SetMetricFixedMask(fixed_mask)
    if stage.use_masks and moving_mask is not None:
        rm.SetMetricMovingMask(moving_mask)
    rm.SetOptimizerAsExhaustive(numberOfSteps=[angles] * n_rot + [shifts] * dim, stepLength=step)
    rm.SetOptimizerScales([1.0] * n_rot + [shift_scale] * dim)
    rm.SetInitialTransform(rigid, inPlace=True)
    halted: list[Halt] = []

    def on_evaluation() -> None:
        try:
            clock.check()
        except Halt as halt:
            halted.append(halt)
            raise StopExecute() from None

    rm.AddCommand(sitk.sitkIterationEvent, on_evaluation)
    install_quiet_stop()
    clock.check()
    try:
        rm.Execute(fixed, moving)
    except RuntimeError:
        if halted:
            raise halted[0] from None
        raise
    best = Linear.of(rigid)
    # keep any scale the centre initializer found (it finds none today, but stay exact if it ever does)
    best.matrix = best.matrix @ state.matrix
    log.debug("rotation search (%d angles, %.3g deg, %d shifts each side): %s -> %s", angles, step_deg, shifts,
              state.translation, best.translation)
    return best
