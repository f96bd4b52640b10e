"""The engine on real SimpleITK registrations of small synthetic pairs (and one real pair when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import pair_data, quick_recipe, synthetic_pair

from autoreg.config import PairSpec
from autoreg.data import load_pair
from autoreg.errors import RegistrationFailed, RegistrationPruned
from autoreg.recipe import BSplineTransform, default_recipe
from autoreg.registration import LevelRecord, register
from autoreg.scoring import has_deformable, transform_points, tre

IDENTITY = {2: sitk.Transform(2, sitk.sitkIdentity), 3: sitk.Transform(3, sitk.sitkIdentity)}


def _tre(tx: sitk.Transform, pair) -> float:
    return tre(tx, pair.fixed_points, pair.moving_points, pair.fixed).mean


def _parameters(tx: sitk.Transform) -> np.ndarray:
    """Every parameter (and fixed parameter) of a transform, composite or not, as one array."""
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        return np.concatenate([_parameters(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())])
    return np.concatenate([np.asarray(tx.GetParameters()), np.asarray(tx.GetFixedParameters())])


# --- (a), (b): good recipes register ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_2d_linear_reaches_subpixel_tre(kind: str) -> None:
    pair = pair_data(synthetic_pair(2, kind))
    before = _tre(IDENTITY[2], pair)
    result = register(quick_recipe([kind], 2), pair)
    after = _tre(result.transform, pair)
    assert before > 3.0
    assert after < 1.0, f"TRE {before:.3f} -> {after:.3f} px"
    assert result.seconds > 0 and len(result.stop_conditions) == 1


def test_2d_with_random_sampling_reaches_subpixel_tre() -> None:
    pair = pair_data(synthetic_pair(2, "rigid"))
    result = register(quick_recipe(["rigid"], 2, strategy="random", percentage=0.2, deterministic=True), pair)
    assert _tre(result.transform, pair) < 1.0


def test_3d_affine_reduces_tre() -> None:
    pair = pair_data(synthetic_pair(3, "affine"))
    before = _tre(IDENTITY[3], pair)
    recipe = quick_recipe(["affine"], 3, strategy="random", percentage=0.2, iterations=200, learning_rate=1.0)
    after = _tre(register(recipe, pair).transform, pair)
    assert after < 0.3 * before and after < 1.0, f"TRE {before:.3f} -> {after:.3f} voxels"


# --- (c) composite transforms survive a .tfm file ---------------------------------------------------------------


@pytest.mark.parametrize("spacing", [1.0, 0.7])
def test_affine_bspline_composite_round_trips_through_tfm(tmp_path: Path, spacing: float) -> None:
    pair = pair_data(synthetic_pair(2, "bspline"), spacing=spacing)
    result = register(quick_recipe(["affine", "bspline"], 2), pair)
    tx = result.transform
    assert tx.GetName() == "CompositeTransform"
    comp = sitk.CompositeTransform(tx)
    assert comp.GetNumberOfTransforms() == 2 and has_deformable(tx)
    assert {comp.GetNthTransform(i).GetName() for i in range(2)} == {"AffineTransform", "BSplineTransform"}
    assert _tre(tx, pair) < 0.5 * _tre(IDENTITY[2], pair)

    path = tmp_path / "composite.tfm"
    sitk.WriteTransform(tx, str(path))
    back = sitk.ReadTransform(str(path))
    rng = np.random.default_rng(0)
    extent = np.asarray(pair.fixed.GetSize()) * spacing
    points = np.vstack([pair.fixed_points, rng.uniform(0, extent, size=(50, 2))])
    np.testing.assert_allclose(transform_points(back, points), transform_points(tx, points), rtol=0, atol=1e-6)


def _refining(mesh: int, levels: tuple[int, ...], optimizer: str = "gradient_descent"):
    from autoreg.recipe import Pyramid

    recipe = quick_recipe(["affine", "bspline"], 2, mesh=mesh, deterministic=True)
    data = recipe.model_dump()
    data["stages"][1].update(
        transform=BSplineTransform(mesh_size=(mesh, mesh), refine=True).model_dump(),
        optimizer={"kind": optimizer, "number_of_iterations": 40},
        pyramid=Pyramid(shrink_factors=levels, smoothing_sigmas=(0.0,) * len(levels), sigma_units="voxel").model_dump(),
    )
    if optimizer == "gradient_descent":
        data["stages"][1]["optimizer"].update(estimate_learning_rate="once", scales="physical_shift")
    return recipe.model_validate(data)


def test_bspline_grid_refinement_starts_coarse_and_ends_on_the_stage_grid() -> None:
    pair = pair_data(synthetic_pair(2, "bspline"))
    levels: list[LevelRecord] = []
    result = register(_refining(8, (4, 2, 1)), pair, level_callback=lambda rec, get_tx: levels.append((rec, get_tx())))
    bspline = sitk.CompositeTransform(result.transform).GetNthTransform(1)
    assert bspline.GetName() == "BSplineTransform"
    assert sitk.BSplineTransform(bspline).GetTransformDomainMeshSize() == (8, 8)  # 2 cells, doubled twice
    meshes = [
        sitk.BSplineTransform(sitk.CompositeTransform(tx).GetNthTransform(1)).GetTransformDomainMeshSize()
        for rec, tx in levels
        if rec.stage == 1
    ]
    assert meshes == [(2, 2), (4, 4), (8, 8)]  # each level's record sees that level's grid
    # one thread: the same numbers every run; the coarse 2x2 grid overshoots, the finer levels recover
    assert [rec.tre_mean for rec, _ in levels if rec.stage == 1][-1] < 0.5 * _tre(IDENTITY[2], pair)


def test_bspline_refinement_is_refused_with_lbfgsb() -> None:
    with pytest.raises(ValueError, match="refine needs a gradient-descent optimizer, not lbfgsb"):
        _refining(8, (2, 1), optimizer="lbfgsb")


# --- (d) determinism --------------------------------------------------------------------------------------------


def test_deterministic_random_sampling_is_bit_identical() -> None:
    pair = pair_data(synthetic_pair(2, "affine"))
    recipe = quick_recipe(["rigid", "affine"], 2, strategy="random", percentage=0.2, iterations=60, deterministic=True)
    first = _parameters(register(recipe, pair).transform)
    second = _parameters(register(recipe, pair).transform)
    np.testing.assert_array_equal(first, second)
    assert np.array_equal(_parameters(register(recipe, pair, seed=recipe.seed).transform), first)

    other_seed = _parameters(register(recipe.with_(seed=12345), pair).transform)
    assert not np.array_equal(first, other_seed)
    overridden = _parameters(register(recipe, pair, seed=12345).transform)
    np.testing.assert_array_equal(overridden, other_seed)


def test_deterministic_run_restores_the_global_thread_count() -> None:
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    recipe = quick_recipe(["rigid"], 2, iterations=10, deterministic=True)
    register(recipe, pair_data(synthetic_pair(2, "rigid")))
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


# --- (e) one record per level -----------------------------------------------------------------------------------


def _mixed_pyramid_recipe():
    """Rigid on a 3-level pyramid, then BSpline on a 2-level one."""
    recipe = quick_recipe(["rigid", "bspline"], 2, iterations=40, bspline_iterations=10)
    rigid, bspline = recipe.stages
    rigid = rigid.model_copy(
        update={
            "pyramid": rigid.pyramid.model_copy(
                update={"shrink_factors": (4, 2, 1), "smoothing_sigmas": (2.0, 1.0, 0.0)}
            )
        }
    )
    return recipe.with_(stages=[rigid.model_dump(), bspline.model_dump()])


@pytest.mark.parametrize("spacing", [1.0, 0.5])
def test_one_level_record_per_level_and_stage(spacing: float) -> None:
    pair = pair_data(synthetic_pair(2, "bspline"), spacing=spacing)
    seen: list[LevelRecord] = []
    result = register(_mixed_pyramid_recipe(), pair, level_callback=lambda rec, _transform: seen.append(rec))
    records = result.levels
    assert [(r.stage, r.level) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [r.transform for r in records] == ["rigid"] * 3 + ["bspline"] * 2
    assert [r.shrink for r in records] == [4, 2, 1, 2, 1]
    assert [r.sigma for r in records] == [2.0, 1.0, 0.0, 1.0, 0.0]
    for r in records:
        assert r.iterations > 0, r
        assert r.seconds >= 0
        assert r.tre_mean is not None and np.isfinite(r.tre_mean)
        assert np.isfinite(r.metric_value)
    for i, r in enumerate(records):
        if i in (2, 4):  # the last level of each stage
            assert r.stop_condition, r
        else:
            assert r.stop_condition is None, r
    assert [r.stop_condition for r in records if r.stop_condition] == result.stop_conditions
    assert seen == records  # the callback saw the same records, in order
    # TRE is in the data's physical units: the last record is the final transform's TRE
    assert records[-1].tre_mean == pytest.approx(_tre(result.transform, pair), rel=1e-6)
    assert records[0].as_dict()["stage"] == 0


@pytest.mark.parametrize(
    "spacing",
    [1.0, 0.5],
)
def test_level_callback_transform_matches_the_record(spacing: float) -> None:
    """The getter passed to the callback is the whole transform so far, in the data's physical frame."""
    pair = pair_data(synthetic_pair(2, "bspline"), spacing=spacing)
    seen: list[tuple[LevelRecord, float]] = []

    def callback(rec: LevelRecord, transform_so_far) -> None:
        seen.append((rec, _tre(transform_so_far(), pair)))

    result = register(_mixed_pyramid_recipe(), pair, level_callback=callback)
    assert [rec for rec, _ in seen] == result.levels
    for rec, callback_tre in seen:
        assert callback_tre == pytest.approx(rec.tre_mean, rel=1e-6)


