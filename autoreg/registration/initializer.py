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
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .core import LINEAR_KINDS, Clock, Halt, itk_seed
from .frame import Frame, Linear, copy_typed
from .method import StopExecute, configure_metric, install_quiet_stop, one_prepared_level

log = logging.getLogger(__name__)

#: The coarse level of a budgeted search keeps about this many voxels on the shortest axis.
SEARCH_AXIS_VOXELS = 48
#: Sample points of a budgeted search (the whole level when it has fewer).
SEARCH_POINTS = 8192
#: The starts ``initializer.kind: best`` weighs, each with the rotation search where the recipe has one.
BEST_STARTS = ("geometry", "moments", "none")


def initial_linear(recipe: Any, frame: Frame, seed: int, clock: Clock | None = None) -> Linear:
    """The initializer: centres (geometry/moments) or identity, then the optional coarse rotation search; ``best``
    runs all three and keeps the start that the first linear stage's metric prefers (the identity keeps what the
    headers say, which is right for images of one scanner's frame, such as PET/CT, whose fields of view differ)."""
    clock = clock or Clock()
    init = recipe.initializer
    first_linear = next((s for s in recipe.stages if s.transform.kind in LINEAR_KINDS), None)
    kinds = BEST_STARTS if init.kind == "best" else (init.kind,)
    starts = [_start(kind, recipe, frame, first_linear, seed, clock) for kind in kinds]
    if len(starts) == 1 or first_linear is None:
        return starts[0]
    values = [coarse_metric_value(state, frame, first_linear, seed) for state in starts]
    log.debug("initializer 'best': metric values %s for %s", values, kinds)
    return starts[int(np.argmin(values))]


def centre_of_mass(image: sitk.Image) -> tuple[float, ...]:
    """The intensity-weighted centre of the whole image, in physical coordinates, weighed from the image's minimum
    where that is negative. ITK's moments calculator weighs only the image's requested region, which a filter run on
    the same image before (``BinShrink`` crops it to a multiple of its factor) leaves behind: the same registration
    then started elsewhere, depending on what its process had run before (0.034 against 0.044 px on an 80x80 pair)."""
    values = sitk.GetArrayViewFromImage(image)
    low = float(values.min())
    if low < 0.0:  # mass cannot be negative: CT's -1024 HU air would pull the centre away from the body
        values = values.astype(np.float64) - low
    total = float(values.sum(dtype=np.float64))
    if total == 0.0:
        raise RuntimeError("moments initializer: Total mass of the image was zero")
    index = []
    for axis in range(values.ndim):  # ITK's index order (x, y, z) is numpy's axes reversed
        others = tuple(a for a in range(values.ndim) if a != values.ndim - 1 - axis)
        marginal = values.sum(axis=others, dtype=np.float64)
        index.append(float(np.dot(marginal, np.arange(marginal.size)) / total))
    return image.TransformContinuousIndexToPhysicalPoint(index)


def centred(fixed: sitk.Image, moving: sitk.Image, kind: str) -> sitk.AffineTransform:
    """The identity matrix about the fixed image's centre (``geometry``: of its grid, ``moments``: of its mass),
    shifted onto the moving image's: SimpleITK's CenteredTransformInitializer, with the moments taken over every
    voxel."""
    dim = fixed.GetDimension()
    if kind == "geometry":
        how = sitk.CenteredTransformInitializerFilter.GEOMETRY
        return sitk.AffineTransform(sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dim), how))
    f, m = centre_of_mass(fixed), centre_of_mass(moving)
    out = sitk.AffineTransform(dim)
    out.SetCenter(f)
    out.SetTranslation([b - a for a, b in zip(f, m)])
    return out


def _start(kind: str, recipe: Any, frame: Frame, first_linear: Any, seed: int, clock: Clock) -> Linear:
    clock.check()
    if kind == "none":
        state = Linear.identity(frame.dim, frame.center())
    else:
        state = Linear.of(centred(frame.fixed, frame.moving, kind))
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
    one_prepared_level(rm, levels, shrink, stage.use_masks)
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


#: When the joint grid does not fit the budget: rotations first (this share of the budget), then shifts around the
#: ``TOP_ROTATIONS`` best of them.
ROTATION_SHARE = 0.7
TOP_ROTATIONS = 3


@dataclass(frozen=True)
class SearchPlan:
    """The grid a search runs: ``angles`` steps of ``step_deg`` each side of every rotation axis and ``shifts`` steps
    each side of every axis; ``joint`` grids try every rotation with every shift, otherwise the rotations are tried
    first and the shifts around the ``TOP_ROTATIONS`` best."""

    angles: int
    step_deg: float
    shifts: int
    joint: bool

    def evaluations(self, dim: int) -> int:
        rotations = (2 * self.angles + 1) ** (1 if dim == 2 else 3)
        shifts = (2 * self.shifts + 1) ** dim
        return rotations * shifts if self.joint else rotations + TOP_ROTATIONS * (shifts - 1)


