"""The recipe as data: every setting of a SimpleITK registration, versioned, immutable, YAML round-trippable.

Format 2 (``autoreg_recipe: 2``). The transform, metric and optimizer of a stage are models keyed on ``kind`` (pydantic
discriminated unions); each holds only the settings its SimpleITK call uses, named as SimpleITK names its keyword
arguments (in snake case: ``numberOfIterations`` is ``number_of_iterations``), so a recipe says exactly what runs and
a setting that its kind ignores is refused. Version-1 recipes are upgraded on load (``upgrade_v1``) to the recipe
that runs identically.

A recipe holds no file paths and no image data, so one recipe runs on any pair (``autoreg apply``). Lengths carry their
unit (``mm`` or ``voxel`` of the fixed image); the engine converts them into its normalised frame (``registration``).
The model defaults are the SimpleITK-notebooks defaults, so ``default_recipe`` (trial 0 of every study) is written once,
here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError, excerpt
from .registration import threads_of
from .yamlio import load_yaml_file, load_yaml_text

RECIPE_FORMAT = 2

#: Stages must not lose freedom: a rigid stage after an affine one would throw freedom away. ``deformable`` is a study
#: stage only (the search picks ``bspline`` or ``displacement`` per trial); recipes hold the concrete kind.
TRANSFORM_RANK = {
    "translation": 0,
    "rigid": 1,
    "similarity": 2,
    "affine": 3,
    "bspline": 4,
    "displacement": 4,
    "deformable": 4,
}
DEFORMABLE_KINDS = ("bspline", "displacement")
Unit = Literal["mm", "voxel"]
Estimate = Literal["never", "once", "each_iteration"]
Scales = Literal["physical_shift", "index_shift", "jacobian", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- initializer -------------------------------------------------------------------------------------------------


class RotationSearch(_Frozen):
    """A grid search of rotation (and shift) before the first rigid-kind stage: large rotations defeat gradients."""

    max_angle_deg: float = Field(180.0, gt=0, le=180)
    step_deg: float = Field(15.0, gt=0, le=90)
    #: Shift search as a fraction of the fixed extent on each side (0: rotations only).
    max_shift_fraction: float = Field(0.0, ge=0, le=0.5)
    shift_steps: int = Field(0, ge=0, le=10)
    #: Metric evaluations allowed; a grid larger than this is coarsened to fit. None: the whole grid (version 1).
    max_evaluations: int | None = Field(None, ge=1)


class Initializer(_Frozen):
    """How the first transform starts: image centres (geometry), centres of mass (moments), identity, or ``best``:
    each pair takes whichever of geometry and moments (each followed by the rotation search, if any) the first
    linear stage's metric prefers, so that one recipe serves aligned and displaced pairs alike."""

    kind: Literal["geometry", "moments", "none", "best"] = "geometry"
    rotation_search: RotationSearch | None = None


# --- transforms ---------------------------------------------------------------------------------------------------


class LinearTransform(_Frozen):
    kind: Literal["translation", "rigid", "similarity", "affine"]


class BSplineTransform(_Frozen):
    """A BSpline grid: mesh cells per axis, or a control-point spacing (mm or fixed voxels)."""

    kind: Literal["bspline"] = "bspline"
    mesh_size: tuple[int, ...] | None = None
    control_point_spacing: float | None = Field(None, gt=0)
    spacing_units: Unit = "voxel"
    order: Literal[3] = 3
    #: Coarse to fine grid (as elastix's grid schedule, SimpleITK's ``scaleFactors``): the grid starts with 2^(L-1)
    #: times fewer cells and doubles at each of the stage's L pyramid levels, reaching the grid above at the finest.
    refine: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> BSplineTransform:
        if (self.mesh_size is None) == (self.control_point_spacing is None):
            raise ValueError("give exactly one of mesh_size and control_point_spacing")
        if self.mesh_size is not None and any(m < 1 for m in self.mesh_size):
            raise ValueError("mesh_size entries must be >= 1")
        return self