def test_records_without_landmarks_have_no_tre() -> None:
    pair = pair_data(synthetic_pair(2, "rigid"), landmarks=False)
    result = register(quick_recipe(["rigid"], 2, iterations=20), pair)
    assert len(result.levels) == 2
    assert all(r.tre_mean is None for r in result.levels)


# --- (f) pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune_at", [0, 1, 2, 3], ids=lambda i: f"record{i}")
def test_level_callback_can_prune(prune_at: int) -> None:
    """Raising RegistrationPruned at any level record (inside ITK's Execute or after the last level) stops the run."""
    pair = pair_data(synthetic_pair(2, "affine"))
    recipe = quick_recipe(["rigid", "affine"], 2, iterations=30)
    calls: list[tuple[int, int]] = []

    def callback(rec: LevelRecord, _transform) -> None:
        calls.append((rec.stage, rec.level))
        if len(calls) == prune_at + 1:
            raise RegistrationPruned(rec.stage, rec.level)

    with pytest.raises(RegistrationPruned) as info:
        register(recipe, pair, level_callback=callback)
    expected = [(0, 0), (0, 1), (1, 0), (1, 1)][prune_at]
    assert (info.value.stage, info.value.level) == expected
    assert calls[-1] == expected and len(calls) == prune_at + 1


