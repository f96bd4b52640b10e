"""Image input checked at load time: degenerate images and masks placed by their physical geometry; a recipe
checked against the data it is applied to, and apply's progress. Through ``autoreg.cli.main`` in-process, except
where the point is a real process (no hang)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import quick_recipe

from autoreg import cli
from autoreg.config import load_config
from autoreg.data import _load_pair_cached, check_recipe_fits, load_images, load_pair, place_mask
from autoreg.errors import UserError
from autoreg.recipe import save_recipe
from autoreg.registration import register
from autoreg.scoring import transform_points

#: Every command must refuse a degenerate image well within this (the old code hung for ever in the initializer).
FAST_S = 10.0


def _edit(path: Path, **changes: Any) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _assert_one_line(result, code: int, *fragments: str) -> str:
    assert result.code == code, (result.code, result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("autoreg: error: ") and "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- degenerate images ------------------------------------------------------------------------------------------


def _degenerate(kind: str, like: Path, path: Path) -> Path:
    """``like``'s voxels (float32) with one NaN / one +Inf voxel at index (10, 12), or all 0, or all 7."""
    image = sitk.Cast(sitk.ReadImage(str(like)), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(image)
    if kind == "nan":
        a[12, 10] = np.nan
    elif kind == "inf":
        a[12, 10] = np.inf
    elif kind == "zero":
        a[:] = 0
    elif kind == "constant":
        a[:] = 7
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))  # .mha: NIfTI's reader turns NaN into 0
    return path


DEGENERATE = {
    "nan": "1 NaN or infinite voxel (the first at index (10, 12))",
    "inf": "1 NaN or infinite voxel (the first at index (10, 12))",
    "zero": "is constant (every voxel is 0)",
    "constant": "is constant (every voxel is 7)",
}


@pytest.fixture
def degenerate_setup(tmp_path: Path, pair_yaml):
    """(PAIR.yaml, its folder, a recipe file) of a 2D synthetic pair; images made degenerate by ``_degenerate``."""
    path = pair_yaml(stages=["rigid"])
    recipe = tmp_path / "RECIPE.yaml"
    save_recipe(quick_recipe(["rigid"], 2, iterations=10), recipe)
    return path, path.parent, recipe


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_pair_yaml_commands_refuse_a_degenerate_image(degenerate_setup, run_cli, tmp_path, kind, which) -> None:
    path, folder, recipe = degenerate_setup
    bad = _degenerate(kind, folder / f"{which}.png", folder / f"bad_{which}.mha")
    _edit(path, **{which: bad.name})
    for argv in (
        ("check", path),
        ("tune", path, "--trials", "2", "--jobs", "1", "--study-dir", tmp_path / "study"),
        ("evaluate", recipe, path),
    ):
        t0 = time.monotonic()
        result = run_cli(*argv)
        assert time.monotonic() - t0 < FAST_S
        line = _assert_one_line(result, 2, str(path), f": {which}: ", str(bad), DEGENERATE[kind])
        assert "expected finite intensities" in line or "intensities that vary" in line


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_apply_refuses_a_degenerate_image(degenerate_setup, run_cli, tmp_path, kind, which) -> None:
    """The old code exited 0 with an identity transform on a NaN image."""
    _, folder, recipe = degenerate_setup
    images = {"fixed": folder / "fixed.png", "moving": folder / "moving.png"}
    images[which] = _degenerate(kind, images[which], tmp_path / f"bad_{which}.mha")
    tfm = tmp_path / "t.tfm"
    result = run_cli("apply", recipe, "--fixed", images["fixed"], "--moving", images["moving"], "--transform-out", tfm)
    _assert_one_line(result, 2, f"--{which}: ", str(images[which]), DEGENERATE[kind])
    assert not tfm.exists()


def test_a_nan_image_is_refused_by_a_real_process_within_seconds(degenerate_setup) -> None:
    """The old code spun in the moments initializer and ignored Ctrl-C: a real process, with a timeout."""
    path, folder, _ = degenerate_setup
    bad = _degenerate("nan", folder / "fixed.png", folder / "nan.mha")
    _edit(path, fixed=bad.name)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "autoreg.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "NaN or infinite" in proc.stderr and str(bad) in proc.stderr


