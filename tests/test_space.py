"""The search space: ranges derived from the fingerprint, conditional parameters, replay and the baseline point.

Spaces are built on fingerprints of synthetic pairs (small, large, 3D) and of made-up huge images; recipes are drawn
with Optuna's RandomSampler on an in-memory study, so every corner of each range is visited. No registration runs.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from autoreg.config import PairSpec, SearchOverride
from autoreg.data import PairData
from autoreg.errors import UserError
from autoreg.fingerprint import (
    MIN_AXIS_VOXELS,
    MIN_SAMPLES,
    MIN_SAMPLES_PER_BIN,
    DatasetFingerprint,
    fingerprint_dataset,
    level_voxels,
    max_shrink,
    min_sampling_fraction,
    samples_needed,
)
from autoreg.recipe import Recipe, ants_field_stage, ants_syn_stage, default_field_stage, default_recipe, recipe_to_dict
from autoreg.space import (
    MAX_BSPLINE_PARAMETERS,
    MAX_SAMPLE_PARAMETERS,
    MAX_SAMPLES,
    MIN_CONTROL_POINT_VOXELS,
    UPDATE_VARIANCE_MAX,
    SearchSpace,
    shrink_schedule,
)
from autoreg.synthetic import make_pair

N_DRAWS = 150
HIST_METRICS = ("mattes", "joint_hist_mi")


@functools.cache
def synthetic_fingerprint(size: tuple[int, ...], seed: int = 2) -> DatasetFingerprint:
    pair = make_pair(size, transform="affine", seed=seed, n_landmarks=8)
    spec = PairSpec(name=f"syn{size}", fixed=Path("fixed"), moving=Path("moving"))
    return fingerprint_dataset([PairData(spec, pair.fixed, pair.moving, pair.fixed_points, pair.moving_points)])


@functools.cache
def huge_fingerprint(size: tuple[int, ...]) -> DatasetFingerprint:
    """A made-up fingerprint of a much larger image (no pixels needed: ranges use sizes only)."""
    base = synthetic_fingerprint((64, 64) if len(size) == 2 else (32, 32, 32)).pairs[0]
    info = dataclasses.replace(base.fixed, size=size, extent=tuple(float(n) for n in size))
    return DatasetFingerprint((dataclasses.replace(base, fixed=info, moving=info, max_shrink=max(1, min(size) // 16)),))


FINGERPRINTS = {
    "2d-40x48": lambda: synthetic_fingerprint((40, 48)),
    "2d-64": lambda: synthetic_fingerprint((64, 64)),
    "2d-512x384": lambda: synthetic_fingerprint((512, 384)),
    "3d-32": lambda: synthetic_fingerprint((32, 32, 32)),
    "3d-48x40x36": lambda: synthetic_fingerprint((48, 40, 36)),
    "2d-2048x1536": lambda: huge_fingerprint((2048, 1536)),
    "3d-256x256x200": lambda: huge_fingerprint((256, 256, 200)),
}
STAGES = [("affine",), ("rigid", "bspline"), ("translation", "affine", "bspline"), ("bspline",)]


@dataclasses.dataclass(frozen=True)
class Drawn:
    number: int
    params: dict[str, Any]


def draws(space: SearchSpace, n: int = N_DRAWS, seed: int = 0) -> list[tuple[Drawn, Recipe]]:
    """``n`` recipes drawn at random from ``space``, each with the params it came from."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        recipe = space.suggest(trial, seed=trial.number)
        out.append((Drawn(trial.number, dict(trial.params)), recipe))
        study.tell(trial, 0.0)
    return out


@functools.cache
def drawn(fp_name: str, stages: tuple[str, ...]) -> tuple[SearchSpace, list]:
    space = SearchSpace(fingerprint=FINGERPRINTS[fp_name](), stages=stages)
    return space, draws(space)


CASES = [pytest.param(fp, st, id=f"{fp}-{'+'.join(st)}") for fp in FINGERPRINTS for st in STAGES]


def smallest_axis(fp: DatasetFingerprint) -> int:
    return min(min(p.fixed.size) for p in fp.pairs)


def in_range(space: SearchSpace, name: str, value: Any) -> bool:
    dim = {d.name: d for d in space.dims()}[name]
    if dim.choices is not None:
        return value in dim.choices
    return dim.low - 1e-12 <= value <= dim.high + 1e-12


