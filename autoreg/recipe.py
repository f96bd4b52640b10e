"""The recipe as data: every setting of a SimpleITK registration, versioned, immutable, YAML round-trippable.

A recipe is what a study tunes and what ``autoreg export`` writes. It holds no file paths and no image data,
so one recipe runs on any pair (``autoreg apply``). Lengths carry their unit (``mm`` or ``voxel`` of the fixed
image); the engine converts them into its normalised frame (see ``registration``).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError, excerpt
from .registration import threads_of

RECIPE_FORMAT = 1

TransformKind = Literal["translation", "rigid", "similarity", "affine", "bspline"]
#: Stages must not decrease in freedom: a rigid stage after an affine one would throw freedom away.
TRANSFORM_RANK = {"translation": 0, "rigid": 1, "similarity": 2, "affine": 3, "bspline": 4}
from .registration import LINEAR_KINDS  # noqa: E402  (the engine owns the list of linear kinds)
Unit = Literal["mm", "voxel"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RotationSearch(_Frozen):
    """Exhaustive search of the rotation before the first rigid-kind stage (large rotations defeat gradients)."""

    max_angle_deg: float = Field(180.0, gt=0, le=180)
    step_deg: float = Field(15.0, gt=0, le=90)
    #: Shift search as a fraction of the fixed extent on each side (0: rotations only).
    max_shift_fraction: float = Field(0.0, ge=0, le=0.5)
    shift_steps: int = Field(0, ge=0, le=10)


class Initializer(_Frozen):
    """How the first transform starts: image centres (geometry), centres of mass (moments) or identity."""

    kind: Literal["geometry", "moments", "none"] = "geometry"
    rotation_search: RotationSearch | None = None


class Metric(_Frozen):
    kind: Literal["mattes", "correlation", "ants_nc", "mean_squares", "joint_hist_mi"] = "mattes"
    bins: int = Field(50, ge=4, le=512)
    #: Neighbourhood radius of ANTS neighborhood correlation, in voxels.
    radius: int = Field(2, ge=1, le=10)
    #: Parzen smoothing variance of the joint-histogram MI metric.
    variance: float = Field(1.5, gt=0)


class Sampling(_Frozen):
    strategy: Literal["none", "regular", "random"] = "random"
    percentage: float = Field(0.01, gt=0, le=1)


class Optimizer(_Frozen):
    kind: Literal["gradient_descent", "regular_step_gd", "lbfgsb", "lbfgs2", "cg_line_search"] = "gradient_descent"
    learning_rate: float = Field(1.0, gt=0)
    estimate_learning_rate: Literal["never", "once", "each_iteration"] = "once"
    iterations: int = Field(100, ge=1, le=100000)
    convergence_minimum_value: float = Field(1e-6, gt=0)
    convergence_window_size: int = Field(10, ge=2)
    #: Regular-step gradient descent: smallest step, relaxation and gradient tolerance.
    minimum_step: float = Field(1e-4, gt=0)
    relaxation_factor: float = Field(0.5, gt=0, lt=1)
    gradient_tolerance: float = Field(1e-5, gt=0)
    #: LBFGS-B / LBFGS2.
    max_corrections: int = Field(5, ge=1, le=100)
    max_function_evaluations: int = Field(1000, ge=1)
    cost_function_convergence_factor: float = Field(1e7, gt=0)


class Pyramid(_Frozen):
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    sigma_units: Unit = "mm"

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


class BSplineGrid(_Frozen):
    """The control-point grid: either mesh cells per axis, or a control-point spacing (mm or fixed voxels)."""

    mesh_size: tuple[int, ...] | None = None
    control_point_spacing: float | None = Field(None, gt=0)
    spacing_units: Unit = "voxel"
    order: Literal[3] = 3
    #: Coarse to fine grid (as elastix's grid schedule, SimpleITK's ``scaleFactors``): the grid starts with 2^(L-1)
    #: times fewer cells and doubles at each of the stage's L pyramid levels, reaching the grid above at the finest.
    refine: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> BSplineGrid:
        if (self.mesh_size is None) == (self.control_point_spacing is None):
            raise ValueError("give exactly one of mesh_size and control_point_spacing")
        if self.mesh_size is not None and any(m < 1 for m in self.mesh_size):
            raise ValueError("mesh_size entries must be >= 1")
        return self


class Stage(_Frozen):
    transform: TransformKind
    metric: Metric = Metric()
    sampling: Sampling = Sampling()
    interpolator: Literal["linear", "nearest", "bspline"] = "linear"
    optimizer: Optimizer = Optimizer()
    scales: Literal["physical_shift", "index_shift", "jacobian", "none"] = "physical_shift"
    pyramid: Pyramid = Pyramid()
    bspline: BSplineGrid | None = None
    use_masks: bool = True

    @model_validator(mode="after")
    def _bspline_grid(self) -> Stage:
        if self.transform == "bspline" and self.bspline is None:
            raise ValueError("a bspline stage needs a 'bspline' grid (mesh_size or control_point_spacing)")
        if self.transform != "bspline" and self.bspline is not None:
            raise ValueError(f"'bspline' grid given for a {self.transform} stage")
        if self.bspline is not None and self.bspline.refine and self.optimizer.kind == "lbfgsb":
            # ITK's LBFGSB keeps the first level's scales and stops when the grid grows
            raise ValueError("bspline.refine needs an optimizer other than lbfgsb (its scales cannot follow the grid)")
        return self


class Recipe(_Frozen):
    """Everything needed to reproduce one registration, and where it came from."""

    autoreg_recipe: Literal[1] = RECIPE_FORMAT
    initializer: Initializer = Initializer()
    stages: tuple[Stage, ...]
    #: Seed of the metric sampling; stage i samples with ``seed + i``.
    seed: int = Field(0, ge=0, lt=2**31)
    #: ITK threads of the registration; 0 means ITK's default (all cores).
    threads: int = Field(0, ge=0)
    #: One thread everywhere: repeated runs are bit-identical.
    deterministic: bool = False
    provenance: dict[str, Any] | None = None

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        check_stage_order([s.transform for s in stages])
        return stages

    @property
    def effective_threads(self) -> int:
        return threads_of(self)

    def with_(self, **changes: Any) -> Recipe:
        """A copy with top-level fields replaced, validated again."""
        return Recipe.model_validate({**self.model_dump(), **changes})


def check_stage_order(kinds: list[str]) -> None:
    """Raise ValueError for an empty list, an unknown kind or a stage that loses freedom after another."""
    if not kinds:
        raise ValueError("at least one stage is needed")
    for kind in kinds:
        if kind not in TRANSFORM_RANK:
            raise ValueError(f"unknown stage '{kind}' (expected one of {', '.join(TRANSFORM_RANK)})")
    for a, b in zip(kinds, kinds[1:]):
        if TRANSFORM_RANK[b] < TRANSFORM_RANK[a]:
            raise ValueError(f"stage '{b}' after '{a}' loses freedom (expected order: {' < '.join(TRANSFORM_RANK)})")


def default_stage(kind: str, dim: int) -> Stage:
    """The SimpleITK-notebooks default for one stage: the baseline every study starts from."""
    if kind == "bspline":
        return Stage(
            transform="bspline",
            bspline=BSplineGrid(mesh_size=(8,) * dim),
            optimizer=Optimizer(
                kind="lbfgsb",
                iterations=100,
                gradient_tolerance=1e-5,
                max_corrections=5,
                max_function_evaluations=1000,
                cost_function_convergence_factor=1e7,
            ),
            scales="none",
        )
    return Stage(transform=kind)


def default_recipe(stages: list[str] | tuple[str, ...], dim: int, *, seed: int = 0) -> Recipe:
    """GEOMETRY init, Mattes MI 50 bins, RANDOM 1 %, GD lr 1.0 x 100 (1e-6 over 10), PhysicalShift scales,
    shrink [4,2,1], sigmas [2,1,0] mm, linear interpolation; BSpline: mesh 8 per axis, LBFGSB."""
    return Recipe(stages=tuple(default_stage(k, dim) for k in stages), seed=seed)


# --- YAML ------------------------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json", exclude_none=False)
    if data.get("provenance") is None:
        data.pop("provenance", None)
    return data


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, width=120)


def recipe_from_dict(data: Any, *, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError("expected a mapping with 'stages'", file=source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise user_error_from_validation(err, source) from None


def recipe_from_yaml(text: str, *, source: str = "recipe") -> Recipe:
    from .yamlio import load_yaml_text

    return recipe_from_dict(load_yaml_text(text, source=source), source=source)


def load_recipe(path) -> Recipe:
    from pathlib import Path

    from .yamlio import load_yaml_file

    path = Path(path)
    return recipe_from_dict(load_yaml_file(path, what="YAML recipe", missing="recipe file not found"), source=str(path))


def save_recipe(recipe: Recipe, path) -> None:
    from pathlib import Path

    Path(path).write_text(recipe_to_yaml(recipe), encoding="utf-8")


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or "syntax error"
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)


def dotted(loc: tuple[Any, ...]) -> str:
    """('pairs', 0, 'fixed') -> 'pairs[0].fixed': the key as a user would point at it."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def user_error_from_validation(err: ValidationError, source: str) -> UserError:
    """The first validation problem as one line naming the file and the key."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = dotted(loc) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind.startswith(("literal", "int", "float", "bool", "string")):
            msg += f" (got {excerpt(first['input'])})"
    return UserError(msg, file=source, key=key)