def test_pruning_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    pair = pair_data(synthetic_pair(2, "rigid"))

    def callback(rec: LevelRecord, _transform) -> None:
        raise RegistrationPruned(rec.stage, rec.level)

    with pytest.raises(RegistrationPruned):
        register(quick_recipe(["rigid"], 2, iterations=10), pair, level_callback=callback)
    # SimpleITK prints exceptions raised in its observers through sys.excepthook: pruning must stay silent
    assert "Traceback" not in capfd.readouterr().err


# --- (g) failures -----------------------------------------------------------------------------------------------


def _assert_short_reason(err: RegistrationFailed) -> None:
    reason = err.reason
    assert reason and "\n" not in reason and len(reason) <= 120, reason
    assert "ITK ERROR" not in reason and "Exception thrown" not in reason and ".hxx" not in reason, reason
    assert str(err).startswith(reason)


def test_default_recipe_fails_on_a_small_pair() -> None:
    """64x64 at shrink 4 is 256 voxels; 1 % random sampling leaves ~3 samples: the metric cannot work."""
    pair = pair_data(synthetic_pair(2, "affine"))
    with pytest.raises(RegistrationFailed) as info:
        register(default_recipe(["affine"], 2).with_(deterministic=True), pair)
    _assert_short_reason(info.value)
    assert "samples" in info.value.reason


def test_no_samples_at_all_fails_with_a_short_reason() -> None:
    pair = pair_data(synthetic_pair(2, "rigid", size=(32, 32)))
    with pytest.raises(RegistrationFailed) as info:
        register(default_recipe(["rigid"], 2), pair)
    _assert_short_reason(info.value)


def test_no_samples_at_all_is_grouped_with_too_few_samples() -> None:
    pair = pair_data(synthetic_pair(2, "rigid", size=(32, 32)))
    with pytest.raises(RegistrationFailed) as info:
        register(default_recipe(["rigid"], 2), pair)
    assert "samples" in info.value.reason


def test_bspline_mesh_of_the_wrong_dimension_fails() -> None:
    pair = pair_data(synthetic_pair(2, "bspline"))
    recipe = quick_recipe(["bspline"], 2, bspline_iterations=2)
    stage = recipe.stages[0].model_copy(update={"transform": BSplineTransform(mesh_size=(3, 3, 3))})
    with pytest.raises(RegistrationFailed) as info:
        register(recipe.with_(stages=[stage.model_dump()]), pair)
    _assert_short_reason(info.value)


# --- (h) spacing does not change what happens in voxels ---------------------------------------------------------

SPACINGS = (0.1, 1.0, 4.0, 10.0)


def _spacing_recipe(stages: list[str]):
    return quick_recipe(
        stages,
        3,
        strategy="regular",
        percentage=0.25,
        iterations=30,
        learning_rate=1.0,
        bspline_iterations=10,
        mesh=2,
        deterministic=True,
    )


