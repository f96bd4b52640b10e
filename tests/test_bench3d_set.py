"""The 3D benchmark set's conventions (benchmarks/make_3d_set.py), on a copy built from the MNI volume shrunk 4x."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "afids_mni152nlin6asym_colin27_t1"

pytestmark = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"{SOURCE} not present (needs ../shared/data)")

SHRINK = 4


@pytest.fixture(scope="module")
def gen():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import make_3d_set

    return make_3d_set


@pytest.fixture(scope="module")
def built(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("data3d")
    metas = gen.build(out, seed=0, shrink=SHRINK)
    return out, metas, {r["case"]: r for r in gen.check(out)}


def test_every_case_is_a_complete_pair_folder(gen, built):
    out, metas, _ = built
    assert set(metas) == set(gen.CASES)
    for name in gen.CASES:
        files = {p.name for p in (out / name).iterdir()}
        assert {
            "fixed.nii.gz",
            "moving.nii.gz",
            "fixed_landmarks.csv",
            "moving_landmarks.csv",
            "pair.yaml",
            "SOURCE.json",
            "SOURCE.txt",
        } <= files
        truth = {"afids": set(), "mmdef3d": {"ground_truth.h5"}}.get(name, {"ground_truth.tfm"})
        assert {f for f in files if f.startswith("ground_truth")} == truth, name
        assert (out / name / "fixed_landmarks.csv").read_text().startswith("x,y,z\n")


def test_ground_truth_has_zero_tre_and_identity_gives_the_initial_tre(gen, built):
    _, metas, rows = built
    for name in gen.CASES:
        row = rows[name]
        assert row["identity_matches_build"], name
        assert row["identity"]["mean"] == pytest.approx(metas[name]["initial_tre_mm"]["mean"])
        if name != "afids":
            assert row["ground_truth_tre"]["max"] < 1e-6, name
            assert row["n"] == gen.N_LANDMARKS
    assert rows["rot3d"]["identity"]["mean"] > 20  # a large rotation moves landmarks far
    assert rows["afids"]["identity"]["mean"] == pytest.approx(4.77, abs=0.01)  # its SOURCE.txt's figure


def test_images_agree_with_the_ground_truth_not_its_inverse(gen, built):
    _, _, rows = built
    for name in ("rot3d", "affine3d", "mmdef3d", "aniso3d"):
        row = rows[name]
        assert row["truth_is_best"], (name, row["mi_at_truth"], row["mi_others"])
    assert rows["rot3d"]["mi_others"]["T^-1 (the other convention)"] > rows["rot3d"]["mi_at_truth"] + 0.3


def test_check_catches_a_moving_image_made_with_the_wrong_convention(gen, built, tmp_path):
    out, _, _ = built
    import shutil

    case = tmp_path / "rot3d"
    shutil.copytree(out / "rot3d", case)
    fixed = sitk.ReadImage(str(case / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(case / "moving.nii.gz"))
    gt = sitk.ReadTransform(str(case / "ground_truth.tfm"))
    wrong = sitk.Resample(fixed, moving, gt, sitk.sitkLinear, 0.0)  # through T instead of T^-1
    sitk.WriteImage(wrong, str(case / "moving.nii.gz"))
    assert not gen.check_case(case)["truth_is_best"]


def test_parameters_lie_in_the_documented_ranges(gen, built):
    _, metas, rows = built
    rot = metas["rot3d"]["transform"]
    assert 30 <= rot["rotation_deg"] <= 45 and 10 <= np.linalg.norm(rot["t"]) <= 20
    assert min(abs(c) for c in rot["rotation_axis"]) >= 0.3  # oblique
    aff = metas["affine3d"]["transform"]
    assert all(0.9 <= s <= 1.15 for s in aff["scales"]) and 8 <= aff["rotation_deg"] <= 12
    assert max(aff["scales"]) - min(aff["scales"]) > 0.13  # anisotropic
    assert min(abs(v) for v in np.triu(aff["shear_upper"], 1)[np.triu_indices(3, 1)]) >= 0.04
    field = metas["mmdef3d"]["transform"]["field"]
    assert field["jacobian_min"] > 0.3  # no folding
    assert field["brain_displacement_mean_mm"] == pytest.approx(3.0) and field["brain_displacement_max_mm"] < 12
    assert rows["aniso3d"]["moving_spacing"][2] == pytest.approx(3 * rows["aniso3d"]["fixed_spacing"][2])


def test_same_seed_same_set_other_seed_other_set(gen, built, tmp_path):
    out, _, _ = built
    gen.build(tmp_path / "a", seed=0, shrink=SHRINK, only=["affine3d"])
    gen.build(tmp_path / "b", seed=1, shrink=SHRINK, only=["affine3d"])
    ref = (out / "affine3d" / "moving_landmarks.csv").read_text()
    assert (tmp_path / "a" / "affine3d" / "moving_landmarks.csv").read_text() == ref
    assert (tmp_path / "b" / "affine3d" / "moving_landmarks.csv").read_text() != ref
    same = json.loads((tmp_path / "a" / "affine3d" / "SOURCE.json").read_text())["transform"]
    assert same == json.loads((out / "affine3d" / "SOURCE.json").read_text())["transform"]
