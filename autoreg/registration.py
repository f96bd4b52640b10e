"""The engine: the only module that drives ``sitk.ImageRegistrationMethod``.

``register(recipe, pair)`` runs the recipe's stages in order and returns one transform mapping FIXED physical points
to MOVING physical points (ITK's convention), plus a record per pyramid level.

Normalised frame. Every registration runs on copies of the images whose spacing and origin are scaled by
``k = 1 / geometric_mean(fixed spacing)``, so that a fixed voxel measures about one unit. Learning rates, gradient
tolerances, smoothing sigmas and control-point spacings then mean the same thing whatever the data's unit (0.1 mm
or 10 mm voxels); lengths the recipe gives in mm are converted with the same ``k``. The result is mapped back:
``T(p) = T_k(k p) / k``, which is exact for every transform kind used here.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:  # this module imports nothing of autoreg: `export --format python` ships its source as is
    from .data import PairData
    from .recipe import Recipe, Stage

LINEAR_KINDS = ("translation", "rigid", "similarity", "affine")


class RegistrationFailed(Exception):
    """A registration that could not run to its end (SimpleITK raised); ``reason`` is short and groupable."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RegistrationPruned(Exception):
    """Raised through a level callback to stop a hopeless registration at a coarse level."""

    def __init__(self, stage: int, level: int):
        self.stage = stage
        self.level = level
        super().__init__(f"pruned after stage {stage} level {level}")


def threads_of(recipe: Any) -> int:
    """ITK threads a recipe asks for: 1 when deterministic, else its ``threads`` (0: ITK's default)."""
    return 1 if recipe.deterministic else int(recipe.threads)


def as_scalar_float(image: sitk.Image) -> sitk.Image:
    """The image as float32 scalars; colour (RGB/RGBA) becomes ITU-R BT.601 luminance, other vectors their mean."""
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        channels = [sitk.Cast(sitk.VectorIndexSelectionCast(image, i), sitk.sitkFloat32) for i in range(ncomp)]
        if ncomp in (3, 4):
            image = channels[0] * 0.299 + channels[1] * 0.587 + channels[2] * 0.114
        else:
            image = sum(channels[1:], channels[0]) / float(ncomp)
    return sitk.Cast(image, sitk.sitkFloat32)

log = logging.getLogger(__name__)


@dataclass
class LevelRecord:
    """What one pyramid level of one stage did; TRE is that of the whole transform at the level's end."""

    stage: int
    level: int
    transform: str
    shrink: int
    sigma: float
    iterations: int = 0
    metric_value: float = float("nan")
    seconds: float = 0.0
    tre_mean: float | None = None
    stop_condition: str | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class RegistrationResult:
    transform: sitk.Transform
    initial_transform: sitk.Transform
    levels: list[LevelRecord] = field(default_factory=list)
    stop_conditions: list[str] = field(default_factory=list)
    seconds: float = 0.0


#: Called at the end of every pyramid level with its record and a getter of the whole transform so far (in the
#: data's physical frame); it may raise ``RegistrationPruned`` to stop the registration.
LevelCallback = Callable[[LevelRecord, Callable[[], sitk.Transform]], None]

# --- frame normalisation -----------------------------------------------------------------------------------