def _voxel_tres(kind: str, recipe) -> list[float]:
    syn = synthetic_pair(3, kind)
    out = []
    for spacing in SPACINGS:
        pair = pair_data(syn, spacing=spacing)
        result = register(recipe, pair)
        out.append(tre(result.transform, pair.fixed_points, pair.moving_points, pair.fixed).mean_vox)
    before = tre(IDENTITY[3], syn.fixed_points, syn.moving_points, syn.fixed).mean_vox
    assert max(out) < before, (before, out)  # the registration did something
    return out


@pytest.mark.parametrize(
    "kind,stages",
    [("rigid", ["rigid"]), ("affine", ["affine"]), ("bspline", ["affine", "bspline"])],
    ids=["rigid", "affine", "affine-bspline"],
)
def test_voxel_tre_does_not_depend_on_spacing(kind: str, stages: list[str]) -> None:
    tres = _voxel_tres(kind, _spacing_recipe(stages))
    assert max(tres) <= 1.02 * min(tres), dict(zip(SPACINGS, tres))


def _bspline_of(tx: sitk.Transform) -> sitk.BSplineTransform:
    comp = sitk.CompositeTransform(tx)
    parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    return sitk.BSplineTransform(next(t for t in parts if t.GetName() == "BSplineTransform"))


@pytest.mark.parametrize("units", ["mm", "voxel"])
def test_control_point_spacing_units(units: str) -> None:
    """8 voxels is 8 voxels at any spacing; 8 mm is 8 / spacing voxels (16^3 grid: 2 cells, or 16 / (8 / s))."""
    recipe = quick_recipe(
        ["bspline"],
        3,
        strategy="random",
        percentage=0.1,
        shrink=(1,),
        sigmas=(0.0,),
        bspline_iterations=1,
        deterministic=True,
    )
    stage = recipe.stages[0].model_copy(
        update={"transform": BSplineTransform(control_point_spacing=8, spacing_units=units)}
    )
    recipe = recipe.with_(stages=[stage.model_dump()])
    meshes, expected = [], []
    for spacing in (0.5, 1.0, 4.0):
        tx = register(recipe, pair_data(synthetic_pair(3, "bspline", size=(16, 16, 16)), spacing=spacing)).transform
        meshes.append(_bspline_of(tx).GetTransformDomainMeshSize())
        cells = 2 if units == "voxel" else max(1, round(16 * spacing / 8))
        expected.append((cells,) * 3)
    assert meshes == expected


# --- (i) a real pair --------------------------------------------------------------------------------------------


def test_real_translation_pair_reaches_subpixel_tre(shared_data: Path) -> None:
    folder = shared_data / "itk_brain_pd_shift13x17"
    spec = PairSpec(
        name="itk_brain_pd",
        fixed=folder / "fixed.png",
        moving=folder / "moving.png",
        fixed_landmarks=folder / "fixed_landmarks.csv",
        moving_landmarks=folder / "moving_landmarks.csv",
        source=str(folder / "PAIR.yaml"),
    )
    pair = load_pair(spec)
    before = _tre(IDENTITY[2], pair)
    assert before == pytest.approx(21.40, abs=0.01)
    recipe = quick_recipe(["rigid"], 2, iterations=200, learning_rate=1.0)
    after = _tre(register(recipe, pair).transform, pair)
    assert after < 0.5, f"TRE {before:.2f} -> {after:.3f} px"


def _rotated_pair(angle_deg: float):
    """The synthetic fixed image and a copy rotated by ``angle_deg`` about its centre (and shifted): a pose that
    gradients from the identity cannot reach."""
    from autoreg.data import PairData

    base = synthetic_pair(2, "translation", size=(96, 96))
    fixed = base.fixed
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    truth = sitk.Euler2DTransform(centre, np.radians(angle_deg), (3.0, -2.0))
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear, 0.0)  # moving(T(x)) = fixed(x)
    moving_points = np.array([truth.TransformPoint(tuple(p)) for p in base.fixed_points])
    return PairData(pair_data(base).spec, fixed, moving, base.fixed_points, moving_points)


def test_rotation_search_recovers_a_large_rotation() -> None:
    from autoreg.recipe import Initializer, RotationSearch

    pair = _rotated_pair(100.0)
    plain = quick_recipe(["rigid"], 2, deterministic=True)
    searched = plain.with_(initializer=Initializer(rotation_search=RotationSearch(max_angle_deg=180, step_deg=15)))
    assert _tre(register(plain, pair).transform, pair) > 20.0
    assert _tre(register(searched, pair).transform, pair) < 0.5
