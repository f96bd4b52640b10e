"""The displacement stage: a dense field with local support, everywhere a BSpline stage works (composition, .tfm and
.h5 files, apply, the standalone script, evaluate, folding, spacing invariance), on real registrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import pair_data, quick_recipe, synthetic_pair

from autoreg.recipe import save_recipe
from autoreg.registration import register
from autoreg.scoring import folding_fraction, has_deformable, transform_points, tre

IDENTITY = {2: sitk.Transform(2, sitk.sitkIdentity), 3: sitk.Transform(3, sitk.sitkIdentity)}


def _tre(tx, pair, vox: bool = False) -> float:
    t = tre(tx, pair.fixed_points, pair.moving_points, pair.fixed)
    return t.mean_vox if vox else t.mean


def _recipe(dim: int, **top):
    return quick_recipe(
        ["affine", "displacement"],
        dim,
        shrink=(4, 2, 1),
        sigmas=(2.0, 1.0, 0.0),
        bspline_iterations=40,
        deterministic=True,
        **top,
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_displacement_after_affine_registers_a_warp(dim: int) -> None:
    pair = pair_data(synthetic_pair(dim, "bspline"))
    affine_only = register(
        quick_recipe(["affine"], dim, shrink=(4, 2, 1), sigmas=(2.0, 1.0, 0.0), deterministic=True), pair
    ).transform
    result = register(_recipe(dim), pair)
    comp = sitk.CompositeTransform(result.transform)
    assert [comp.GetNthTransform(i).GetName() for i in range(2)] == ["AffineTransform", "DisplacementFieldTransform"]
    assert has_deformable(result.transform)
    # the field adds what the affine cannot (the 32^3 volume's warp is smaller than the 64^2 image's)
    assert _tre(result.transform, pair) < (0.8 if dim == 2 else 0.9) * _tre(affine_only, pair)
    assert folding_fraction(result.transform, pair.fixed) == 0.0


def _symmetric(recipe, **transform):
    """``recipe`` with its field moved by SyN's symmetric scheme (which needs a gradient step)."""
    data = recipe.model_dump()
    data["stages"][-1]["transform"].update({"symmetric": True, "gradient_step": 0.25, **transform})
    return recipe.model_validate(data)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("suffix", ["tfm", "h5"])
def test_displacement_transform_files_read_back_the_same_mapping(tmp_path: Path, suffix: str, symmetric: bool) -> None:
    pair = pair_data(synthetic_pair(2, "bspline"), spacing=0.7)
    tx = register(_symmetric(_recipe(2)) if symmetric else _recipe(2), pair).transform
    path = tmp_path / f"t.{suffix}"
    sitk.WriteTransform(tx, str(path))
    back = sitk.ReadTransform(str(path))
    rng = np.random.default_rng(1)
    points = np.vstack([pair.fixed_points, rng.uniform(0, 64 * 0.7, size=(50, 2))])
    np.testing.assert_allclose(transform_points(back, points), transform_points(tx, points), atol=1e-9)


def test_displacement_field_resolution_follows_grid_spacing() -> None:
    pair = pair_data(synthetic_pair(2, "bspline"))
    for grid, expected in ((1.0, (64, 64)), (2.0, (32, 32))):
        recipe = _recipe(2)
        data = recipe.model_dump()
        data["stages"][1]["transform"]["grid_spacing"] = grid
        levels: list = []
        tx = register(recipe.model_validate(data), pair, level_callback=lambda rec, get: levels.append(rec))  # noqa: B023 - called within this iteration
        tx = tx.transform
        field = sitk.DisplacementFieldTransform(sitk.CompositeTransform(tx).GetNthTransform(1)).GetDisplacementField()
        assert field.GetSize() == expected
        assert [r.voxels for r in levels if r.stage == 1] == [16 * 16, 32 * 32, int(np.prod(expected))]


def test_a_field_that_stops_at_half_resolution_lives_on_the_half_grid() -> None:
    """ANTs SyN's pyramid (shrink 4x2, full resolution unrun): the field ends on the half-resolution grid, still
    registers the warp the affine cannot reach and does not fold."""
    pair = pair_data(synthetic_pair(2, "bspline"))
    data = _recipe(2).model_dump()
    data["stages"][1]["pyramid"].update(shrink_factors=[4, 2], smoothing_sigmas=[2.0, 1.0])
    recipe = _recipe(2).model_validate(data)
    levels: list = []
    tx = register(recipe, pair, level_callback=lambda rec, get: levels.append(rec)).transform
    field = sitk.DisplacementFieldTransform(sitk.CompositeTransform(tx).GetNthTransform(1)).GetDisplacementField()
    assert field.GetSize() == (32, 32) and field.GetSpacing() == pytest.approx(2 * np.array(pair.fixed.GetSpacing()))
    assert [r.voxels for r in levels if r.stage == 1] == [16 * 16, 32 * 32]
    affine = sitk.CompositeTransform(tx).GetNthTransform(0)
    assert _tre(tx, pair) < 0.8 * _tre(affine, pair)
    assert folding_fraction(tx, pair.fixed) == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_voxel_tre_of_a_displacement_stage_does_not_depend_on_spacing(symmetric: bool) -> None:
    syn = synthetic_pair(2, "bspline")
    recipe = _symmetric(_recipe(2)) if symmetric else _recipe(2)
    tres = [
        _tre(register(recipe, pair_data(syn, spacing=s)).transform, pair_data(syn, spacing=s), vox=True)
        for s in (0.1, 1.0, 10.0)
    ]
    assert max(tres) <= 1.02 * min(tres), tres


