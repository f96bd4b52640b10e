"""A recipe in the terms of elastix and ANTs: one elastix parameter map per stage, one antsRegistration
command line.

Pure functions of a recipe and the fixed image's grid (``Geometry``), which turns what the recipe states relative to
the data (sampling percentages, mesh sizes, voxel lengths) into the absolute numbers the peers take. Every setting is
translated where the peer has its equivalent; the rest is written as a comment (``not translated: ...``), and where a
peer's component differs in kind (elastix's ASGD is not SimpleITK's gradient descent) the comment says how.
Neither peer reproduces autoreg's registration exactly: sampling, optimizers and pyramids are their own.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .errors import UserError
from .recipe import DisplacementTransform, Recipe, Stage
from .registration import (
    LINEAR_KINDS,
    RegistrationFailed,
    axis_factors,
    bspline_schedule,
    frame_scale,
    itk_seed,
    level_sizes,
    sampling_fraction,
    search_grid,
)
from .registration.initializer import SEARCH_AXIS_VOXELS, SEARCH_POINTS, search_plan

PEER_FORMATS = ("elastix", "ants")
#: The script that runs the elastix parameter maps, beside them in the output folder.
ELASTIX_SCRIPT = "run_elastix.sh"


@dataclass(frozen=True)
class Geometry:
    """The fixed image's grid. It answers ``GetSize``/``GetSpacing``/``GetDimension`` like an image, so that the
    engine's own rules (``bspline_schedule``, ``level_sizes``) compute the grids and sample counts here too."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    name: str = "fixed"

    @classmethod
    def of(cls, image: Any, name: str = "fixed") -> Geometry:
        return cls(tuple(int(n) for n in image.GetSize()), tuple(float(s) for s in image.GetSpacing()), name)

    # the image API that the engine's helpers read
    def GetSize(self) -> tuple[int, ...]:
        return self.size

    def GetSpacing(self) -> tuple[float, ...]:
        return self.spacing

    def GetDimension(self) -> int:
        return len(self.size)

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def k(self) -> float:
        """The engine's frame scale: lengths it reads in its normalised frame are physical lengths times ``k``."""
        return frame_scale(self)

    def normalised(self) -> Geometry:
        return Geometry(self.size, tuple(s * self.k for s in self.spacing), self.name)

    def describe(self) -> str:
        return f"size {_x(self.size)}, spacing {_x(self.spacing)}"


# --- shared rules -------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    """A number as elastix and ANTs read it: integers bare, floats with up to 8 significant digits."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = f"{value:.8g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _x(values: Any) -> str:
    return "x".join(_num(v) for v in values)


def _levels(stage: Stage) -> int:
    return len(stage.pyramid.shrink_factors)


def _level_voxels(stage: Stage, geometry: Geometry) -> list[int]:
    p = stage.pyramid
    return [math.prod(size) for size in level_sizes(geometry, p.shrink_factors, prepared=p.shrink_images)]


def _sample_fractions(stage: Stage, geometry: Geometry) -> list[float]:
    return [sampling_fraction(stage.sampling, voxels) for voxels in _level_voxels(stage, geometry)]