def search_plan(search: Any, dim: int) -> SearchPlan:
    """The recipe's grid, whole when it fits ``max_evaluations`` (or there is none: version 1); otherwise rotations
    first on a grid coarsened to ``ROTATION_SHARE`` of the budget, then shifts around the best few. A 3D grid of
    4 angle steps and 3 shift steps each side is 729 x 343 = 250,047 evaluations joint, 729 + 1,026 in two phases."""
    n_rot = 1 if dim == 2 else 3
    angles = max(1, int(math.floor(search.max_angle_deg / search.step_deg + 1e-9)))
    shifts = search.shift_steps if search.max_shift_fraction > 0 else 0
    budget = getattr(search, "max_evaluations", None)
    if budget is None or (2 * angles + 1) ** n_rot * (2 * shifts + 1) ** dim <= budget:
        return SearchPlan(angles, search.step_deg, shifts, True)
    while angles > 1 and (2 * angles + 1) ** n_rot > ROTATION_SHARE * budget:
        angles -= 1
    left = budget - (2 * angles + 1) ** n_rot
    while shifts > 0 and TOP_ROTATIONS * ((2 * shifts + 1) ** dim - 1) > left:
        shifts -= 1
    return SearchPlan(angles, search.max_angle_deg / angles, shifts, False)


def search_work(search: Any, size: tuple[int, ...]) -> tuple[int, int]:
    """(metric evaluations, points per evaluation) of a search on a fixed image of ``size`` voxels: what the cost
    model charges for it."""
    dim = len(size)
    budgeted = getattr(search, "max_evaluations", None) is not None
    shrink = max(1, min(size) // (SEARCH_AXIS_VOXELS if budgeted else 64))
    voxels = int(np.prod([max(1, n // shrink) for n in size]))
    return search_plan(search, dim).evaluations(dim), min(voxels, SEARCH_POINTS) if budgeted else voxels


def search_grid(search: Any, dim: int) -> tuple[int, float, int]:
    """(angle steps each side, angle step in degrees, shift steps each side) of ``search_plan``."""
    plan = search_plan(search, dim)
    return plan.angles, plan.step_deg, plan.shifts


def rotation_search(search: Any, frame: Frame, state: Linear, stage: Any, seed: int, clock: Clock) -> Linear:
    """The best pose on a grid of rotations (and shifts) about the current centre, by the first linear stage's
    metric. Version-1 recipes (no ``max_evaluations``) run the whole grid on ITK's coarse level, every voxel."""
    dim = frame.dim
    n_rot = 1 if dim == 2 else 3
    plan = search_plan(search, dim)
    step = math.radians(plan.step_deg)
    extent = np.array([n * s for n, s in zip(frame.fixed.GetSize(), frame.fixed.GetSpacing())])
    shift_scale = (search.max_shift_fraction * float(np.min(extent)) / plan.shifts) / step if plan.shifts else 1.0
    budgeted = getattr(search, "max_evaluations", None) is not None

    def grid(start: sitk.Transform, angles: int, shifts: int) -> tuple[sitk.Transform, list]:
        """Exhaustive search from ``start``; returns the best pose and every (value, parameters) tried."""
        if budgeted:
            rm, fixed, moving = _coarse_method(frame, stage, seed)
        else:  # version 1: ITK's own coarse level (~64 voxels across), every voxel
            rm, fixed, moving = _v1_method(frame, stage)
        rigid = copy_typed(start)
        rm.SetOptimizerAsExhaustive(numberOfSteps=[angles] * n_rot + [shifts] * dim, stepLength=step)
        rm.SetOptimizerScales([1.0] * n_rot + [shift_scale] * dim)
        rm.SetInitialTransform(rigid, inPlace=True)
        tried: list = []
        halted: list[Halt] = []

        def on_evaluation() -> None:
            tried.append((rm.GetMetricValue(), tuple(rm.GetOptimizerPosition())))
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
        return rigid, tried

    start = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
    start.SetCenter(tuple(state.center))
    start.SetTranslation(tuple(state.translation))
    if plan.joint:
        rigid, _ = grid(start, plan.angles, plan.shifts)
    else:  # rotations at the centres' shift, then the shifts around the best few rotations
        rigid, tried = grid(start, plan.angles, 0)
        best: list[tuple[float, sitk.Transform]] = [(min(v for v, _ in tried), rigid)]
        if plan.shifts:
            best = []
            for _value, position in sorted(tried, key=lambda vp: vp[0])[:TOP_ROTATIONS]:
                candidate = copy_typed(start)
                candidate.SetParameters(position)
                found, shifted = grid(candidate, 0, plan.shifts)
                best.append((min(v for v, _ in shifted), found))
        rigid = min(best, key=lambda vt: vt[0])[1]
    result = Linear.of(rigid)
    # keep any scale the centre initializer found (it finds none today, but stay exact if it ever does)
    result.matrix = result.matrix @ state.matrix
    log.debug("rotation search (%s): %s -> %s", plan, state.translation, result.translation)
    return result


def _v1_method(frame: Frame, stage: Any) -> tuple[sitk.ImageRegistrationMethod, sitk.Image, sitk.Image]:
    """Version 1's search method: ITK's own coarse level (~64 voxels across, sigma half the shrink), every voxel."""
    rm = sitk.ImageRegistrationMethod()
    configure_metric(rm, stage.metric)
    rm.SetMetricUseFixedImageGradientFilter(False)  # the grid needs metric values only (they do not depend on it)
    rm.SetMetricUseMovingImageGradientFilter(False)
    rm.SetInterpolator(sitk.sitkLinear)
    shrink = max(1, int(min(frame.fixed.GetSize()) // 64))
    rm.SetMetricSamplingStrategy(rm.NONE)
    rm.SetShrinkFactorsPerLevel([shrink])
    rm.SetSmoothingSigmasPerLevel([shrink / 2.0])
    rm.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    if stage.use_masks and frame.fixed_mask is not None:
        rm.SetMetricFixedMask(frame.fixed_mask)
    if stage.use_masks and frame.moving_mask is not None:
        rm.SetMetricMovingMask(frame.moving_mask)
    return rm, frame.fixed, frame.moving
