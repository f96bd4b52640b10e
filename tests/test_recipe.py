"""The recipe: exact YAML round trips for every option, immutability, one-line errors naming file and key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from autoreg.errors import UserError
from autoreg.recipe import (
    LBFGS2,
    LBFGSB,
    METRIC_KINDS,
    OPTIMIZER_KINDS,
    TRANSFORM_RANK,
    ANTSNeighborhoodCorrelation,
    BSplineTransform,
    ConjugateGradientLineSearch,
    Correlation,
    Demons,
    DisplacementTransform,
    GradientDescent,
    Initializer,
    JointHistogramMutualInformation,
    LinearTransform,
    MattesMutualInformation,
    MeanSquares,
    Pyramid,
    Recipe,
    RegularStepGradientDescent,
    RotationSearch,
    Sampling,
    Stage,
    default_recipe,
    load_recipe,
    recipe_from_yaml,
    recipe_to_yaml,
    save_recipe,
)

KINDS = tuple(k for k in TRANSFORM_RANK if k != "deformable")  # a study stage, never a recipe's


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
        assert recipe.kinds == stages
        _assert_round_trip(recipe)


def _everything_recipe(initializer: Initializer) -> Recipe:
    """Every metric, optimizer, sampling strategy and amount, scales option, interpolator, both sigma units, both
    pyramids and every transform kind with each of its grids."""
    stages = (
        Stage(
            transform=LinearTransform(kind="translation"),
            metric=MattesMutualInformation(number_of_histogram_bins=32, use_moving_image_gradient_filter=False),
            sampling=Sampling(strategy="none"),
            interpolator="nearest",
            optimizer=GradientDescent(
                learning_rate=0.25,
                estimate_learning_rate="never",
                number_of_iterations=7,
                convergence_minimum_value=1e-8,
                convergence_window_size=4,
                maximum_step_size_in_physical_units=2.5,
                scales="physical_shift",
            ),
            pyramid=Pyramid(
                shrink_factors=(8, 4, 2, 1),
                smoothing_sigmas=(3.5, 2.0, 0.5, 0.0),
                sigma_units="voxel",
                shrink_images=True,
            ),
        ),
        Stage(
            transform=LinearTransform(kind="rigid"),
            metric=Correlation(),
            sampling=Sampling(strategy="regular", percentage=0.123456789),
            interpolator="bspline",
            optimizer=RegularStepGradientDescent(
                learning_rate=2.0,
                min_step=1e-5,
                relaxation_factor=0.7,
                gradient_magnitude_tolerance=1e-9,
                estimate_learning_rate="each_iteration",
                scales="index_shift",
            ),
            pyramid=Pyramid(shrink_factors=(2, 1), smoothing_sigmas=(0.75, 0.0), sigma_units="mm"),
        ),
        Stage(
            transform=LinearTransform(kind="similarity"),
            metric=ANTSNeighborhoodCorrelation(radius=3, use_fixed_image_gradient_filter=False),
            sampling=Sampling(strategy="random", points=2048),
            optimizer=LBFGSB(
                maximum_number_of_corrections=9,
                maximum_number_of_function_evaluations=333,
                cost_function_convergence_factor=1e12,
                gradient_convergence_tolerance=3e-7,
            ),
        ),
        Stage(
            transform=LinearTransform(kind="affine"),
            metric=MeanSquares(),
            optimizer=LBFGS2(number_of_iterations=55, hessian_approximate_accuracy=4, scales="jacobian"),
            use_masks=False,
        ),
        Stage(
            transform=LinearTransform(kind="affine"),
            metric=JointHistogramMutualInformation(number_of_histogram_bins=20, variance_for_joint_pdf_smoothing=0.3),
            optimizer=ConjugateGradientLineSearch(
                learning_rate=0.5, convergence_window_size=5, scales="none", line_search_maximum_iterations=7
            ),
        ),
        Stage(transform=BSplineTransform(mesh_size=(5, 6, 7)), optimizer=LBFGSB()),
        Stage(
            transform=BSplineTransform(control_point_spacing=12.5, spacing_units="mm"),
            pyramid=Pyramid(shrink_factors=(1,), smoothing_sigmas=(0.0,)),
        ),
        Stage(transform=BSplineTransform(control_point_spacing=8, spacing_units="voxel", refine=True)),
        Stage(
            transform=DisplacementTransform(
                grid_spacing=2.0, variance_for_update_field=1.5, variance_for_total_field=0.25
            ),
            pyramid=Pyramid(shrink_images=True),
        ),
        Stage(
            transform=DisplacementTransform(),
            metric=MeanSquares(),
            sampling=Sampling(strategy="none"),
            optimizer=Demons(variant="diffeomorphic", number_of_iterations=9, maximum_update_step_length=1.5),
            pyramid=Pyramid(shrink_images=True),
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
        kind="moments",
        rotation_search=RotationSearch(
            max_angle_deg=90, step_deg=7.5, max_shift_fraction=0.2, shift_steps=3, max_evaluations=500
        ),
    ),
    "none_rotation_search": Initializer(kind="none", rotation_search=RotationSearch()),
}


@pytest.mark.parametrize("init", sorted(INITIALIZERS))
def test_recipe_with_every_option_round_trips(init: str, tmp_path: Path) -> None:
    recipe = _everything_recipe(INITIALIZERS[init])
    # what the recipe covers, so that this test keeps meaning "every option"
    stages = recipe.stages
    assert {s.metric.kind for s in stages} == set(METRIC_KINDS)
    assert {s.optimizer.kind for s in stages} == set(OPTIMIZER_KINDS)
    assert set(recipe.kinds) == set(KINDS)
    assert {s.sampling.strategy for s in stages} == {"none", "regular", "random"}
    assert {"percentage", "points"} <= {k for s in stages for k in ("percentage", "points") if getattr(s.sampling, k)}
    assert {getattr(s.optimizer, "scales", None) for s in stages} >= {
        "physical_shift",
        "index_shift",
        "jacobian",
        "none",
    }
    assert {s.pyramid.sigma_units for s in stages} == {"mm", "voxel"}
    assert {s.pyramid.shrink_images for s in stages} == {True, False}
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
    assert back.stages[5].transform.mesh_size == (5, 6, 7)
    assert back.stages[6].transform.control_point_spacing == 12.5 and back.stages[6].transform.spacing_units == "mm"


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
        recipe.stages[0].metric.number_of_histogram_bins = 10  # type: ignore[misc]
    with pytest.raises(ValidationError):
        recipe.stages[1].transform.mesh_size = (2, 2, 2)  # type: ignore[misc]
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

RIGID = "{transform: {kind: rigid}}"
BAD_RECIPES = {
    "unknown_top_key": (f"colour: red\nstages: [{RIGID}]\n", "colour", "unknown key"),
    "unknown_stage_key": ("stages: [{transform: {kind: rigid}, shrink: 2}]\n", "stages[0].shrink", "unknown key"),
    "wrong_type": (
        "stages: [{transform: {kind: rigid}, optimizer: {kind: gradient_descent, number_of_iterations: many}}]\n",
        "stages[0].optimizer.number_of_iterations",
        "'many'",
    ),
    "wrong_type_top": (f"seed: abc\nstages: [{RIGID}]\n", "seed", "'abc'"),
    "bad_pyramid": (
        "stages:\n- transform: {kind: affine}\n  pyramid: {shrink_factors: [4, 2, 1], smoothing_sigmas: [2, 1]}\n",
        "stages[0].pyramid",
        "one entry per level",
    ),
    "increasing_shrink": (
        f"stages:\n- {RIGID}\n- transform: {{kind: affine}}\n"
        "  pyramid: {shrink_factors: [1, 2], smoothing_sigmas: [0, 0]}\n",
        "stages[1].pyramid",
        "increase",
    ),
    "bad_metric_kind": ("stages: [{transform: {kind: rigid}, metric: {kind: nmi}}]\n", "stages[0].metric", "'nmi'"),
    "bspline_without_grid": ("stages: [{transform: {kind: bspline}}]\n", "stages[0].transform", "exactly one"),
    "bspline_two_grids": (
        "stages: [{transform: {kind: bspline, mesh_size: [4, 4], control_point_spacing: 5}}]\n",
        "stages[0].transform",
        "exactly one",
    ),
    "stage_order": ("stages: [{transform: {kind: affine}}, {transform: {kind: rigid}}]\n", "stages", "loses freedom"),
    "missing_stages": ("seed: 1\n", "stages", "missing"),
    "future_format": (f"autoreg_recipe: 3\nstages: [{RIGID}]\n", "autoreg_recipe", "reads 1 and 2"),
    # settings that the chosen kind ignores are refused, named with the kind
    "lbfgsb_learning_rate": (
        "stages: [{transform: {kind: rigid}, optimizer: {kind: lbfgsb, learning_rate: 0.5}}]\n",
        "stages[0].optimizer.learning_rate",
        "not a setting of 'lbfgsb'",
    ),
    "gd_corrections": (
        "stages: [{transform: {kind: rigid}, optimizer: {kind: gradient_descent, maximum_number_of_corrections: 5}}]\n",
        "stages[0].optimizer.maximum_number_of_corrections",
        "not a setting of 'gradient_descent'",
    ),
    "lbfgsb_scales": (
        "stages: [{transform: {kind: rigid}, optimizer: {kind: lbfgsb, scales: jacobian}}]\n",
        "stages[0].optimizer.scales",
        "not a setting of 'lbfgsb'",
    ),
    "mattes_radius": (
        "stages: [{transform: {kind: rigid}, metric: {kind: mattes, radius: 3}}]\n",
        "stages[0].metric.radius",
        "not a setting of 'mattes'",
    ),
    "correlation_bins": (
        "stages: [{transform: {kind: rigid}, metric: {kind: correlation, number_of_histogram_bins: 32}}]\n",
        "stages[0].metric.number_of_histogram_bins",
        "not a setting of 'correlation'",
    ),
    "rigid_mesh": (
        "stages: [{transform: {kind: rigid, mesh_size: [4, 4]}}]\n",
        "stages[0].transform.mesh_size",
        "not a setting of 'rigid'",
    ),
    "none_with_percentage": (
        "stages: [{transform: {kind: rigid}, sampling: {strategy: none, percentage: 0.5}}]\n",
        "stages[0].sampling",
        "uses every voxel",
    ),
    "points_and_percentage": (
        "stages: [{transform: {kind: rigid}, sampling: {strategy: random, percentage: 0.5, points: 100}}]\n",
        "stages[0].sampling",
        "exactly one of percentage and points",
    ),
    "displacement_with_lbfgsb": (
        "stages: [{transform: {kind: displacement}, optimizer: {kind: lbfgsb}, pyramid: {shrink_images: true}}]\n",
        "stages[0]",
        "gradient-descent optimizer",
    ),
    "displacement_on_itk_pyramid": ("stages: [{transform: {kind: displacement}}]\n", "stages[0]", "shrink_images"),
    "demons_on_bspline": (
        "stages: [{transform: {kind: bspline, mesh_size: [4, 4]}, optimizer: {kind: demons}, "
        "metric: {kind: mean_squares}, sampling: {strategy: none}}]\n",
        "stages[0]",
        "displacement",
    ),
    "demons_with_mattes": (
        "stages: [{transform: {kind: displacement}, optimizer: {kind: demons}, pyramid: {shrink_images: true}}]\n",
        "stages[0]",
        "mean_squares",
    ),
    "demons_with_gradient_step": (
        "stages: [{transform: {kind: displacement, gradient_step: 0.2}, optimizer: {kind: demons}, "
        "metric: {kind: mean_squares}, sampling: {strategy: none}, pyramid: {shrink_images: true}}]\n",
        "stages[0]",
        "maximum_update_step_length",
    ),
    "demons_composing": (
        "stages: [{transform: {kind: displacement, across_levels: compose}, optimizer: {kind: demons}, "
        "metric: {kind: mean_squares}, sampling: {strategy: none}, pyramid: {shrink_images: true}}]\n",
        "stages[0]",
        "continues its field",
    ),
    "gradient_step_and_maximum_step": (
        "stages: [{transform: {kind: displacement, gradient_step: 0.2}, pyramid: {shrink_images: true}, "
        "optimizer: {kind: gradient_descent, maximum_step_size_in_physical_units: 1.0}}]\n",
        "stages[0]",
        "not both",
    ),
    "across_levels_unknown": (
        "stages: [{transform: {kind: displacement, across_levels: merge}, pyramid: {shrink_images: true}}]\n",
        "stages[0].transform.across_levels",
        "continue",
    ),
    "refine_with_lbfgsb": (
        "stages: [{transform: {kind: bspline, mesh_size: [4, 4], refine: true}, optimizer: {kind: lbfgsb}}]\n",
        "stages[0]",
        "gradient-descent optimizer",
    ),
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


# --- version 1 ------------------------------------------------------------------------------------------------------

DATA = Path(__file__).parent / "data"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def test_a_version_1_recipe_applies_bit_identically(tmp_path: Path) -> None:
    """tests/data/recipe_v1.yaml and the transform autoreg 0.1.0 wrote with it (before format 2 existed)."""
    from autoreg.cli import main

    out = tmp_path / "t.tfm"
    code = main(
        [
            "apply",
            str(DATA / "recipe_v1.yaml"),
            "--fixed",
            str(QUICKSTART / "fixed.png"),
            "--moving",
            str(QUICKSTART / "moving.png"),
            "--transform-out",
            str(out),
        ]
    )
    assert code == 0
    assert out.read_bytes() == (DATA / "recipe_v1_quickstart.tfm.txt").read_bytes()


def test_version_1_settings_land_on_their_simpleitk_names() -> None:
    recipe = load_recipe(DATA / "recipe_v1.yaml")
    assert recipe.autoreg_recipe == 2
    affine, bspline = recipe.stages
    assert affine.optimizer == RegularStepGradientDescent(
        learning_rate=1.0,
        min_step=1e-4,
        number_of_iterations=60,
        relaxation_factor=0.5,
        gradient_magnitude_tolerance=1e-5,
        estimate_learning_rate="once",
        scales="physical_shift",
    )
    assert affine.metric == MattesMutualInformation(number_of_histogram_bins=32)
    assert bspline.metric == JointHistogramMutualInformation(
        number_of_histogram_bins=24, variance_for_joint_pdf_smoothing=1.5
    )
    assert bspline.transform == BSplineTransform(mesh_size=(4, 4))
    assert bspline.optimizer == LBFGSB(number_of_iterations=30)
    assert not affine.pyramid.shrink_images and not bspline.pyramid.shrink_images  # ITK's own pyramid, as in v1
    # written back, it is a format-2 recipe that loads to the same thing
    assert recipe_from_yaml(recipe_to_yaml(recipe)) == recipe


@pytest.mark.parametrize(
    "kind, expected",
    [
        (
            "gradient_descent",
            GradientDescent(
                learning_rate=0.5,
                number_of_iterations=7,
                convergence_minimum_value=1e-7,
                convergence_window_size=4,
                estimate_learning_rate="never",
                scales="jacobian",
            ),
        ),
        (
            "cg_line_search",
            ConjugateGradientLineSearch(
                learning_rate=0.5,
                number_of_iterations=7,
                convergence_minimum_value=1e-7,
                convergence_window_size=4,
                estimate_learning_rate="never",
                scales="jacobian",
            ),
        ),
        # version 1 passed max_corrections as LBFGS2's Hessian accuracy and gradient_tolerance as its solution accuracy
        (
            "lbfgs2",
            LBFGS2(solution_accuracy=3e-6, number_of_iterations=7, hessian_approximate_accuracy=9, scales="jacobian"),
        ),
        (
            "lbfgsb",
            LBFGSB(
                gradient_convergence_tolerance=3e-6,
                number_of_iterations=7,
                maximum_number_of_corrections=9,
                maximum_number_of_function_evaluations=99,
                cost_function_convergence_factor=1e9,
            ),
        ),
    ],
)
def test_version_1_optimizers_keep_what_they_ran_with(kind: str, expected) -> None:
    old = {
        "kind": kind,
        "learning_rate": 0.5,
        "estimate_learning_rate": "never",
        "iterations": 7,
        "convergence_minimum_value": 1e-7,
        "convergence_window_size": 4,
        "minimum_step": 1e-3,
        "relaxation_factor": 0.6,
        "gradient_tolerance": 3e-6,
        "max_corrections": 9,
        "max_function_evaluations": 99,
        "cost_function_convergence_factor": 1e9,
    }
    text = f"autoreg_recipe: 1\nstages: [{{transform: affine, scales: jacobian, optimizer: {old}}}]\n"
    assert recipe_from_yaml(text).stages[0].optimizer == expected


def test_version_1_short_form_and_sampling_none() -> None:
    recipe = recipe_from_yaml(
        "autoreg_recipe: 1\nstages: [{transform: rigid, sampling: {strategy: none, percentage: 1.0}}]\n"
    )
    assert recipe.stages[0].sampling == Sampling(strategy="none")
    assert recipe.stages[0].metric == MattesMutualInformation()
    assert recipe.stages[0].pyramid == Pyramid(shrink_images=False)