def test_a_nearly_constant_image_is_accepted(pair_yaml, run_cli) -> None:
    """Constant means every voxel equal: one voxel of contrast is an image (check warns, it does not refuse)."""
    path = pair_yaml()
    folder = path.parent
    a = np.zeros((64, 64), np.float32)
    a[30:34, 30:34] = 100
    sitk.WriteImage(sitk.GetImageFromArray(a), str(folder / "dot.mha"))
    doc = yaml.safe_load(path.read_text())
    doc["fixed"] = "dot.mha"
    doc.pop("landmarks")
    path.write_text(yaml.safe_dump(doc))
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "fixed image is nearly constant" in result.out


def test_empty_mask_in_apply(degenerate_setup, run_cli, tmp_path) -> None:
    _, folder, recipe = degenerate_setup
    empty = tmp_path / "empty.png"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkUInt8), str(empty))
    result = run_cli(
        "apply",
        recipe,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--moving-mask",
        empty,
    )
    _assert_one_line(result, 2, "--moving-mask: ", str(empty), "is empty")


# --- masks placed by their physical geometry --------------------------------------------------------------------


def _box_mask(path: Path, size: tuple[int, int], origin: tuple[float, float], spacing: float = 1.0) -> Path:
    """A mask full of ones with its own grid (written as NRRD, which keeps the origin and spacing)."""
    mask = sitk.Image(size, sitk.sitkUInt8) + 1
    mask.SetOrigin(origin)
    mask.SetSpacing((spacing, spacing))
    sitk.WriteImage(mask, str(path))
    return path


def test_a_cropped_mask_lands_where_its_geometry_says(pair_yaml, run_cli) -> None:
    """A 20 x 20 mask at (10, 12) mm on the 64 x 64 image (spacing 1, origin 0): refused by the old code."""
    path = pair_yaml()
    _box_mask(path.parent / "crop.nrrd", (20, 20), (10.0, 12.0))
    _edit(path, masks={"fixed": "crop.nrrd"})
    pair = load_pair(load_config(path).pairs[0])
    assert pair.fixed_mask.GetSize() == pair.fixed.GetSize() == (64, 64)
    assert pair.fixed_mask.GetPixelID() == sitk.sitkUInt8
    expected = np.zeros((64, 64), np.uint8)
    expected[12:32, 10:30] = 1  # numpy is (y, x)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(pair.fixed_mask), expected)
    assert pair.fixed_mask_coverage.of_image == pytest.approx(400 / 4096)
    assert pair.fixed_mask_coverage.inside_image == 1.0
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "fixed mask: covers 9.8% of the fixed image's voxels; 100.0% of the mask lies inside the image" in result.out
    assert "warning: only" not in result.out


def test_a_coarser_mask_is_resampled_onto_the_image_grid(pair_yaml) -> None:
    """A 32 x 32 mask of 2 mm voxels covering the same 64 mm: every image voxel inside it."""
    path = pair_yaml()
    _box_mask(path.parent / "coarse.nrrd", (32, 32), (0.5, 0.5), spacing=2.0)
    _edit(path, masks={"moving": "coarse.nrrd"})
    pair = load_pair(load_config(path).pairs[0])
    assert pair.moving_mask.GetSize() == pair.moving.GetSize() == (68, 64)
    a = sitk.GetArrayViewFromImage(pair.moving_mask)
    assert a[:, :64].all() and not a[:, 64:].any()  # the moving image is 68 wide: 4 columns lie beyond the mask


