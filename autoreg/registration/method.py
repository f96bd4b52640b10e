"""Setting up one ``sitk.ImageRegistrationMethod`` from a stage of a recipe, and the observers that turn its events
into per-level records, enforce the clock and let a level callback prune."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import SimpleITK as sitk

from .core import NO_OVERLAP, Clock, Halt, LevelRecord, RegistrationFailed, RegistrationPruned, itk_seed
from .frame import NO_OVERLAP_SHARE, compose, unscale_transform
from .pyramid import inside_share, sampling_fraction

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _estimate(rm: sitk.ImageRegistrationMethod, how: str):
    return {"never": rm.Never, "once": rm.Once, "each_iteration": rm.EachIteration}[how]


def configure_metric(rm: sitk.ImageRegistrationMethod, m: Any) -> None:
    """The stage's metric, with SimpleITK's keyword arguments of the same names as the recipe's settings."""
    if m.kind == "mattes":
        rm.SetMetricAsMattesMutualInformation(numberOfHistogramBins=m.number_of_histogram_bins)
    elif m.kind == "joint_hist_mi":
        rm.SetMetricAsJointHistogramMutualInformation(
            numberOfHistogramBins=m.number_of_histogram_bins,
            varianceForJointPDFSmoothing=m.variance_for_joint_pdf_smoothing,
        )
    elif m.kind == "ants_nc":
        rm.SetMetricAsANTSNeighborhoodCorrelation(radius=m.radius)
    elif m.kind == "correlation":
        rm.SetMetricAsCorrelation()
    elif m.kind == "mean_squares":
        rm.SetMetricAsMeanSquares()
    else:
        raise ValueError(f"unknown metric {m.kind!r}")
    rm.SetMetricUseFixedImageGradientFilter(bool(m.use_fixed_image_gradient_filter))
    rm.SetMetricUseMovingImageGradientFilter(bool(m.use_moving_image_gradient_filter))


def configure_optimizer(rm: sitk.ImageRegistrationMethod, o: Any) -> None:
    """The stage's optimizer and, for the kinds that use them, its parameter scales."""
    if o.kind == "gradient_descent":
        rm.SetOptimizerAsGradientDescent(
            learningRate=o.learning_rate,
            numberOfIterations=o.number_of_iterations,
            convergenceMinimumValue=o.convergence_minimum_value,
            convergenceWindowSize=o.convergence_window_size,
            estimateLearningRate=_estimate(rm, o.estimate_learning_rate),
            maximumStepSizeInPhysicalUnits=o.maximum_step_size_in_physical_units,
        )
    elif o.kind == "regular_step_gd":
        rm.SetOptimizerAsRegularStepGradientDescent(
            learningRate=o.learning_rate,
            minStep=o.min_step,
            numberOfIterations=o.number_of_iterations,
            relaxationFactor=o.relaxation_factor,
            gradientMagnitudeTolerance=o.gradient_magnitude_tolerance,
            estimateLearningRate=_estimate(rm, o.estimate_learning_rate),
            maximumStepSizeInPhysicalUnits=o.maximum_step_size_in_physical_units,
        )
    elif o.kind == "cg_line_search":
        rm.SetOptimizerAsConjugateGradientLineSearch(
            learningRate=o.learning_rate,
            numberOfIterations=o.number_of_iterations,
            convergenceMinimumValue=o.convergence_minimum_value,
            convergenceWindowSize=o.convergence_window_size,
            lineSearchLowerLimit=o.line_search_lower_limit,
            lineSearchUpperLimit=o.line_search_upper_limit,
            lineSearchEpsilon=o.line_search_epsilon,
            lineSearchMaximumIterations=o.line_search_maximum_iterations,
            estimateLearningRate=_estimate(rm, o.estimate_learning_rate),
            maximumStepSizeInPhysicalUnits=o.maximum_step_size_in_physical_units,
        )
    elif o.kind == "lbfgsb":
        rm.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=o.gradient_convergence_tolerance,
            numberOfIterations=o.number_of_iterations,
            maximumNumberOfCorrections=o.maximum_number_of_corrections,
            maximumNumberOfFunctionEvaluations=o.maximum_number_of_function_evaluations,
            costFunctionConvergenceFactor=o.cost_function_convergence_factor,
        )
    elif o.kind == "lbfgs2":
        rm.SetOptimizerAsLBFGS2(
            solutionAccuracy=o.solution_accuracy,
            numberOfIterations=o.number_of_iterations,
            hessianApproximateAccuracy=o.hessian_approximate_accuracy,
            deltaConvergenceDistance=o.delta_convergence_distance,
            deltaConvergenceTolerance=o.delta_convergence_tolerance,
            lineSearchMaximumEvaluations=o.line_search_maximum_evaluations,
        )
    else:
        raise ValueError(f"unknown optimizer {o.kind!r}")
    scales = getattr(o, "scales", "none")
    if scales == "physical_shift":
        rm.SetOptimizerScalesFromPhysicalShift()
    elif scales == "index_shift":
        rm.SetOptimizerScalesFromIndexShift()
    elif scales == "jacobian":
        rm.SetOptimizerScalesFromJacobian()


