"""``autoreg check`` and ``autoreg apply`` through ``autoreg.cli.main``, in-process."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import quick_recipe, real_pair_yaml

from autoreg.config import load_config
from autoreg.data import load_images, load_pair
from autoreg.recipe import default_recipe, save_recipe
from autoreg.registration import register
from autoreg.scoring import transform_points


def _assert_one_line_error(result, code: int, *fragments: str) -> str:
    assert result.code == code, (result.code, result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err_lines[0], result.err_lines[0]
    return result.err_lines[0]


# --- check ------------------------------------------------------------------------------------------------------


def _assert_fingerprint(out: str, fixed_size: str, moving_size: str) -> None:
    assert re.search(rf"fixed\s+size {fixed_size}\s+spacing ", out), out
    assert re.search(rf"moving\s+size {moving_size}\s+spacing ", out), out
    assert "overlap after initialization: geometry " in out
    assert "mean TRE before registration" in out
    assert "deepest pyramid: shrink" in out
    assert "the search may use:" in out
    assert out.rstrip().splitlines()[-1].startswith("ok (")


def test_check_prints_the_fingerprint_2d(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid", "affine"])
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert result.err == ""
    out = result.out
    _assert_fingerprint(out, "64x64", "68x64")
    assert "spacing 1x1" in out
    assert "stages: rigid -> affine; objective: TRE" in out
    assert "deepest pyramid: shrink 4" in out  # 64 voxels / 16
    assert "BSpline control points" not in out  # a linear study draws no grid
    assert "landmarks: 20;" in out
    # the TRE before registration is the identity's mean landmark distance
    pair = load_pair(load_config(path).pairs[0])
    identity = np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1).mean()
    assert f"{identity:.4g} (identity)" in out


def test_check_3d_without_landmarks(pair_yaml, run_cli) -> None:
    path = pair_yaml(dim=3, stages=["affine", "bspline"], landmarks=False)
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert re.search(r"fixed\s+size 32x32x32\s+spacing 1x1x1", result.out)
    assert "objective: holdout NMI" in result.out
    assert "landmarks: none" in result.out
    assert "deepest pyramid: shrink 2" in result.out
    assert "; BSpline control points every " in result.out


def test_check_names_the_per_axis_shrink_of_thick_slices(pair_yaml, run_cli) -> None:
    """48 x 48 x 6 voxels of 1 x 1 x 8 mm: the deepest level shrinks the thin axes only."""
    path = pair_yaml(dim=3, stages=["affine"], landmarks=False, size=(48, 48, 48))
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        image = sitk.ReadImage(str(path.parent / name))
        sitk.WriteImage(
            sitk.Resample(image, [48, 48, 6], sitk.Transform(), sitk.sitkLinear, (0.0, 0.0, 3.5), (1.0, 1.0, 8.0)),
            str(path.parent / name),
        )
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "deepest pyramid: shrink 3, per axis 3x3x1 (keeps >= 16 voxels on every axis it shrinks)" in result.out
    assert "is anisotropic (8.0:1); the search's levels shrink its coarse axes less" in result.out


def test_check_a_real_pair(shared_data: Path, tmp_path: Path, run_cli) -> None:
    folder = shared_data / "itk_brain_pd_shift13x17"
    path = real_pair_yaml(folder, tmp_path / "PAIR.yaml", name="itk_brain_pd", stages=["translation"])
    result = run_cli("check", path)
    assert result.code == 0, result.err
    _assert_fingerprint(result.out, "221x257", "221x257")
    assert "landmarks: 91;" in result.out
    assert "21.4 (identity)" in result.out
    assert "deepest pyramid: shrink 13" in result.out  # 221 // 16


# --- apply ------------------------------------------------------------------------------------------------------


@pytest.fixture
def applied(tmp_path: Path, pair_yaml, run_cli):
    """A deterministic affine recipe applied to a 2D synthetic pair through the CLI."""
    path = pair_yaml(transform="affine", stages=["affine"])
    folder = path.parent
    recipe = quick_recipe(["affine"], 2, iterations=100, deterministic=True)
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(recipe, recipe_path)
    tfm = tmp_path / "out.tfm"
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tfm,
        "--fixed-landmarks",
        folder / "fixed_landmarks.csv",
        "--moving-landmarks",
        folder / "moving_landmarks.csv",
    )
    return path, recipe, tfm, result


def test_apply_writes_a_transform_that_maps_like_register(applied) -> None:
    path, recipe, tfm, result = applied
    assert result.code == 0, result.err
    assert "written to" in result.out and "TRE mean" in result.out
    back = sitk.ReadTransform(str(tfm))
    pair = load_pair(load_config(path).pairs[0])
    in_process = register(recipe, pair).transform
    np.testing.assert_allclose(
        transform_points(back, pair.fixed_points), transform_points(in_process, pair.fixed_points), rtol=0, atol=1e-6
    )
    # and it registers: fixed landmarks land on the moving ones
    errors = np.linalg.norm(transform_points(back, pair.fixed_points) - pair.moving_points, axis=1)
    assert errors.mean() < 1.0


def test_apply_prints_tre_before_and_after(applied) -> None:
    *_, result = applied
    match = re.search(r"TRE mean ([\d.e+-]+) -> ([\d.e+-]+)", result.out)
    assert match, result.out
    before, after = map(float, match.groups())
    assert after < before


@pytest.mark.parametrize("suffix", [".nii.gz", ".png", ".mha"])
def test_apply_image_out_has_the_fixed_grid(tmp_path: Path, pair_yaml, run_cli, suffix: str) -> None:
    path = pair_yaml()
    folder = path.parent
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(quick_recipe(["rigid"], 2, iterations=30), recipe_path)
    warped = tmp_path / f"warped{suffix}"
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--image-out",
        warped,
    )
    assert result.code == 0, result.err
    image = sitk.ReadImage(str(warped))
    fixed = sitk.ReadImage(str(folder / "fixed.png"))
    assert image.GetSize() == fixed.GetSize() == (64, 64)  # the moving image is 68 x 64
    assert image.GetSpacing() == fixed.GetSpacing()
    if suffix == ".png":
        assert image.GetPixelID() == sitk.sitkUInt8
    assert np.asarray(sitk.GetArrayViewFromImage(image)).max() > 100  # the phantom, not an empty image


def test_apply_3d(tmp_path: Path, pair_yaml, run_cli) -> None:
    path = pair_yaml(dim=3, transform="affine", stages=["affine"])
    folder = path.parent
    recipe = quick_recipe(["affine"], 3, strategy="random", percentage=0.2, iterations=100, learning_rate=1.0)
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(recipe, recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.nii.gz",
        "--moving",
        folder / "moving.nii.gz",
        "--transform-out",
        tmp_path / "t.tfm",
        "--image-out",
        tmp_path / "w.nii.gz",
        "--threads",
        "1",
    )
    assert result.code == 0, result.err
    assert sitk.ReadTransform(str(tmp_path / "t.tfm")).GetDimension() == 3
    assert sitk.ReadImage(str(tmp_path / "w.nii.gz")).GetSize() == (32, 32, 32)


def test_apply_with_a_missing_recipe(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    missing = tmp_path / "no_recipe.yaml"
    result = run_cli(
        "apply",
        missing,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line_error(result, 2, str(missing))
    assert not (tmp_path / "t.tfm").exists()


def test_apply_with_a_bad_recipe(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    recipe_path = tmp_path / "RECIPE.yaml"
    recipe_path.write_text("stages:\n- transform: rigid\n  pyramid: {shrink_factors: [2, 1], smoothing_sigmas: [1]}\n")
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line_error(result, 2, str(recipe_path), "stages[0].pyramid")


def test_apply_with_a_binary_recipe(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    recipe_path = tmp_path / "RECIPE.yaml"
    recipe_path.write_bytes(b"\xff\xfe\x00\x01binary")
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line_error(result, 2, str(recipe_path))


def _far_mask(path: Path) -> Path:
    """A full 10 x 10 mask placed at (500, 500) mm: physically nowhere near the 64 x 64 images at the origin."""
    mask = sitk.Image(10, 10, sitk.sitkUInt8) + 1
    mask.SetOrigin((500.0, 500.0))
    sitk.WriteImage(mask, str(path))
    return path


def test_apply_with_a_moving_mask_that_misses_its_image(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    mask = _far_mask(tmp_path / "far_mask.nrrd")
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(quick_recipe(["rigid"], 2, iterations=5), recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--moving-mask",
        mask,
    )
    _assert_one_line_error(result, 2, "--moving-mask", "lies outside its image")


def test_apply_with_a_fixed_mask_that_misses_its_image(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    mask = _far_mask(tmp_path / "far_mask.nrrd")
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(quick_recipe(["rigid"], 2, iterations=5), recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--fixed-mask",
        mask,
    )
    _assert_one_line_error(result, 2, "--fixed-mask", "mask spans [499.5, 509.5] x [499.5, 509.5]")


def test_apply_with_a_missing_image(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(default_recipe(["rigid"], 2), recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "absent.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line_error(result, 2, "absent.png")


def test_apply_with_mismatched_landmarks(tmp_path: Path, pair_yaml, run_cli) -> None:
    folder = pair_yaml().parent
    short = tmp_path / "short.csv"
    short.write_text("\n".join((folder / "moving_landmarks.csv").read_text().splitlines()[:5]) + "\n")
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(quick_recipe(["rigid"], 2, iterations=5), recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--fixed-landmarks",
        folder / "fixed_landmarks.csv",
        "--moving-landmarks",
        short,
    )
    _assert_one_line_error(result, 2, "short.csv")


def test_apply_that_fails_exits_1_with_the_reason(tmp_path: Path, pair_yaml, run_cli) -> None:
    """The SimpleITK-notebooks default on a 64 x 64 pair: too few samples at shrink 4."""
    folder = pair_yaml(transform="affine", stages=["affine"]).parent
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(default_recipe(["affine"], 2).with_(deterministic=True), recipe_path)
    result = run_cli(
        "apply",
        recipe_path,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line_error(result, 1, "registration failed", "samples")


def test_apply_says_why_a_registration_failed_on_one_line(tmp_path: Path, pair_yaml, run_cli) -> None:
    """A step far too long for the pair steps the images apart: apply gives the reason and ITK's detail, one line."""
    from autoreg.recipe import GradientDescent

    folder = pair_yaml(stages=["rigid"]).parent
    base = quick_recipe(["rigid"], 2, shrink=(2, 1), sigmas=(1.0, 0.0))
    wild = GradientDescent(learning_rate=1e3, number_of_iterations=50, estimate_learning_rate="never", scales="none")
    recipe = base.model_copy(update={"stages": (base.stages[0].model_copy(update={"optimizer": wild}),)})
    save_recipe(recipe, tmp_path / "r.yaml")
    files = ["--fixed", folder / "fixed.png", "--moving", folder / "moving.png", "--transform-out", tmp_path / "t.tfm"]
    _assert_one_line_error(
        run_cli("apply", tmp_path / "r.yaml", *files),
        1,
        "registration failed: too few samples inside the moving image",
        "(All samples map outside moving image buffer. The images do not sufficiently overlap.",
    )