# --- the pyramid --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_coarsest_level_keeps_16_voxels_on_the_shortest_axis(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    shortest = smallest_axis(space.fingerprint)
    assert space.max_shrink == max(1, shortest // MIN_AXIS_VOXELS)
    assert 2 ** (space.max_levels - 1) <= max(1, space.max_shrink)
    seen = set()
    for _, recipe in recipes:
        for stage in recipe.stages:
            shrinks = stage.pyramid.shrink_factors
            assert shrinks[-1] == 1
            assert list(shrinks) == sorted(shrinks, reverse=True)
            assert len(shrinks) <= space.max_levels
            assert len(stage.pyramid.smoothing_sigmas) == len(shrinks)
            assert shortest // shrinks[0] >= MIN_AXIS_VOXELS or shrinks[0] == 1
            seen.add(shrinks[0])
    if space.max_shrink >= 2:
        assert max(seen) > 1  # the search does use pyramids


def test_a_thick_slice_volume_gets_a_pyramid_that_keeps_its_slices() -> None:
    """160 x 160 x 10 voxels of 0.3 x 0.3 x 6 mm: one factor for every axis left it no pyramid (10 slices); a
    prepared level shrinks the thin axes only, to 16 voxels (shrink 10: 10 x 10 x 1)."""
    from autoreg.registration import axis_factors

    base = synthetic_fingerprint((32, 32, 32)).pairs[0]
    size, spacing = (160, 160, 10), (0.3, 0.3, 6.0)
    info = dataclasses.replace(base.fixed, size=size, spacing=spacing, extent=(48.0, 48.0, 60.0))
    pair = dataclasses.replace(base, fixed=info, moving=info, max_shrink=max_shrink(size, spacing))
    space = SearchSpace(fingerprint=DatasetFingerprint((pair,)), stages=("affine",))
    assert space.max_shrink == 10 and max_shrink(size) == 1  # without its spacing: the 10 slices allow none
    coarsest = set()
    for _, recipe in draws(space, 60):
        first = recipe.stages[0].pyramid.shrink_factors[0]
        coarsest.add(first)
        assert all(n // f >= MIN_AXIS_VOXELS or f == 1 for n, f in zip(size, axis_factors(spacing, first, size)))
    assert max(coarsest) > 2


def test_shrink_schedule() -> None:
    for coarsest in range(1, 70):
        for levels in range(1, 6):
            s = shrink_schedule(coarsest, levels)
            assert len(s) == levels
            assert s[-1] == 1
            assert s[0] == (coarsest if levels > 1 else 1)
            assert all(a >= b for a, b in zip(s, s[1:]))
    assert shrink_schedule(4, 3) == (4, 2, 1)
    assert shrink_schedule(16, 5) == (16, 8, 4, 2, 1)
    assert shrink_schedule(4, 2, finest=2) == (4, 2) and shrink_schedule(8, 3, finest=2) == (8, 4, 2)


@pytest.mark.parametrize("fp_name", ["2d-512x384", "3d-256x256x200"])
def test_only_a_field_may_stop_above_full_resolution(fp_name: str) -> None:
    """A displacement field's pyramid may end at shrink 2, as ANTs SyN's does; every other stage ends at full
    resolution, and the point of a recipe gives back its pyramid."""
    space, recipes = drawn(fp_name, ("affine", "deformable"))
    ends = {"displacement": set(), "bspline": set(), "affine": set()}
    for trial, recipe in recipes:
        for i, stage in enumerate(recipe.stages):
            shrinks = stage.pyramid.shrink_factors
            ends[stage.kind].add(shrinks[-1])
            finest = trial.params.get(f"stage{i}.pyramid.finest_shrink")
            assert finest is None or stage.kind == "displacement"
            # a field stops above full resolution where asked to, below a coarser level
            assert shrinks[-1] == (finest if finest and shrinks[0] > finest else 1)
            assert list(shrinks) == sorted(shrinks, reverse=True)
        point = space.params_of(recipe)
        replay = space.suggest(optuna.trial.FixedTrial(point), seed=trial.number)
        for again, stage in zip(replay.stages, recipe.stages):
            assert again.pyramid.shrink_factors == stage.pyramid.shrink_factors
            assert again.pyramid.smoothing_sigmas == pytest.approx(stage.pyramid.smoothing_sigmas, abs=1e-5)
    assert ends == {"displacement": {1, 2}, "bspline": {1}, "affine": {1}}


# --- sampling -----------------------------------------------------------------------------------------------------


def _bins(stage) -> int | None:
    return getattr(stage.metric, "number_of_histogram_bins", None)


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_sampling_points_cover_what_the_metric_needs(fp_name: str, stages: tuple[str, ...]) -> None:
    """A stage samples a number of points per level: at least what the metric needs, at most MAX_SAMPLES; and the
    coarsest shrink is lowered until its level holds that many voxels."""
    space, recipes = drawn(fp_name, stages)
    size = space.fingerprint.smallest_size
    lowered = 0
    for trial, recipe in recipes:
        for i, stage in enumerate(recipe.stages):
            s = f"stage{i}"
            sampling, bins = stage.sampling, _bins(stage)
            coarsest = stage.pyramid.shrink_factors[0]
            asked = (
                trial.params.get(f"{s}.pyramid.coarsest_shrink", 1) if trial.params[f"{s}.pyramid.levels"] > 1 else 1
            )
            assert coarsest <= asked
            assert coarsest == 1 or level_voxels(size, coarsest) >= samples_needed(bins)
            if coarsest < asked:  # lowered: the next coarser level would hold fewer voxels than the metric needs
                lowered += 1
                assert level_voxels(size, coarsest + 1) < samples_needed(bins)
            if stage.metric.kind == "ants_nc":
                assert sampling.strategy == "none"
            if sampling.strategy == "none":
                assert sampling.points is None and sampling.percentage is None
                continue
            assert sampling.percentage is None
            raw = trial.params[f"{s}.sampling.points"]
            if stage.kind == "bspline":  # bounded seconds per iteration of a dense Jacobian
                mesh = [max(1, round(n / stage.transform.control_point_spacing)) for n in size]
                raw = min(raw, int(MAX_SAMPLE_PARAMETERS / (space.dim * np.prod([m + 3 for m in mesh]))))
            assert sampling.points == max(raw, samples_needed(bins))
            assert sampling.points <= max(MAX_SAMPLES, samples_needed(bins))
    assert any(s.sampling.strategy != "none" for _, r in recipes for s in r.stages)
    if space.max_shrink >= 4 and space.dim == 2:  # (16 voxels a side hold enough samples in 3D)
        assert lowered  # the rule is exercised


@pytest.mark.parametrize("fp_name", ["2d-512x384", "3d-256x256x200"])
def test_a_displacement_field_samples_every_voxel_a_level_may_and_does_not_search_its_sampling(fp_name: str) -> None:
    """A field moves only where it is sampled, and its samples cost little next to smoothing it
    (``SearchSpace.field_sampling``); the linear stage before it still searches its sampling."""
    space = SearchSpace(fingerprint=FINGERPRINTS[fp_name](), stages=("affine", "deformable"))
    assert (space.field_sampling().strategy == "none") == space.dense_affordable
    fields = 0
    for trial, recipe in draws(space, 200):
        assert ("stage0.sampling.strategy" in trial.params) == (recipe.stages[0].metric.kind != "ants_nc")
        stage = recipe.stages[1]
        if stage.kind == "displacement" and stage.optimizer.kind != "demons":
            fields += 1
            assert stage.sampling == space.field_sampling()
            assert not any(name.startswith("stage1.sampling.") for name in trial.params)
    assert fields
    with pytest.raises(UserError, match="never used"):  # a search override that could not act says so
        SearchSpace(
            fingerprint=FINGERPRINTS[fp_name](),
            stages=("affine", "displacement"),
            overrides={"stage1.sampling.points": SearchOverride(low=1000, high=2000)},
            source="PAIR.yaml",
        )


def test_sampling_fraction_examples() -> None:
    assert min_sampling_fraction((64, 64), 4, 50) == 1.0  # 16x16 = 256 voxels < 500 samples
    assert min_sampling_fraction((256, 256), 1, None) == pytest.approx(MIN_SAMPLES / 65536)
    assert min_sampling_fraction((256, 256), 2, 128) == pytest.approx(MIN_SAMPLES_PER_BIN * 128 / 16384)
    assert min_sampling_fraction((32, 32, 32), 2, 16) == pytest.approx(MIN_SAMPLES / 4096)


def test_coarsest_level_holds_the_samples_the_metric_needs() -> None:
    space, recipes = drawn("2d-64", ("affine",))
    size = space.fingerprint.smallest_size
    for _, recipe in recipes:
        stage = recipe.stages[0]
        bins = _bins(stage)
        coarsest = stage.pyramid.shrink_factors[0]
        if coarsest > 1 and stage.metric.kind in HIST_METRICS:
            voxels = level_voxels(size, coarsest)
            assert voxels >= max(MIN_SAMPLES, MIN_SAMPLES_PER_BIN * bins), (stage.pyramid, stage.metric, stage.sampling)


# --- BSpline grid -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", [c for c in CASES if "bspline" in c.values[1]])
def test_bspline_control_point_spacing_within_bounds(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    shortest = space.fingerprint.min_extent_voxels
    low, high = max(MIN_CONTROL_POINT_VOXELS, shortest / 32), max(MIN_CONTROL_POINT_VOXELS, shortest / 2)
    spacings = []
    for _, recipe in recipes:
        for stage in recipe.stages:
            if stage.kind != "bspline":
                continue
            grid = stage.transform
            assert grid.mesh_size is None and grid.spacing_units == "voxel"
            cps = grid.control_point_spacing
            assert low - 1e-4 <= cps <= high + 1e-4
            cells = shortest / cps
            assert cells <= 32 + 1e-3
            assert cells >= min(2.0, shortest / MIN_CONTROL_POINT_VOXELS) - 1e-3
            assert getattr(stage.optimizer, "scales", "none") in ("none", "physical_shift")
            spacings.append(cps)
    assert spacings and max(spacings) > min(spacings)


# --- the conditional space ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_only_parameters_of_the_drawn_branch_are_asked(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    names = space.parameter_names()
    branches: set[str] = set()
    for trial, recipe in recipes:
        p = trial.params
        assert set(p) <= names
        for name, value in p.items():
            assert in_range(space, name, value), (name, value)
        if not p.get("initializer.rotation_search", False):
            assert "initializer.rotation_search.max_angle_deg" not in p
        for i, (kind, stage) in enumerate(zip(stages, recipe.stages)):
            s = f"stage{i}"
            mine = {k for k in p if k.startswith(s + ".")}
            levels = p[f"{s}.pyramid.levels"]
            if levels == 1:
                assert not mine & {f"{s}.pyramid.coarsest_shrink", f"{s}.pyramid.sigma_factor"}
            metric = p[f"{s}.metric.kind"]
            assert stage.metric.kind == metric
            if metric not in HIST_METRICS:
                assert f"{s}.metric.number_of_histogram_bins" not in mine
            if metric == "ants_nc":
                assert not mine & {f"{s}.sampling.strategy", f"{s}.sampling.points"}
            elif p[f"{s}.sampling.strategy"] == "none":
                branches.add("strategy none")
                assert f"{s}.sampling.points" not in mine
            else:
                assert f"{s}.sampling.points" in mine
            opt = p[f"{s}.optimizer.kind"]
            if opt in ("lbfgsb", "lbfgs2"):
                assert not mine & {
                    f"{s}.optimizer.learning_rate",
                    f"{s}.optimizer.estimate_learning_rate",
                    f"{s}.optimizer.convergence_window_size",
                }
            elif kind == "bspline":  # gradient descent on a BSpline grid always estimates its step
                assert not mine & {f"{s}.optimizer.learning_rate", f"{s}.optimizer.estimate_learning_rate"}
                assert stage.optimizer.estimate_learning_rate == "once"
            elif p[f"{s}.optimizer.estimate_learning_rate"] == "once":
                assert f"{s}.optimizer.learning_rate" not in mine
            if opt != "regular_step_gd":
                assert not mine & {f"{s}.optimizer.min_step", f"{s}.optimizer.relaxation_factor"}
            assert (f"{s}.optimizer.gradient_convergence_tolerance" in mine) == (opt == "lbfgsb")
            assert (f"{s}.optimizer.solution_accuracy" in mine) == (opt == "lbfgs2")
            if kind == "bspline":
                branches.add("bspline")
                assert f"{s}.transform.control_point_spacing" in mine
                assert not stage.transform.refine  # a recipe field, not searched
                assert f"{s}.optimizer.scales" not in mine
            else:
                assert not [k for k in mine if "transform." in k]
                assert (f"{s}.optimizer.scales" in mine) == (
                    opt in ("gradient_descent", "regular_step_gd", "cg_line_search")
                )
    if "bspline" not in stages:
        assert not [n for n in names if "control_point" in n]
    first_linear = next((k for k in stages if k != "bspline"), None)
    assert ("initializer.rotation_search" in names) == (first_linear not in (None, "translation"))
    # every voxel is offered only where it costs no more than the most points a level may sample
    assert ("strategy none" in branches) == space.dense_affordable
    assert space.dense_affordable == (level_voxels(space.fingerprint.smallest_size, 1) <= MAX_SAMPLES)
    assert ("ants_nc" in space.metric_kinds()) == space.dense_affordable


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_fixed_trial_of_the_params_replays_the_recipe(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    for trial, recipe in recipes:
        replay = space.suggest(optuna.trial.FixedTrial(trial.params, trial.number), seed=trial.number)
        assert recipe_to_dict(replay) == recipe_to_dict(recipe)


# --- the point of a recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_the_default_recipe_is_a_point_inside_the_space(fp_name: str, stages: tuple[str, ...]) -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS[fp_name](), stages=stages)
    base = space.baseline_recipe(seed=5)
    assert base.kinds == stages and base.seed == 5
    assert recipe_to_dict(base) == recipe_to_dict(default_recipe(stages, space.dim, seed=5))
    params = space.params_of(base)
    assert set(params) <= space.parameter_names()
    for name, value in params.items():
        assert in_range(space, name, value), (name, value)
    # a complete point: the space can draw the whole recipe from it, and it describes the default
    recipe = space.suggest(optuna.trial.FixedTrial(params), seed=0)
    assert recipe.initializer.kind == "geometry" and recipe.initializer.rotation_search is None
    for kind, stage in zip(stages, recipe.stages):
        assert stage.kind == kind
        assert stage.metric.kind == "mattes" and stage.metric.number_of_histogram_bins == 50
        assert stage.sampling.strategy == "random"
        assert stage.optimizer.number_of_iterations == 100
        assert stage.pyramid.shrink_factors[-1] == 1
        assert stage.optimizer.kind == ("lbfgsb" if kind == "bspline" else "gradient_descent")


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_params_of_a_drawn_recipe_are_its_params(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    for trial, recipe in recipes[:40]:
        described = space.params_of(recipe)
        for name, value in trial.params.items():
            if name.endswith(
                (
                    "sampling.points",
                    "max_angle_deg",
                    "control_point_spacing",
                    "sigma_factor",
                    "sigma_last",
                    "coarsest_shrink",
                    "pyramid.levels",
                    "max_shift_fraction",
                )
            ):
                continue  # raised to a need, rounded, or lowered by a rule: described as what ran
            assert described[name] == value, (name, value, described.get(name))


def _drawn_from(space: SearchSpace, point: dict[str, Any]) -> Recipe:
    """What a trial enqueued with ``point`` runs: the point's values, the sampler's draws for the rest."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(point)
    return space.suggest(study.ask(), seed=0)


@pytest.mark.parametrize("stages", [("affine",), ("rigid", "bspline")])
def test_a_study_without_a_deformable_choice_has_one_default_point(stages: tuple[str, ...]) -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=stages)
    [(role, point)] = space.default_points()
    assert role == "default" and point == space.params_of(space.baseline_recipe())
    recipe = _drawn_from(space, point)
    assert recipe.kinds == stages
    assert all(s.optimizer.number_of_iterations == 100 and s.metric.kind == "mattes" for s in recipe.stages)


def test_a_deformable_stage_has_a_default_point_per_way() -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-512x384"](), stages=("affine", "deformable"))
    points = dict(space.default_points())
    assert list(points) == [
        "default:bspline",
        "default:displacement",
        "default:smooth",
        "default:symmetric",
        "default:demons",
    ]
    bspline = _drawn_from(space, points["default:bspline"])
    assert bspline.kinds == ("affine", "bspline") and bspline.stages[1].optimizer.kind == "lbfgsb"
    assert bspline.stages[1].transform.control_point_spacing == pytest.approx(384 / 8)
    field = _drawn_from(space, points["default:displacement"])
    assert field.kinds == ("affine", "displacement") and field.stages[1].optimizer.kind == "gradient_descent"
    # the field's way starts where ANTs SyN's defaults do, not at the notebook's field (which barely moves), with its
    # levels composed and its total smoothed (ANTs' own folds)
    drawn, default = (
        recipe_to_dict(field)["stages"][1],
        recipe_to_dict(Recipe(stages=(default_field_stage(2),)))["stages"][0],
    )
    assert drawn == default  # gradient images too: neither ANTs nor the search builds them
    assert field.stages[1].transform.variance_for_update_field == 3.0 and field.stages[1].sampling.strategy == "none"
    assert not field.stages[1].transform.symmetric
    assert field.stages[1].transform.across_levels == "compose"
    assert (
        field.stages[1].transform.variance_for_total_field > 0 == ants_field_stage(2).transform.variance_for_total_field
    )
    # the same field with its updates smoothed the most the search allows: TPE is shown both ends of that range
    smooth = _drawn_from(space, points["default:smooth"])
    assert smooth.stages[1].transform == field.stages[1].transform.model_copy(
        update={"variance_for_update_field": UPDATE_VARIANCE_MAX}
    )
    assert recipe_to_dict(smooth)["stages"][1]["optimizer"] == recipe_to_dict(field)["stages"][1]["optimizer"]
    # SyN's scheme on the same defaults, its total field smoothed (SyN's own, unsmoothed, folds)
    syn = _drawn_from(space, points["default:symmetric"])
    assert syn.stages[1].transform == ants_syn_stage(2).transform
    assert syn.stages[1].transform.symmetric and syn.stages[1].transform.variance_for_total_field > 0
    assert recipe_to_dict(syn)["stages"][1]["optimizer"] == recipe_to_dict(field)["stages"][1]["optimizer"]
    demons = _drawn_from(space, points["default:demons"])
    assert demons.kinds == ("affine", "displacement") and demons.stages[1].optimizer.kind == "demons"
    assert demons.stages[1].optimizer.number_of_iterations == 50 and demons.stages[1].metric.kind == "mean_squares"
    # all start from the same linear stage: only the deformable way differs
    assert recipe_to_dict(bspline)["stages"][0] == recipe_to_dict(field)["stages"][0]
    assert recipe_to_dict(demons)["stages"][0] == recipe_to_dict(field)["stages"][0]
    # a displacement stage: gradient descent and Demons
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("affine", "displacement"))
    roles = ["default:displacement", "default:smooth", "default:symmetric", "default:demons"]
    assert [role for role, _ in space.default_points()] == roles
    # a narrowed range moves the smooth way's variance to its top; a range that cannot be smoother has no such way
    for high, smooth in ((8.0, 8.0), (3.0, None), (2.0, None)):
        narrowed = SearchSpace(
            fingerprint=FINGERPRINTS["2d-64"](),
            stages=("affine", "displacement"),
            overrides={"stage1.transform.variance_for_update_field": SearchOverride(low=0.0, high=high)},
        )
        points = dict(narrowed.default_points())
        got = points.get("default:smooth", {}).get("stage1.transform.variance_for_update_field")
        assert got == smooth, (high, list(points))


def test_crossed_points_put_each_default_way_on_a_trial_s_linear_stages() -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-512x384"](), stages=("affine", "deformable"))
    defaults = dict(space.default_points())
    for drawn_, recipe in draws(space, n=6, seed=3):
        crossed = space.crossed_points(drawn_.params)
        assert [role for role, _ in crossed] == list(defaults)
        for role, point in crossed:
            ran = recipe_to_dict(_drawn_from(space, point))
            way = recipe_to_dict(_drawn_from(space, defaults[role]))
            assert ran["stages"][0] == recipe_to_dict(recipe)["stages"][0]  # the trial's affine, as it ran
            assert ran["initializer"] == recipe_to_dict(recipe)["initializer"]
            assert ran["stages"][1] == way["stages"][1]  # the default way's deformable stage
    assert SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("rigid", "affine")).crossed_points({}) == []


def test_the_field_s_default_point_samples_what_a_large_volume_affords() -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS["3d-256x256x200"](), stages=("affine", "displacement"))
    assert not space.dense_affordable
    field = _drawn_from(space, dict(space.default_points())["default:displacement"]).stages[1]
    assert field.optimizer.kind == "gradient_descent" and field.optimizer.number_of_iterations == 40
    assert field.sampling.strategy == "regular" and field.sampling.points == space.points_range()[1]


def test_default_points_leave_out_what_the_overrides_rule_out() -> None:
    overrides = {
        "stage1.transform.kind": SearchOverride(choices=("displacement",)),
        "stage1.optimizer.demons": SearchOverride(value=False, fixed=True),
        "stage1.transform.symmetric": SearchOverride(value=False, fixed=True),
        "stage1.transform.variance_for_update_field": SearchOverride(value=3.0, fixed=True),
        "stage0.optimizer.number_of_iterations": SearchOverride(low=20, high=50),
        "stage0.metric.kind": SearchOverride(value="correlation", fixed=True),
    }
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("affine", "deformable"), overrides=overrides)
    [(role, point)] = space.default_points()  # one way left: its default, as the study's default point
    assert role == "default" and point["stage1.transform.kind"] == "displacement"
    assert "stage0.optimizer.number_of_iterations" not in point and "stage0.metric.kind" not in point
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no value outside what the study allows reaches Optuna
        recipe = _drawn_from(space, point)
    assert 20 <= recipe.stages[0].optimizer.number_of_iterations <= 50
    assert recipe.stages[0].metric.kind == "correlation" and recipe.kinds == ("affine", "displacement")
    assert recipe.stages[1].optimizer.kind == "gradient_descent"


def test_dropped_parameters_take_the_default_recipe_s_value() -> None:
    fp = FINGERPRINTS["2d-64"]()
    overrides = {
        "stage0.metric.number_of_histogram_bins": SearchOverride(drop=True),
        "stage0.optimizer.number_of_iterations": SearchOverride(drop=True),
        "stage0.metric.kind": SearchOverride(value="mattes", fixed=True),
    }
    space = SearchSpace(fingerprint=fp, stages=("affine",), overrides=overrides)
    for _, recipe in draws(space, n=10):
        assert recipe.stages[0].metric.number_of_histogram_bins == 50
        assert recipe.stages[0].optimizer.number_of_iterations == 100


# --- overrides ---------------------------------------------------------------------------------------------------


def test_overrides_fix_narrow_choose_and_drop() -> None:
    fp = FINGERPRINTS["2d-64"]()
    overrides = {
        "stage0.metric.kind": SearchOverride(value="mattes", fixed=True),
        "stage0.optimizer.number_of_iterations": SearchOverride(low=20, high=30),
        "stage0.metric.number_of_histogram_bins": SearchOverride(drop=True),
        "stage0.sampling.strategy": SearchOverride(choices=("regular", "random")),
        "stage1.transform.control_point_spacing": SearchOverride(value=8.0, fixed=True),
        "stage0.interpolator": SearchOverride(value="bspline", fixed=True),  # a recipe field that is not searched
        "stage0.pyramid.shrink_factors": SearchOverride(value=[4, 2, 1], fixed=True),  # README's example
        # a setting of one optimizer kind among those searched: applied where that kind is drawn
        "stage0.optimizer.gradient_magnitude_tolerance": SearchOverride(value=1e-6, fixed=True),
    }
    space = SearchSpace(fingerprint=fp, stages=("affine", "bspline"), overrides=overrides)
    kinds = set()
    for trial, recipe in draws(space, n=60):
        p = trial.params
        assert not set(p) & {
            "stage0.metric.kind",
            "stage0.metric.number_of_histogram_bins",
            "stage1.transform.control_point_spacing",
            "stage0.pyramid.levels",
            "stage0.pyramid.coarsest_shrink",
        }
        s0, s1 = recipe.stages
        assert s0.metric.kind == "mattes" and s0.metric.number_of_histogram_bins == 50
        assert 20 <= s0.optimizer.number_of_iterations <= 30
        assert s0.sampling.strategy in ("regular", "random")
        assert s0.interpolator == "bspline" and s1.interpolator == "linear"
        assert s0.pyramid.shrink_factors == (4, 2, 1) and len(s0.pyramid.smoothing_sigmas) == 3
        assert s1.transform.control_point_spacing == 8.0
        kinds.add(s0.optimizer.kind)
        if s0.optimizer.kind == "regular_step_gd":
            assert s0.optimizer.gradient_magnitude_tolerance == 1e-6
        replay = space.suggest(optuna.trial.FixedTrial(p), seed=trial.number)
        assert recipe_to_dict(replay) == recipe_to_dict(recipe)
    assert {"regular_step_gd", "gradient_descent"} <= kinds


def test_value_form_and_list_form_fix_a_recipe_field(tmp_path: Path) -> None:
    """``{value: [4, 2, 1]}`` and a bare list both fix a recipe field that is not searched (a list is not choices)."""
    from autoreg.config import parse_pair_file

    doc = {
        "name": "x",
        "fixed": "f.png",
        "moving": "m.png",
        "stages": ["affine"],
        "search": {"stage0.pyramid.shrink_factors": {"value": [2, 1]}, "stage0.pyramid.smoothing_sigmas": [1.0, 0.0]},
    }
    cfg = parse_pair_file(doc, tmp_path / "pair.yaml")
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("affine",), overrides=dict(cfg.search))
    for _, recipe in draws(space, n=5):
        assert recipe.stages[0].pyramid.shrink_factors == (2, 1)
        assert recipe.stages[0].pyramid.smoothing_sigmas == (1.0, 0.0)


@pytest.mark.parametrize(
    "key, override, fragment",
    [
        ("stage2.metric.number_of_histogram_bins", SearchOverride(value=32, fixed=True), "unknown"),  # no third stage
        ("metric.number_of_histogram_bins", SearchOverride(value=32, fixed=True), "unknown"),
        ("stage0.nonsense", SearchOverride(low=1, high=2), "only a fixed value"),
        ("stage0.metric.bins", SearchOverride(low=16, high=32), "stage0.metric.number_of_histogram_bins"),
        ("stage0.optimizer.iterations", SearchOverride(low=16, high=32), "number_of_iterations"),
        ("stage0.sampling.percentage", SearchOverride(low=0.01, high=0.1), "sampling.points"),
        (
            "stage0.optimizer.maximum_number_of_corrections",
            SearchOverride(value=5, fixed=True),
            "not a setting of optimizer",
        ),
        ("stage0.pyramid.smoothing_sigmas", SearchOverride(value=[1.0, 0.0], fixed=True), "shrink_factors"),
    ],
)
def test_unknown_override_names_its_key(key: str, override: SearchOverride, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        SearchSpace(
            fingerprint=FINGERPRINTS["2d-64"](),
            stages=("rigid", "affine"),
            overrides={key: override},
            source="PAIR.yaml",
        )
    assert info.value.key == f"search.{key}"
    assert str(info.value).startswith(f"PAIR.yaml: search.{key}: ")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        # bins of a metric kind the study never draws
        (
            {
                "stage0.metric.kind": SearchOverride(value="correlation", fixed=True),
                "stage0.metric.number_of_histogram_bins": SearchOverride(low=16, high=32),
            },
            "search.stage0.metric.number_of_histogram_bins",
            "never used",
        ),
        # a fixed learning rate while the rate is always estimated
        (
            {
                "stage0.optimizer.estimate_learning_rate": SearchOverride(value="once", fixed=True),
                "stage0.optimizer.learning_rate": SearchOverride(value=0.5, fixed=True),
            },
            "search.stage0.optimizer.learning_rate",
            "never used",
        ),
        # an LBFGSB setting while the optimizer is fixed to gradient descent
        (
            {
                "stage0.optimizer.kind": SearchOverride(value="gradient_descent", fixed=True),
                "stage0.optimizer.min_step": SearchOverride(value=1e-3, fixed=True),
            },
            "search.stage0.optimizer.min_step",
            "never used",
        ),
        # a value that makes every recipe invalid
        (
            {"stage0.optimizer.relaxation_factor": SearchOverride(value=1.5, fixed=True)},
            "search.stage0.optimizer.relaxation_factor",
            "invalid recipe (Input should be less than 1)",
        ),
    ],
)
def test_overrides_that_would_fail_every_trial_are_refused(overrides, key: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("affine",), overrides=overrides, source="PAIR.yaml")
    assert info.value.key == key and fragment in str(info.value), str(info.value)


# --- the whole space on one real-sized example ---------------------------------------------------------------------


def test_ranges_scale_with_the_image() -> None:
    small = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("bspline",))
    large = SearchSpace(fingerprint=FINGERPRINTS["2d-512x384"](), stages=("bspline",))
    assert small.max_shrink == 4 and large.max_shrink == 24
    assert small.max_levels == 3 and large.max_levels == 5
    dims_s = {d.name: d for d in small.dims()}
    dims_l = {d.name: d for d in large.dims()}
    cps = "stage0.transform.control_point_spacing"
    assert (dims_s[cps].low, dims_s[cps].high) == (4, 32)
    assert (dims_l[cps].low, dims_l[cps].high) == (16, 192)  # at most 32 cells on the longest axis
    # in 3D a dense BSpline Jacobian keeps the grid below MAX_BSPLINE_PARAMETERS: 11 cells a side
    big3d = SearchSpace(fingerprint=FINGERPRINTS["3d-256x256x200"](), stages=("bspline",))
    low = {d.name: d for d in big3d.dims()}[cps].low
    assert big3d.max_cells() == 11 and low == pytest.approx(256 / 11)
    assert 3 * (round(256 / low) + 3) ** 2 * (round(200 / low) + 3) <= MAX_BSPLINE_PARAMETERS
    pts = "stage0.sampling.points"
    assert dims_s[pts].high == 64 * 64 and dims_l[pts].high == min(MAX_SAMPLES, 512 * 384)
    assert dims_s[pts].low == dims_l[pts].low == MIN_SAMPLES


# --- deformable stages: bspline, displacement (gradient descent or Demons), or the search's choice ----------------


@pytest.mark.parametrize("stages", [("affine", "deformable"), ("affine", "displacement")], ids=lambda s: "+".join(s))
def test_deformable_stages_draw_consistent_recipes(stages: tuple[str, ...]) -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=stages)
    seen = set()
    for trial, recipe in draws(space, n=80):
        stage, p = recipe.stages[1], trial.params
        seen.add((stage.kind, stage.optimizer.kind))
        if stage.kind == "displacement":
            assert stage.pyramid.shrink_images and "stage1.transform.grid_spacing" in p
            if stage.optimizer.kind == "demons":  # its force is the intensity difference, at every voxel
                assert stage.metric.kind == "mean_squares" and stage.sampling.strategy == "none"
                assert not {"stage1.metric.kind", "stage1.sampling.strategy"} & set(p)
                assert stage.optimizer.match_histograms == p["stage1.optimizer.match_histograms"]
            else:
                assert "stage1.optimizer.match_histograms" not in p
                assert stage.optimizer.kind == "gradient_descent" and stage.optimizer.scales == "physical_shift"
            assert "stage1.transform.control_point_spacing" not in p and "stage1.optimizer.kind" not in p
        else:
            assert "stage1.transform.grid_spacing" not in p and "stage1.optimizer.demons" not in p
        replay = space.suggest(optuna.trial.FixedTrial(p), seed=trial.number)
        assert recipe_to_dict(replay) == recipe_to_dict(recipe)
    kinds = {k for k, _ in seen}
    assert kinds == ({"bspline", "displacement"} if "deformable" in stages else {"displacement"})
    assert ("displacement", "demons") in seen and ("displacement", "gradient_descent") in seen
    # the default of a 'deformable' stage is the notebooks' free-form deformation
    assert space.baseline_recipe().kinds == ("affine", "bspline" if "deformable" in stages else "displacement")