def one_prepared_level(
    rm: sitk.ImageRegistrationMethod, levels: Any, shrink: int, use_masks: bool
) -> sitk.Image | None:
    """Run ``rm`` on one already shrunk and smoothed level: its masks (when used) and a single ITK level; returns the
    fixed mask (None without one)."""
    fixed_mask = levels.mask("fixed", shrink) if use_masks else None
    moving_mask = levels.mask("moving", shrink) if use_masks else None
    if fixed_mask is not None:
        rm.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        rm.SetMetricMovingMask(moving_mask)
    rm.SetShrinkFactorsPerLevel([1])
    rm.SetSmoothingSigmasPerLevel([0.0])
    return fixed_mask


def sampling_strategy(rm: sitk.ImageRegistrationMethod, strategy: str):
    return {"none": rm.NONE, "regular": rm.REGULAR, "random": rm.RANDOM}[strategy]


# --- stopping Execute from an observer --------------------------------------------------------------------------


class StopExecute(Exception):
    """Raised inside an observer to stop ``Execute`` (it surfaces as RuntimeError); the reason is kept aside."""


def _quiet_stop_hook(default_hook):
    def hook(kind, value, tb):  # SWIG prints callback exceptions through sys.excepthook: keep ours silent
        if not issubclass(kind, StopExecute):
            default_hook(kind, value, tb)

    hook.autoreg = True  # type: ignore[attr-defined]
    return hook


def install_quiet_stop() -> None:
    if not getattr(sys.excepthook, "autoreg", False):
        sys.excepthook = _quiet_stop_hook(sys.excepthook)


class LevelTracker:
    """Turns a stage's optimisation into one ``LevelRecord`` per pyramid level, checks the clock at every iteration,
    and passes each finished level to the callback (which may prune).

    ITK's own pyramid announces levels with ``MultiResolutionIterationEvent`` (at the start of each level, when the
    optimizer still holds the previous level's end); prepared pyramids call :meth:`start_level` and
    :meth:`close_level` around each level's ``Execute``."""

    def __init__(
        self,
        stage: Any,
        index: int,
        frame: Any,
        moving_initial,
        callback,
        clock: Clock,
        level_need: Callable[[int], float] | None = None,
        min_overlap: float = 0.0,
    ):
        self.stage, self.index, self.frame = stage, index, frame
        #: A level ending with less of the fixed image inside the moving one than this has diverged (``Frame.overlap``).
        self.min_overlap = min_overlap
        self.failed: RegistrationFailed | None = None
        self.moving_initial, self.callback, self.clock = moving_initial, callback, clock
        #: Seconds a level needs before its first iteration ends (ITK's pyramid asks at each level's start).
        self.level_need = level_need
        self.records: list[LevelRecord] = []
        self.rm: sitk.ImageRegistrationMethod | None = None
        self.optimized: sitk.Transform | None = None
        self.level = -1
        self.t_level = 0.0
        self.t_first: float | None = None
        self.iterations = 0
        self.metric_value = float("nan")
        self.pruned: RegistrationPruned | None = None
        self.halt: Halt | None = None
        self.samples: int | None = None
        self.voxels: int | None = None
        self.t_iteration: float | None = None

    def attach(self, rm: sitk.ImageRegistrationMethod, optimized: sitk.Transform, *, itk_levels: bool) -> None:
        self.rm, self.optimized = rm, optimized
        if itk_levels:
            rm.AddCommand(sitk.sitkMultiResolutionIterationEvent, self._on_itk_level)
        rm.AddCommand(sitk.sitkIterationEvent, self._on_iteration)

    def _on_iteration(self) -> None:
        now = time.perf_counter()
        # the next iteration will take about as long as the last one: stop now if it would not fit
        last = now - self.t_iteration if self.t_iteration is not None and self.t_first is not None else 0.0
        if self.t_first is None:
            self.t_first = now
        self.t_iteration = now
        self.iterations = self.rm.GetOptimizerIteration() + 1
        self.metric_value = self.rm.GetMetricValue()
        try:
            self.clock.check(last)
        except Halt as halt:
            self.halt = halt
            raise StopExecute() from None

    def _on_itk_level(self) -> None:
        if self.level >= 0:
            self.close_level(self.current_transform(), None)
        self.start_level(self.level + 1)
        try:
            self.clock.check(self.level_need(self.level) if self.level_need is not None and self.level > 0 else 0.0)
        except Halt as halt:
            self.halt = halt
            raise StopExecute() from None

    def start_level(self, level: int, *, samples: int | None = None, voxels: int | None = None) -> None:
        self.level = level
        self.t_level = time.perf_counter()
        self.t_first = None
        self.t_iteration = None
        self.iterations = 0
        self.metric_value = float("nan")
        self.samples, self.voxels = samples, voxels

    def current_transform(self) -> sitk.Transform:
        tx = sitk.Transform(self.optimized)
        tx.SetParameters(self.rm.GetOptimizerPosition())
        return compose([self.moving_initial, tx]) if self.moving_initial is not None else tx

    def final_transform(self) -> sitk.Transform:
        return compose([self.moving_initial, self.optimized]) if self.moving_initial is not None else self.optimized

    def close_level(self, tx: sitk.Transform, stop: str | None) -> None:
        """Record the level that just ended; the callback may prune (``StopExecute`` inside ITK's events)."""
        p = self.stage.pyramid
        lvl = min(self.level, len(p.shrink_factors) - 1)
        now = time.perf_counter()
        rec = LevelRecord(
            stage=self.index,
            level=lvl,
            transform=self.stage.transform.kind,
            shrink=p.shrink_factors[lvl],
            sigma=p.smoothing_sigmas[lvl],
            iterations=self.iterations,
            metric_value=float(self.metric_value),
            seconds=now - self.t_level,
            tre_mean=self.frame.tre_mean(tx),
            stop_condition=stop,
            samples=self.samples,
            voxels=self.voxels,
            parameters=self.optimized.GetNumberOfParameters() if self.optimized is not None else None,
            setup_seconds=(self.t_first if self.t_first is not None else now) - self.t_level,
        )
        self.records.append(rec)
        if self.callback is not None:
            try:
                self.callback(rec, lambda: unscale_transform(tx, self.frame.k))
            except RegistrationPruned as err:
                self.pruned = err
                raise StopExecute() from None
        if self.min_overlap > 0.0 and (share := self.frame.overlap(tx)) < self.min_overlap:
            self.failed = RegistrationFailed(
                NO_OVERLAP,
                f"after stage {self.index} level {lvl} {share:.1%} of the fixed image maps inside the moving image "
                f"({self.min_overlap / NO_OVERLAP_SHARE:.0%} at the start): the optimizer diverged",
            )
            raise StopExecute() from None

    def stopped(self) -> Exception | None:
        """What stopped the stage from inside a level's end: the callback's prune, or a lost overlap."""
        return self.pruned or self.failed

    def setup_rate(self) -> float | None:
        """Seconds of setup per voxel measured at the last level (to predict whether the next one fits the clock)."""
        if not self.records or not self.records[-1].voxels or self.records[-1].setup_seconds is None:
            return None
        return self.records[-1].setup_seconds / self.records[-1].voxels