class DisplacementTransform(_Frozen):
    """A dense displacement field with local support (``sitk.DisplacementFieldTransform``), Gaussian-regularised.

    ``grid_spacing`` sets the field's resolution; the variances (``SetSmoothingGaussianOnUpdate``) are in voxels of
    that grid, so they mean the same at any image spacing. Defaults after SimpleITK-notebooks 66 (demons_registration).
    """

    kind: Literal["displacement"] = "displacement"
    grid_spacing: float = Field(1.0, gt=0)
    spacing_units: Unit = "voxel"
    variance_for_update_field: float = Field(0.0, ge=0)
    variance_for_total_field: float = Field(2.0, ge=0)
    #: The largest update per iteration of gradient descent, in voxels of the level's images (ANTs' gradientStep).
    #: None: ITK's own bound, one voxel of the field's grid, which overshoots on a coarse grid: the convergence check
    #: stops it after 9-15 iterations (``benchmarks/deformable3d.py``; 0.25 voxel runs ~100).
    gradient_step: float | None = Field(None, gt=0, le=10)
    #: How gradient descent carries the field down the pyramid: ``continue`` refines one field (ANTs'), ``compose``
    #: optimises a new field per level after the earlier ones, then merges them. On mmdef3d, composing ended at 0.93
    #: mm where continuing ended at 1.87 (``benchmarks/deformable3d.py``); elsewhere unmeasured: the search chooses.
    across_levels: Literal["continue", "compose"] = "continue"
    #: ANTs SyN's scheme: both images move toward a midpoint by ``gradient_step`` each (see ``fields.py``), rather
    #: than the moving image alone by ITK's gradient descent.
    symmetric: bool = False


Transform = Annotated[LinearTransform | BSplineTransform | DisplacementTransform, Field(discriminator="kind")]


# --- metrics ------------------------------------------------------------------------------------------------------


class _Metric(_Frozen):
    #: ITK's metrics precompute the images' gradients (True) or take central differences at each sample (False:
    #: cheaper when few voxels are sampled; the gradient image costs a full pass over the level's voxels).
    use_fixed_image_gradient_filter: bool = True
    use_moving_image_gradient_filter: bool = True


class MattesMutualInformation(_Metric):
    kind: Literal["mattes"] = "mattes"
    number_of_histogram_bins: int = Field(50, ge=4, le=512)


class JointHistogramMutualInformation(_Metric):
    kind: Literal["joint_hist_mi"] = "joint_hist_mi"
    number_of_histogram_bins: int = Field(20, ge=4, le=512)
    variance_for_joint_pdf_smoothing: float = Field(1.5, gt=0)


class ANTSNeighborhoodCorrelation(_Metric):
    kind: Literal["ants_nc"] = "ants_nc"
    #: Neighbourhood radius in voxels.
    radius: int = Field(2, ge=1, le=10)


class Correlation(_Metric):
    kind: Literal["correlation"] = "correlation"


class MeanSquares(_Metric):
    kind: Literal["mean_squares"] = "mean_squares"


Metric = Annotated[
    MattesMutualInformation | JointHistogramMutualInformation | ANTSNeighborhoodCorrelation | Correlation | MeanSquares,
    Field(discriminator="kind"),
]
HISTOGRAM_METRICS = ("mattes", "joint_hist_mi")


# --- sampling -----------------------------------------------------------------------------------------------------


class Sampling(_Frozen):
    """Which voxels of each level the metric samples: all (``none``), or a percentage of them, or a number of points.

    ``points`` is per pyramid level and capped by the level's voxels, so a trial's cost no longer grows with the image
    size (elastix samples 2,048 points whatever the image size); ``percentage`` is ITK's own rule.
    """

    strategy: Literal["none", "regular", "random"] = "random"
    percentage: float | None = Field(None, gt=0, le=1)
    points: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _amount(self) -> Sampling:
        given = (self.percentage is not None) + (self.points is not None)
        if self.strategy == "none" and given:
            raise ValueError("sampling 'none' uses every voxel: remove percentage and points")
        if self.strategy != "none" and given != 1:
            raise ValueError(f"sampling '{self.strategy}' needs exactly one of percentage and points")
        return self


