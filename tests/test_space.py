"""The search space: ranges derived from the fingerprint, conditional parameters, replay and the baseline point.

Spaces are built on fingerprints of synthetic pairs (small, large, 3D) and of made-up huge images; recipes are drawn
with Optuna's RandomSampler on an in-memory study, so every corner of each range is visited. No registration runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from autoreg.config import PairSpec, SearchOverride
from autoreg.data import PairData
from autoreg.errors import UserError
from autoreg.fingerprint import (
    enough_samples,
    MIN_AXIS_VOXELS,
    MIN_SAMPLES,
    MIN_SAMPLES_PER_BIN,
    DatasetFingerprint,
    fingerprint_dataset,
    level_voxels,
    min_sampling_fraction,
)
from autoreg.recipe import Recipe, recipe_to_dict
from autoreg.space import MAX_SAMPLES, MIN_CONTROL_POINT_VOXELS, SearchSpace, shrink_schedule
from autoreg.synthetic import make_pair

N_DRAWS = 150
HIST_METRICS = ("mattes", "joint_hist_mi")


@functools.lru_cache(maxsize=None)
def synthetic_fingerprint(size: tuple[int, ...], seed: int = 2) -> DatasetFingerprint:
    pair = make_pair(size, transform="affine", seed=seed, n_landmarks=8)
    spec = PairSpec(name=f"syn{size}", fixed=Path("fixed"), moving=Path("moving"))
    return fingerprint_dataset([PairData(spec, pair.fixed, pair.moving, pair.fixed_points, pair.moving_points)])


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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


# --- sampling -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_sampling_is_raised_to_what_the_coarsest_level_needs(fp_name: str, stages: tuple[str, ...]) -> None:
    """The fraction covers what full resolution needs, and the coarsest shrink is lowered until it covers that
    level too; the fraction never samples more than MAX_SAMPLES at full resolution unless the metric needs it."""
    space, recipes = drawn(fp_name, stages)
    size = space.fingerprint.smallest_size
    full = level_voxels(size, 1)
    lowered = 0
    for trial, recipe in recipes:
        for i, stage in enumerate(recipe.stages):
            s = f"stage{i}"
            strategy, pct = stage.sampling.strategy, stage.sampling.percentage
            coarsest = stage.pyramid.shrink_factors[0]
            asked = trial.params.get(f"{s}.pyramid.coarsest_shrink", 1) if trial.params[f"{s}.pyramid.levels"] > 1 else 1
            assert coarsest <= asked
            if stage.metric.kind == "ants_nc":
                assert strategy == "none"
            if strategy == "none":
                assert pct == 1.0
                bins = stage.metric.bins if stage.metric.kind in HIST_METRICS else None
                assert coarsest == 1 or enough_samples(size, coarsest, bins, 1.0)
                if coarsest < asked:
                    assert not enough_samples(size, coarsest + 1, bins, 1.0)
                continue
            assert 0 < pct <= 1.0
            bins = stage.metric.bins if stage.metric.kind in HIST_METRICS else None
            # (the percentage is rounded to 6 decimals, which may take it up to 5e-7 below a need)
            need_full = min_sampling_fraction(size, 1, bins)
            assert pct >= need_full - 5e-7
            need = min_sampling_fraction(size, coarsest, bins)
            assert coarsest == 1 or pct >= need - 5e-7, (i, stage.pyramid.shrink_factors, bins, pct, need)
            if coarsest < asked:  # lowered: the next coarser level would not have had enough samples
                lowered += 1
                assert min_sampling_fraction(size, coarsest + 1, bins) > pct
            # in samples: all the coarsest level's voxels, or the samples the metric needs
            voxels = level_voxels(size, coarsest)
            wanted = max(MIN_SAMPLES, MIN_SAMPLES_PER_BIN * (bins or 0))
            assert coarsest == 1 or (pct + 5e-7) * voxels >= min(voxels, wanted) * (1 - 1e-9)
            # cost: at most MAX_SAMPLES at full resolution, unless the metric needs more
            assert pct * full <= max(MAX_SAMPLES, wanted) * (1 + 1e-5) + 1
            raw = trial.params[f"{s}.sampling.percentage"]
            assert pct == pytest.approx(min(1.0, max(raw, need_full)), abs=1e-6)
    assert any(s.sampling.strategy != "none" for _, r in recipes for s in r.stages)
    if space.max_shrink >= 4:
        assert lowered  # the rule is exercised


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
        bins = stage.metric.bins
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
            if stage.transform != "bspline":
                assert stage.bspline is None
                continue
            grid = stage.bspline
            assert grid is not None and grid.mesh_size is None and grid.spacing_units == "voxel"
            cps = grid.control_point_spacing
            assert low - 1e-4 <= cps <= high + 1e-4
            cells = shortest / cps
            assert cells <= 32 + 1e-3
            assert cells >= min(2.0, shortest / MIN_CONTROL_POINT_VOXELS) - 1e-3
            assert stage.scales in ("none", "physical_shift")
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
                assert f"{s}.metric.bins" not in mine
            if metric == "ants_nc":
                assert not mine & {f"{s}.sampling.strategy", f"{s}.sampling.percentage"}
            elif p[f"{s}.sampling.strategy"] == "none":
                branches.add("strategy none")
                assert f"{s}.sampling.percentage" not in mine
            else:
                assert f"{s}.sampling.percentage" in mine
            opt = p[f"{s}.optimizer.kind"]
            if opt in ("lbfgsb", "lbfgs2"):
                assert not mine & {f"{s}.optimizer.learning_rate", f"{s}.optimizer.estimate_learning_rate",
                                   f"{s}.optimizer.convergence_window_size"}
            elif kind == "bspline":  # gradient descent on a BSpline grid always estimates its step
                assert not mine & {f"{s}.optimizer.learning_rate", f"{s}.optimizer.estimate_learning_rate"}
                assert stage.optimizer.estimate_learning_rate == "once"
            elif p[f"{s}.optimizer.estimate_learning_rate"] == "once":
                assert f"{s}.optimizer.learning_rate" not in mine
            if opt != "regular_step_gd":
                assert not mine & {f"{s}.optimizer.minimum_step", f"{s}.optimizer.relaxation_factor"}
            if kind == "bspline":
                branches.add("bspline")
                assert f"{s}.bspline.control_point_spacing" in mine
                assert not stage.bspline.refine  # a recipe field, not searched
                assert f"{s}.scales" not in mine
            else:
                assert not [k for k in mine if "bspline" in k or "gradient_tolerance" in k]
                assert f"{s}.scales" in mine
    if "bspline" not in stages:
        assert not [n for n in names if "bspline" in n]
    first_linear = next((k for k in stages if k != "bspline"), None)
    assert ("initializer.rotation_search" in names) == (first_linear not in (None, "translation"))
    assert "strategy none" in branches


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_fixed_trial_of_the_params_replays_the_recipe(fp_name: str, stages: tuple[str, ...]) -> None:
    space, recipes = drawn(fp_name, stages)
    for trial, recipe in recipes:
        replay = space.suggest(optuna.trial.FixedTrial(trial.params, trial.number), seed=trial.number)
        assert recipe_to_dict(replay) == recipe_to_dict(recipe)


# --- the baseline point -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp_name, stages", CASES)
def test_baseline_params_lie_inside_the_space(fp_name: str, stages: tuple[str, ...]) -> None:
    space = SearchSpace(fingerprint=FINGERPRINTS[fp_name](), stages=stages)
    params = space.baseline_params()
    assert set(params) <= space.parameter_names()
    for name, value in params.items():
        assert in_range(space, name, value), (name, value)
    # a complete point: the space can draw the whole recipe from it
    recipe = space.suggest(optuna.trial.FixedTrial(params), seed=0)
    assert recipe.initializer.kind == "geometry" and recipe.initializer.rotation_search is None
    for kind, stage in zip(stages, recipe.stages):
        assert stage.transform == kind
        assert stage.metric.kind == "mattes" and stage.metric.bins == 50
        assert stage.sampling.strategy == "random"
        assert stage.optimizer.iterations == 100
        assert stage.pyramid.shrink_factors[-1] == 1
        assert stage.optimizer.kind == ("lbfgsb" if kind == "bspline" else "gradient_descent")
    # the enqueued baseline trial carries the notebook default recipe itself
    base = space.baseline_recipe(seed=5)
    assert [s.transform for s in base.stages] == list(stages) and base.seed == 5


def test_baseline_params_leave_out_overridden_parameters() -> None:
    fp = FINGERPRINTS["2d-64"]()
    overrides = {"stage0.metric.bins": SearchOverride(value=32, fixed=True),
                 "stage0.optimizer.iterations": SearchOverride(low=20, high=30)}
    space = SearchSpace(fingerprint=fp, stages=("affine",), overrides=overrides)
    params = space.baseline_params()
    assert "stage0.metric.bins" not in params and "stage0.optimizer.iterations" not in params


# --- overrides ---------------------------------------------------------------------------------------------------


def test_overrides_fix_narrow_choose_and_drop() -> None:
    fp = FINGERPRINTS["2d-64"]()
    overrides = {
        "stage0.metric.kind": SearchOverride(value="mattes", fixed=True),
        "stage0.optimizer.iterations": SearchOverride(low=20, high=30),
        "stage0.metric.bins": SearchOverride(drop=True),
        "stage0.sampling.strategy": SearchOverride(choices=("regular", "random")),
        "stage1.bspline.control_point_spacing": SearchOverride(value=8.0, fixed=True),
        "stage0.interpolator": SearchOverride(value="bspline", fixed=True),  # a recipe field that is not searched
    }
    space = SearchSpace(fingerprint=fp, stages=("affine", "bspline"), overrides=overrides)
    for trial, recipe in draws(space, n=60):
        p = trial.params
        assert not set(p) & {"stage0.metric.kind", "stage0.metric.bins", "stage1.bspline.control_point_spacing"}
        s0, s1 = recipe.stages
        assert s0.metric.kind == "mattes" and s0.metric.bins == 50
        assert 20 <= s0.optimizer.iterations <= 30
        assert s0.sampling.strategy in ("regular", "random")
        assert s0.interpolator == "bspline" and s1.interpolator == "linear"
        assert s1.bspline.control_point_spacing == 8.0
        replay = space.suggest(optuna.trial.FixedTrial(p), seed=trial.number)
        assert recipe_to_dict(replay) == recipe_to_dict(recipe)


@pytest.mark.parametrize(
    "key, override",
    [
        ("stage2.metric.bins", SearchOverride(value=32, fixed=True)),  # no third stage
        ("metric.bins", SearchOverride(value=32, fixed=True)),
        ("stage0.nonsense", SearchOverride(low=1, high=2)),  # a range for a field that is not searched
    ],
)
def test_unknown_override_names_its_key(key: str, override: SearchOverride) -> None:
    with pytest.raises(UserError) as info:
        SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("rigid", "affine"), overrides={key: override},
                    source="PAIR.yaml")
    assert info.value.key == f"search.{key}"
    assert str(info.value).startswith(f"PAIR.yaml: search.{key}: ")
    assert "\n" not in str(info.value)


# --- the whole space on one real-sized example ---------------------------------------------------------------------


def test_ranges_scale_with_the_image() -> None:
    small = SearchSpace(fingerprint=FINGERPRINTS["2d-64"](), stages=("bspline",))
    large = SearchSpace(fingerprint=FINGERPRINTS["2d-512x384"](), stages=("bspline",))
    assert small.max_shrink == 4 and large.max_shrink == 24
    assert small.max_levels == 3 and large.max_levels == 5
    dims_s = {d.name: d for d in small.dims()}
    dims_l = {d.name: d for d in large.dims()}
    cps = "stage0.bspline.control_point_spacing"
    assert (dims_s[cps].low, dims_s[cps].high) == (4, 32)
    assert (dims_l[cps].low, dims_l[cps].high) == (12, 192)
    pct = "stage0.sampling.percentage"
    assert dims_l[pct].low < dims_s[pct].low  # a larger image can be sampled more sparsely
    assert math.isclose(dims_l[pct].high, 1.0) or dims_l[pct].high * 512 * 384 <= MAX_SAMPLES * (1 + 1e-9)
    assert np.isfinite(dims_l[pct].default)
