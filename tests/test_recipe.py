"""The recipe: exact YAML round trips for every option, immutability, one-line errors naming file and key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from autoreg.errors import UserError
from autoreg.recipe import (
    TRANSFORM_RANK,
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
    load_recipe,
    recipe_from_yaml,
    recipe_to_yaml,
    save_recipe,
)

KINDS = tuple(TRANSFORM_RANK)


def _stage_lists(max_len: int = 3) -> list[tuple[str, ...]]:
    """Every valid stage list up to ``max_len`` stages (kinds never lose freedom along the list)."""
    out = []
    for n in range(1, max_len + 1):
        out.extend(itertools.combinations_with_replacement(KINDS, n))  # sorted by rank: exactly the valid lists
    return out


def _assert_round_trip(recipe: Recipe) -> None:
    text = recipe_to_yaml(recipe)
    back = recipe_from_yaml(text, source="roundtrip.yaml")
    assert back == recipe
    assert back.model_dump() == recipe.model_dump()
    assert recipe_to_yaml(back) == text


@pytest.mark.parametrize("stages", _stage_lists(), ids=lambda s: "-".join(s))
def test_default_recipes_round_trip(stages: tuple[str, ...]) -> None:
    for dim in (2, 3):
        recipe = default_recipe(stages, dim, seed=11)
        assert tuple(s.transform for s in recipe.stages) == stages
        _assert_round_trip(recipe)


def _everything_recipe(initializer: Initializer) -> Recipe:
    """Every metric, optimizer, sampling strategy, scales option, interpolator, both sigma units and both grids."""
    stages = (
        Stage(
            transform="translation",
            metric=Metric(kind="mattes", bins=32),
            sampling=Sampling(strategy="none", percentage=1.0),
            interpolator="nearest",
            optimizer=Optimizer(kind="gradient_descent", learning_rate=0.25, estimate_learning_rate="never",
                                iterations=7, convergence_minimum_value=1e-8, convergence_window_size=4),
            scales="physical_shift",
            pyramid=Pyramid(shrink_factors=(8, 4, 2, 1), smoothing_sigmas=(3.5, 2.0, 0.5, 0.0), sigma_units="voxel"),
        ),
        Stage(
            transform="rigid",
            metric=Metric(kind="correlation"),
            sampling=Sampling(strategy="regular", percentage=0.123456789),
            interpolator="bspline",
            optimizer=Optimizer(kind="regular_step_gd", learning_rate=2.0, minimum_step=1e-5, relaxation_factor=0.7,
                                gradient_tolerance=1e-9, estimate_learning_rate="each_iteration"),
            scales="index_shift",
            pyramid=Pyramid(shrink_factors=(2, 1), smoothing_sigmas=(0.75, 0.0), sigma_units="mm"),
        ),
        Stage(
            transform="similarity",
            metric=Metric(kind="ants_nc", radius=3),
            sampling=Sampling(strategy="random", percentage=0.05),
            optimizer=Optimizer(kind="lbfgsb", max_corrections=9, max_function_evaluations=333,
                                cost_function_convergence_factor=1e12, gradient_tolerance=3e-7),
            scales="jacobian",
        ),
        Stage(
            transform="affine",
            metric=Metric(kind="mean_squares"),
            optimizer=Optimizer(kind="lbfgs2", iterations=55, max_corrections=4),
            scales="none",
            use_masks=False,
        ),
        Stage(
            transform="affine",
            metric=Metric(kind="joint_hist_mi", bins=20, variance=0.3),
            optimizer=Optimizer(kind="cg_line_search", learning_rate=0.5, convergence_window_size=5),
        ),
        Stage(
            transform="bspline",
            bspline=BSplineGrid(mesh_size=(5, 6, 7)),
            optimizer=Optimizer(kind="lbfgsb"),
            scales="none",
        ),
        Stage(
            transform="bspline",
            bspline=BSplineGrid(control_point_spacing=12.5, spacing_units="mm"),
            pyramid=Pyramid(shrink_factors=(1,), smoothing_sigmas=(0.0,)),
        ),
        Stage(
            transform="bspline",
            bspline=BSplineGrid(control_point_spacing=8, spacing_units="voxel", refine=True),
        ),
    )
    return Recipe(
        initializer=initializer,
        stages=stages,
        seed=2**31 - 1,
        threads=3,
        deterministic=True,
        provenance={
            "autoreg": "0.1.0",
            "simpleitk": "2.5.7",
            "optuna": "5.0.0",
            "study": "syn",
            "trial": 42,
            "score": {"mean": 0.123456789012345, "median": 0.1, "p90": 1e-12, "max": 3.0},
            "fingerprint": {"pairs": [{"size": [64, 64], "spacing": [0.5, 1.25]}], "max_shrink": 4},
            "quoted": ["001", "yes", "null", "1e3", "2024-01-01", "a: b", ""],
            "nothing": None,
            "flag": False,
        },
    )


INITIALIZERS = {
    "geometry": Initializer(kind="geometry"),
    "moments_rotation_search": Initializer(
        kind="moments", rotation_search=RotationSearch(max_angle_deg=90, step_deg=7.5, max_shift_fraction=0.2,
                                                      shift_steps=3)
    ),
    "none_rotation_search": Initializer(kind="none", rotation_search=RotationSearch()),
}


@pytest.mark.parametrize("init", sorted(INITIALIZERS))
def test_recipe_with_every_option_round_trips(init: str, tmp_path: Path) -> None:
    recipe = _everything_recipe(INITIALIZERS[init])
    # what the recipe covers, so that this test keeps meaning "every option"
    stages = recipe.stages
    assert {s.metric.kind for s in stages} == set(Metric.model_fields["kind"].annotation.__args__)
    assert {s.optimizer.kind for s in stages} == set(Optimizer.model_fields["kind"].annotation.__args__)
    assert {s.sampling.strategy for s in stages} == {"none", "regular", "random"}
    assert {s.scales for s in stages} == {"physical_shift", "index_shift", "jacobian", "none"}
    assert {s.pyramid.sigma_units for s in stages} == {"mm", "voxel"}
    assert {s.interpolator for s in stages} == {"linear", "nearest", "bspline"}
    _assert_round_trip(recipe)
    # through a file as well
    path = tmp_path / "RECIPE.yaml"
    save_recipe(recipe, path)
    assert load_recipe(path) == recipe
    assert path.read_text(encoding="utf-8") == recipe_to_yaml(recipe)


def test_round_trip_keeps_nested_provenance_types() -> None:
    recipe = _everything_recipe(INITIALIZERS["geometry"])
    back = recipe_from_yaml(recipe_to_yaml(recipe))
    prov = back.provenance
    assert prov is not None
    assert prov["trial"] == 42 and isinstance(prov["trial"], int)
    assert prov["score"]["mean"] == 0.123456789012345
    assert prov["quoted"] == ["001", "yes", "null", "1e3", "2024-01-01", "a: b", ""]
    assert prov["nothing"] is None and prov["flag"] is False
    assert back.stages[5].bspline.mesh_size == (5, 6, 7)
    assert back.stages[6].bspline.control_point_spacing == 12.5 and back.stages[6].bspline.spacing_units == "mm"


def test_no_provenance_key_when_absent() -> None:
    text = recipe_to_yaml(default_recipe(["rigid"], 2))
    assert "provenance" not in text
    assert recipe_from_yaml(text).provenance is None


# --- immutability -----------------------------------------------------------------------------------------------


def test_fields_cannot_be_assigned() -> None:
    recipe = default_recipe(["affine", "bspline"], 3)
    with pytest.raises(ValidationError):
        recipe.seed = 5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        recipe.stages[0].metric.bins = 10  # type: ignore[misc]
    with pytest.raises(ValidationError):
        recipe.stages[1].bspline.mesh_size = (2, 2, 2)  # type: ignore[misc]
    with pytest.raises(ValidationError):
        recipe.initializer.kind = "none"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        recipe.stages.append(recipe.stages[0])  # type: ignore[attr-defined]


def test_copies_are_validated_and_leave_the_original_alone() -> None:
    recipe = default_recipe(["rigid"], 2)
    changed = recipe.with_(seed=9, deterministic=True)
    assert (changed.seed, changed.deterministic, changed.effective_threads) == (9, True, 1)
    assert (recipe.seed, recipe.deterministic) == (0, False)
    with pytest.raises(ValidationError):
        recipe.with_(seed=-1)


# --- errors in recipe files -------------------------------------------------------------------------------------

BAD_RECIPES = {
    "unknown_top_key": ("colour: red\nstages: [{transform: rigid}]\n", "colour", "unknown key"),
    "unknown_stage_key": ("stages: [{transform: rigid, shrink: 2}]\n", "stages[0].shrink", "unknown key"),
    "wrong_type": ("stages: [{transform: rigid, optimizer: {iterations: many}}]\n",
                   "stages[0].optimizer.iterations", "'many'"),
    "wrong_type_top": ("seed: abc\nstages: [{transform: rigid}]\n", "seed", "'abc'"),
    "bad_pyramid": ("stages:\n- transform: affine\n  pyramid: {shrink_factors: [4, 2, 1], smoothing_sigmas: [2, 1]}\n",
                    "stages[0].pyramid", "one entry per level"),
    "increasing_shrink": ("stages:\n- {transform: rigid}\n- transform: affine\n"
                          "  pyramid: {shrink_factors: [1, 2], smoothing_sigmas: [0, 0]}\n",
                          "stages[1].pyramid", "increase"),
    "bad_literal": ("stages: [{transform: rigid, metric: {kind: nmi}}]\n", "stages[0].metric.kind", "'nmi'"),
    "bspline_without_grid": ("stages: [{transform: bspline}]\n", "stages[0]", "grid"),
    "bspline_two_grids": ("stages: [{transform: bspline, bspline: {mesh_size: [4, 4], control_point_spacing: 5}}]\n",
                          "stages[0].bspline", "exactly one"),
    "stage_order": ("stages: [{transform: affine}, {transform: rigid}]\n", "stages", "loses freedom"),
    "missing_stages": ("seed: 1\n", "stages", "missing"),
    "future_format": ("autoreg_recipe: 2\nstages: [{transform: rigid}]\n", "autoreg_recipe", "1"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_file_names_file_and_key(tmp_path: Path, case: str) -> None:
    text, key, fragment = BAD_RECIPES[case]
    path = tmp_path / "RECIPE.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == key
    message = str(err)
    assert message.startswith(f"{path}: {key}: "), message
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["stages: [{transform: rigid\n", "- rigid\n", ""], ids=["syntax", "list", "empty"])
def test_recipe_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "RECIPE.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.file == str(path) and "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_recipe(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)
