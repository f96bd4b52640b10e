"""The search space: fingerprint + overrides -> which parameters, which ranges; ``suggest(trial) -> Recipe``.

``suggest`` takes any object with Optuna's ``suggest_*`` methods, so ``optuna.trial.FixedTrial(params)`` replays a
trial's recipe through the very code that tuned it; ``params_of(recipe)`` goes the other way (the point of the space
that describes a recipe), which gives every parameter its value when it is dropped: the default recipe's. Parameter
names are stable dotted paths; where a parameter is a recipe field its name is that field's path
(``stage0.optimizer.number_of_iterations``), so PAIR.yaml's ``search:`` can fix, narrow or drop it by the same name,
and can also fix any other recipe field (``stage0.interpolator: bspline``).

Ranges follow from the fingerprint (see ``fingerprint`` for the rules):

* the coarsest shrink never leaves fewer than 16 voxels on an axis it shrinks (a thick-slice axis is shrunk less:
  ``registration.axis_factors``) of the smallest pair, nor fewer voxels
  than the metric needs samples;
* a stage samples a number of points per level, on a log range from what the metric needs to ``MAX_SAMPLES`` (cost,
  not accuracy, beyond that), capped by each level's voxels;
* BSpline control points are spaced between ``1/32`` and ``1/2`` of the shortest extent (at least 4 voxels), so
  the grid always has 2 to 32 cells per axis and stays inside the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import SearchOverride, StudyConfig
from .errors import UserError
from .fingerprint import DatasetFingerprint, level_voxels, samples_needed
from .recipe import (
    DEFORMABLE_KINDS,
    GRADIENT_DESCENT_KINDS,
    HISTOGRAM_METRICS,
    METRIC_KINDS,
    Metric,
    Optimizer,
    Recipe,
    Sampling,
    Stage,
    Transform,
    ants_syn_stage,
    default_demons_stage,
    default_field_stage,
    default_recipe,
    default_stage,
    model_of,
    recipe_from_dict,
    recipe_to_dict,
)
from .registration import LINEAR_KINDS
from .trial import DEFAULT_POINT

MAX_LEVELS = 5
MAX_SAMPLES = 250_000
#: The finest level a displacement field's pyramid may stop at (1: full resolution).
FINEST_SHRINKS = (1, 2)
#: The most a displacement field's updates are smoothed (Gaussian variance in field voxels; ANTs' default is 3):
#: from the landmarks' affine, 9 ended below 3 on the histology pairs (``benchmarks/landmark_floor.py``).
UPDATE_VARIANCE_MAX = 16.0
MIN_CONTROL_POINT_VOXELS = 4
#: ITKv4's BSpline Jacobian is dense: each sample costs ~30 ns per grid parameter per iteration. Grids stay below
#: this many parameters (32 cells a side in 2D, 12 in 3D) ...
MAX_BSPLINE_PARAMETERS = 10_000
#: ... and a BSpline stage samples at most this many (points x parameters) per iteration (about a second).
MAX_SAMPLE_PARAMETERS = 3e7
#: Metric evaluations of the rotation search (its grid is coarsened to fit): seconds, not minutes, in 3D.
SEARCH_EVALUATIONS = 2000
#: The last level's smoothing is drawn on this grid, so that prepared full-resolution images are reused across trials.
SIGMA_LAST_STEP = 0.25
LINEAR_OPTIMIZERS = ("gradient_descent", "regular_step_gd", "cg_line_search")
BSPLINE_OPTIMIZERS = ("lbfgsb", "lbfgs2", "gradient_descent")
#: Search names of format 1 -> where the setting lives now (a one-line hint instead of "unknown parameter").
RENAMED = {
    "metric.bins": "metric.number_of_histogram_bins",
    "optimizer.iterations": "optimizer.number_of_iterations",
    "optimizer.minimum_step": "optimizer.min_step",
    "optimizer.gradient_tolerance": "optimizer.gradient_convergence_tolerance (lbfgsb) or optimizer.solution_accuracy "
    "(lbfgs2)",
    "scales": "optimizer.scales",
    "bspline.control_point_spacing": "transform.control_point_spacing",
    "bspline.mesh_size": "transform.mesh_size",
    "bspline.refine": "transform.refine",
}


class TrialLike(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step=None, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices) -> Any: ...


@dataclass(frozen=True)
class Dim:
    """One searched parameter: a numeric range or a list of choices, asked only where ``when`` holds.

    ``when`` maps another parameter (or a group's fixed kind, ``stage0.transform.kind``) to the values under which this
    one matters, e.g. histogram bins only for the histogram metrics.
    """

    name: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False
    integer: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return not isinstance(value, bool) and isinstance(value, (int, float)) and self.low <= value <= self.high

    def clamp(self, value: Any) -> Any:
        if self.choices is not None:
            return value if value in self.choices else None
        v = min(max(float(value), self.low), self.high)
        if self.step is not None:
            v = self.low + round((v - self.low) / self.step) * self.step
        return int(round(v)) if self.integer else v


@dataclass
class SearchSpace:
    fingerprint: DatasetFingerprint
    stages: tuple[str, ...]
    overrides: dict[str, SearchOverride] = field(default_factory=dict)
    source: str = "PAIR.yaml"

    def __post_init__(self) -> None:
        self._dims = {d.name: d for d in self._all_dims()}
        # a list given for a recipe field that is not searched is its value (shrink_factors: [4, 2, 1]), not choices
        self.overrides = {
            k: SearchOverride(value=list(ov.choices), fixed=True)
            if k not in self._dims and ov.choices is not None
            else ov
            for k, ov in self.overrides.items()
        }
        self._defaults = self.params_of(self.baseline_recipe())
        self._check_overrides()

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

    def points_range(self) -> tuple[int, int]:
        """Sample points per level: from what a correlation metric needs to ``MAX_SAMPLES`` or the whole image."""
        full = level_voxels(self.fingerprint.smallest_size, 1)
        high = max(samples_needed(None), min(MAX_SAMPLES, full))
        return min(samples_needed(None), high), high

    @property
    def dense_affordable(self) -> bool:
        """Whether every voxel of the full-resolution image is no more than the most points a level may sample: on
        larger images (a 3D volume has millions) dense sampling costs minutes per trial and is not offered."""
        return level_voxels(self.fingerprint.smallest_size, 1) <= MAX_SAMPLES

    def metric_kinds(self) -> tuple[str, ...]:
        """The metrics the search draws: ITK's ANTS neighbourhood correlation is built for dense evaluation
        (sampled, it was 10-60x slower here), so it is offered only where dense sampling is."""
        return METRIC_KINDS if self.dense_affordable else tuple(k for k in METRIC_KINDS if k != "ants_nc")

    def max_cells(self) -> int:
        """Cells per axis of the finest BSpline grid the search may use: 32, or fewer where the parameter count
        would pass ``MAX_BSPLINE_PARAMETERS``."""
        return max(2, min(32, int((MAX_BSPLINE_PARAMETERS / self.dim) ** (1 / self.dim)) - 3))

    def cp_spacing_range(self) -> tuple[float, float]:
        shortest = self.fingerprint.min_extent_voxels
        longest = self.fingerprint.max_extent_voxels
        low = max(MIN_CONTROL_POINT_VOXELS, shortest / 32, longest / self.max_cells())
        return low, max(low, shortest / 2)

    def dims(self) -> list[Dim]:
        """Every parameter the search may touch, before overrides (conditional ones included)."""
        return list(self._dims.values())

    def _all_dims(self) -> list[Dim]:
        out: list[Dim] = [Dim("initializer.kind", choices=("geometry", "moments", "none", "best"))]
        first_linear = next((k for k in self.stages if k in LINEAR_KINDS), None)
        if first_linear not in (None, "translation"):
            on = (("initializer.rotation_search", (True,)),)
            out.append(Dim("initializer.rotation_search", choices=(False, True)))
            out.append(
                Dim(
                    "initializer.rotation_search.max_angle_deg",
                    low=10.0,
                    high=180.0 if self.dim == 2 else 90.0,
                    when=on,
                )
            )
            # rotations alone, with the centres' offset held, can lock onto a flipped pose; searching the shift
            # with them found poses 3-7x closer on rotated, shifted sections (0: rotations only)
            out.append(Dim("initializer.rotation_search.max_shift_fraction", low=0.0, high=0.25, when=on))
        for i, kind in enumerate(self.stages):
            out += self._stage_dims(f"stage{i}", kind)
        return out

    def _stage_dims(self, s: str, kind: str) -> list[Dim]:
        deformable = kind not in LINEAR_KINDS
        multi = ((f"{s}.pyramid.levels", tuple(range(2, MAX_LEVELS + 1))),)
        sampled = ((f"{s}.sampling.strategy", ("regular", "random")),)
        opt = f"{s}.optimizer.kind"
        gd = ((opt, GRADIENT_DESCENT_KINDS),)
        bspline = ((f"{s}.transform.kind", ("bspline",)),)
        displacement = ((f"{s}.transform.kind", ("displacement",)),)
        plo, phi = self.points_range()
        # a displacement field samples densely (``field_sampling``): the sampling is searched for the other kinds
        not_field = ((f"{s}.transform.kind", (*LINEAR_KINDS, "bspline")),)
        out = [Dim(f"{s}.transform.kind", choices=DEFORMABLE_KINDS)] if kind == "deformable" else []
        out += [
            Dim(f"{s}.pyramid.levels", low=1, high=self.max_levels, integer=True),
            Dim(
                f"{s}.pyramid.coarsest_shrink", low=2, high=max(2, self.max_shrink), integer=True, log=True, when=multi
            ),
            Dim(f"{s}.pyramid.sigma_factor", low=0.0, high=1.0, when=multi),
            Dim(f"{s}.pyramid.sigma_last", low=0.0, high=1.0, step=SIGMA_LAST_STEP),
            Dim(f"{s}.metric.kind", choices=self.metric_kinds()),
            Dim(
                f"{s}.metric.number_of_histogram_bins",
                low=16,
                high=128,
                integer=True,
                log=True,
                when=((f"{s}.metric.kind", HISTOGRAM_METRICS),),
            ),
            Dim(
                f"{s}.sampling.strategy",
                choices=("none", "regular", "random") if self.dense_affordable else ("regular", "random"),
                when=((f"{s}.metric.kind", tuple(k for k in METRIC_KINDS if k != "ants_nc")),) + not_field,
            ),
            Dim(f"{s}.sampling.points", low=plo, high=phi, integer=True, log=True, when=sampled + not_field),
            # a displacement field always descends the gradient (ITK's local-support updates): not searched
            Dim(opt, choices=BSPLINE_OPTIMIZERS, when=bspline) if deformable else Dim(opt, choices=LINEAR_OPTIMIZERS),
            Dim(f"{s}.optimizer.number_of_iterations", low=20, high=500, integer=True, log=True),
        ]
        if not deformable:
            # A BSpline stage's gradient descent always estimates its step (ITK bounds it by a voxel's shift): a fixed
            # rate on control-point displacements does not carry over between metrics and grids. In a 60-trial study
            # of a histology pair, 12 of 14 fixed-rate trials ended above 17 px (most diverged).
            out += [
                Dim(f"{s}.optimizer.estimate_learning_rate", choices=("never", "once"), when=gd),
                Dim(
                    f"{s}.optimizer.learning_rate",
                    low=0.01,
                    high=10.0,
                    log=True,
                    when=gd + ((f"{s}.optimizer.estimate_learning_rate", ("never",)),),
                ),
                Dim(f"{s}.optimizer.scales", choices=("physical_shift", "index_shift", "jacobian"), when=gd),
            ]
        out += [
            Dim(
                f"{s}.optimizer.convergence_minimum_value",
                low=1e-8,
                high=1e-4,
                log=True,
                when=((opt, ("gradient_descent", "cg_line_search")),),
            ),
            Dim(
                f"{s}.optimizer.convergence_window_size",
                low=5,
                high=20,
                integer=True,
                when=((opt, ("gradient_descent", "cg_line_search")),),
            ),
            Dim(f"{s}.optimizer.min_step", low=1e-6, high=1e-2, log=True, when=((opt, ("regular_step_gd",)),)),
            Dim(f"{s}.optimizer.relaxation_factor", low=0.3, high=0.9, when=((opt, ("regular_step_gd",)),)),
        ]
        if kind in ("bspline", "deformable"):
            clo, chi = self.cp_spacing_range()
            out += [
                Dim(
                    f"{s}.optimizer.gradient_convergence_tolerance",
                    low=1e-7,
                    high=1e-3,
                    log=True,
                    when=bspline + ((opt, ("lbfgsb",)),),
                ),
                Dim(
                    f"{s}.optimizer.solution_accuracy",
                    low=1e-7,
                    high=1e-3,
                    log=True,
                    when=bspline + ((opt, ("lbfgs2",)),),
                ),
                Dim(f"{s}.transform.control_point_spacing", low=clo, high=chi, log=True, when=bspline),
            ]
        if kind in ("displacement", "deformable"):
            # the field's grid in fixed voxels (1: every voxel of the level) and the Gaussian regularisation of each
            # update (viscous) and of the whole field (elastic), in voxels of that grid: ANTs' GaussianDisplacementField
            demons = displacement + ((f"{s}.optimizer.demons", (True,)),)
            not_demons = displacement + ((f"{s}.optimizer.demons", (False,)),)
            out += [
                Dim(f"{s}.transform.grid_spacing", low=1.0, high=4.0, log=True, when=displacement),
                Dim(f"{s}.transform.variance_for_update_field", low=0.0, high=UPDATE_VARIANCE_MAX, when=displacement),
                Dim(f"{s}.transform.variance_for_total_field", low=0.0, high=3.0, when=displacement),
                # ANTs SyN's pyramid ends at half resolution (40x20x0 iterations): from the landmarks' affine, as good a
                # field on histology at a third of the seconds (benchmarks/landmark_floor.py)
                Dim(f"{s}.pyramid.finest_shrink", choices=FINEST_SHRINKS, when=displacement + multi),
                # SimpleITK's Demons moves the field by the intensity difference (one modality): on same-modality
                # deformations it ended at a quarter of gradient descent's TRE (benchmarks/demons.py)
                Dim(f"{s}.optimizer.demons", choices=(False, True), when=displacement),
                Dim(f"{s}.optimizer.variant", choices=("fast_symmetric_forces", "diffeomorphic"), when=demons),
                Dim(f"{s}.optimizer.maximum_update_step_length", low=0.1, high=2.0, log=True, when=demons),
                # stains or scanners that scale intensities differently: matching the moving level's histogram first
                # lowered TRE on two histology pairs and raised it on two (benchmarks/demons.py --histology)
                Dim(f"{s}.optimizer.match_histograms", choices=("off", "all", "above_mean"), when=demons),
                # gradient descent on the field: its step in level voxels (ANTs' gradientStep; ITK's own bound, a
                # voxel of the field's grid, overshoots on coarse grids) and how levels carry the field
                Dim(f"{s}.transform.gradient_step", low=0.1, high=1.0, log=True, when=not_demons),
                # ANTs SyN's scheme, both images toward a midpoint: from the landmarks' affine 0.2-1.4 px below the
                # one-sided field on the four histology pairs at 2-4x its seconds; on afids 0.4 mm above
                # (benchmarks/landmark_floor.py)
                Dim(f"{s}.transform.symmetric", choices=(False, True), when=not_demons),
                Dim(
                    f"{s}.transform.across_levels",
                    choices=("continue", "compose"),
                    when=not_demons + multi + ((f"{s}.transform.symmetric", (False,)),),
                ),
            ]
        return out

    def parameter_names(self) -> set[str]:
        return set(self._dims)

    # --- suggesting -------------------------------------------------------------------------------------------

    def _get(self, trial: TrialLike, name: str) -> Any:
        d = self._dims[name]
        ov = self.overrides.get(name)
        if ov is not None and ov.drop:
            return self.default_of(name)
        if ov is not None and ov.fixed:
            return ov.value
        if d.choices is not None or (ov is not None and ov.choices is not None):
            choices = ov.choices if ov is not None and ov.choices is not None else d.choices
            return trial.suggest_categorical(name, list(choices))
        low, high = self._bounds(name)
        log = ov.log if ov is not None and ov.log is not None else d.log
        if d.integer:
            return trial.suggest_int(name, int(low), int(high), log=log)
        if d.step is not None and not log:
            return trial.suggest_float(name, float(low), float(high), step=d.step)
        return trial.suggest_float(name, float(low), float(high), log=log)

    def default_of(self, name: str) -> Any:
        """A parameter's value when it is not searched: the default recipe's (its first choice or low end else)."""
        if name in self._defaults:
            return self._defaults[name]
        d = self._dims[name]
        return d.choices[0] if d.choices is not None else (int(d.low) if d.integer else d.low)

    def suggest(self, trial: TrialLike, *, seed: int = 0) -> Recipe:
        """Draw a recipe. Only parameters that matter for the drawn branch are asked for (conditional space)."""
        get = lambda name: self._get(trial, name)  # noqa: E731
        init: dict[str, Any] = {"kind": get("initializer.kind")}
        if "initializer.rotation_search" in self._dims and get("initializer.rotation_search"):
            max_angle = float(get("initializer.rotation_search.max_angle_deg"))
            # 2D: 25 angles x 49 shifts, one joint grid; 3D: 9^3 rotations, then 5^3 shifts around the best three
            # (a joint 3D grid would be 91,125 evaluations: see registration.initializer.search_plan)
            step = max(5.0, max_angle / 12) if self.dim == 2 else max(5.0, max_angle / 4)
            shift = round(float(get("initializer.rotation_search.max_shift_fraction")), 4)
            steps = (3 if self.dim == 2 else 2) if shift > 0 else 0
            init["rotation_search"] = {
                "max_angle_deg": max_angle,
                "step_deg": step,
                "max_shift_fraction": shift,
                "shift_steps": steps,
                "max_evaluations": SEARCH_EVALUATIONS,
            }
        stages = [self._suggest_stage(i, kind, get) for i, kind in enumerate(self.stages)]
        data = {"initializer": init, "stages": stages, "seed": seed}
        self._apply_field_overrides(data)
        return recipe_from_dict(data, source=f"{self.source} (search)")

    def _suggest_stage(self, i: int, kind: str, get) -> dict[str, Any]:
        s = f"stage{i}"
        if kind == "deformable":
            kind = get(f"{s}.transform.kind")
        demons = kind == "displacement" and bool(get(f"{s}.optimizer.demons"))
        metric_kind = "mean_squares" if demons else get(f"{s}.metric.kind")
        metric: dict[str, Any] = {"kind": metric_kind}
        bins = None
        if metric_kind in HISTOGRAM_METRICS:
            bins = metric["number_of_histogram_bins"] = int(get(f"{s}.metric.number_of_histogram_bins"))
        # Gradient images cost a pass over each level's voxels (4.5 s on a 182x218x182 volume) and no less per
        # sample than central differences (measured: 1.5 us per sample and iteration either way): never computed.
        metric.update(use_fixed_image_gradient_filter=False, use_moving_image_gradient_filter=False)
        transform: dict[str, Any] = {"kind": kind}
        parameters = None
        if kind == "bspline":
            # the coarse-to-fine grid (transform.refine) is not searched: on ki67 it gave no better best after 30
            # trials (14.24 against 13.42 px) for much longer trials; it stays a recipe field
            cps = round(float(get(f"{s}.transform.control_point_spacing")), 4)
            transform.update(control_point_spacing=cps, spacing_units="voxel")
            size = self.fingerprint.smallest_size
            parameters = self.dim * math.prod(max(1, round(n / cps)) + 3 for n in size)
        elif kind == "displacement":
            transform.update(
                grid_spacing=round(float(get(f"{s}.transform.grid_spacing")), 4),
                spacing_units="voxel",
                variance_for_update_field=round(float(get(f"{s}.transform.variance_for_update_field")), 4),
                variance_for_total_field=round(float(get(f"{s}.transform.variance_for_total_field")), 4),
            )
        sampling: dict[str, Any]
        if kind == "displacement" and not demons:
            sampling = self.field_sampling().model_dump(exclude_none=True)
        else:
            strategy = "none" if metric_kind == "ants_nc" or demons else get(f"{s}.sampling.strategy")
            sampling = {"strategy": strategy}
            if strategy != "none":
                points = int(get(f"{s}.sampling.points"))
                if parameters is not None:  # a dense BSpline Jacobian: bounded seconds per iteration
                    points = min(points, int(MAX_SAMPLE_PARAMETERS / parameters))
                # at least the samples the metric needs (a few thousand for 128 bins):
                # fewer end in "joint PDF summed to zero"
                sampling["points"] = max(points, samples_needed(bins))
        pyramid = self._suggest_pyramid(s, get, bins, field=kind == "displacement")
        if kind == "displacement" and not demons:
            transform["gradient_step"] = round(float(get(f"{s}.transform.gradient_step")), 4)
            transform["symmetric"] = bool(get(f"{s}.transform.symmetric"))
            if len(pyramid["shrink_factors"]) > 1 and not transform["symmetric"]:
                transform["across_levels"] = get(f"{s}.transform.across_levels")
        return {
            "transform": transform,
            "metric": metric,
            "sampling": sampling,
            "optimizer": self._suggest_optimizer(s, kind, get),
            "pyramid": pyramid,
        }

    def _suggest_pyramid(self, s: str, get, bins: int | None, field: bool = False) -> dict[str, Any]:
        fixed_shrinks = self._fixed(f"{s}.pyramid.shrink_factors")
        if fixed_shrinks is not None:
            shrinks = tuple(int(f) for f in fixed_shrinks)
        else:
            levels = int(get(f"{s}.pyramid.levels"))
            coarsest = int(get(f"{s}.pyramid.coarsest_shrink")) if levels > 1 else 1
            # no level so coarse that it holds fewer voxels than the metric needs samples ("joint PDF summed to zero")
            size, spacing = self.fingerprint.smallest_size, self.fingerprint.smallest_spacing
            while coarsest > 1 and level_voxels(size, coarsest, spacing) < samples_needed(bins):
                coarsest -= 1
            # a field may stop above full resolution, as ANTs SyN's does, below a coarser level
            finest = int(get(f"{s}.pyramid.finest_shrink")) if field and levels > 1 else 1
            finest = finest if finest < coarsest else 1
            shrinks = shrink_schedule(coarsest, min(levels, coarsest - finest + 1), finest)
        sigmas = self._fixed(f"{s}.pyramid.smoothing_sigmas")
        units = self._fixed(f"{s}.pyramid.sigma_units") or "voxel"
        if sigmas is None:
            factor = float(get(f"{s}.pyramid.sigma_factor")) if len(shrinks) > 1 else 0.0
            last = float(get(f"{s}.pyramid.sigma_last"))
            sigmas = tuple(round(factor * f, 6) for f in shrinks[:-1]) + (round(last, 6),)
            units = "voxel"
        # prepared levels (ITK's own pyramid smooths and differentiates the full images at every level: seconds in 3D)
        return {
            "shrink_factors": list(shrinks),
            "smoothing_sigmas": list(sigmas),
            "sigma_units": units,
            "shrink_images": True,
        }

    def _suggest_optimizer(self, s: str, kind: str, get) -> dict[str, Any]:
        if kind == "displacement" and get(f"{s}.optimizer.demons"):
            return {
                "kind": "demons",
                "variant": get(f"{s}.optimizer.variant"),
                "number_of_iterations": int(get(f"{s}.optimizer.number_of_iterations")),
                "maximum_update_step_length": round(float(get(f"{s}.optimizer.maximum_update_step_length")), 4),
                "match_histograms": get(f"{s}.optimizer.match_histograms"),
            }
        okind = "gradient_descent" if kind == "displacement" else get(f"{s}.optimizer.kind")
        opt: dict[str, Any] = {"kind": okind, "number_of_iterations": int(get(f"{s}.optimizer.number_of_iterations"))}
        if okind in GRADIENT_DESCENT_KINDS:
            linear = kind in LINEAR_KINDS
            estimate = get(f"{s}.optimizer.estimate_learning_rate") if linear else "once"
            opt["estimate_learning_rate"] = estimate
            if estimate == "never":
                opt["learning_rate"] = float(get(f"{s}.optimizer.learning_rate"))
            if okind == "regular_step_gd":
                opt["min_step"] = float(get(f"{s}.optimizer.min_step"))
                opt["relaxation_factor"] = float(get(f"{s}.optimizer.relaxation_factor"))
            else:
                opt["convergence_minimum_value"] = float(get(f"{s}.optimizer.convergence_minimum_value"))
                opt["convergence_window_size"] = int(get(f"{s}.optimizer.convergence_window_size"))
            # a BSpline grid's parameters all move control points: one scale for all ("none"); physical-shift scales
            # cost 35 s of setup for 4,000 parameters in 3D, and Jacobian scales are zero outside the samples' support.
            # A displacement field's local updates are scaled by physical shift, as in ANTs (one scale per axis).
            opt["scales"] = (
                get(f"{s}.optimizer.scales") if linear else ("physical_shift" if kind == "displacement" else "none")
            )
        elif okind == "lbfgsb":
            opt["gradient_convergence_tolerance"] = float(get(f"{s}.optimizer.gradient_convergence_tolerance"))
        elif okind == "lbfgs2":
            opt["solution_accuracy"] = float(get(f"{s}.optimizer.solution_accuracy"))
        return opt

    # --- the point of a recipe ----------------------------------------------------------------------------------

    def params_of(self, recipe: Recipe) -> dict[str, Any]:
        """The point of this space that describes ``recipe`` (as closely as the parametrisation allows)."""
        data = recipe_to_dict(recipe)
        out: dict[str, Any] = {"initializer.kind": recipe.initializer.kind}
        rs = recipe.initializer.rotation_search
        out["initializer.rotation_search"] = rs is not None
        if rs is not None:
            out["initializer.rotation_search.max_angle_deg"] = rs.max_angle_deg
            out["initializer.rotation_search.max_shift_fraction"] = rs.max_shift_fraction
        voxel = self.fingerprint.voxel_size
        for i, (stage, sdata) in enumerate(zip(recipe.stages, data["stages"])):
            s = f"stage{i}"
            p = stage.pyramid
            sig = [x / voxel if p.sigma_units == "mm" else x for x in p.smoothing_sigmas]
            out[f"{s}.pyramid.levels"] = len(p.shrink_factors)
            if len(p.shrink_factors) > 1:
                out[f"{s}.pyramid.coarsest_shrink"] = p.shrink_factors[0]
                out[f"{s}.pyramid.sigma_factor"] = sig[0] / p.shrink_factors[0]
            out[f"{s}.pyramid.sigma_last"] = sig[-1]
            for group in ("transform", "metric", "sampling", "optimizer"):
                for key, value in sdata[group].items():
                    out[f"{s}.{group}.{key}"] = value
            if stage.sampling.percentage is not None:
                out[f"{s}.sampling.points"] = stage.sampling.percentage * level_voxels(
                    self.fingerprint.smallest_size, 1
                )
            if stage.kind == "displacement":
                out[f"{s}.optimizer.demons"] = stage.optimizer.kind == "demons"
                if len(p.shrink_factors) > 1:
                    out[f"{s}.pyramid.finest_shrink"] = p.shrink_factors[-1]
            mesh = getattr(stage.transform, "mesh_size", None)
            if mesh:
                out[f"{s}.transform.control_point_spacing"] = self.fingerprint.min_extent_voxels / min(mesh)
        clamped = {}
        for name, value in out.items():
            d = self._dims.get(name)
            if d is not None and (v := d.clamp(value)) is not None:
                clamped[name] = v
        return clamped

    def baseline_recipe(self, seed: int = 0) -> Recipe:
        """The SimpleITK-notebooks default recipe for these stages (trial 0 of every study)."""
        return default_recipe(self.stages, self.dim, seed=seed)

    def point_of(self, recipe: Recipe) -> dict[str, Any]:
        """``params_of`` less what this study's overrides fix, drop or rule out: the sampler draws those."""
        out = {}
        for name, value in self.params_of(recipe).items():
            ov = self.overrides.get(name)
            if ov is not None and (
                ov.drop
                or ov.fixed
                or (ov.choices is not None and value not in ov.choices)
                or (ov.low is not None and value < ov.low)
                or (ov.high is not None and value > ov.high)
            ):
                continue
            out[name] = value
        return out

    def default_points(self) -> list[tuple[str, dict[str, Any]]]:
        """The default recipe as points of the space, role -> params: one per way its first ``deformable`` or
        ``displacement`` stage may go (bspline, a field by gradient descent after ANTs SyN's defaults with its levels
        composed and its total smoothed, the same with its updates smoothed the most the search allows, the first by
        SyN's symmetric scheme, a field by Demons).

        The baseline runs as it is and teaches the sampler nothing; its points do, and each way is tried once before
        TPE narrows (in a 60-trial study of ratkidney without them, TPE never came near the default; on ki67, a study
        that drew Demons only at random never drew it again)."""
        index = self.first_deformable()
        ways: dict[str, Stage] = {}
        if index is not None:
            choices = self._possible(f"stage{index}.transform.kind")
            first = {
                "bspline": default_stage("bspline", self.dim),
                "displacement": self.affordable(default_field_stage(self.dim)),
            }
            ways = {kind: first[kind] for kind in DEFORMABLE_KINDS if kind in choices}
            if "displacement" in ways and (smooth := self._smoothest_field(index, ways["displacement"])) is not None:
                ways["smooth"] = smooth
            if "displacement" in ways and True in self._possible(f"stage{index}.transform.symmetric"):
                ways["symmetric"] = self.affordable(ants_syn_stage(self.dim))
            if "displacement" in ways and True in self._possible(f"stage{index}.optimizer.demons"):
                ways["demons"] = default_demons_stage(self.dim)
        baseline = self.baseline_recipe()
        if not ways:
            return [(DEFAULT_POINT, self.point_of(baseline))]
        out = []
        for name, stage in ways.items():
            stages = list(baseline.stages)
            stages[index] = stage
            role = DEFAULT_POINT if len(ways) == 1 else f"{DEFAULT_POINT}:{name}"
            out.append((role, self.point_of(Recipe(stages=tuple(stages)))))
        return out

    def _smoothest_field(self, index: int, field: Stage) -> Stage | None:
        """The default field with its update smoothing at the top of the range searched (None where that is no
        smoother): the best smoothing of a field depends on the deformation, not on the images' size or spacing, and
        TPE narrows around the points it is shown, so it is shown both ends. From a study's own best affine, the default
        field ended at 0.53 mm with ANTs' variance 3 and at 0.29 with 16 on mmdef3d (a smooth synthetic field), and at
        3.12 against 3.30 mm on afids (``benchmarks/deformable3d.py --part smoothing``)."""
        top = self._high(f"stage{index}.transform.variance_for_update_field")
        if top is None or top <= field.transform.variance_for_update_field:
            return None
        transform = field.transform.model_copy(update={"variance_for_update_field": top})
        return field.model_copy(update={"transform": transform})

    def _high(self, name: str) -> float | None:
        """The top of a numeric parameter's searched range, overrides applied (None where it is not searched)."""
        d, ov = self._dims.get(name), self.overrides.get(name)
        if d is None or d.high is None or (ov is not None and (ov.drop or ov.fixed or ov.choices is not None)):
            return None
        return float(self._bounds(name)[1])

    def _bounds(self, name: str) -> tuple[Any, Any]:
        """A numeric parameter's (low, high): an override's where it narrows them, else the dimension's."""
        d, ov = self._dims[name], self.overrides.get(name)
        low = ov.low if ov is not None and ov.low is not None else d.low
        high = ov.high if ov is not None and ov.high is not None else d.high
        return low, high

    def crossed_points(self, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Each default way of the first deformable stage on the other stages of ``params`` (a finished trial's
        point): the default points run on the default linear stages, which on sections that need a real affine
        leave the deformable way nothing to show, so the ways are tried again on the best linear stages found."""
        index = self.first_deformable()
        if index is None:
            return []
        prefix = f"stage{index}."
        kept = {k: v for k, v in params.items() if not k.startswith(prefix)}
        return [
            (role, {**kept, **{k: v for k, v in point.items() if k.startswith(prefix)}})
            for role, point in self.default_points()
        ]

    def first_deformable(self) -> int | None:
        """The index of the first stage whose kind is ``deformable`` or ``displacement`` (the one with default ways)."""
        return next((i for i, k in enumerate(self.stages) if k in ("deformable", "displacement")), None)

    def affordable(self, stage: Stage) -> Stage:
        """``stage`` with its dense sampling replaced by the most points a level may sample, where every voxel of the
        image is more than that."""
        if stage.sampling.strategy != "none" or self.dense_affordable:
            return stage
        return stage.model_copy(update={"sampling": self.field_sampling()})

    def field_sampling(self) -> Sampling:
        """A displacement field's sampling: every voxel of a level, up to the most points a level may sample. A field
        moves only where it is sampled, and its samples cost little next to smoothing it: on mmdef3d's finer level
        1,000 points took 10.7 s where 185,700 took 13.9, and ended at 2.68 mm against 0.46; from the landmarks'
        affine on ki67 and rat kidney 60,000 to 3,000 points ended 0.05-0.8 px above every voxel."""
        if self.dense_affordable:
            return Sampling(strategy="none")
        return Sampling(strategy="regular", points=self.points_range()[1])

    # --- overrides ----------------------------------------------------------------------------------------------

    def _fixed(self, name: str) -> Any:
        ov = self.overrides.get(name)
        return ov.value if ov is not None and ov.fixed else None

    def _possible(self, name: str) -> tuple[Any, ...]:
        """The values a parameter (or a group's kind) can take in this study, overrides applied."""
        ov = self.overrides.get(name)
        if name not in self._dims:
            stage, _, rest = name.partition(".")
            if rest == "transform.kind":
                return (self.stages[int(stage[5:])],)
            if rest == "optimizer.kind":  # a displacement stage's gradient descent
                return ("gradient_descent",)
            return ()
        if ov is not None and ov.drop:
            return (self.default_of(name),)
        if ov is not None and ov.fixed:
            return (ov.value,)
        if ov is not None and ov.choices is not None:
            return tuple(ov.choices)
        d = self._dims[name]
        return d.choices if d.choices is not None else ()

    def _check_overrides(self) -> None:
        """Every override names a parameter or a recipe field that some drawable recipe uses, with a possible value."""
        for key, ov in self.overrides.items():
            where = f"search.{key}"
            d = self._dims.get(key)
            if d is None:
                self._check_field_override(key, ov)
                continue
            if ov.drop:
                continue
            values = list(ov.choices) if ov.choices is not None else ([ov.value] if ov.fixed else [])
            for v in values:
                if d.choices is not None and v not in d.choices:
                    raise UserError(f"{v!r} is not one of {list(d.choices)}", file=self.source, key=where)
                if d.choices is None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise UserError(f"expected a number, got {v!r}", file=self.source, key=where)
            if (
                d.choices is not None
                and ov.choices is None
                and not ov.fixed
                and (ov.low is not None or ov.high is not None)
            ):
                raise UserError("low/high given for a parameter with choices", file=self.source, key=where)
            bounds = [v for v in (ov.low, ov.high, *values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if d.log and any(v <= 0 for v in bounds):  # Optuna cannot draw it, and no recipe could use it
                raise UserError(
                    f"expected values above 0 (it is drawn on a log scale; got {min(bounds):g})",
                    file=self.source,
                    key=where,
                )
            for other, allowed in d.when:
                possible = self._possible(other)
                if possible and not set(possible) & set(allowed):
                    raise UserError(
                        f"never used: it applies only when {other} is one of {list(allowed)}, and this "
                        f"study's {other} is {list(possible)}",
                        file=self.source,
                        key=where,
                    )
        self._check_fixed_shrink()
        try:  # field overrides must make a valid recipe
            self.suggest(_DefaultsTrial(self))
        except UserError as err:
            fixed = [k for k, ov in self.overrides.items() if ov.fixed]
            raise UserError(
                f"the fixed values make an invalid recipe ({err.detail})",
                file=self.source,
                key=f"search.{fixed[0]}" if len(fixed) == 1 else "search",
            ) from None
        for key, ov in self.overrides.items():  # each fixed value or choice, on a branch where it is used
            d = self._dims.get(key)
            if d is None or ov.drop or not (ov.fixed or ov.choices is not None):
                continue
            branch = {
                other: next(v for v in allowed if v in (self._possible(other) or allowed)) for other, allowed in d.when
            }
            for v in list(ov.choices) if ov.choices is not None else [ov.value]:
                try:
                    self.suggest(_DefaultsTrial(self, {**branch, key: v}))
                except UserError as err:
                    raise UserError(
                        f"{v!r} makes an invalid recipe ({err.detail})", file=self.source, key=f"search.{key}"
                    ) from None

    def _check_fixed_shrink(self) -> None:
        """A fixed pyramid must leave every level of the smallest fixed image an image ITK can smooth and sample."""
        from .data import MIN_IMAGE_AXIS

        shortest = min(min(p.fixed.size) for p in self.fingerprint.pairs)
        for key, ov in self.overrides.items():
            if not (key.endswith(".pyramid.shrink_factors") and ov.fixed and isinstance(ov.value, list)):
                continue
            numbers = [f for f in ov.value if isinstance(f, int) and not isinstance(f, bool)]
            if numbers and shortest // max(numbers) < MIN_IMAGE_AXIS:
                raise UserError(
                    f"shrink factor {max(numbers)} leaves {shortest // max(numbers)} voxel(s) on the shortest axis "
                    f"({shortest}) of the fixed images; expected at most {shortest // MIN_IMAGE_AXIS}",
                    file=self.source,
                    key=f"search.{key}",
                )

    def _check_field_override(self, key: str, ov: SearchOverride) -> None:
        where = f"search.{key}"
        stage, _, rest = key.partition(".")
        if rest in RENAMED or key in RENAMED:
            raise UserError(
                f"renamed in recipe format 2: use {stage}.{RENAMED[rest]}"
                if rest in RENAMED
                else f"renamed in recipe format 2: use {RENAMED[key]}",
                file=self.source,
                key=where,
            )
        if not self._is_recipe_field(key):
            raise UserError(
                f"unknown search parameter (searched: {', '.join(sorted(self._dims))}; or a recipe field "
                "such as stage0.interpolator)",
                file=self.source,
                key=where,
            )
        if rest == "pyramid.smoothing_sigmas" and f"{stage}.pyramid.shrink_factors" not in self.overrides:
            raise UserError(
                f"fix {stage}.pyramid.shrink_factors with it (one sigma per level)", file=self.source, key=where
            )
        if not ov.fixed:
            if key.endswith(".sampling.percentage"):
                raise UserError(
                    f"the sampling is searched as points per level: narrow {stage}.sampling.points, or fix "
                    "a percentage",
                    file=self.source,
                    key=where,
                )
            raise UserError(
                "only a fixed value can be given for a recipe field that is not searched", file=self.source, key=where
            )
        group, _, fieldname = rest.partition(".")
        union = {"transform": Transform, "metric": Metric, "optimizer": Optimizer}.get(group)
        if union is not None and fieldname and "." not in fieldname and fieldname != "kind":
            kinds = self._possible(f"{stage}.{group}.kind")
            users = [k for k in kinds if fieldname in model_of(union, k).model_fields]
            if not users:
                raise UserError(
                    f"not a setting of {group} {' or '.join(map(repr, kinds))}", file=self.source, key=where
                )

    def _is_recipe_field(self, key: str) -> bool:
        parts = key.split(".")
        if parts[0] in ("initializer", "seed", "threads", "deterministic"):
            return True
        if parts[0].startswith("stage") and parts[0][5:].isdigit():
            return int(parts[0][5:]) < len(self.stages) and len(parts) > 1
        return False

    def _apply_field_overrides(self, data: dict[str, Any]) -> None:
        """Set the fixed recipe fields that are not searched parameters, where the drawn kinds have them."""
        for key, ov in self.overrides.items():
            if (
                key in self._dims
                or not ov.fixed
                or ".pyramid.shrink_factors" in key
                or ".pyramid.smoothing_sigmas" in key
                or ".pyramid.sigma_units" in key
            ):
                continue
            _set_path(data, key, ov.value)


class _DefaultsTrial:
    """Answers every ``suggest_*`` with ``forced[name]`` or the parameter's default: to check overrides without a
    study."""

    def __init__(self, space: SearchSpace, forced: dict[str, Any] | None = None):
        self.space = space
        self.forced = forced or {}

    def _value(self, name: str, fallback: Any) -> Any:
        if name in self.forced:
            return self.forced[name]
        return self.space.default_of(name) if name in self.space._dims else fallback

    def suggest_int(self, name, low, high, **_):
        return min(max(int(self._value(name, low)), low), high)

    def suggest_float(self, name, low, high, **_):
        return min(max(float(self._value(name, low)), low), high)

    def suggest_categorical(self, name, choices):
        d = self._value(name, choices[0])
        return d if d in choices else choices[0]


def shrink_schedule(coarsest: int, levels: int, finest: int = 1) -> tuple[int, ...]:
    """Shrink factors from ``coarsest`` down to ``finest``, evenly spaced in log scale, strictly decreasing where
    possible."""
    if levels <= 1:
        return (finest,)
    out = []
    for level in range(levels):
        f = coarsest ** ((levels - 1 - level) / (levels - 1)) * finest ** (level / (levels - 1))
        out.append(max(finest, int(round(f))))
    for j in range(len(out) - 2, -1, -1):  # keep non-increasing after rounding
        out[j] = max(out[j], out[j + 1])
    return tuple(out)


def _set_path(data: dict, key: str, value: Any) -> None:
    """Set ``stage1.optimizer.min_step`` (or ``initializer.kind``...) in recipe data; a setting the drawn kind of its
    group does not have is skipped (the override is for the kinds that have it), and a sampling amount replaces the
    other one (percentage or points)."""
    parts = key.split(".")
    node: Any = data
    if parts[0].startswith("stage") and parts[0][5:].isdigit():
        node = data["stages"][int(parts[0][5:])]
        parts = parts[1:]
    union = {"transform": Transform, "metric": Metric, "optimizer": Optimizer}.get(parts[0])
    if union is not None and len(parts) == 2 and parts[1] != "kind":
        kind = (node.get(parts[0]) or {}).get("kind")
        if kind is not None and parts[1] not in model_of(union, kind).model_fields:
            return
    if parts[0] == "sampling" and len(parts) == 2 and parts[1] in ("percentage", "points"):
        node.setdefault("sampling", {}).pop("points" if parts[1] == "percentage" else "percentage", None)
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def build_space(cfg: StudyConfig, fingerprint: DatasetFingerprint) -> SearchSpace:
    return SearchSpace(fingerprint=fingerprint, stages=cfg.stages, overrides=dict(cfg.search), source=str(cfg.path))


def pyramid_plan(fingerprint: DatasetFingerprint, stages: Sequence[str] = ("affine",)) -> str:
    """One line for ``autoreg check``: the pyramids and sampling the search may use on these data (and the BSpline
    grid, where ``stages`` may draw one)."""
    space = SearchSpace(fingerprint=fingerprint, stages=("affine",))
    plo, phi = space.points_range()
    line = (
        f"1..{space.max_levels} pyramid levels, coarsest shrink <= {space.max_shrink} "
        f"(e.g. {list(shrink_schedule(space.max_shrink, space.max_levels))}); {plo}..{phi} sample points per level"
    )
    if any(kind in ("bspline", "deformable") for kind in stages):
        clo, chi = space.cp_spacing_range()
        line += f"; BSpline control points every {clo:.3g}..{chi:.3g} voxels"
    return line