# --- optimizers ---------------------------------------------------------------------------------------------------


class GradientDescent(_Frozen):
    kind: Literal["gradient_descent"] = "gradient_descent"
    learning_rate: float = Field(1.0, gt=0)
    number_of_iterations: int = Field(100, ge=1, le=100000)
    convergence_minimum_value: float = Field(1e-6, gt=0)
    convergence_window_size: int = Field(10, ge=2)
    estimate_learning_rate: Estimate = "once"
    #: 0: ITK's default (one voxel's shift).
    maximum_step_size_in_physical_units: float = Field(0.0, ge=0)
    scales: Scales = "physical_shift"


class RegularStepGradientDescent(_Frozen):
    kind: Literal["regular_step_gd"] = "regular_step_gd"
    learning_rate: float = Field(1.0, gt=0)
    min_step: float = Field(1e-4, gt=0)
    number_of_iterations: int = Field(100, ge=1, le=100000)
    relaxation_factor: float = Field(0.5, gt=0, lt=1)
    gradient_magnitude_tolerance: float = Field(1e-4, gt=0)
    estimate_learning_rate: Estimate = "once"
    maximum_step_size_in_physical_units: float = Field(0.0, ge=0)
    scales: Scales = "physical_shift"


class ConjugateGradientLineSearch(_Frozen):
    kind: Literal["cg_line_search"] = "cg_line_search"
    learning_rate: float = Field(1.0, gt=0)
    number_of_iterations: int = Field(100, ge=1, le=100000)
    convergence_minimum_value: float = Field(1e-6, gt=0)
    convergence_window_size: int = Field(10, ge=2)
    line_search_lower_limit: float = Field(0.0, ge=0)
    line_search_upper_limit: float = Field(5.0, gt=0)
    line_search_epsilon: float = Field(0.01, gt=0)
    line_search_maximum_iterations: int = Field(20, ge=1)
    estimate_learning_rate: Estimate = "once"
    maximum_step_size_in_physical_units: float = Field(0.0, ge=0)
    scales: Scales = "physical_shift"


class LBFGSB(_Frozen):
    """ITK's LBFGSB ignores optimizer scales (it warns and sets them to one), so it has none."""

    kind: Literal["lbfgsb"] = "lbfgsb"
    gradient_convergence_tolerance: float = Field(1e-5, gt=0)
    number_of_iterations: int = Field(100, ge=1, le=100000)
    maximum_number_of_corrections: int = Field(5, ge=1, le=100)
    maximum_number_of_function_evaluations: int = Field(1000, ge=1)
    cost_function_convergence_factor: float = Field(1e7, gt=0)


class LBFGS2(_Frozen):
    kind: Literal["lbfgs2"] = "lbfgs2"
    solution_accuracy: float = Field(1e-5, gt=0)
    #: 0: until convergence.
    number_of_iterations: int = Field(100, ge=0, le=100000)
    hessian_approximate_accuracy: int = Field(6, ge=1, le=100)
    delta_convergence_distance: int = Field(0, ge=0)
    delta_convergence_tolerance: float = Field(1e-5, ge=0)
    line_search_maximum_evaluations: int = Field(40, ge=1)
    scales: Scales = "none"


class Demons(_Frozen):
    """SimpleITK's Demons filters on a displacement field: for images of one modality (the force is the intensity
    difference, so the stage's metric is mean squares, every voxel). The field's smoothing comes from the transform's
    variances (standard deviations: their square roots, in field voxels)."""

    kind: Literal["demons"] = "demons"
    variant: Literal["fast_symmetric_forces", "diffeomorphic"] = "fast_symmetric_forces"
    number_of_iterations: int = Field(50, ge=1, le=100000)
    #: Largest update per iteration, in voxels of the field (0: unbounded).
    maximum_update_step_length: float = Field(0.5, ge=0)
    intensity_difference_threshold: float = Field(0.001, ge=0)
    #: The filter stops early once the RMS change of the field falls below this.
    maximum_rms_error: float = Field(0.02, ge=0)
    #: Map the moving level's intensities onto the fixed one's histogram first (the force assumes equal intensities):
    #: over every voxel (``all``) or above the mean only (``above_mean``: ITK's way of leaving a dark background out).
    match_histograms: Literal["off", "all", "above_mean"] = "off"