ExecuteFn = Callable[[], None]


# --- one stage's method and levels ------------------------------------------------------------------------------


def changed(model: Any, **changes: Any) -> Any:
    """A copy of a recipe's model with ``changes``: a pydantic model here, plain attributes in a standalone script."""
    if hasattr(model, "model_copy"):
        return model.model_copy(update=changes)
    return SimpleNamespace(**{**vars(model), **changes})


def stage_method(stage: Any, threads: int, step: float | None = None) -> sitk.ImageRegistrationMethod:
    """The stage's registration method; ``step`` replaces the optimizer's maximum step (physical units)."""
    rm = sitk.ImageRegistrationMethod()
    configure_metric(rm, stage.metric)
    rm.SetMetricSamplingStrategy(sampling_strategy(rm, stage.sampling.strategy))
    rm.SetInterpolator(INTERPOLATORS[stage.interpolator])
    if threads > 0:
        rm.SetNumberOfThreads(threads)
    optimizer = stage.optimizer
    if step is not None:
        optimizer = changed(optimizer, maximum_step_size_in_physical_units=step)
    configure_optimizer(rm, optimizer)
    return rm


def execute(rm: sitk.ImageRegistrationMethod, tracker: LevelTracker, fixed: sitk.Image, moving: sitk.Image) -> str:
    """``Execute``, turning a stop from an observer back into what caused it (prune or clock)."""
    install_quiet_stop()
    try:
        rm.Execute(fixed, moving)
    except RuntimeError:
        if tracker.stopped() is not None:
            raise tracker.stopped() from None
        if tracker.halt is not None:
            raise tracker.halt from None
        raise
    return rm.GetOptimizerStopConditionDescription()


def close(tracker: LevelTracker, stop: str) -> None:
    """Record the level that ended with ``stop``; a prune by the level callback surfaces as itself."""
    try:
        tracker.close_level(tracker.final_transform(), stop)
    except StopExecute:
        assert tracker.stopped() is not None
        raise tracker.stopped() from None


def prepared_level(
    rm: sitk.ImageRegistrationMethod, stage: Any, index: int, frame: Any, shrink: int, voxels: int, seed: int
) -> float:
    """One prepared level's masks and sampling on ``rm`` (a single ITK level); returns the share of the level inside
    the fixed mask, read off the mask set on ``rm`` rather than a second one."""
    inside = inside_share(one_prepared_level(rm, frame.levels, shrink, stage.use_masks))
    if stage.sampling.strategy != "none":
        rm.SetMetricSamplingPercentage(sampling_fraction(stage.sampling, voxels, inside), itk_seed(seed, index))
    return inside