def test_a_mask_half_outside_is_accepted_with_a_warning(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    _box_mask(path.parent / "half.nrrd", (64, 64), (32.0, 0.0))
    _edit(path, masks={"fixed": "half.nrrd"})
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "fixed mask: covers 50.0% of the fixed image's voxels; 50.0% of the mask lies inside the image" in result.out
    assert "warning: only 50% of the fixed mask lies inside the fixed image" in result.out


def test_a_mask_with_a_wrong_origin_is_refused(pair_yaml, run_cli) -> None:
    """Same size as its image, origin 1000 mm off: the old code overwrote the geometry and accepted it silently."""
    path = pair_yaml()
    _box_mask(path.parent / "off.nrrd", (64, 64), (1000.0, 0.0))
    _edit(path, masks={"fixed": "off.nrrd"})
    _assert_one_line(
        run_cli("check", path),
        2,
        str(path),
        ": masks.fixed: ",
        "lies outside its image",
        "mask spans [999.5, 1064] x [-0.5, 63.5]",
        "check the mask's origin",
    )


def test_a_mask_of_another_dimension_is_refused(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    sitk.WriteImage(sitk.Image((8, 8, 8), sitk.sitkUInt8) + 1, str(path.parent / "m3.nrrd"))
    _edit(path, masks={"moving": "m3.nrrd"})
    _assert_one_line(run_cli("check", path), 2, ": masks.moving: ", "is 3D but its image is 2D")


def test_a_mask_thinner_than_a_voxel_is_refused() -> None:
    image = sitk.Image(16, 16, sitk.sitkFloat32)
    mask = sitk.Image(1, 1, sitk.sitkUInt8) + 1
    mask.SetSpacing((0.1, 0.1))
    mask.SetOrigin((4.45, 4.45))  # a 0.1 mm square between voxel centres (4, 4) and (5, 5)
    with pytest.raises(UserError, match="covers no voxel centre"):
        place_mask(mask, image, what="dot")


def test_apply_reads_masks_as_tune_does(pair_yaml, run_cli, tmp_path) -> None:
    """apply --fixed-mask/--moving-mask and PAIR.yaml masks go through one function: same masks, same transform."""
    path = pair_yaml(transform="affine", stages=["affine"])
    folder = path.parent
    _box_mask(folder / "fm.nrrd", (40, 40), (12.0, 12.0))
    _box_mask(folder / "mm.nrrd", (44, 40), (12.0, 12.0))
    _edit(path, masks={"fixed": "fm.nrrd", "moving": "mm.nrrd"})
    pair = load_pair(load_config(path).pairs[0])
    applied = load_images(folder / "fixed.png", folder / "moving.png", folder / "fm.nrrd", folder / "mm.nrrd")
    for a, b in ((pair.fixed_mask, applied.fixed_mask), (pair.moving_mask, applied.moving_mask)):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    recipe = quick_recipe(["affine"], 2, iterations=50, deterministic=True)
    recipe_path = tmp_path / "RECIPE.yaml"
    save_recipe(recipe, recipe_path)
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
        folder / "fm.nrrd",
        "--moving-mask",
        folder / "mm.nrrd",
    )
    assert result.code == 0, result.err
    back = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    in_process = register(recipe, pair).transform
    np.testing.assert_allclose(
        transform_points(back, pair.fixed_points), transform_points(in_process, pair.fixed_points), atol=1e-6
    )


# --- a recipe checked against the data it is applied to -------------------------------------------------------


def _provenance(dim: int, size: tuple[int, ...], spacing: tuple[float, ...]) -> dict:
    """The part of an exported recipe's provenance that describes the data (what ``fingerprint.provenance`` writes)."""
    entry = {"file": "f", "sha256": "0", "size": list(size), "spacing": list(spacing)}
    return {"study": "s", "fingerprint": {"dim": dim, "pairs": [{"name": "p", "fixed": entry, "moving": entry}]}}


def test_apply_refuses_a_recipe_tuned_in_another_dimension(pair_yaml, run_cli, tmp_path) -> None:
    """A 2D recipe on a 3D pair: the old code ran it (minutes on a real volume) without a word."""
    folder = pair_yaml(dim=3, stages=["rigid"]).parent
    recipe = tmp_path / "R2.yaml"
    save_recipe(quick_recipe(["rigid"], 2).with_(provenance=_provenance(2, (64, 64), (1.0, 1.0))), recipe)
    t0 = time.monotonic()
    result = run_cli(
        "apply",
        recipe,
        "--fixed",
        folder / "fixed.nii.gz",
        "--moving",
        folder / "moving.nii.gz",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    assert time.monotonic() - t0 < FAST_S
    _assert_one_line(result, 2, f"{recipe}: provenance.fingerprint.dim: ", "tuned on 2D images", "is 3D")
    assert not (tmp_path / "t.tfm").exists()


def test_evaluate_refuses_a_recipe_tuned_in_another_dimension(pair_yaml, run_cli, tmp_path) -> None:
    path = pair_yaml(dim=3, stages=["rigid"])
    recipe = tmp_path / "R2.yaml"
    save_recipe(quick_recipe(["rigid"], 2).with_(provenance=_provenance(2, (64, 64), (1.0, 1.0))), recipe)
    _assert_one_line(run_cli("evaluate", recipe, path), 2, "provenance.fingerprint.dim", "tuned on 2D images")


def test_apply_refuses_a_bspline_mesh_of_another_length(pair_yaml, run_cli, tmp_path) -> None:
    """No provenance at all: the stage's own mesh_size gives the dimension away."""
    folder = pair_yaml(dim=3, stages=["rigid"]).parent
    recipe = tmp_path / "B2.yaml"
    save_recipe(quick_recipe(["rigid", "bspline"], 2), recipe)
    result = run_cli(
        "apply",
        recipe,
        "--fixed",
        folder / "fixed.nii.gz",
        "--moving",
        folder / "moving.nii.gz",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    _assert_one_line(result, 2, "stages[1].transform.mesh_size", "mesh_size has 2 entries", "is 3D")


def _respaced(src: Path, dst: Path, spacing: float) -> Path:
    image = sitk.ReadImage(str(src))
    image.SetSpacing((spacing,) * image.GetDimension())
    sitk.WriteImage(image, str(dst))
    return dst


def test_apply_warns_once_when_the_spacing_is_far_from_the_tuned_data(pair_yaml, run_cli, tmp_path) -> None:
    folder = pair_yaml(stages=["rigid"]).parent
    fixed = _respaced(folder / "fixed.png", tmp_path / "fixed.mha", 0.2)
    moving = _respaced(folder / "moving.png", tmp_path / "moving.mha", 0.2)
    recipe = tmp_path / "R.yaml"
    save_recipe(
        quick_recipe(["rigid"], 2, iterations=10).with_(provenance=_provenance(2, (64, 64), (1.0, 1.0))), recipe
    )
    result = run_cli("apply", recipe, "--fixed", fixed, "--moving", moving, "--transform-out", tmp_path / "t.tfm")
    assert result.code == 0, result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith(f"autoreg: warning: {recipe}: {fixed} (spacing 0.2x0.2, size 64x64) differs more than 4x")
    assert "nearest: spacing 1x1, size 64x64" in line
    # the same recipe on data like its own: no warning
    result = run_cli(
        "apply",
        recipe,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
    )
    assert result.code == 0 and result.err == "", result.err


def test_fit_ratio_counts_spacing_and_size_on_every_axis(pair_yaml) -> None:
    folder = pair_yaml().parent
    pair = load_images(folder / "fixed.png", folder / "moving.png")  # 64 x 64, spacing 1
    recipe = quick_recipe(["rigid"], 2)
    assert check_recipe_fits(recipe, [pair], source="r") == []  # no provenance: nothing to compare with
    assert check_recipe_fits(recipe.with_(provenance=_provenance(2, (64, 250), (1, 1))), [pair], source="r") == []
    assert len(check_recipe_fits(recipe.with_(provenance=_provenance(2, (64, 260), (1, 1))), [pair], source="r")) == 1
    assert len(check_recipe_fits(recipe.with_(provenance=_provenance(2, (64, 64), (1, 4.5))), [pair], source="r")) == 1
    odd = {"fingerprint": {"dim": "two", "pairs": [{"fixed": {"size": "x"}}, 3]}}  # unreadable: ignored, no crash
    assert check_recipe_fits(recipe.with_(provenance=odd), [pair], source="r") == []


def test_apply_shows_a_line_per_level_once_it_runs_long(pair_yaml, run_cli, tmp_path, monkeypatch) -> None:
    folder = pair_yaml(stages=["rigid"]).parent
    recipe = tmp_path / "R.yaml"
    save_recipe(quick_recipe(["rigid", "affine"], 2, iterations=10), recipe)
    argv = (
        "apply",
        recipe,
        "--fixed",
        folder / "fixed.png",
        "--moving",
        folder / "moving.png",
        "--transform-out",
        tmp_path / "t.tfm",
        "--fixed-landmarks",
        folder / "fixed_landmarks.csv",
        "--moving-landmarks",
        folder / "moving_landmarks.csv",
    )
    quiet = run_cli(*argv)  # well under APPLY_PROGRESS_AFTER_S: no progress lines
    assert quiet.code == 0 and "registering" not in quiet.out and "level 1" not in quiet.out
    monkeypatch.setattr(cli, "APPLY_PROGRESS_AFTER_S", 0.0)
    result = run_cli(*argv)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "registering (rigid -> affine); a line per pyramid level as it ends:"
    levels = [line for line in lines if "iterations, metric" in line]
    assert [line.split(":")[0].strip() for line in levels] == [
        "stage 0 (rigid) level 1 (shrink 2)",
        "stage 0 (rigid) level 2 (shrink 1)",
        "stage 1 (affine) level 1 (shrink 2)",
        "stage 1 (affine) level 2 (shrink 1)",
    ]
    assert all(", TRE " in line for line in levels)
    assert lines.index(levels[-1]) < next(i for i, line in enumerate(lines) if line.startswith("registered in"))


def test_check_says_when_the_headers_align_the_images_better_than_centring(pair_yaml, run_cli) -> None:
    """A moving image cut out of the fixed one where it lies (one scanner's CT and a smaller PET field of view):
    centring their grids or masses moves them apart, and ``check`` names the initializers that keep them."""
    path = pair_yaml(dim=3, transform="translation", stages=("affine",), size=(48, 48, 48))
    folder = path.parent
    doc = yaml.safe_load(path.read_text())
    fixed = sitk.ReadImage(str(folder / doc["fixed"]))
    sitk.WriteImage(sitk.RegionOfInterest(fixed, [24, 24, 24], [20, 20, 20]), str(folder / doc["moving"]))
    inside = [fixed.TransformIndexToPhysicalPoint((i, j, k)) for i in (24, 32, 40) for j in (24, 40) for k in (24, 40)]
    for key in ("fixed", "moving"):  # the same points: as the headers place them, the images are aligned
        np.savetxt(folder / doc["landmarks"][key], inside, delimiter=",", header="x,y,z", comments="")
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "warning: the headers align the images better than centring them (TRE 0 as they are," in result.out
    assert "initializer.kind none or best starts where the headers put them" in result.out
    overlap = re.search(r"as the headers place them (\d+)%", result.out)
    assert overlap and 0 < int(overlap[1]) < 50, result.out  # the fixed image's share inside the smaller moving one
    # the synthetic pair as made: centred grids are as good as the headers, no warning
    plain = pair_yaml(dim=3, transform="translation", stages=("affine",), size=(48, 48, 48), folder="plain")
    assert "the headers align" not in run_cli("check", plain).out


def test_landmark_files_of_different_lengths_are_both_named(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    fixed_csv = path.parent / yaml.safe_load(path.read_text())["landmarks"]["fixed"]
    rows = fixed_csv.read_text().splitlines()
    fixed_csv.write_text("\n".join(rows[:-1]) + "\n")  # one point short
    result = run_cli("check", path)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    n = len(rows) - 1
    assert f"landmarks.moving: {path.parent / 'moving_landmarks.csv'} has {n} points but landmarks.fixed" in result.err
    assert f"({fixed_csv}) has {n - 1}; row i of one must be the same point as row i of the other" in result.err


def test_3d_landmarks_on_a_one_slice_volume_are_its_2d_points(pair_yaml, run_cli, tmp_path) -> None:
    """A 2D pair saved as volumes one slice thick at z = 5 mm (a single DICOM file, a 2D NIfTI): its landmarks, placed
    in 3D (3D Slicer's), lie on that plane and are read as the slice's 2D points; a point off the slice is refused."""
    path = pair_yaml(stages=["rigid"])
    folder = path.parent
    doc = yaml.safe_load(path.read_text())
    for which in ("fixed", "moving"):
        image = sitk.JoinSeries(sitk.ReadImage(str(folder / doc[which])))  # 64 x 64 x 1
        image.SetSpacing((1.0, 1.0, 3.0))
        image.SetOrigin((0.0, 0.0, 5.0))
        sitk.WriteImage(image, str(folder / f"{which}.nii.gz"))
        points = np.loadtxt(folder / doc["landmarks"][which], delimiter=",", skiprows=1)
        flat = np.column_stack([points, np.full(len(points), 5.0)])
        np.savetxt(folder / f"{which}3d.csv", flat, delimiter=",", header="x,y,z", comments="")
    _edit(
        path, fixed="fixed.nii.gz", moving="moving.nii.gz", landmarks={"fixed": "fixed3d.csv", "moving": "moving3d.csv"}
    )
    pair = load_pair(load_config(path).pairs[0])
    assert pair.dim == 2 and pair.fixed_points.shape[1] == 2
    np.testing.assert_allclose(
        pair.fixed_points, np.loadtxt(folder / doc["landmarks"]["fixed"], delimiter=",", skiprows=1)
    )
    assert run_cli("check", path).code == 0
    off = np.loadtxt(folder / "moving3d.csv", delimiter=",", skiprows=1)
    off[2, 2] = 9.0  # 4 mm off a slice 3 mm thick
    np.savetxt(folder / "moving3d.csv", off, delimiter=",", header="x,y,z", comments="")
    _load_pair_cached.cache_clear()  # the same spec, a changed file
    result = run_cli("check", path)
    assert result.code == 2 and "point 3 has z = 9, off the image's one slice at z = 5 (3 thick)" in result.err