Optimizer = Annotated[
    GradientDescent | RegularStepGradientDescent | ConjugateGradientLineSearch | LBFGSB | LBFGS2 | Demons,
    Field(discriminator="kind"),
]
#: Optimizers that take a fixed or estimated learning rate, and a refining BSpline grid (LBFGSB keeps its first
#: level's bounds and stops when the grid grows).
GRADIENT_DESCENT_KINDS = ("gradient_descent", "regular_step_gd", "cg_line_search")


def kinds_of(union: Any) -> tuple[str, ...]:
    """The ``kind`` values of a discriminated union of models, in declaration order."""
    members = get_args(get_args(union)[0])
    return tuple(k for m in members for k in get_args(m.model_fields["kind"].annotation))


def model_of(union: Any, kind: str) -> type[BaseModel]:
    """The model of ``union`` whose ``kind`` is ``kind``."""
    for m in get_args(get_args(union)[0]):
        if kind in get_args(m.model_fields["kind"].annotation):
            return m
    raise KeyError(kind)


TRANSFORM_KINDS = kinds_of(Transform)
METRIC_KINDS = kinds_of(Metric)
OPTIMIZER_KINDS = kinds_of(Optimizer)


# --- pyramid, stage, recipe ---------------------------------------------------------------------------------------


class Pyramid(_Frozen):
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    sigma_units: Unit = "mm"
    #: True: both images are smoothed and shrunk once per level and worker, and each level registers on them. False:
    #: ITK's own pyramid, which smooths both full-resolution images and computes their gradient at every level and
    #: shrinks only the sampling grid (version 1; seconds per level on a large 3D volume).
    shrink_images: bool = False

    @model_validator(mode="after")
    def _levels_agree(self) -> Pyramid:
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ValueError("shrink_factors and smoothing_sigmas must have one entry per level")
        if not self.shrink_factors:
            raise ValueError("a pyramid needs at least one level")
        if any(s < 1 for s in self.shrink_factors):
            raise ValueError("shrink factors must be >= 1")
        if any(s < 0 for s in self.smoothing_sigmas):
            raise ValueError("smoothing sigmas must be >= 0")
        if any(a < b for a, b in zip(self.shrink_factors, self.shrink_factors[1:])):
            raise ValueError("shrink factors must not increase from one level to the next")
        return self


def _default_sampling() -> Sampling:
    return Sampling(strategy="random", percentage=0.01)


