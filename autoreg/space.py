"""The search space: fingerprint + overrides -> which parameters, which ranges; ``suggest(trial) -> Recipe``.

``suggest`` takes any object with Optuna's ``suggest_*`` methods, so ``optuna.trial.FixedTrial(params)`` replays a
trial's recipe through the very code that tuned it. Parameter names are stable dotted paths; where a parameter is a
recipe field its name is that field's path (``stage0.sampling.percentage``), so PAIR.yaml's ``search:`` can fix,
narrow or drop it by the same name, and can also fix any other recipe field (``stage0.interpolator: bspline``).

Ranges follow from the fingerprint (see ``fingerprint`` for the rules):

* the coarsest shrink never leaves fewer than 16 voxels on the shortest axis of the smallest pair;
* the sampling fraction never samples more than ``MAX_SAMPLES`` voxels at full resolution (cost, not accuracy,
  beyond that); per trial it is raised to what full resolution needs for the chosen histogram bins, and the
  coarsest shrink is lowered until that fraction still leaves the coarsest level enough samples;
* BSpline control points are spaced between ``1/32`` and ``1/2`` of the shortest extent (at least 4 voxels), so
  the grid always has 2 to 32 cells per axis and stays inside the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from .config import SearchOverride, StudyConfig
from .errors import UserError
from .fingerprint import DatasetFingerprint, enough_samples, level_voxels, min_sampling_fraction
from .recipe import (
    LINEAR_KINDS,
    BSplineGrid,
    Initializer,
    Metric,
    Optimizer,
    Pyramid,
    Recipe,
    RotationSearch,
    Sampling,
    Stage,
    default_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

MAX_LEVELS = 5
MAX_SAMPLES = 250_000
MIN_CONTROL_POINT_VOXELS = 4


class TrialLike(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step=None, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices) -> Any: ...


@dataclass(frozen=True)
class Dim:
    """One searched parameter: a numeric range or a list of choices, with the value used when it is dropped."""

    name: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False
    integer: bool = False
    default: Any = None


@dataclass
class SearchSpace:
    fingerprint: DatasetFingerprint
    stages: tuple[str, ...]
    overrides: dict[str, SearchOverride] = field(default_factory=dict)
    source: str = "PAIR.yaml"

    def __post_init__(self) -> None:
        known = self.parameter_names()
        for key in self.overrides:
            if key in known:
                continue
            if self._is_recipe_field(key):
                if not self.overrides[key].fixed:
                    raise UserError(
                        "only a fixed value can be given for a recipe field that is not searched",
                        file=self.source,
                        key=f"search.{key}",
                    )
                continue
            raise UserError(
                f"unknown search parameter (searched: {', '.join(sorted(known))})", file=self.source, key=f"search.{key}"
            )
        self._check_overrides()

    def _check_overrides(self) -> None:
        """Fixed values and choices must be possible; recipe-field overrides must make a valid recipe."""
        dims = {d.name: d for d in self.dims()}
        for key, ov in self.overrides.items():
            d = dims.get(key)
            if d is None or ov.drop:
                continue
            values = list(ov.choices) if ov.choices is not None else ([ov.value] if ov.fixed else [])
            for v in values:
                if d.choices is not None and v not in d.choices:
                    raise UserError(f"{v!r} is not one of {list(d.choices)}", file=self.source, key=f"search.{key}")
                if d.choices is None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise UserError(f"expected a number, got {v!r}", file=self.source, key=f"search.{key}")
            if d.choices is not None and ov.choices is None and not ov.fixed and (ov.low is not None or ov.high is not None):
                raise UserError("low/high given for a parameter with choices", file=self.source, key=f"search.{key}")
        fixed_params = [k for k, ov in self.overrides.items() if k in dims and ov.fixed]
        if fixed_params:
            try:  # the fixed values must make a valid recipe (e.g. bins >= 4)
                self.suggest(_DefaultsTrial(dims))
            except ValidationError as err:
                raise UserError(
                    f"fixed values make an invalid recipe: {err.errors()[0]['msg']}",
                    file=self.source, key=f"search.{fixed_params[0]}" if len(fixed_params) == 1 else "search",
                ) from None
        for key, ov in self.overrides.items():
            if key in dims or not ov.fixed:
                continue
            try:
                self._apply_field_overrides(self.baseline_recipe(), only=key)
            except UserError as err:
                raise UserError(err.detail, file=self.source, key=f"search.{key}") from None
            except (KeyError, IndexError, TypeError):
                raise UserError("no such recipe field", file=self.source, key=f"search.{key}") from None

    # --- the ranges, derived from the fingerprint -----------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.fingerprint.dim

    @property
    def max_shrink(self) -> int:
        return self.fingerprint.max_shrink

    @property
    def max_levels(self) -> int:
        return max(1, min(MAX_LEVELS, 1 + int(math.floor(math.log2(self.max_shrink)))))

    def _percentage_range(self) -> tuple[float, float]:
        size = self.fingerprint.smallest_size
        full = level_voxels(size, 1)
        high = min(1.0, max(MAX_SAMPLES / full, min_sampling_fraction(size, 1, 128)))
        low = min(high, min_sampling_fraction(size, 1, 16))
        return low, high

    def _cp_spacing_range(self) -> tuple[float, float]:
        shortest = self.fingerprint.min_extent_voxels
        low = max(MIN_CONTROL_POINT_VOXELS, shortest / 32)
        high = max(low, shortest / 2)
        return low, high

    def dims(self) -> list[Dim]:
        """Every parameter the search may touch, before overrides (conditional ones included)."""
        out: list[Dim] = [Dim("initializer.kind", choices=("geometry", "moments", "none"), default="geometry")]
        first_linear = next((k for k in self.stages if k in LINEAR_KINDS), None)
        if first_linear not in (None, "translation"):
            out.append(Dim("initializer.rotation_search", choices=(False, True), default=False))
            hi = 180.0 if self.dim == 2 else 30.0
            out.append(Dim("initializer.rotation_search.max_angle_deg", low=10.0, high=hi, default=hi))
            # rotations alone, with the centres' offset held, can lock onto a flipped pose; searching the shift
            # with them found poses 3-7x closer on rotated, shifted sections (0: rotations only)
            out.append(Dim("initializer.rotation_search.max_shift_fraction", low=0.0, high=0.25, default=0.15))
        plo, phi = self._percentage_range()
        for i, kind in enumerate(self.stages):
            s = f"stage{i}"
            out += [
                Dim(f"{s}.pyramid.levels", low=1, high=self.max_levels, integer=True, default=min(3, self.max_levels)),
                Dim(f"{s}.pyramid.coarsest_shrink", low=2, high=max(2, self.max_shrink), integer=True, log=True, default=min(4, self.max_shrink)),
                Dim(f"{s}.pyramid.sigma_factor", low=0.0, high=1.0, default=0.5),
                Dim(f"{s}.pyramid.sigma_last", low=0.0, high=1.0, default=0.0),
                Dim(f"{s}.metric.kind", choices=("mattes", "joint_hist_mi", "correlation", "mean_squares", "ants_nc"), default="mattes"),
                Dim(f"{s}.metric.bins", low=16, high=128, integer=True, log=True, default=50),
                Dim(f"{s}.sampling.strategy", choices=("none", "regular", "random"), default="random"),
                Dim(f"{s}.sampling.percentage", low=plo, high=phi, log=True, default=max(plo, min(phi, 0.01))),
            ]
            if kind == "bspline":
                clo, chi = self._cp_spacing_range()
                out += [
                    Dim(f"{s}.optimizer.kind", choices=("lbfgsb", "lbfgs2", "gradient_descent"), default="lbfgsb"),
                    Dim(f"{s}.bspline.control_point_spacing", low=clo, high=chi, log=True, default=min(chi, max(clo, self.fingerprint.min_extent_voxels / 8))),
                    Dim(f"{s}.optimizer.gradient_tolerance", low=1e-7, high=1e-3, log=True, default=1e-5),
                ]
            else:
                out += [
                    Dim(f"{s}.optimizer.kind", choices=("gradient_descent", "regular_step_gd", "cg_line_search"), default="gradient_descent"),
                    Dim(f"{s}.scales", choices=("physical_shift", "index_shift", "jacobian"), default="physical_shift"),
                ]
            if kind != "bspline":
                # A BSpline stage's gradient descent always estimates its step (ITK bounds it by a voxel's shift):
                # a fixed rate on control-point displacements does not carry over between metrics and grids. In a
                # 60-trial study of a histology pair, 12 of 14 fixed-rate trials ended above 17 px (most at
                # 1e3-1e6 px: diverged), one matched the best estimated-rate trials.
                out += [
                    Dim(f"{s}.optimizer.estimate_learning_rate", choices=("never", "once"), default="once"),
                    Dim(f"{s}.optimizer.learning_rate", low=0.01, high=10.0, log=True, default=1.0),
                ]
            out += [
                Dim(f"{s}.optimizer.iterations", low=20, high=500, integer=True, log=True, default=100),
                Dim(f"{s}.optimizer.convergence_minimum_value", low=1e-8, high=1e-4, log=True, default=1e-6),
                Dim(f"{s}.optimizer.convergence_window_size", low=5, high=20, integer=True, default=10),
                Dim(f"{s}.optimizer.minimum_step", low=1e-6, high=1e-2, log=True, default=1e-4),
                Dim(f"{s}.optimizer.relaxation_factor", low=0.3, high=0.9, default=0.5),
            ]
        return out

    def parameter_names(self) -> set[str]:
        return {d.name for d in self.dims()}

    def _is_recipe_field(self, key: str) -> bool:
        parts = key.split(".")
        if parts[0] in ("initializer", "seed", "threads", "deterministic"):
            return True
        if parts[0].startswith("stage") and parts[0][5:].isdigit():
            return int(parts[0][5:]) < len(self.stages) and len(parts) > 1
        return False

    # --- suggesting -------------------------------------------------------------------------------------------

    def _get(self, trial: TrialLike, dims: dict[str, Dim], name: str) -> Any:
        d = dims[name]
        ov = self.overrides.get(name)
        if ov is not None and ov.drop:
            return d.default
        if ov is not None and ov.fixed:
            return ov.value
        if d.choices is not None or (ov is not None and ov.choices is not None):
            choices = ov.choices if ov is not None and ov.choices is not None else d.choices
            return trial.suggest_categorical(name, list(choices))
        low = ov.low if ov is not None and ov.low is not None else d.low
        high = ov.high if ov is not None and ov.high is not None else d.high
        log = ov.log if ov is not None and ov.log is not None else d.log
        if d.integer:
            return trial.suggest_int(name, int(low), int(high), log=log)
        return trial.suggest_float(name, float(low), float(high), log=log)

    def suggest(self, trial: TrialLike, *, seed: int = 0) -> Recipe:
        """Draw a recipe. Only parameters that matter for the drawn branch are asked for (conditional space)."""
        dims = {d.name: d for d in self.dims()}
        get = lambda name: self._get(trial, dims, name)  # noqa: E731
        init_kind = get("initializer.kind")
        rotation = None
        if "initializer.rotation_search" in dims and get("initializer.rotation_search"):
            max_angle = float(get("initializer.rotation_search.max_angle_deg"))
            step = max(5.0, max_angle / 12) if self.dim == 2 else max(5.0, max_angle / 2)
            shift = round(float(get("initializer.rotation_search.max_shift_fraction")), 4)
            # the grid's size: (2n+1) shifts per axis, 7 in 2D (49 shifts per angle), 3 in 3D (27 per angle triple)
            steps = (3 if self.dim == 2 else 1) if shift > 0 else 0
            rotation = RotationSearch(max_angle_deg=max_angle, step_deg=step, max_shift_fraction=shift, shift_steps=steps)
        stages = []
        for i, kind in enumerate(self.stages):
            stages.append(self._suggest_stage(i, kind, get))
        recipe = Recipe(initializer=Initializer(kind=init_kind, rotation_search=rotation), stages=tuple(stages), seed=seed)
        return self._apply_field_overrides(recipe)

    def _suggest_stage(self, i: int, kind: str, get) -> Stage:
        s = f"stage{i}"
        levels = int(get(f"{s}.pyramid.levels"))
        coarsest = int(get(f"{s}.pyramid.coarsest_shrink")) if levels > 1 else 1
        factor = float(get(f"{s}.pyramid.sigma_factor")) if levels > 1 else 0.0
        last = float(get(f"{s}.pyramid.sigma_last"))

        metric_kind = get(f"{s}.metric.kind")
        histogram = metric_kind in ("mattes", "joint_hist_mi")
        bins = int(get(f"{s}.metric.bins")) if histogram else 50
        # ITK's ANTS neighbourhood correlation is built for dense evaluation: sampled, it was 10-60x slower here.
        strategy = "none" if metric_kind == "ants_nc" else get(f"{s}.sampling.strategy")
        size = self.fingerprint.smallest_size
        metric_bins = bins if histogram else None
        percentage = 1.0
        if strategy != "none":
            raw = float(get(f"{s}.sampling.percentage"))
            # enough samples at full resolution for the chosen bins (cheap: a few thousand) ...
            percentage = min(1.0, math.ceil(max(raw, min_sampling_fraction(size, 1, metric_bins)) * 1e6) / 1e6)
        # ... and no level so coarse that this fraction leaves too few ("joint PDF summed to zero")
        while coarsest > 1 and not enough_samples(size, coarsest, metric_bins, percentage):
            coarsest -= 1
        shrinks = shrink_schedule(coarsest, min(levels, coarsest))
        sigmas = tuple(round(factor * f, 6) for f in shrinks[:-1]) + (round(last, 6),)
        pyramid = Pyramid(shrink_factors=shrinks, smoothing_sigmas=sigmas, sigma_units="voxel")

        opt_kind = get(f"{s}.optimizer.kind")
        opt: dict[str, Any] = {"kind": opt_kind, "iterations": int(get(f"{s}.optimizer.iterations"))}
        if opt_kind in ("gradient_descent", "regular_step_gd", "cg_line_search"):
            estimate = "once" if kind == "bspline" else get(f"{s}.optimizer.estimate_learning_rate")
            opt["estimate_learning_rate"] = estimate
            if estimate == "never":
                opt["learning_rate"] = float(get(f"{s}.optimizer.learning_rate"))
            if opt_kind == "regular_step_gd":
                opt["minimum_step"] = float(get(f"{s}.optimizer.minimum_step"))
                opt["relaxation_factor"] = float(get(f"{s}.optimizer.relaxation_factor"))
            else:
                opt["convergence_minimum_value"] = float(get(f"{s}.optimizer.convergence_minimum_value"))
                opt["convergence_window_size"] = int(get(f"{s}.optimizer.convergence_window_size"))
        if kind == "bspline":
            if opt_kind in ("lbfgsb", "lbfgs2"):
                opt["gradient_tolerance"] = float(get(f"{s}.optimizer.gradient_tolerance"))
            scales = "none" if opt_kind in ("lbfgsb", "lbfgs2") else "physical_shift"
            # the coarse-to-fine grid (bspline.refine) is not searched: on ki67 it gave no better best after 30 trials
            # (14.24 against 13.42 px) for much longer trials; it stays a recipe field (enqueue or apply a recipe with it)
            grid = BSplineGrid(control_point_spacing=round(float(get(f"{s}.bspline.control_point_spacing")), 4),
                               spacing_units="voxel")
        else:
            scales = get(f"{s}.scales")
            grid = None
        return Stage(
            transform=kind,
            metric=Metric(kind=metric_kind, bins=bins),
            sampling=Sampling(strategy=strategy, percentage=percentage),
            optimizer=Optimizer(**opt),
            scales=scales,
            pyramid=pyramid,
            bspline=grid,
        )

    def _apply_field_overrides(self, recipe: Recipe, only: str | None = None) -> Recipe:
        names = self.parameter_names()
        extra = {k: v for k, v in self.overrides.items() if k not in names and v.fixed and only in (None, k)}
        if not extra:
            return recipe
        data = recipe_to_dict(recipe)
        for key, ov in extra.items():
            _set_path(data, key, ov.value)
        return recipe_from_dict(data, source=f"{self.source} (search overrides)")

    def baseline_params(self) -> dict[str, Any]:
        """Parameters of this space that describe the default recipe as closely as it can be described."""
        params: dict[str, Any] = {"initializer.kind": "geometry"}
        names = self.parameter_names()
        if "initializer.rotation_search" in names:
            params["initializer.rotation_search"] = False
        for i, kind in enumerate(self.stages):
            s = f"stage{i}"
            levels = min(3, self.max_levels)
            params[f"{s}.pyramid.levels"] = levels
            if levels > 1:
                params[f"{s}.pyramid.coarsest_shrink"] = max(2, min(4, self.max_shrink))
                params[f"{s}.pyramid.sigma_factor"] = 0.5
            params[f"{s}.pyramid.sigma_last"] = 0.0
            params[f"{s}.metric.kind"] = "mattes"
            params[f"{s}.metric.bins"] = 50
            params[f"{s}.sampling.strategy"] = "random"
            plo, phi = self._percentage_range()
            params[f"{s}.sampling.percentage"] = max(plo, min(phi, 0.01))
            params[f"{s}.optimizer.iterations"] = 100
            if kind == "bspline":
                params[f"{s}.optimizer.kind"] = "lbfgsb"
                params[f"{s}.optimizer.gradient_tolerance"] = 1e-5
                clo, chi = self._cp_spacing_range()
                params[f"{s}.bspline.control_point_spacing"] = min(chi, max(clo, self.fingerprint.min_extent_voxels / 8))
            else:
                params[f"{s}.optimizer.kind"] = "gradient_descent"
                params[f"{s}.optimizer.estimate_learning_rate"] = "once"
                params[f"{s}.optimizer.convergence_minimum_value"] = 1e-6
                params[f"{s}.optimizer.convergence_window_size"] = 10
                params[f"{s}.scales"] = "physical_shift"
        return {k: v for k, v in params.items() if k in names and k not in self.overrides}

    def baseline_recipe(self, seed: int = 0) -> Recipe:
        """The SimpleITK-notebooks default recipe for these stages (trial 0 of every study)."""
        return default_recipe(self.stages, self.dim, seed=seed)


class _DefaultsTrial:
    """Answers every ``suggest_*`` with the parameter's default: to check fixed overrides without a study."""

    def __init__(self, dims: dict[str, Dim]):
        self.dims = dims

    def suggest_int(self, name, low, high, **_):
        return int(self.dims[name].default)

    def suggest_float(self, name, low, high, **_):
        return float(self.dims[name].default)

    def suggest_categorical(self, name, choices):
        d = self.dims[name].default
        return d if d in choices else choices[0]