def frame_scale(image: sitk.Image) -> float:
    """``k`` such that the image's voxels measure about one unit once spacing is multiplied by ``k``."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    return float(1.0 / np.exp(np.mean(np.log(spacing))))


def scale_image(image: sitk.Image, k: float) -> sitk.Image:
    """A copy sharing the voxels, with spacing and origin multiplied by ``k`` (physical p -> k p)."""
    if k == 1.0:
        return image
    out = sitk.Image(image)
    out.SetSpacing(tuple(s * k for s in image.GetSpacing()))
    out.SetOrigin(tuple(o * k for o in image.GetOrigin()))
    return out


def unscale_transform(tx: sitk.Transform, k: float) -> sitk.Transform:
    """Map a transform found in the frame scaled by ``k`` back: ``T(p) = T_k(k p) / k``."""
    if k == 1.0:
        return tx
    inv = 1.0 / k
    tx = tx.Downcast()
    name = tx.GetName()
    if name == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        out = sitk.CompositeTransform(tx.GetDimension())
        for i in range(comp.GetNumberOfTransforms()):
            out.AddTransform(unscale_transform(comp.GetNthTransform(i), k))
        return out
    if name == "TranslationTransform":
        t = sitk.TranslationTransform(tx)
        return sitk.TranslationTransform(t.GetDimension(), tuple(c * inv for c in t.GetOffset()))
    if name == "BSplineTransform":
        b = sitk.BSplineTransform(tx)
        out = sitk.BSplineTransform(b.GetDimension(), b.GetOrder())
        out.SetTransformDomainOrigin(tuple(c * inv for c in b.GetTransformDomainOrigin()))
        out.SetTransformDomainPhysicalDimensions(tuple(c * inv for c in b.GetTransformDomainPhysicalDimensions()))
        out.SetTransformDomainDirection(b.GetTransformDomainDirection())
        out.SetTransformDomainMeshSize(b.GetTransformDomainMeshSize())
        out.SetParameters(tuple(c * inv for c in b.GetParameters()))
        return out
    # Every other kind here is a MatrixOffsetTransformBase: matrix unchanged, centre and translation scaled.
    out = _copy_typed(tx)
    out.SetCenter(tuple(c * inv for c in out.GetCenter()))
    out.SetTranslation(tuple(c * inv for c in out.GetTranslation()))
    return out


_TYPED = {
    "Euler2DTransform": sitk.Euler2DTransform,
    "Euler3DTransform": sitk.Euler3DTransform,
    "Similarity2DTransform": sitk.Similarity2DTransform,
    "Similarity3DTransform": sitk.Similarity3DTransform,
    "AffineTransform": sitk.AffineTransform,
    "VersorRigid3DTransform": sitk.VersorRigid3DTransform,
    "ScaleSkewVersor3DTransform": sitk.ScaleSkewVersor3DTransform,
}


def _copy_typed(tx: sitk.Transform) -> sitk.Transform:
    return _TYPED[tx.GetName()](tx)


# --- linear state: one (matrix, centre, translation) carried from stage to stage ------------------------------


@dataclass
class _Linear:
    matrix: np.ndarray
    center: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls, dim: int, center) -> _Linear:
        return cls(np.eye(dim), np.asarray(center, float), np.zeros(dim))

    @classmethod
    def of(cls, tx: sitk.Transform) -> _Linear:
        dim = tx.GetDimension()
        if tx.GetName() == "TranslationTransform":
            return cls(np.eye(dim), np.zeros(dim), np.asarray(sitk.TranslationTransform(tx).GetOffset()))
        typed = _copy_typed(tx)
        return cls(
            np.asarray(typed.GetMatrix()).reshape(dim, dim),
            np.asarray(typed.GetCenter()),
            np.asarray(typed.GetTranslation()),
        )

    def as_kind(self, kind: str) -> sitk.Transform:
        """The transform of ``kind`` equal to this state (exact: kinds only gain freedom along the stages)."""
        dim = len(self.center)
        if kind == "translation":
            # x -> A(x - c) + c + t with A = I is x + t
            return sitk.TranslationTransform(dim, tuple(self.translation + (self.matrix - np.eye(dim)) @ (-self.center)))
        tx: sitk.Transform
        if kind == "rigid":
            tx = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
        elif kind == "similarity":
            tx = sitk.Similarity2DTransform() if dim == 2 else sitk.Similarity3DTransform()
        elif kind == "affine":
            tx = sitk.AffineTransform(dim)
        else:
            raise ValueError(kind)
        tx.SetCenter(tuple(self.center))
        if not np.allclose(self.matrix, np.eye(dim)):
            tx.SetMatrix(tuple(self.matrix.ravel()))
        tx.SetTranslation(tuple(self.translation))
        return tx

    def as_affine(self) -> sitk.AffineTransform:
        return sitk.AffineTransform(tuple(self.matrix.ravel()), tuple(self.translation), tuple(self.center))


# --- setting up sitk.ImageRegistrationMethod from a stage ---------------------------------------------------

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _estimate(rm: sitk.ImageRegistrationMethod, how: str):
    return {"never": rm.Never, "once": rm.Once, "each_iteration": rm.EachIteration}[how]


def _configure_metric(rm: sitk.ImageRegistrationMethod, m: Any) -> None:
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


def _configure_optimizer(rm: sitk.ImageRegistrationMethod, o: Any) -> None:
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


def level_sizes(image: sitk.Image, shrink_factors) -> list[tuple[int, ...]]:
    """The grid size of each pyramid level (ITK's shrink: ``max(1, n // s)`` voxels per axis)."""
    return [tuple(max(1, n // s) for n in image.GetSize()) for s in shrink_factors]


def sampling_fractions(sampling: Any, sizes: list[tuple[int, ...]]) -> list[float]:
    """The fraction of each level's voxels the metric samples: the percentage, or ``points`` capped by the level."""
    if sampling.strategy == "none":
        return [1.0] * len(sizes)
    points = getattr(sampling, "points", None)
    if points is None:
        return [float(sampling.percentage)] * len(sizes)
    return [min(1.0, points / float(np.prod(size))) for size in sizes]


def _configure_sampling(rm: sitk.ImageRegistrationMethod, stage: Any, fixed: sitk.Image, seed: int) -> None:
    s = stage.sampling
    rm.SetMetricSamplingStrategy({"none": rm.NONE, "regular": rm.REGULAR, "random": rm.RANDOM}[s.strategy])
    if s.strategy == "none":
        return
    if getattr(s, "points", None) is None:
        rm.SetMetricSamplingPercentage(s.percentage, seed)
    else:
        fractions = sampling_fractions(s, level_sizes(fixed, stage.pyramid.shrink_factors))
        rm.SetMetricSamplingPercentagePerLevel(fractions, seed)


def _sigmas(stage: Stage, k: float) -> tuple[list[float], bool]:
    p = stage.pyramid
    if p.sigma_units == "mm":
        return [s * k for s in p.smoothing_sigmas], True
    return list(p.smoothing_sigmas), False


def bspline_mesh(stage: Stage, fixed: sitk.Image, k: float = 1.0) -> list[int]:
    """Mesh cells per axis: given, or the fixed extent divided by the control-point spacing."""
    grid = stage.transform
    if getattr(grid, "mesh_size", None) is not None:
        mesh = list(grid.mesh_size)
        if len(mesh) == 1:
            mesh = mesh * fixed.GetDimension()
        if len(mesh) != fixed.GetDimension():
            raise RegistrationFailed("bad bspline mesh", f"mesh_size has {len(mesh)} entries for a {fixed.GetDimension()}D image")
        return mesh
    # In the normalised frame a fixed voxel is ~1 unit (exactly 1 for isotropic data).
    # ``fixed`` is already in the normalised frame: a voxel measures 1 / frame_scale(fixed) (1 for isotropic data).
    if grid.spacing_units == "mm":
        spacing = grid.control_point_spacing * k
    else:
        spacing = grid.control_point_spacing / frame_scale(fixed)
    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    return [max(1, int(round(e / spacing))) for e in extent]


def bspline_schedule(stage: Stage, fixed: sitk.Image, k: float = 1.0) -> tuple[list[int], list[int] | None]:
    """The grid a BSpline stage starts from and, with ``refine``, the per-level scale factors that double it.

    Without refinement: the stage's mesh, no factors. With it, over L levels: the mesh divided by 2^(L-1) (at least
    one cell per axis) and factors 1, 2, ..., 2^(L-1), so the finest level has the stage's grid, rounded up to a
    multiple of 2^(L-1)."""
    mesh = bspline_mesh(stage, fixed, k)
    levels = len(stage.pyramid.shrink_factors)
    if not getattr(stage.transform, "refine", False) or levels < 2:
        return mesh, None
    step = 2 ** (levels - 1)
    return [max(1, -(-m // step)) for m in mesh], [2**level for level in range(levels)]


# --- failure reasons -----------------------------------------------------------------------------------------

_REASONS = [
    (re.compile(r"joint pdf summed to zero", re.I), "joint PDF summed to zero"),
    (re.compile(r"samples map outside moving image|no valid points|all samples map outside|"
                r"must have 1 or more points", re.I),
     "too few samples inside the moving image (little overlap or too sparse sampling)"),
    (re.compile(r"bad_alloc|out of memory|failed to allocate|MemoryError", re.I), "out of memory"),
    (re.compile(r"not positive definite|singular", re.I), "singular matrix"),
]


def failure_reason(err: BaseException) -> tuple[str, str]:
    """(short groupable reason, the exception's last meaningful text) for a registration exception."""
    text = str(err)
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason, _itk_message(text)
    return _itk_message(text) or type(err).__name__, text[-500:]


def _itk_message(text: str) -> str:
    m = re.findall(r"ITK ERROR: [^:]*: ([^\n]*)", text)
    if m:
        return m[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def itk_seed(seed: int, stage_index: int) -> int:
    """The sampling seed ITK gets: never 0, which SimpleITK reads as 'use the wall clock'."""
    return (seed + stage_index) % (2**31 - 2) + 1


# --- threads --------------------------------------------------------------------------------------------------


@contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Set ITK's global default thread count for the duration (0 keeps the current one)."""
    if n <= 0:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


# --- the engine -----------------------------------------------------------------------------------------------


class _Frame:
    """The pair in the normalised frame, with landmarks for per-level TRE."""

    def __init__(self, pair: PairData):
        self.k = frame_scale(pair.fixed)
        self.fixed = scale_image(pair.fixed, self.k)
        self.moving = scale_image(pair.moving, self.k)
        self.fixed_mask = scale_image(pair.fixed_mask, self.k) if pair.fixed_mask is not None else None
        self.moving_mask = scale_image(pair.moving_mask, self.k) if pair.moving_mask is not None else None
        self.fixed_points = pair.fixed_points * self.k if pair.fixed_points is not None else None
        self.moving_points = pair.moving_points * self.k if pair.moving_points is not None else None
        self.dim = pair.dim

    def tre_mean(self, tx: sitk.Transform) -> float | None:
        """Mean TRE in physical units of the original data for a transform of the normalised frame."""
        if self.fixed_points is None:
            return None
        mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in self.fixed_points])
        return float(np.mean(np.linalg.norm(mapped - self.moving_points, axis=1)) / self.k)


def register(
    recipe: Recipe,
    pair: PairData,
    *,
    level_callback: LevelCallback | None = None,
    seed: int | None = None,
    time_limit: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RegistrationResult:
    """Run ``recipe`` on ``pair``; raises ``RegistrationFailed`` with a short reason, or ``RegistrationPruned``
    when ``level_callback`` raised it. ``seed`` overrides the recipe's sampling seed; past ``time_limit`` seconds
    the registration stops at its next iteration and fails with reason 'time limit'; when ``should_stop()`` turns
    true (Ctrl-C) it stops likewise with reason 'interrupted'."""
    t0 = time.perf_counter()
    frame = _Frame(pair)
    seed = recipe.seed if seed is None else seed
    with itk_threads(threads_of(recipe)):
        try:
            deadline = None if time_limit is None else time.monotonic() + time_limit
            result = _run(recipe, frame, seed, level_callback, deadline, should_stop)
        except RegistrationPruned:
            raise
        except RegistrationFailed:
            raise
        except MemoryError as err:
            raise RegistrationFailed("out of memory", str(err)) from None
        except RuntimeError as err:
            reason, detail = failure_reason(err)
            raise RegistrationFailed(reason, detail) from None
    result.transform = unscale_transform(result.transform, frame.k)
    result.initial_transform = unscale_transform(result.initial_transform, frame.k)
    params = _all_parameters(result.transform)
    if not np.all(np.isfinite(params)):
        raise RegistrationFailed("diverged (non-finite transform parameters)")
    result.seconds = time.perf_counter() - t0
    return result


def _all_parameters(tx: sitk.Transform) -> np.ndarray:
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        parts = [_all_parameters(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(tx.GetParameters(), dtype=float)


def initial_linear(recipe: Recipe, frame: _Frame, seed: int) -> _Linear:
    """The initializer: centres (geometry/moments) or identity, then the optional coarse rotation search."""
    init = recipe.initializer
    fixed, moving = frame.fixed, frame.moving
    dim = frame.dim
    center = np.asarray(
        fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])
    )
    if init.kind == "none":
        state = _Linear.identity(dim, center)
    else:
        how = (
            sitk.CenteredTransformInitializerFilter.GEOMETRY
            if init.kind == "geometry"
            else sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        tx = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dim), how)
        state = _Linear.of(tx)
    first_linear = next((s for s in recipe.stages if s.transform.kind in LINEAR_KINDS), None)
    if init.rotation_search is not None and first_linear is not None and first_linear.transform.kind != "translation":
        state = _rotation_search(recipe, frame, state, first_linear, seed)
    return state


def _coarse_shrink(image: sitk.Image, target: int = 64) -> int:
    return max(1, int(min(image.GetSize()) // target))


def _rotation_search(recipe: Recipe, frame: _Frame, state: _Linear, stage: Stage, seed: int) -> _Linear:
    """Exhaustive search over rotations (and optionally shifts) at a coarse level, with the stage's metric."""
    rs = recipe.initializer.rotation_search
    assert rs is not None
    dim = frame.dim
    rigid = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
    rigid.SetCenter(tuple(state.center))
    rigid.SetTranslation(tuple(state.translation))
    n_angles = max(1, int(math.floor(rs.max_angle_deg / rs.step_deg + 1e-9)))
    step = math.radians(rs.step_deg)
    n_rot = 1 if dim == 2 else 3
    extent = np.array([n * s for n, s in zip(frame.fixed.GetSize(), frame.fixed.GetSpacing())])
    if rs.shift_steps > 0 and rs.max_shift_fraction > 0:
        shift_step = rs.max_shift_fraction * float(np.min(extent)) / rs.shift_steps
        shift_steps, shift_scale = rs.shift_steps, shift_step / step
    else:
        shift_steps, shift_scale = 0, 1.0
    rm = sitk.ImageRegistrationMethod()
    _configure_metric(rm, stage.metric)
    rm.SetMetricSamplingStrategy(rm.NONE)
    rm.SetInterpolator(sitk.sitkLinear)
    if stage.use_masks and frame.fixed_mask is not None:
        rm.SetMetricFixedMask(frame.fixed_mask)
    if stage.use_masks and frame.moving_mask is not None:
        rm.SetMetricMovingMask(frame.moving_mask)
    shrink = _coarse_shrink(frame.fixed)
    rm.SetShrinkFactorsPerLevel([shrink])
    rm.SetSmoothingSigmasPerLevel([shrink / 2.0])
    rm.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    rm.SetOptimizerAsExhaustive(numberOfSteps=[n_angles] * n_rot + [shift_steps] * dim, stepLength=step)
    rm.SetOptimizerScales([1.0] * n_rot + [shift_scale] * dim)
    rm.SetInitialTransform(rigid, inPlace=True)
    rm.Execute(frame.fixed, frame.moving)
    best = _Linear.of(rigid)
    # keep any scale the centre initializer found (it finds none today, but stay exact if it ever does)
    best.matrix = best.matrix @ state.matrix
    log.debug("rotation search: %s -> %s", state.translation, best.translation)
    return best


def _run(recipe: Recipe, frame: _Frame, seed: int, level_callback: LevelCallback | None,
         deadline: float | None = None, should_stop: Callable[[], bool] | None = None) -> RegistrationResult:
    linear = initial_linear(recipe, frame, seed)
    initial = linear.as_affine()
    result = RegistrationResult(transform=initial, initial_transform=initial)
    current_linear: sitk.Transform = initial
    deformables: list[sitk.Transform] = []
    for index, stage in enumerate(recipe.stages):
        rm = sitk.ImageRegistrationMethod()
        _configure_metric(rm, stage.metric)
        _configure_sampling(rm, stage, frame.fixed, itk_seed(seed, index))
        rm.SetInterpolator(_INTERPOLATORS[stage.interpolator])
        if stage.use_masks and frame.fixed_mask is not None:
            rm.SetMetricFixedMask(frame.fixed_mask)
        if stage.use_masks and frame.moving_mask is not None:
            rm.SetMetricMovingMask(frame.moving_mask)
        sigmas, physical = _sigmas(stage, frame.k)
        rm.SetShrinkFactorsPerLevel(list(stage.pyramid.shrink_factors))
        rm.SetSmoothingSigmasPerLevel(sigmas)
        rm.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(physical)
        if threads_of(recipe) > 0:
            rm.SetNumberOfThreads(threads_of(recipe))
        _configure_optimizer(rm, stage.optimizer)

        factors = None
        if stage.transform.kind in LINEAR_KINDS:
            optimized = linear.as_kind(stage.transform.kind)
            moving_initial = None
        else:
            mesh, factors = bspline_schedule(stage, frame.fixed, frame.k)
            optimized = sitk.BSplineTransformInitializer(frame.fixed, mesh, order=3)
            moving_initial = _compose([current_linear, *deformables])
            rm.SetMovingInitialTransform(moving_initial)
        if factors is not None:  # a BSpline stage that refines its grid
            rm.SetInitialTransformAsBSpline(optimized, inPlace=True, scaleFactors=factors)
        else:
            rm.SetInitialTransform(optimized, inPlace=True)

        tracker = _LevelTracker(rm, stage, index, frame, optimized, moving_initial, level_callback, deadline,
                                should_stop)
        _install_quiet_stop()
        tracker.attach()
        try:
            rm.Execute(frame.fixed, frame.moving)
        except RuntimeError:
            if tracker.pruned is not None:
                raise tracker.pruned from None
            if tracker.timed_out:
                raise RegistrationFailed("time limit", f"stopped in stage {index} level {tracker.level}") from None
            if tracker.interrupted:
                raise RegistrationFailed("interrupted", f"stopped in stage {index} level {tracker.level}") from None
            raise
        stop = rm.GetOptimizerStopConditionDescription()
        tracker.finish(stop)
        result.levels.extend(tracker.records)
        result.stop_conditions.append(stop)

        if stage.transform.kind in LINEAR_KINDS:
            linear = _Linear.of(optimized)
            current_linear = optimized
        else:
            deformables.append(optimized)
    result.transform = _compose([current_linear, *deformables])
    return result


def _compose(transforms: list[sitk.Transform]) -> sitk.Transform:
    """One transform applying the last of ``transforms`` first (ITK's composite order)."""
    if len(transforms) == 1:
        return transforms[0]
    comp = sitk.CompositeTransform(transforms[0].GetDimension())
    for tx in transforms:
        comp.AddTransform(tx)
    return comp


class _StopExecute(Exception):
    """Raised inside an observer to stop ``Execute`` (it surfaces as RuntimeError); the reason is kept aside."""


def _quiet_stop_hook(default_hook):
    def hook(kind, value, tb):  # SWIG prints callback exceptions through sys.excepthook: keep ours silent
        if not issubclass(kind, _StopExecute):
            default_hook(kind, value, tb)

    hook.autoreg = True  # type: ignore[attr-defined]
    return hook


def _install_quiet_stop() -> None:
    if not getattr(sys.excepthook, "autoreg", False):
        sys.excepthook = _quiet_stop_hook(sys.excepthook)


class _LevelTracker:
    """Observers that turn SimpleITK's events into one ``LevelRecord`` per pyramid level."""

    def __init__(self, rm, stage: Stage, index: int, frame: _Frame, optimized, moving_initial, callback, deadline=None,
                 should_stop=None):
        self.rm, self.stage, self.index, self.frame = rm, stage, index, frame
        self.optimized, self.moving_initial, self.callback = optimized, moving_initial, callback
        self.records: list[LevelRecord] = []
        self.level = -1
        self.t_level = 0.0
        self.iterations = 0
        self.metric_value = float("nan")
        self.pruned: RegistrationPruned | None = None
        self.deadline = deadline
        self.timed_out = False
        self.should_stop = should_stop
        self.interrupted = False

    def attach(self) -> None:
        self.rm.AddCommand(sitk.sitkMultiResolutionIterationEvent, self._on_level)
        self.rm.AddCommand(sitk.sitkIterationEvent, self._on_iteration)

    def _on_iteration(self) -> None:
        self.iterations = self.rm.GetOptimizerIteration() + 1
        self.metric_value = self.rm.GetMetricValue()
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            raise _StopExecute()
        if self.should_stop is not None and self.should_stop():
            self.interrupted = True
            raise _StopExecute()

    def _on_level(self) -> None:
        # Fires at the start of each level: the optimizer position is still the previous level's end.
        if self.level >= 0:
            self._close(self._current_transform(), None)
        self.level += 1
        self.t_level = time.perf_counter()
        self.iterations = 0
        self.metric_value = float("nan")

    def _current_transform(self) -> sitk.Transform:
        tx = sitk.Transform(self.optimized)
        tx.SetParameters(self.rm.GetOptimizerPosition())
        return _compose([self.moving_initial, tx]) if self.moving_initial is not None else tx

    def _close(self, tx: sitk.Transform, stop: str | None) -> None:
        p = self.stage.pyramid
        lvl = min(self.level, len(p.shrink_factors) - 1)
        rec = LevelRecord(
            stage=self.index,
            level=lvl,
            transform=self.stage.transform.kind,
            shrink=p.shrink_factors[lvl],
            sigma=p.smoothing_sigmas[lvl],
            iterations=self.iterations,
            metric_value=float(self.metric_value),
            seconds=time.perf_counter() - self.t_level,
            tre_mean=self.frame.tre_mean(tx),
            stop_condition=stop,
        )
        self.records.append(rec)
        if self.callback is not None:
            try:
                self.callback(rec, lambda: unscale_transform(tx, self.frame.k))
            except RegistrationPruned as err:
                self.pruned = err
                raise _StopExecute() from None

    def finish(self, stop: str) -> None:
        final = _compose([self.moving_initial, self.optimized]) if self.moving_initial is not None else self.optimized
        try:
            self._close(final, stop)
        except _StopExecute:
            assert self.pruned is not None
            raise self.pruned from None