def _coarse_shrink(recipe: Recipe, geometry: Geometry) -> int:
    """The engine's coarse level for the rotation search: ~48 voxels across when budgeted, ~64 in version 1."""
    budgeted = recipe.initializer.rotation_search.max_evaluations is not None
    return max(1, min(geometry.size) // (SEARCH_AXIS_VOXELS if budgeted else 64))


def _mesh_schedule(stage: Stage, geometry: Geometry) -> tuple[list[int], list[int] | None]:
    """The engine's BSpline grid of the stage on this geometry: starting mesh and per-level factors (refine)."""
    try:
        return bspline_schedule(stage, geometry.normalised(), geometry.k)
    except RegistrationFailed as err:
        raise UserError(f"{err.reason}: {err.detail}", key="stages") from None


def _final_mesh(stage: Stage, geometry: Geometry) -> list[int]:
    mesh, factors = _mesh_schedule(stage, geometry)
    return [m * (factors[-1] if factors else 1) for m in mesh]


def _max_step_mm(optimizer: Any, geometry: Geometry) -> float | None:
    """The optimizer's largest step in physical units; None: ITK's default (one voxel of the level).

    The engine passes ``maximum_step_size_in_physical_units`` to SimpleITK in its normalised frame (1 unit ~ 1 voxel).
    """
    value = getattr(optimizer, "maximum_step_size_in_physical_units", 0.0)
    return value / geometry.k if value > 0 else None


def _header_lines(recipe: Recipe, geometry: Geometry, what: str) -> list[str]:
    prov = recipe.provenance or {}
    if prov:
        versions = prov.get("versions") or {}
        source = (
            f"study '{prov.get('study', '?')}', trial {prov.get('trial', '?')}, "
            f"{prov.get('objective', 'score')} {_score(prov.get('score'))} "
            f"(baseline {_score(prov.get('baseline_score'))}), autoreg {versions.get('autoreg', '?')}, "
            f"SimpleITK {versions.get('SimpleITK', '?')}"
        )
        lines = [f"Exported by autoreg as {what} from {source}."]
        if prov.get("pair_file"):
            lines.append(f"Tuned on {prov['pair_file']}; exported {prov.get('exported', '?')}.")
    else:
        lines = [f"Exported by autoreg as {what} from a recipe without provenance (not from a study)."]
    lines += [
        (
            f"Sample counts, grid spacings and steps were computed for the fixed image '{geometry.name}' "
            f"({geometry.describe()}); other data may need them recomputed: autoreg export again."
        ),
        "The result maps fixed physical points to moving ones, as autoreg's transform does.",
        "A peer's sampling, optimizer and pyramid are its own: expect similar, not identical, results.",
    ]
    return lines


def _score(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def searched_stage(recipe: Recipe) -> Stage | None:
    """The stage whose metric autoreg's rotation search uses (the first linear one), or None where none runs."""
    if recipe.initializer.rotation_search is None:
        return None
    first = next((s for s in recipe.stages if s.kind in LINEAR_KINDS), None)
    return first if first is not None and first.kind != "translation" else None


def _search_angles(recipe: Recipe, dim: int) -> tuple[int, float]:
    """(n, step in degrees): the engine's grid (coarsened to its budget) tries the angles -n*step .. n*step about
    each axis."""
    angles, step, _ = search_grid(recipe.initializer.rotation_search, dim)
    return angles, step


def _search_shifts(recipe: Recipe, geometry: Geometry) -> tuple[int, float]:
    """(m, step in mm): the engine's grid also tries shifts of -m*step .. m*step along each axis (m = 0: none)."""
    rs = recipe.initializer.rotation_search
    _, _, shifts = search_grid(rs, geometry.dim)
    if shifts == 0:
        return 0, 0.0
    extent = min(n * sp for n, sp in zip(geometry.size, geometry.spacing))
    return shifts, rs.max_shift_fraction * extent / shifts


def _search_notes(recipe: Recipe, dim: int | None = None) -> list[str]:
    rs = recipe.initializer.rotation_search
    notes = []
    if dim is not None and not search_plan(rs, dim).joint:
        notes.append(
            "differs: autoreg tries the rotations first, then the shifts around its three best rotations; "
            "here every rotation is tried with every shift"
        )
    if rs.max_evaluations is not None:
        notes.append(
            f"differs: rotation_search.max_evaluations {rs.max_evaluations} coarsened autoreg's grid to the one "
            f"written here; autoreg scores it on {SEARCH_POINTS} random points of its coarse level"
        )
    return notes


def _gradient_filter_note(stage: Stage) -> str:
    m = stage.metric
    return (
        f"not translated: metric.use_fixed_image_gradient_filter {m.use_fixed_image_gradient_filter}, "
        f"use_moving_image_gradient_filter {m.use_moving_image_gradient_filter} (how ITK differentiates the "
        "images; elastix differentiates through its interpolators)"
    )


# --- elastix ------------------------------------------------------------------------------------------------------

_ELASTIX_TRANSFORM = {
    "translation": "TranslationTransform",
    "rigid": "EulerTransform",
    "similarity": "SimilarityTransform",
    "affine": "AffineTransform",
    "bspline": "BSplineTransform",
    "displacement": "BSplineTransform",
}
_ELASTIX_INTERPOLATOR = {
    "linear": "LinearInterpolator",
    "nearest": "NearestNeighborInterpolator",
    "bspline": "BSplineInterpolator",
}
#: Parameters of the linear transforms, for explicit unit scales (``scales: none``).
_LINEAR_PARAMETERS = {
    2: {"translation": 2, "rigid": 3, "similarity": 4, "affine": 6},
    3: {"translation": 3, "rigid": 6, "similarity": 7, "affine": 12},
}


def elastix_file_name(index: int, stage: Stage) -> str:
    return f"stage_{index}_{stage.kind}.txt"


#: The parameter map of autoreg's rotation search, run before the stages' maps.
ROTATION_SEARCH_MAP = "rotation_search.txt"


def elastix_files(recipe: Recipe, geometry: Geometry) -> dict[str, str]:
    """File name -> text: the rotation search (where the recipe has one) and one parameter map per stage, in the
    order they run, then ``run_elastix.sh`` that runs them."""
    names = [elastix_file_name(i, s) for i, s in enumerate(recipe.stages)]
    searched = searched_stage(recipe)
    order = _elastix_search_order(recipe, geometry) + names
    files = {}
    if searched is not None:
        files.update(_elastix_search_maps(recipe, searched, geometry, order))
    files.update({name: elastix_parameter_map(recipe, i, geometry, order) for i, name in enumerate(names)})
    files[ELASTIX_SCRIPT] = _elastix_script(recipe, geometry, order)
    return files


class _Map:
    """An elastix parameter map being written: parameters in order and the notes on what is not translated."""

    def __init__(self, dim: int, levels: int):
        self.params: list[tuple[str, list[Any]]] = []
        self.notes: list[str] = []
        for key, value in (
            ("FixedInternalImagePixelType", "float"),
            ("MovingInternalImagePixelType", "float"),
            ("FixedImageDimension", dim),
            ("MovingImageDimension", dim),
            ("UseDirectionCosines", "true"),
            ("Registration", "MultiResolutionRegistration"),
            ("NumberOfResolutions", levels),
        ):
            self.put(key, value)

    def put(self, key: str, *values: Any) -> None:
        self.params.append((key, list(values)))

    def text(self, recipe: Recipe, geometry: Geometry, title: str, order: list[str]) -> str:
        lines = [f"// {line}" for line in _header_lines(recipe, geometry, "elastix parameter maps")]
        lines += [
            f"// {title}. Run every map, in order:",
            f"//   elastix -f FIXED -m MOVING -out OUTDIR {' '.join('-p ' + n for n in order)}",
            f"//   or: sh {ELASTIX_SCRIPT} FIXED MOVING OUTDIR [FIXED_MASK [MOVING_MASK]]",
            "//   itk-elastix: p = itk.ParameterObject.New(); then p.AddParameterFile(name) for each file, in order;",
            "//   then itk.elastix_registration_method(fixed, moving, parameter_object=p)",
            "",
        ]
        lines += [f"({key} {' '.join(_elastix_value(v) for v in values)})" for key, values in self.params]
        if self.notes:
            lines += [""] + [f"// {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _elastix_common_tail(m: _Map, *, last: bool) -> None:
    m.put("HowToCombineTransforms", "Compose")
    m.put("ErodeMask", "false")
    m.put("Resampler", "DefaultResampler")
    m.put("ResampleInterpolator", "FinalLinearInterpolator")
    m.put("DefaultPixelValue", 0)
    m.put("WriteResultImage", "true" if last else "false")
    m.put("ResultImageFormat", "nii.gz")


def _elastix_initializer(recipe: Recipe, m: _Map) -> None:
    if recipe.initializer.kind == "none":
        m.put("AutomaticTransformInitialization", "false")
        return
    m.put("AutomaticTransformInitialization", "true")
    m.put(
        "AutomaticTransformInitializationMethod",
        "GeometricalCenter" if recipe.initializer.kind == "geometry" else "CenterOfGravity",
    )


def elastix_parameter_map(recipe: Recipe, index: int, geometry: Geometry, order: list[str] | None = None) -> str:
    """The elastix parameter-map text of stage ``index``: header, translated parameters, what is not translated."""
    stage = recipe.stages[index]
    order = order or [elastix_file_name(i, s) for i, s in enumerate(recipe.stages)]
    m = _Map(geometry.dim, _levels(stage))
    _elastix_pyramid(stage, geometry, m.put, m.notes)
    _elastix_metric(stage, m.put, m.notes)
    _elastix_sampling(stage, geometry, m.put, m.notes)
    m.put("RandomSeed", itk_seed(recipe.seed, index))
    m.put("Interpolator", _ELASTIX_INTERPOLATOR[stage.interpolator])
    if stage.interpolator == "bspline":
        m.put("BSplineInterpolationOrder", 3)
    _elastix_optimizer(stage, geometry, m.put, m.notes)
    _elastix_transform(recipe, index, geometry, m)
    if not stage.use_masks:
        m.notes.append(
            "not translated: use_masks false (elastix applies -fMask/-mMask, when given, to every stage; "
            "leave them out to register this stage without masks)"
        )
    _elastix_common_tail(m, last=index == len(recipe.stages) - 1)
    title = f"Stage {index + 1} of {len(recipe.stages)} ({stage.kind}): {elastix_file_name(index, stage)}"
    return m.text(recipe, geometry, title, order)


#: A map that only places the initial transform (the image centres), for a rotation search that also shifts.
INITIALIZER_MAP = "initializer.txt"


def _elastix_search_order(recipe: Recipe, geometry: Geometry) -> list[str]:
    """The maps that run before the stages' maps: the rotation search, after the initializer where it shifts."""
    if searched_stage(recipe) is None:
        return []
    shifts, _ = _search_shifts(recipe, geometry)
    return ([INITIALIZER_MAP] if shifts and recipe.initializer.kind != "none" else []) + [ROTATION_SEARCH_MAP]


def _elastix_search_maps(recipe: Recipe, stage: Stage, geometry: Geometry, order: list[str]) -> dict[str, str]:
    """autoreg's rotation search as elastix's FullSearch of the Euler angles (and shifts): one coarse level (the
    engine's shrink, sigma half of it in voxels), every voxel, the first linear stage's metric. FullSearch sets
    absolute parameter values, so a search with shifts runs after a map that only places the image centres."""
    shrink = _coarse_shrink(recipe, geometry)
    n, step = _search_angles(recipe, geometry.dim)
    shifts, shift_step = _search_shifts(recipe, geometry)
    own_initializer = INITIALIZER_MAP not in order

    def coarse_map(space: list[Any]) -> _Map:
        m = _Map(geometry.dim, 1)
        m.put("FixedImagePyramid", "FixedGenericImagePyramid")
        m.put("MovingImagePyramid", "MovingGenericImagePyramid")
        m.put("FixedImagePyramidRescaleSchedule", *([shrink] * geometry.dim))
        m.put("MovingImagePyramidRescaleSchedule", *([1] * geometry.dim))
        sigmas = [shrink / 2.0 * sp for sp in geometry.spacing]
        m.put("FixedImagePyramidSmoothingSchedule", *sigmas)
        m.put("MovingImagePyramidSmoothingSchedule", *sigmas)
        _elastix_metric(stage, m.put, m.notes)
        m.put("ImageSampler", "Full")
        m.put("Interpolator", "LinearInterpolator")
        m.put("Optimizer", "FullSearch")
        m.put("FullSearchSpace0", *space)
        m.put("Transform", "EulerTransform")
        return m

    # the Euler transform's parameters: the angle(s), then the translation
    angles = ["rotation"] if geometry.dim == 2 else ["rotation_x", "rotation_y", "rotation_z"]
    files = {}
    if not own_initializer:
        m = coarse_map([angles[0], 0, 0.0, 0.0, 1.0])  # one point, angle 0: the centres only
        _elastix_initializer(recipe, m)
        _elastix_common_tail(m, last=False)
        files[INITIALIZER_MAP] = m.text(
            recipe,
            geometry,
            f"initializer {recipe.initializer.kind}: the image centres, before the rotation search",
            order,
        )
    space: list[Any] = []
    limit = math.radians(n * step)
    # FullSearch counts (max - min) / step + 1 points, truncated: a hair above the last point keeps it
    for number, axis in enumerate(angles):
        space += [axis, number, -limit, limit + 1e-3 * math.radians(step), math.radians(step)]
    for number, axis in enumerate("xyz"[: geometry.dim]):
        if shifts:
            space += [
                f"shift_{axis}",
                len(angles) + number,
                -shifts * shift_step,
                shifts * shift_step + 1e-3 * shift_step,
                shift_step,
            ]
    m = coarse_map(space)
    if own_initializer:
        _elastix_initializer(recipe, m)
    else:
        m.put("AutomaticTransformInitialization", "false")
    _elastix_common_tail(m, last=False)
    m.notes += _search_notes(recipe, geometry.dim)
    title = (
        f"autoreg's rotation search (initializer.rotation_search): angles -{_num(n * step)} .. {_num(n * step)} "
        f"degrees in steps of {_num(step)}"
        + (
            f", shifts -{_num(shifts * shift_step)} .. {_num(shifts * shift_step)} mm in steps of {_num(shift_step)}"
            if shifts
            else ""
        )
        + ", before stage 1"
    )
    files[ROTATION_SEARCH_MAP] = m.text(recipe, geometry, title, order)
    return files


def _elastix_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else _num(value)


def _elastix_pyramid(stage: Stage, geometry: Geometry, put, notes: list[str]) -> None:
    """SimpleITK smooths both images and shrinks the fixed grid (``shrink_images: false``: the moving image keeps its
    resolution); elastix's generic pyramid takes the same two schedules, sigmas in physical units per axis."""
    p = stage.pyramid
    dim = geometry.dim
    sigmas = [[s * (sp if p.sigma_units == "voxel" else 1.0) for sp in geometry.spacing] for s in p.smoothing_sigmas]
    if p.shrink_images:  # prepared levels: each axis to about the same voxel size
        fixed_rescale = [a for f in p.shrink_factors for a in axis_factors(geometry.spacing, f, geometry.size)]
    else:
        fixed_rescale = [f for f in p.shrink_factors for _ in range(dim)]
    moving_rescale = fixed_rescale if p.shrink_images else [1] * len(fixed_rescale)
    put("FixedImagePyramid", "FixedGenericImagePyramid")
    put("MovingImagePyramid", "MovingGenericImagePyramid")
    put("FixedImagePyramidRescaleSchedule", *fixed_rescale)
    put("MovingImagePyramidRescaleSchedule", *moving_rescale)
    put("FixedImagePyramidSmoothingSchedule", *[v for level in sigmas for v in level])
    put("MovingImagePyramidSmoothingSchedule", *[v for level in sigmas for v in level])
    if p.sigma_units == "voxel":
        notes.append(
            "pyramid.smoothing_sigmas in voxels were converted to mm with the fixed image's spacing, "
            "also for the moving image"
        )


#: Histogram bins of the Mattes MI that stands in for a local correlation elastix does not have (its default).
ELASTIX_MI_BINS = 32


def _elastix_metric(stage: Stage, put, notes: list[str]) -> None:
    m = stage.metric
    if m.kind == "mattes":
        put("Metric", "AdvancedMattesMutualInformation")
        put("NumberOfHistogramBins", m.number_of_histogram_bins)
    elif m.kind == "joint_hist_mi":
        put("Metric", "AdvancedMattesMutualInformation")
        put("NumberOfHistogramBins", m.number_of_histogram_bins)
        notes.append(
            f"differs: metric joint_hist_mi (joint-histogram mutual information) -> elastix's "
            f"AdvancedMattesMutualInformation (the same quantity, Parzen-window estimate); not translated: "
            f"variance_for_joint_pdf_smoothing {m.variance_for_joint_pdf_smoothing}"
        )
    elif m.kind == "ants_nc":
        # elastix's correlation is global: one linear intensity relation over the whole image, which a multi-modal
        # pair breaks (T1 against PD: 6.04 mm exported so against autoreg's 0.125 and 0.097 with Mattes MI)
        put("Metric", "AdvancedMattesMutualInformation")
        put("NumberOfHistogramBins", ELASTIX_MI_BINS)
        notes.append(
            f"differs: metric ants_nc (local correlation in a {m.radius}-voxel neighbourhood) -> elastix's "
            f"AdvancedMattesMutualInformation ({ELASTIX_MI_BINS} bins): elastix has no local correlation metric, "
            "and its AdvancedNormalizedCorrelation, global, fails where the intensities relate differently across "
            "the image, as local correlation and mutual information do not"
        )
    elif m.kind == "correlation":
        put("Metric", "AdvancedNormalizedCorrelation")
    elif m.kind == "mean_squares":
        put("Metric", "AdvancedMeanSquares")
    notes.append(_gradient_filter_note(stage))


def _elastix_sampling(stage: Stage, geometry: Geometry, put, notes: list[str]) -> None:
    s = stage.sampling
    if s.strategy == "none":
        put("ImageSampler", "Full")
        return
    fractions = _sample_fractions(stage, geometry)
    voxels = _level_voxels(stage, geometry)
    asked = f"percentage {s.percentage}" if s.points is None else f"points {s.points}"
    if s.strategy == "regular":
        # a regular grid keeping a fraction f of the voxels steps f^(-1/dim) voxels along each axis
        steps = [max(1, round(f ** (-1.0 / geometry.dim))) for f in fractions]
        put("ImageSampler", "Grid")
        put("SampleGridSpacing", *[step for step in steps for _ in range(geometry.dim)])
        notes.append(
            f"sampling regular ({asked}) -> a grid of every {_x(steps)} voxels per level (SimpleITK "
            "jitters its regular samples inside their voxels; elastix's grid does not)"
        )
    else:
        counts = [max(1, round(f * n)) for f, n in zip(fractions, voxels)]
        put("ImageSampler", "RandomCoordinate")
        put("NumberOfSpatialSamples", *counts)
        notes.append(f"sampling random ({asked}) -> {_x(counts)} samples per level of {_x(voxels)} voxels")


def _elastix_optimizer(stage: Stage, geometry: Geometry, put, notes: list[str]) -> None:
    o = stage.optimizer
    step = _max_step_mm(o, geometry)
    stochastic = False
    if o.kind == "gradient_descent":
        stochastic = True
        put("Optimizer", "AdaptiveStochasticGradientDescent")
        put("MaximumNumberOfIterations", o.number_of_iterations)
        put("AutomaticParameterEstimation", "true")
        if step is not None:
            put("MaximumStepLength", step)
        notes.append(
            "differs: optimizer gradient_descent (SimpleITK: a fixed sample set per level, learning rate "
            f"{o.learning_rate} estimated '{o.estimate_learning_rate}', stop when the metric changes less than "
            f"{_num(o.convergence_minimum_value)} over {o.convergence_window_size} iterations) -> elastix's adaptive "
            "stochastic gradient descent: new samples each iteration, step sizes estimated from the largest "
            "allowed displacement (MaximumStepLength; default one mean voxel, as ITK's), runs all its iterations"
        )
        notes.append(
            "not translated: optimizer.learning_rate, estimate_learning_rate, convergence_minimum_value, "
            "convergence_window_size"
        )
    elif o.kind == "regular_step_gd":
        put("Optimizer", "RegularStepGradientDescent")
        put("MaximumNumberOfIterations", o.number_of_iterations)
        put("MinimumStepLength", o.min_step)
        put("RelaxationFactor", o.relaxation_factor)
        put("MinimumGradientMagnitude", o.gradient_magnitude_tolerance)
        put("MaximumStepLength", step if step is not None else min(geometry.spacing))
        notes.append(
            f"differs: regular_step_gd's first step: SimpleITK estimates it ('{o.estimate_learning_rate}') "
            f"from the largest allowed shift; here MaximumStepLength is that shift (learning_rate "
            f"{o.learning_rate} not translated)"
        )
    elif o.kind == "cg_line_search":
        put("Optimizer", "ConjugateGradient")
        put("MaximumNumberOfIterations", o.number_of_iterations)
        put("MaximumNumberOfLineSearchIterations", o.line_search_maximum_iterations)
        put("ValueTolerance", o.convergence_minimum_value)
        notes.append(
            "differs: cg_line_search (SimpleITK: golden-section line search in "
            f"[{o.line_search_lower_limit}, {o.line_search_upper_limit}] x the learning rate) -> elastix's "
            "ConjugateGradient (More-Thuente line search); not translated: learning_rate, "
            "estimate_learning_rate, line_search_lower_limit, line_search_upper_limit, line_search_epsilon, "
            "convergence_window_size, maximum_step_size_in_physical_units"
        )
    elif o.kind in ("lbfgsb", "lbfgs2"):
        put("Optimizer", "QuasiNewtonLBFGS")
        put("MaximumNumberOfIterations", max(1, o.number_of_iterations))
        if o.kind == "lbfgsb":
            put("LBFGSUpdateAccuracy", o.maximum_number_of_corrections)
            put("GradientMagnitudeTolerance", o.gradient_convergence_tolerance)
            notes.append(
                "differs: lbfgsb -> elastix's QuasiNewtonLBFGS (unbounded, as autoreg's LBFGSB without "
                "bounds); not translated: maximum_number_of_function_evaluations "
                f"{o.maximum_number_of_function_evaluations}, cost_function_convergence_factor "
                f"{_num(o.cost_function_convergence_factor)}"
            )
        else:
            put("LBFGSUpdateAccuracy", o.hessian_approximate_accuracy)
            put("GradientMagnitudeTolerance", o.solution_accuracy)
            put("MaximumNumberOfLineSearchIterations", o.line_search_maximum_evaluations)
            notes.append(
                "differs: lbfgs2 -> elastix's QuasiNewtonLBFGS; not translated: delta_convergence_distance "
                f"{o.delta_convergence_distance}, delta_convergence_tolerance "
                f"{_num(o.delta_convergence_tolerance)}"
                + (", number_of_iterations 0 (until convergence)" if o.number_of_iterations == 0 else "")
            )
    elif o.kind == "demons":
        stochastic = True
        put("Optimizer", "AdaptiveStochasticGradientDescent")
        put("MaximumNumberOfIterations", o.number_of_iterations)
        put("AutomaticParameterEstimation", "true")
        notes.append(
            f"differs: optimizer demons ({o.variant}) -> elastix has no Demons: its adaptive stochastic "
            "gradient descent on the stage's grid; not translated: maximum_update_step_length "
            f"{_num(o.maximum_update_step_length)}, intensity_difference_threshold "
            f"{_num(o.intensity_difference_threshold)}, maximum_rms_error {_num(o.maximum_rms_error)}"
        )
    put("NewSamplesEveryIteration", "true" if stochastic else "false")
    _elastix_scales(stage, geometry, put, notes)


def _elastix_scales(stage: Stage, geometry: Geometry, put, notes: list[str]) -> None:
    if stage.kind not in LINEAR_KINDS:
        return  # elastix estimates no scales for a BSpline grid, nor does SimpleITK use them there
    scales = getattr(stage.optimizer, "scales", "none")
    if scales == "none":
        put("AutomaticScalesEstimation", "false")
        put("Scales", *([1.0] * _LINEAR_PARAMETERS[geometry.dim][stage.kind]))
        if stage.optimizer.kind in ("gradient_descent", "regular_step_gd"):
            notes.append(
                "scales none: elastix's steps (MaximumStepLength) are then in raw parameter units "
                "(radians, matrix entries), while SimpleITK sizes its learning rate by physical shifts"
            )
        return
    put("AutomaticScalesEstimation", "true")
    if scales != "physical_shift":
        notes.append(
            f"differs: scales {scales} -> elastix's automatic scales (from the shift of the image's "
            "points per parameter, as physical_shift)"
        )


def _elastix_transform(recipe: Recipe, index: int, geometry: Geometry, m: _Map) -> None:
    stage = recipe.stages[index]
    put, notes = m.put, m.notes
    put("Transform", _ELASTIX_TRANSFORM[stage.kind])
    first_linear = next((i for i, s in enumerate(recipe.stages) if s.kind in LINEAR_KINDS), None)
    if stage.kind in LINEAR_KINDS:
        if index == first_linear and searched_stage(recipe) is None:
            _elastix_initializer(recipe, m)
        else:  # the rotation search's map or an earlier stage started it
            put("AutomaticTransformInitialization", "false")
        return
    if first_linear is None and index == 0 and recipe.initializer.kind != "none":
        notes.append(
            f"not translated: initializer {recipe.initializer.kind} (elastix initialises linear "
            "transforms only; this recipe has none)"
        )
    put("BSplineTransformSplineOrder", 3)
    levels = _levels(stage)
    if isinstance(stage.transform, DisplacementTransform):
        t = stage.transform
        grid = t.grid_spacing * (1.0 if t.spacing_units == "mm" else 1.0 / geometry.k)  # mm
        # a cubic B-spline kernel of spacing h has variance h^2 / 3: match the field's total smoothing
        cell = max(1.0, math.sqrt(3.0 * t.variance_for_total_field)) * grid
        put("FinalGridSpacingInPhysicalUnits", *([cell] * geometry.dim))
        put("GridSpacingSchedule", *([1.0] * levels))
        notes.append(
            f"differs: displacement (a dense field on a {_num(grid)} mm grid, Gaussian-smoothed with "
            f"variances {t.variance_for_update_field} (update) and {t.variance_for_total_field} (total) "
            "grid voxels) -> elastix has no such transform: a BSpline grid whose kernel has the variance of "
            f"the total-field Gaussian ({_num(cell)} mm)"
        )
        return
    final = _final_mesh(stage, geometry)
    spacing = [n * sp / cells for n, sp, cells in zip(geometry.size, geometry.spacing, final)]
    put("FinalGridSpacingInPhysicalUnits", *spacing)
    refine = getattr(stage.transform, "refine", False) and levels > 1
    put("GridSpacingSchedule", *[float(2 ** (levels - 1 - i)) if refine else 1.0 for i in range(levels)])
    notes.append(
        f"bspline mesh {_x(final)} cells at the finest level -> control points every {_x(spacing)} mm "
        "(elastix adds its border control points itself)"
    )


def _elastix_script(recipe: Recipe, geometry: Geometry, names: list[str]) -> str:
    threads = 1 if recipe.deterministic else recipe.threads
    lines = ["#!/bin/sh"]
    lines += [f"# {line}" for line in _header_lines(recipe, geometry, "elastix parameter maps")]
    lines += [
        f"# Usage: sh {ELASTIX_SCRIPT} FIXED MOVING OUTDIR [FIXED_MASK [MOVING_MASK]]",
        "# Runs elastix (on PATH) with the parameter maps beside this script, one per stage, in order;",
        "# OUTDIR receives TransformParameters.N.txt (for transformix) and the warped image result.N.nii.gz.",
        "set -eu",
        'if [ $# -lt 3 ]; then echo "usage: sh $0 FIXED MOVING OUTDIR [FIXED_MASK [MOVING_MASK]]" >&2; exit 2; fi',
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        "FIXED=$1 MOVING=$2 OUT=$3 FIXED_MASK=${4:-} MOVING_MASK=${5:-}",
        'set -- -f "$FIXED" -m "$MOVING" -out "$OUT" ' + " ".join(f'-p "$HERE/{n}"' for n in names),
    ]
    if threads:
        lines.append(f'set -- "$@" -threads {threads}')
    lines += [
        'if [ -n "$FIXED_MASK" ]; then set -- "$@" -fMask "$FIXED_MASK"; fi',
        'if [ -n "$MOVING_MASK" ]; then set -- "$@" -mMask "$MOVING_MASK"; fi',
        'mkdir -p "$OUT"',
        'exec elastix "$@"',
    ]
    return "\n".join(lines) + "\n"


# --- ANTs ---------------------------------------------------------------------------------------------------------

_ANTS_LINEAR = {"translation": "Translation", "rigid": "Rigid", "similarity": "Similarity", "affine": "Affine"}
#: ANTs' initial-moving-transform features: 0 geometric centre, 1 centre of mass.
_ANTS_INIT = {"geometry": 0, "moments": 1}
#: antsRegistration's convergence defaults, used where the recipe's optimizer has no such setting.
_ANTS_CONVERGENCE = (1e-6, 10)


#: antsAffineInitializer's output, beside antsRegistration's (OUTPREFIX + this).
ANTS_ROTATION_SEARCH = "rotation_search.mat"


def ants_rotation_search(recipe: Recipe, geometry: Geometry) -> tuple[list[str], list[str]]:
    """autoreg's rotation search as an antsAffineInitializer command (shell words; none without a search) and the
    notes on how it differs."""
    if searched_stage(recipe) is None:
        return [], []
    n, step = _search_angles(recipe, geometry.dim)
    words = [
        "antsAffineInitializer",
        str(geometry.dim),
        "$FIXED",
        "$MOVING",
        f"${{OUT}}{ANTS_ROTATION_SEARCH}",
        _num(step),
        _num(min(1.0, n * step / 180.0)),
        "0",
    ]
    notes = [
        f"initializer.rotation_search (angles -{_num(n * step)} .. {_num(n * step)} degrees in steps of "
        f"{_num(step)}) -> antsAffineInitializer, whose result starts antsRegistration. It differs: Mattes MI "
        "with 32 bins on the full-resolution images, from the centres of mass (whatever initializer.kind), and "
        "each start refined by a short affine optimisation",
        *_search_notes(recipe, geometry.dim),
    ]
    if searched_stage(recipe).use_masks:
        notes.append(
            "not translated: masks in the rotation search (the script does not pass them to antsAffineInitializer)"
        )
    shifts, shift_step = _search_shifts(recipe, geometry)
    if shifts:
        notes.append(
            f"not translated: the shift search ({shifts} steps of {_num(shift_step)} mm each way): "
            "antsAffineInitializer has none (ANTs' antsAI --translation-search-grid has)"
        )
    return [_shell_word(w) for w in words], notes


def ants_script(recipe: Recipe, geometry: Geometry) -> str:
    """A POSIX shell script: header and notes as comments, then one antsRegistration command line (after the
    antsAffineInitializer command of the rotation search, where the recipe has one)."""
    search, search_notes = ants_rotation_search(recipe, geometry)
    args, notes = ants_arguments(recipe, geometry)
    notes = search_notes + notes
    lines = ["#!/bin/sh"]
    lines += [f"# {line}" for line in _header_lines(recipe, geometry, "an antsRegistration command line")]
    lines += [
        "# Usage: sh SCRIPT FIXED MOVING OUTPREFIX [FIXED_MASK [MOVING_MASK]]",
        "# Runs antsRegistration (on PATH); writes OUTPREFIX0GenericAffine.mat (and OUTPREFIX1Warp.nii.gz for a",
        "# deformable stage) and OUTPREFIXWarped.nii.gz. Apply to points with antsApplyTransformsToPoints and these",
        "# forward transforms: they take fixed points to moving ones. ANTsPy, without the ANTs binaries:",
        "# ants.registration(ARGS, None) with ARGS the arguments below as a list (images as file names).",
        "# Without FIXED_MASK/MOVING_MASK the masks are NULL: none (antsRegistration says 'file NULL does not exist').",
        "# ANTs optimises every stage with its conjugate-gradient line search, learning rate re-estimated at each",
        "# iteration, the step capped at the stage's gradientStep (mm): Rigid[step] and so on.",
    ]
    if search:
        lines.append(
            "# The rotation search runs first: antsAffineInitializer (ANTsPy: ants.lib.antsAffineInitializer"
            "(ARGS)) writes OUTPREFIXrotation_search.mat, which starts antsRegistration."
        )
    lines += [f"# {n}" for n in notes]
    lines += [
        "set -eu",
        'if [ $# -lt 3 ]; then echo "usage: sh $0 FIXED MOVING OUTPREFIX [FIXED_MASK [MOVING_MASK]]" >&2; exit 2; fi',
        "FIXED=$1 MOVING=$2 OUT=$3 FIXED_MASK=${4:-NULL} MOVING_MASK=${5:-NULL}",
    ]
    threads = 1 if recipe.deterministic else recipe.threads
    if threads:
        lines.append(f"export ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={threads}")
    if search:
        lines.append(" ".join(search))
    command = ["antsRegistration"]
    for i in range(0, len(args), 2):
        command.append(f"  {args[i]} {args[i + 1]}" if i + 1 < len(args) else f"  {args[i]}")
    lines.append(" \\\n".join(command))
    return "\n".join(lines) + "\n"


def _shell_word(value: str) -> str:
    """A shell word that keeps ``$FIXED``-style variables live: double-quoted when it holds one, else quoted plainly."""
    if "$" in value:
        return '"' + value.replace('"', '\\"') + '"'
    return shlex.quote(value)


def ants_arguments(recipe: Recipe, geometry: Geometry) -> tuple[list[str], list[str]]:
    """The antsRegistration arguments (shell words, images as ``$FIXED``/``$MOVING``) and the notes on what is not
    translated or differs."""
    notes: list[str] = []
    words: list[str] = [
        "--dimensionality",
        str(geometry.dim),
        "--float",
        "0",
        "--output",
        "[$OUT,${OUT}Warped.nii.gz]",
        "--interpolation",
        "Linear",
        "--use-histogram-matching",
        "0",
        "--winsorize-image-intensities",
        "[0,1]",
        "--collapse-output-transforms",
        "1",
        "--random-seed",
        str(itk_seed(recipe.seed, 0)),
    ]
    init = recipe.initializer.kind
    if searched_stage(recipe) is not None:
        words += ["--initial-moving-transform", f"${{OUT}}{ANTS_ROTATION_SEARCH}"]
    elif init in _ANTS_INIT:
        words += ["--initial-moving-transform", f"[$FIXED,$MOVING,{_ANTS_INIT[init]}]"]
    notes.append("the recipe's stages sample with seeds seed + i + 1; ANTs takes one --random-seed for all")
    for index, stage in enumerate(recipe.stages):
        stage_words, stage_notes = _ants_stage(stage, geometry)
        if index > 0 and recipe.stages[index - 1].kind == "bspline":
            stage_notes.insert(
                0,
                "WARNING: antsRegistration stops with an error on a stage after a BSpline stage "
                "(ITK's BSplineTransform has no Jacobian with respect to position)",
            )
        words += stage_words
        notes += [f"stage {index} ({stage.kind}): {n}" for n in stage_notes]
    return [_shell_word(w) for w in words], notes


def _ants_stage(stage: Stage, geometry: Geometry) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    o = stage.optimizer
    levels = _levels(stage)
    step = _max_step_mm(o, geometry)
    if step is None:
        step = min(geometry.spacing)
        notes.append(
            f"gradientStep {_num(step)} mm: one voxel of the finest level (ITK's default step is one "
            "voxel of each level; ANTs takes one step for all levels)"
        )
    transform = _ants_transform(stage, geometry, step, notes)

    m = stage.metric
    s = stage.sampling
    if s.strategy == "none":
        strategy, fraction = "None", 1.0
    else:
        fractions = _sample_fractions(stage, geometry)
        strategy, fraction = s.strategy.capitalize(), fractions[-1]
        if s.points is not None and len(set(fractions)) > 1:
            notes.append(
                f"sampling points {s.points} -> {_num(fraction)} of the voxels at every level (the finest "
                f"level's fraction; SimpleITK samples {_x([round(f, 6) for f in fractions])} per level)"
            )
    gradient_filter = m.use_fixed_image_gradient_filter
    if m.use_fixed_image_gradient_filter != m.use_moving_image_gradient_filter:
        notes.append(
            "not translated: use_fixed_image_gradient_filter differs from use_moving_image_gradient_filter "
            "(ANTs sets both with one flag: the fixed one's value is used)"
        )
    if m.kind in ("mattes", "joint_hist_mi"):
        name, parameter = ("Mattes" if m.kind == "mattes" else "MI"), str(m.number_of_histogram_bins)
        if m.kind == "joint_hist_mi":
            notes.append(
                f"not translated: variance_for_joint_pdf_smoothing {m.variance_for_joint_pdf_smoothing} "
                "(ANTs' MI smooths its joint histogram its own way)"
            )
    elif m.kind == "ants_nc":
        name, parameter = "CC", str(m.radius)
    elif m.kind == "correlation":
        name, parameter = "GC", "1"
    else:
        name, parameter = "MeanSquares", "1"
    metric = f"{name}[$FIXED,$MOVING,1,{parameter},{strategy},{_num(fraction)},{_num(bool(gradient_filter))}]"

    iterations = max(1, o.number_of_iterations)
    if o.kind in ("gradient_descent", "cg_line_search"):
        threshold, window = o.convergence_minimum_value, o.convergence_window_size
    else:
        threshold, window = _ANTS_CONVERGENCE
        notes.append(
            f"differs: optimizer {o.kind} -> ANTs' conjugate-gradient line search (antsRegistration has no "
            f"other); convergence {_num(threshold)} over {window} iterations is ANTs' default"
        )
    if o.kind == "gradient_descent":
        notes.append(
            f"differs: gradient_descent (learning rate {o.learning_rate} estimated "
            f"'{o.estimate_learning_rate}') -> ANTs' conjugate-gradient line search, learning rate estimated "
            "at each iteration; not translated: learning_rate, estimate_learning_rate"
        )
    elif o.kind == "cg_line_search":
        notes.append(
            f"not translated: line search [{o.line_search_lower_limit}, {o.line_search_upper_limit}], "
            f"epsilon {o.line_search_epsilon}, {o.line_search_maximum_iterations} iterations (ANTs: [0, 2], "
            "0.2, 20), learning_rate, estimate_learning_rate"
        )
    if stage.interpolator != "linear":
        notes.append(f"not translated: interpolator {stage.interpolator} (ANTs' metrics interpolate linearly)")
    if o.kind in ("lbfgsb", "lbfgs2") and o.number_of_iterations == 0:
        notes.append("number_of_iterations 0 (until convergence) -> 1 iteration per level")
    scales = getattr(o, "scales", "none")
    if stage.kind in LINEAR_KINDS and scales != "physical_shift":
        notes.append(f"differs: scales {scales} -> ANTs' scales from physical shift")

    p = stage.pyramid
    units = "mm" if p.sigma_units == "mm" else "vox"
    if p.shrink_images:
        notes.append("not translated: pyramid.shrink_images (ANTs shrinks the fixed grid only, as SimpleITK)")
    mask = "[$FIXED_MASK,$MOVING_MASK]" if stage.use_masks else "[NULL,NULL]"
    words = [
        "--transform",
        transform,
        "--metric",
        metric,
        "--convergence",
        f"[{'x'.join([str(iterations)] * levels)},{_num(threshold)},{window}]",
        "--shrink-factors",
        _x(p.shrink_factors),
        "--smoothing-sigmas",
        _x(p.smoothing_sigmas) + units,
        "--masks",
        mask,
    ]
    return words, notes


def _ants_transform(stage: Stage, geometry: Geometry, step: float, notes: list[str]) -> str:
    t = stage.transform
    if stage.kind in _ANTS_LINEAR:
        return f"{_ANTS_LINEAR[stage.kind]}[{_num(step)}]"
    if isinstance(t, DisplacementTransform):
        if not (t.spacing_units == "voxel" and t.grid_spacing == 1.0):
            notes.append(
                f"not translated: grid_spacing {t.grid_spacing} {t.spacing_units} (ANTs' field lives on "
                "each level's fixed grid)"
            )
        if t.across_levels == "compose":
            notes.append("not translated: across_levels compose (ANTs refines one field across levels)")
        if t.gradient_step is not None:  # the same bound: ANTs' gradientStep is in voxels of each level
            step = t.gradient_step
        # the symmetric scheme is SyN's own: both images toward a midpoint, each by the gradient step
        name = "SyN" if t.symmetric else "GaussianDisplacementField"
        return f"{name}[{_num(step)},{_num(t.variance_for_update_field)},{_num(t.variance_for_total_field)}]"
    mesh, factors = _mesh_schedule(stage, geometry)
    levels = _levels(stage)
    if factors is None and levels > 1:
        # ANTs doubles the mesh at each level: start 2^(L-1) times coarser so that the finest level has the grid
        base = [max(1, -(-m // 2 ** (levels - 1))) for m in mesh]
        notes.append(
            f"differs: refine false (one {_x(mesh)} grid at every level) -> ANTs doubles the mesh at each "
            f"level: {_x(base)} at the coarsest, {_x([b * 2 ** (levels - 1) for b in base])} at the finest"
        )
        mesh = base
    return f"BSpline[{_num(step)},{_x(mesh)}]"


# --- study and files ---------------------------------------------------------------------------------------------


def export_text(recipe: Recipe, fmt: str, geometry: Geometry) -> str | dict[str, str]:
    """``ants``: the script's text; ``elastix``: file name -> text, written into a folder (``write_folder``)."""
    if fmt == "elastix":
        return elastix_files(recipe, geometry)
    if fmt == "ants":
        return ants_script(recipe, geometry)
    raise ValueError(f"unknown peer format {fmt!r}")


def study_geometry(cfg: StudyConfig) -> Geometry:
    """The grid of the study's first fixed image: the data the exported numbers are computed for."""
    from .data import read_image

    spec = cfg.pairs[0]
    image = read_image(spec.fixed, source=str(cfg.path), key=spec.key_of("fixed"))
    return Geometry.of(image, spec.name)


def write_folder(folder: Path, files: dict[str, str]) -> None:
    """Write ``files`` into ``folder`` (created); an existing file in its place is a user error."""
    if folder.exists() and not folder.is_dir():
        raise UserError("exists and is not a folder (--format elastix writes a folder of parameter files)", file=folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write ({err.strerror})", file=folder) from None