def shrink_schedule(coarsest: int, levels: int) -> tuple[int, ...]:
    """Shrink factors from ``coarsest`` down to 1, evenly spaced in log scale, strictly decreasing where possible."""
    if levels <= 1:
        return (1,)
    out = []
    for l in range(levels):
        f = coarsest ** ((levels - 1 - l) / (levels - 1))
        out.append(max(1, int(round(f))))
    for j in range(len(out) - 2, -1, -1):  # keep non-increasing after rounding
        out[j] = max(out[j], out[j + 1])
    return tuple(out)


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    if parts[0].startswith("stage") and parts[0][5:].isdigit():
        node = data["stages"][int(parts[0][5:])]
        parts = parts[1:]
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def build_space(cfg: StudyConfig, fingerprint: DatasetFingerprint) -> SearchSpace:
    return SearchSpace(fingerprint=fingerprint, stages=cfg.stages, overrides=dict(cfg.search), source=str(cfg.path))


def pyramid_plan(fingerprint: DatasetFingerprint) -> str:
    """One line for ``autoreg check``: the pyramids and sampling the search may use on these data."""
    space = SearchSpace(fingerprint=fingerprint, stages=("affine",))
    plo, phi = space._percentage_range()
    clo, chi = space._cp_spacing_range()
    return (
        f"1..{space.max_levels} pyramid levels, coarsest shrink <= {space.max_shrink} "
        f"(e.g. {list(shrink_schedule(space.max_shrink, space.max_levels))}); sampling {plo:.3g}..{phi:.3g} of the voxels; "
        f"BSpline control points every {clo:.3g}..{chi:.3g} voxels"
    )