@pytest.mark.parametrize("way", ["itk_step", "gradient_step", "symmetric"])
def test_apply_script_and_evaluate_run_a_displacement_recipe(pair_yaml, run_cli, tmp_path: Path, way: str) -> None:
    """The field by ITK's own step, by a bound in level voxels and by SyN's scheme: the standalone script (plain
    attributes, no pydantic) registers exactly as ``apply`` does."""
    from autoreg.script import recipe_to_script

    pair = pair_yaml(transform="bspline", stages=["affine", "displacement"])
    folder = pair.parent
    recipe = _recipe(2)
    if way == "gradient_step":
        data = recipe.model_dump()
        data["stages"][1]["transform"]["gradient_step"] = 0.25
        recipe = recipe.model_validate(data)
    elif way == "symmetric":
        recipe = _symmetric(recipe)
    save_recipe(recipe, tmp_path / "r.yaml")
    res = run_cli(
        "apply",
        tmp_path / "r.yaml",
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "apply.h5",
    )
    assert res.code == 0, res.err
    (tmp_path / "r.py").write_text(recipe_to_script(recipe))
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            str(tmp_path / "r.py"),
            str(folder / "fixed.png"),
            str(folder / "moving.png"),
            str(tmp_path / "script.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    a, b = (sitk.ReadTransform(str(tmp_path / n)) for n in ("apply.h5", "script.h5"))
    points = np.random.default_rng(2).uniform(0, 63, size=(100, 2))
    np.testing.assert_array_equal(transform_points(a, points), transform_points(b, points))  # one thread: identical
    res = run_cli("evaluate", tmp_path / "r.yaml", pair)
    assert res.code == 0, res.err


def test_a_demons_stage_registers_a_same_modality_warp() -> None:
    """SimpleITK's Demons on the displacement field (one modality): the warp the affine stage cannot reach."""
    from autoreg.recipe import Demons, MeanSquares, Sampling

    pair = pair_data(synthetic_pair(2, "bspline"))
    recipe = _recipe(2)
    data = recipe.model_dump()
    data["stages"][1].update(
        metric=MeanSquares().model_dump(),
        sampling=Sampling(strategy="none").model_dump(),
        optimizer=Demons(number_of_iterations=30).model_dump(),
    )
    levels = []
    result = register(recipe.model_validate(data), pair, level_callback=lambda rec, get: levels.append(rec))
    affine_only = register(
        quick_recipe(["affine"], 2, shrink=(4, 2, 1), sigmas=(2.0, 1.0, 0.0), deterministic=True), pair
    ).transform
    assert _tre(result.transform, pair) < 0.8 * _tre(affine_only, pair)
    assert [r.iterations for r in levels if r.stage == 1] and all(
        0 < r.iterations <= 30 for r in levels if r.stage == 1
    )
    assert all(r.stop_condition.startswith("Demons (fast_symmetric_forces)") for r in levels if r.stage == 1)
    assert folding_fraction(result.transform, pair.fixed) < 0.001


def test_demons_matches_histograms_when_the_moving_image_is_scaled_differently() -> None:
    """Demons' force is the intensity difference: a moving image whose intensities are remapped (another stain, another
    scanner's scale) pulls the field astray unless its histogram is matched to the fixed one first."""
    from dataclasses import replace

    from autoreg.recipe import Demons, MeanSquares, Sampling

    pair = pair_data(synthetic_pair(2, "bspline"))
    pair = replace(pair, moving=sitk.Sqrt(sitk.Cast(pair.moving, sitk.sitkFloat32) + 1.0) * 40.0)
    errors = {}
    for how in ("off", "all"):
        data = _recipe(2).model_dump()
        data["stages"][1].update(
            metric=MeanSquares().model_dump(),
            sampling=Sampling(strategy="none").model_dump(),
            optimizer=Demons(number_of_iterations=30, match_histograms=how).model_dump(),
        )
        errors[how] = _tre(register(_recipe(2).model_validate(data), pair).transform, pair)
    assert errors["all"] < 0.8 * errors["off"], errors


def test_a_demons_stage_stops_on_time() -> None:
    from autoreg.errors import RegistrationFailed
    from autoreg.recipe import Demons, MeanSquares, Sampling

    pair = pair_data(synthetic_pair(3, "bspline", size=(48, 48, 48)))
    recipe = _recipe(3)
    data = recipe.model_dump()
    data["stages"][1].update(
        metric=MeanSquares().model_dump(),
        sampling=Sampling(strategy="none").model_dump(),
        optimizer=Demons(number_of_iterations=100000, maximum_rms_error=0.0).model_dump(),
    )
    import time

    t0 = time.monotonic()
    with pytest.raises(RegistrationFailed) as info:
        register(recipe.model_validate(data), pair, time_limit=2.0)
    assert info.value.reason == "time limit" and time.monotonic() - t0 < 4.0


def _stage_field(tx: sitk.Transform) -> np.ndarray:
    comp = sitk.CompositeTransform(tx)
    field = sitk.DisplacementFieldTransform(comp.GetNthTransform(comp.GetNumberOfTransforms() - 1))
    return sitk.GetArrayFromImage(field.GetDisplacementField())


@pytest.mark.parametrize("spacing", [1.0, 0.7])
def test_gradient_step_bounds_every_update_in_voxels_of_the_level(spacing: float) -> None:
    pair = pair_data(synthetic_pair(2, "bspline"), spacing=spacing)
    data = _recipe(2).model_dump()
    stage = data["stages"][1]
    stage["pyramid"].update(shrink_factors=[2], smoothing_sigmas=[0.0])
    stage["transform"].update(variance_for_update_field=0.0, variance_for_total_field=0.0)
    stage["optimizer"].update(
        number_of_iterations=5, estimate_learning_rate="each_iteration", convergence_minimum_value=1e-300
    )
    largest = {}
    for step in (None, 0.05):
        stage["transform"]["gradient_step"] = step
        tx = register(_recipe(2).model_validate(data), pair).transform
        largest[step] = float(np.linalg.norm(_stage_field(tx), axis=-1).max())
    bound = 5 * 0.05 * 2 * spacing  # 5 updates of 0.05 voxels of the shrink-2 level
    assert 0 < largest[0.05] <= bound * (1 + 1e-6)
    assert largest[None] > 2 * bound  # ITK's own bound (a field voxel per update) is much larger


def test_composed_levels_end_in_one_field_that_keeps_what_the_coarse_level_found() -> None:
    pair = pair_data(synthetic_pair(2, "bspline"))
    data = _recipe(2).model_dump()
    data["stages"][1]["pyramid"].update(shrink_factors=[2, 2], smoothing_sigmas=[1.0, 1.0])
    data["stages"][1]["transform"].update(across_levels="compose", gradient_step=0.25)
    levels: list = []
    tx = register(_recipe(2).model_validate(data), pair, level_callback=lambda rec, get: levels.append(rec)).transform
    comp = sitk.CompositeTransform(tx)
    assert [comp.GetNthTransform(i).GetName() for i in range(2)] == ["AffineTransform", "DisplacementFieldTransform"]
    first, second = (r.tre_mean for r in levels if r.stage == 1)
    assert second <= 1.05 * first  # the second level starts where the first ended: nothing eroded
    assert _tre(tx, pair) == pytest.approx(second)  # the merged field is what the last level measured
    data["stages"][1]["transform"]["across_levels"] = "continue"
    other = register(_recipe(2).model_validate(data), pair).transform
    assert not np.allclose(_stage_field(other), _stage_field(tx))


@pytest.mark.parametrize("dim", [2, 3])
def test_a_symmetric_field_registers_a_warp_the_affine_cannot(dim: int) -> None:
    """SyN's scheme: one fixed -> moving field after the affine (the moving half after the fixed half's inverse) that
    registers the warp and does not fold."""
    pair = pair_data(synthetic_pair(dim, "bspline"))
    levels: list = []
    tx = register(_symmetric(_recipe(dim)), pair, level_callback=lambda rec, get: levels.append(rec)).transform
    comp = sitk.CompositeTransform(tx)
    assert [comp.GetNthTransform(i).GetName() for i in range(2)] == ["AffineTransform", "DisplacementFieldTransform"]
    affine = comp.GetNthTransform(0)
    assert _tre(tx, pair) < (0.8 if dim == 2 else 0.9) * _tre(affine, pair)
    assert folding_fraction(tx, pair.fixed) == 0.0
    field_levels = [r for r in levels if r.stage == 1]
    assert len(field_levels) == 3 and all(r.stop_condition.startswith("symmetric") for r in field_levels)
    assert _tre(tx, pair) == pytest.approx(field_levels[-1].tre_mean)  # the field returned is the one measured


def test_a_symmetric_field_moves_both_images_by_the_gradient_step() -> None:
    """Each half moves at most ``gradient_step`` level voxels per iteration, so the fixed -> moving field moves up to
    twice that: more than one side alone could."""
    pair = pair_data(synthetic_pair(2, "bspline"))
    data = _recipe(2).model_dump()
    stage = data["stages"][1]
    stage["pyramid"].update(shrink_factors=[2], smoothing_sigmas=[0.0])
    stage["transform"].update(variance_for_update_field=1.0, variance_for_total_field=0.0)
    stage["optimizer"].update(number_of_iterations=5, convergence_minimum_value=1e-300)
    recipe = _symmetric(_recipe(2).model_validate(data), gradient_step=0.05)
    largest = float(np.linalg.norm(_stage_field(register(recipe, pair).transform), axis=-1).max())
    one_side = 5 * 0.05 * 2  # 5 updates of 0.05 voxels of the shrink-2 level
    assert one_side < largest <= 2 * one_side * 1.05


def test_a_symmetric_field_stops_on_time() -> None:
    from autoreg.registration import RegistrationFailed

    pair = pair_data(synthetic_pair(2, "bspline"))
    data = _recipe(2).model_dump()
    data["stages"][1]["optimizer"].update(number_of_iterations=100000, convergence_window_size=10**6)
    recipe = _symmetric(_recipe(2).model_validate(data))
    with pytest.raises(RegistrationFailed, match="time limit"):
        register(recipe, pair, time_limit=2.0)


@pytest.mark.parametrize("way", ["symmetric", "one-sided"])
def test_a_default_field_improves_the_landmarks_affine_on_a_real_histology_pair(
    way: str, shared_data: Path, tmp_path: Path
) -> None:
    """cd31 (2D histology, two stains), started from the least-squares affine of its landmarks: ANTs SyN's defaults
    moved by SyN's own scheme, or by ITK's descent with composed levels and a smoothed total (a study's two default
    field points), bring the landmarks closer than the best affine can, without folding (ANTs' one-sided field,
    continued and unsmoothed, folded 1.0 % of the voxels here)."""
    import dataclasses

    from conftest import real_pair_yaml

    from autoreg.config import load_config
    from autoreg.data import load_pair
    from autoreg.recipe import Initializer, Recipe, ants_syn_stage, default_field_stage

    folder = shared_data / "cima_lunglesion3_he_cd31"
    config = load_config(real_pair_yaml(folder, tmp_path / "PAIR.yaml", name="cd31", stages=["rigid"]))
    pair = load_pair(config.pairs[0])
    f, m = pair.fixed_points, pair.moving_points
    coef, *_ = np.linalg.lstsq(np.hstack([f, np.ones((len(f), 1))]), m, rcond=None)
    affine = sitk.AffineTransform(2)
    affine.SetMatrix(coef[:2].T.ravel().tolist())
    affine.SetTranslation(coef[2].tolist())
    background = float(np.median(sitk.GetArrayViewFromImage(pair.moving)[0]))
    warped = sitk.Resample(pair.moving, pair.fixed, affine, sitk.sitkLinear, background, sitk.sitkFloat32)
    on_affine = dataclasses.replace(pair, moving=warped, fixed_mask=None, moving_mask=None)
    stage = ants_syn_stage(2) if way == "symmetric" else default_field_stage(2)
    recipe = Recipe(initializer=Initializer(kind="none"), stages=(stage,), threads=1)
    field = register(recipe, on_affine).transform

    def mean(tx) -> float:
        return float(np.linalg.norm(transform_points(affine, transform_points(tx, f)) - m, axis=1).mean())

    start = mean(sitk.Transform(2, sitk.sitkIdentity))
    assert mean(field) < 0.95 * start
    assert folding_fraction(field, pair.fixed) <= 0.001


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_field_whose_points_cover_its_level_samples_every_voxel(symmetric: bool) -> None:
    """Points for every voxel of a field's level are dense sampling (ITK's regular sampling would jitter them and
    leave the per-voxel gradient gapped): the same field as ``strategy: none``."""
    pair = pair_data(synthetic_pair(2, "bspline"))
    recipe = _symmetric(_recipe(2)) if symmetric else _recipe(2)
    fields = {}
    for strategy, points in (("none", None), ("regular", 64 * 64), ("regular", 500)):
        data = recipe.model_dump()
        data["stages"][1]["sampling"] = {"strategy": strategy, "points": points}
        fields[(strategy, points)] = _stage_field(register(recipe.model_validate(data), pair).transform)
    np.testing.assert_array_equal(fields[("regular", 64 * 64)], fields[("none", None)])
    assert not np.array_equal(fields[("regular", 500)], fields[("none", None)])