class Stage(_Frozen):
    transform: Transform
    metric: Metric = Field(default_factory=MattesMutualInformation)
    sampling: Sampling = Field(default_factory=_default_sampling)
    interpolator: Literal["linear", "nearest", "bspline"] = "linear"
    optimizer: Optimizer = Field(default_factory=GradientDescent)
    pyramid: Pyramid = Pyramid()
    use_masks: bool = True

    @field_validator("transform", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """``transform: rigid`` is short for ``transform: {kind: rigid}``."""
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> Stage:
        t = self.transform
        if isinstance(t, BSplineTransform) and t.refine and self.optimizer.kind not in GRADIENT_DESCENT_KINDS:
            raise ValueError(
                f"transform.refine needs a gradient-descent optimizer, not {self.optimizer.kind} "
                "(its bounds and memory cannot follow a growing grid)"
            )
        if self.optimizer.kind == "demons":
            if not isinstance(t, DisplacementTransform):
                raise ValueError(f"the demons optimizer moves a displacement field, not a {t.kind} transform")
            if self.metric.kind != "mean_squares" or self.sampling.strategy != "none":
                raise ValueError(
                    "the demons optimizer's force is the intensity difference at every voxel: "
                    "use metric mean_squares and sampling 'none'"
                )
        if isinstance(t, DisplacementTransform):
            if t.gradient_step is not None and self.optimizer.kind == "demons":
                raise ValueError(
                    "transform.gradient_step bounds gradient descent; the demons optimizer bounds its step by "
                    "optimizer.maximum_update_step_length"
                )
            if t.symmetric and (
                self.optimizer.kind != "gradient_descent" or t.gradient_step is None or t.across_levels != "continue"
            ):
                raise ValueError(
                    "transform.symmetric moves both halves by gradient_step each: it needs optimizer "
                    "gradient_descent, a transform.gradient_step and across_levels 'continue'"
                )
            if t.across_levels != "continue" and self.optimizer.kind == "demons":
                raise ValueError("the demons optimizer continues its field across levels: drop transform.across_levels")
            if t.gradient_step is not None and getattr(self.optimizer, "maximum_step_size_in_physical_units", 0):
                raise ValueError(
                    "set transform.gradient_step (voxels of each level) or "
                    "optimizer.maximum_step_size_in_physical_units, not both"
                )
            if self.optimizer.kind not in (*GRADIENT_DESCENT_KINDS, "demons"):
                raise ValueError(
                    f"a displacement field needs a gradient-descent optimizer or demons, not "
                    f"{self.optimizer.kind} (ITK's local-support updates)"
                )
            if not self.pyramid.shrink_images:
                raise ValueError(
                    "a displacement field runs on prepared levels: set pyramid.shrink_images to true "
                    "(its grid follows each level)"
                )
        return self

    @property
    def kind(self) -> str:
        return self.transform.kind


class Recipe(_Frozen):
    """Everything needed to reproduce one registration, and where it came from."""

    autoreg_recipe: Literal[2] = RECIPE_FORMAT
    initializer: Initializer = Initializer()
    stages: tuple[Stage, ...]
    #: Seed of the metric sampling; stage i samples with ``seed + i + 1`` (0 would mean the wall clock to SimpleITK).
    seed: int = Field(0, ge=0, lt=2**31)
    #: ITK threads of the registration; 0 means ITK's default (all cores).
    threads: int = Field(0, ge=0)
    #: One thread everywhere: repeated runs are bit-identical.
    deterministic: bool = False
    provenance: dict[str, Any] | None = None

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        kinds = [s.kind for s in stages]
        check_stage_order(kinds)
        return stages

    @property
    def effective_threads(self) -> int:
        return threads_of(self)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.stages)

    def with_(self, **changes: Any) -> Recipe:
        """A copy with top-level fields replaced, validated again."""
        return Recipe.model_validate({**self.model_dump(), **changes})

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file of any supported version (SPEC's ``autoreg.Recipe.load``)."""
        return load_recipe(path)

    def save(self, path: str | Path) -> None:
        save_recipe(self, path)


def check_stage_order(kinds: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError for an empty list, an unknown kind or a stage that loses freedom after another."""
    if not kinds:
        raise ValueError("at least one stage is needed")
    for kind in kinds:
        if kind not in TRANSFORM_RANK:
            raise ValueError(f"unknown stage '{kind}' (expected one of {', '.join(TRANSFORM_RANK)})")
    for a, b in zip(kinds, kinds[1:]):
        if TRANSFORM_RANK[b] < TRANSFORM_RANK[a]:
            order = (
                " < ".join(k for k in TRANSFORM_RANK if k in ("translation", "rigid", "similarity", "affine"))
                + " < bspline | displacement"
            )
            raise ValueError(f"stage '{b}' after '{a}' loses freedom (expected order: {order})")


def fits_stages(kinds: tuple[str, ...] | list[str], stages: tuple[str, ...] | list[str]) -> bool:
    """Whether a recipe's stage kinds are those of a study (a study's ``deformable`` stage takes either kind)."""
    return len(kinds) == len(stages) and all(
        k == s or (s == "deformable" and k in DEFORMABLE_KINDS) for k, s in zip(kinds, stages)
    )


def default_stage(kind: str, dim: int) -> Stage:
    """The SimpleITK-notebooks default for one stage: the model defaults; BSpline (and a study's ``deformable`` stage,
    whose default is the notebooks' free-form deformation): mesh 8 per axis and LBFGSB."""
    if kind in ("bspline", "deformable"):
        return Stage(transform=BSplineTransform(mesh_size=(8,) * dim), optimizer=LBFGSB())
    if kind == "displacement":
        return Stage(
            transform=DisplacementTransform(),
            optimizer=GradientDescent(number_of_iterations=20),
            pyramid=Pyramid(smoothing_sigmas=(8.0, 4.0, 0.0), shrink_images=True),
        )
    return Stage(transform=LinearTransform(kind=kind))


def ants_field_stage(dim: int) -> Stage:
    """A field by gradient descent with ANTs SyN's defaults (ANTsPy's ``registration("SyN")``: Mattes 32 bins on every
    voxel, shrink 4x2 with sigmas 2x1 voxels, as its 40x20x0 iterations leave the full-resolution level unrun,
    gradient step 0.2, update variance 3, total variance 0, 40 iterations, no gradient images: central differences,
    as antsRegistration differentiates and as the search always does). The notebook's field (``default_stage``)
    ends within 0.07 px of the landmarks' affine floor on the histology pairs when started from that affine; this one
    ends 0.2-0.6 px below it, ANTs SyN 0.7-1.4 px below (``benchmarks/landmark_floor.py``)."""
    return Stage(
        transform=DisplacementTransform(variance_for_update_field=3.0, variance_for_total_field=0.0, gradient_step=0.2),
        metric=MattesMutualInformation(
            number_of_histogram_bins=32, use_fixed_image_gradient_filter=False, use_moving_image_gradient_filter=False
        ),
        sampling=Sampling(strategy="none"),
        optimizer=GradientDescent(number_of_iterations=40),
        pyramid=Pyramid(shrink_factors=(4, 2), smoothing_sigmas=(2.0, 1.0), sigma_units="voxel", shrink_images=True),
    )


#: The total-field variance (field voxels) of the study's default fields, one-sided and symmetric: ANTs' 0 folds.
DEFAULT_TOTAL_FIELD_VARIANCE = 1.0


def default_field_stage(dim: int) -> Stage:
    """``ants_field_stage`` with each level's field composed after the coarser levels' and the total smoothed by
    ``DEFAULT_TOTAL_FIELD_VARIANCE``: ANTs' own, continued down the pyramid unsmoothed, left 0.03-1.7 % of the voxels
    folded from the landmarks' affine on the histology pairs (over a study's 0.1 % limit on three); this one folded
    none and ended 0.2-0.6 px lower on all four; on afids 0.30 mm higher (``benchmarks/landmark_floor.py``)."""
    stage = ants_field_stage(dim)
    transform = stage.transform.model_copy(
        update={"across_levels": "compose", "variance_for_total_field": DEFAULT_TOTAL_FIELD_VARIANCE}
    )
    return stage.model_copy(update={"transform": transform})


def ants_syn_stage(dim: int) -> Stage:
    """``ants_field_stage`` moved by ANTs SyN's own symmetric scheme (both images toward a midpoint), its total field
    smoothed by ``DEFAULT_TOTAL_FIELD_VARIANCE``: from the landmarks' affine on the four histology pairs, 0 (SyN's own)
    left 0.25-0.29 % of the voxels folded and ended 0.1-0.7 px higher (``benchmarks/landmark_floor.py``)."""
    stage = ants_field_stage(dim)
    transform = stage.transform.model_copy(
        update={"symmetric": True, "variance_for_total_field": DEFAULT_TOTAL_FIELD_VARIANCE}
    )
    return stage.model_copy(update={"transform": transform})


def default_demons_stage(dim: int) -> Stage:
    """The displacement stage's default field and pyramid moved by SimpleITK's Demons (notebook 66's other way):
    the intensity difference at every voxel."""
    return default_stage("displacement", dim).model_copy(
        update={"optimizer": Demons(), "metric": MeanSquares(), "sampling": Sampling(strategy="none")}
    )


def default_recipe(stages: list[str] | tuple[str, ...], dim: int, *, seed: int = 0) -> Recipe:
    """GEOMETRY init, Mattes MI 50 bins, RANDOM 1 %, GD lr 1.0 x 100 (1e-6 over 10), PhysicalShift scales,
    shrink [4,2,1], sigmas [2,1,0] mm, linear interpolation; BSpline: mesh 8 per axis, LBFGSB."""
    return Recipe(stages=tuple(default_stage(k, dim) for k in stages), seed=seed)


# --- version 1 ----------------------------------------------------------------------------------------------------

#: Version-1 optimizer fields -> their format-2 names, per kind (fields a kind ignored are dropped).
_V1_OPTIMIZER = {
    "gradient_descent": {
        "learning_rate": "learning_rate",
        "iterations": "number_of_iterations",
        "convergence_minimum_value": "convergence_minimum_value",
        "convergence_window_size": "convergence_window_size",
        "estimate_learning_rate": "estimate_learning_rate",
    },
    "regular_step_gd": {
        "learning_rate": "learning_rate",
        "minimum_step": "min_step",
        "iterations": "number_of_iterations",
        "relaxation_factor": "relaxation_factor",
        "gradient_tolerance": "gradient_magnitude_tolerance",
        "estimate_learning_rate": "estimate_learning_rate",
    },
    "cg_line_search": {
        "learning_rate": "learning_rate",
        "iterations": "number_of_iterations",
        "convergence_minimum_value": "convergence_minimum_value",
        "convergence_window_size": "convergence_window_size",
        "estimate_learning_rate": "estimate_learning_rate",
    },
    "lbfgsb": {
        "gradient_tolerance": "gradient_convergence_tolerance",
        "iterations": "number_of_iterations",
        "max_corrections": "maximum_number_of_corrections",
        "max_function_evaluations": "maximum_number_of_function_evaluations",
        "cost_function_convergence_factor": "cost_function_convergence_factor",
    },
    # version 1 passed max_corrections as the Hessian accuracy and gradient_tolerance as the solution accuracy
    "lbfgs2": {
        "gradient_tolerance": "solution_accuracy",
        "iterations": "number_of_iterations",
        "max_corrections": "hessian_approximate_accuracy",
    },
}
#: Version-1 defaults of the fields above (a v1 file may leave them out).
_V1_OPTIMIZER_DEFAULTS = {
    "learning_rate": 1.0,
    "estimate_learning_rate": "once",
    "iterations": 100,
    "convergence_minimum_value": 1e-6,
    "convergence_window_size": 10,
    "minimum_step": 1e-4,
    "relaxation_factor": 0.5,
    "gradient_tolerance": 1e-5,
    "max_corrections": 5,
    "max_function_evaluations": 1000,
    "cost_function_convergence_factor": 1e7,
}
_V1_METRIC = {
    "mattes": {"bins": "number_of_histogram_bins"},
    "joint_hist_mi": {"bins": "number_of_histogram_bins", "variance": "variance_for_joint_pdf_smoothing"},
    "ants_nc": {"radius": "radius"},
    "correlation": {},
    "mean_squares": {},
}
_V1_METRIC_DEFAULTS = {"bins": 50, "variance": 1.5, "radius": 2}


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 recipe as the format-2 recipe that runs identically (structure only; validation follows)."""
    out = {k: v for k, v in data.items() if k not in ("autoreg_recipe", "stages")}
    out["autoreg_recipe"] = RECIPE_FORMAT
    stages = data.get("stages")
    if not isinstance(stages, (list, tuple)):
        return {**out, "stages": stages}
    out["stages"] = [_upgrade_stage_v1(s) if isinstance(s, dict) else s for s in stages]
    return out


def _upgrade_stage_v1(stage: dict[str, Any]) -> dict[str, Any]:
    kind = stage.get("transform")
    transform: dict[str, Any] = {"kind": kind}
    if isinstance(stage.get("bspline"), dict):
        transform.update(stage["bspline"])
    metric_in = dict(stage.get("metric") or {})
    mkind = metric_in.get("kind", "mattes")
    metric = {"kind": mkind}
    for old, new in _V1_METRIC.get(mkind, {}).items():
        metric[new] = metric_in.get(old, _V1_METRIC_DEFAULTS[old])
    sampling_in = dict(stage.get("sampling") or {})
    strategy = sampling_in.get("strategy", "random")
    sampling = {"strategy": strategy}
    if strategy != "none":
        sampling["percentage"] = sampling_in.get("percentage", 0.01)
    opt_in = dict(stage.get("optimizer") or {})
    okind = opt_in.get("kind", "gradient_descent")
    optimizer = {"kind": okind}
    for old, new in _V1_OPTIMIZER.get(okind, {}).items():
        optimizer[new] = opt_in.get(old, _V1_OPTIMIZER_DEFAULTS[old])
    if okind not in ("lbfgsb",):  # version 1 set the scales on every optimizer; LBFGSB ignores them
        optimizer["scales"] = stage.get("scales", "physical_shift")
    out = {
        "transform": transform,
        "metric": metric,
        "sampling": sampling,
        "optimizer": optimizer,
        "pyramid": {**(stage.get("pyramid") or {}), "shrink_images": False},
    }
    for key in ("interpolator", "use_masks"):
        if key in stage:
            out[key] = stage[key]
    return out


# --- YAML -----------------------------------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data, settings that are not given (None) left out, each model's ``kind`` first."""
    return _kind_first(recipe.model_dump(mode="json", exclude_none=True))


def _kind_first(value: Any) -> Any:
    if isinstance(value, dict):
        ordered = {"kind": value["kind"]} if "kind" in value else {}
        ordered.update((k, _kind_first(v)) for k, v in value.items() if k != "kind")
        return ordered
    if isinstance(value, list):
        return [_kind_first(v) for v in value]
    return value


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, width=120)


def recipe_from_dict(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe of any supported version; problems are one line naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise UserError("expected a mapping with 'stages'", file=source)
    version = data.get("autoreg_recipe", RECIPE_FORMAT)
    if version == 1:
        data = upgrade_v1(data)
    elif version != RECIPE_FORMAT:
        raise UserError(
            f"unknown recipe format {excerpt(version)} (this autoreg reads 1 and 2)", file=source, key="autoreg_recipe"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise user_error_from_validation(err, source) from None


def recipe_from_yaml(text: str, *, source: str = "recipe") -> Recipe:
    return recipe_from_dict(load_yaml_text(text, source=source), source=source)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return recipe_from_dict(load_yaml_file(path, what="YAML recipe", missing="recipe file not found"), source=str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(recipe_to_yaml(recipe), encoding="utf-8")


def dotted(loc: tuple[Any, ...]) -> str:
    """('pairs', 0, 'fixed') -> 'pairs[0].fixed': the key as a user would point at it."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


#: Parts of a validation error's location that name a union member, not a key the user wrote.
_UNION_TAGS = ("function-", "tagged-union[")


def user_error_from_validation(err: ValidationError, source: str) -> UserError:
    """The first validation problem as one line naming the file and the key."""
    first = err.errors()[0]
    loc = list(first["loc"])
    kind = first["type"]
    # a discriminated union puts the member's tag (its 'kind') into the location: drop it, keep the user's keys
    tag = None
    for i, part in enumerate(loc):
        if isinstance(part, str) and i > 0 and _is_union_member(part):
            tag = part
    loc = [p for p in loc if not (isinstance(p, str) and (p.startswith(_UNION_TAGS) or p == tag))]
    key = dotted(tuple(loc)) or None
    if kind == "extra_forbidden":
        msg = f"not a setting of {tag!r}" if tag else "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = first.get("ctx") or {}
        expected = ctx.get("expected_tags", "")
        msg = f"expected 'kind' to be one of {expected}" + (f" (got {excerpt(ctx['tag'])})" if "tag" in ctx else "")
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind.startswith(("literal", "int", "float", "bool", "string")):
            msg += f" (got {excerpt(first['input'])})"
    return UserError(msg, file=source, key=key)


def _is_union_member(part: str) -> bool:
    return part in (*TRANSFORM_KINDS, *METRIC_KINDS, *OPTIMIZER_KINDS)