def test_load_images_reads_what_apply_reads(pair_yaml) -> None:
    folder = pair_yaml().parent
    pair = load_images(folder / "fixed.png", folder / "moving.png")
    assert pair.fixed.GetPixelID() == sitk.sitkFloat32 and pair.fixed_points is None
    assert pair.dim == 2


def test_tune_says_when_the_folding_limit_chose_the_best(capsys) -> None:
    import optuna
    from optuna.trial import TrialState, create_trial

    from autoreg import cli
    from autoreg.trial import FOLDING_CONSTRAINT, best_and_baseline, records

    class Result:  # what _folding_summary reads of a TuneResult
        def __init__(self, study: optuna.Study, limit: float) -> None:
            self.study = study
            self.config = type("C", (), {"objective": type("O", (), {"max_folding_percent": limit})()})()

    def study_of(*trials: tuple[float, float]) -> optuna.Study:
        study = optuna.create_study()
        for value, folding in trials:
            study.add_trial(
                create_trial(
                    state=TrialState.COMPLETE,
                    value=value,
                    user_attrs={"folding_fraction": folding},
                    constraints={FOLDING_CONSTRAINT: 100 * folding - 0.1},
                )
            )
        return study

    mixed = study_of((1.0, 0.01), (2.0, 0.0), (1.5, 0.02))
    best, _ = best_and_baseline(records(mixed))
    capsys.readouterr()
    cli._folding_summary(Result(mixed, 0.1), best)
    assert best.value == 2.0
    assert "2 trial(s) scored lower but fold more than 0.1 % of the voxels: not chosen" in capsys.readouterr().out
    folded = study_of((1.0, 0.01), (2.0, 0.03))
    best, _ = best_and_baseline(records(folded))
    cli._folding_summary(Result(folded, 0.1), best)
    assert "no trial stayed within objective.max_folding_percent (0.1 %): the best folds 1 %" in capsys.readouterr().out
