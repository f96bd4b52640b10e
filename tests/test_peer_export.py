"""``export --format elastix|ants``: the text translates every stage, and elastix and ANTs run it as well as autoreg.

The pure tests read the exported text (the shell scripts run for real, with a stand-in ``elastix`` or
``antsRegistration`` on PATH that records its arguments). The peer tests need the ``bench`` extra (itk-elastix,
antspyx) and skip without it: they run itk-elastix on the written parameter files and ANTsPy on the script's
arguments, on a small synthetic pair, and compare the landmarks' TRE with autoreg's own registration.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import synthetic_pair

from autoreg.data import PairData, load_images
from autoreg.peer_export import ELASTIX_SCRIPT, Geometry, ants_script, elastix_files, write_folder
from autoreg.recipe import Recipe, recipe_from_dict
from autoreg.registration import register
from autoreg.scoring import transform_points, tre_stats
from autoreg.synthetic import write_pair


def _installed(distribution: str, module: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec(module) is not None


BENCH = "the bench extra: pip install -e '.[bench]'"
needs_elastix = pytest.mark.skipif(not _installed("itk-elastix", "itk"), reason=f"itk-elastix not installed ({BENCH})")
needs_ants = pytest.mark.skipif(not _installed("antspyx", "ants"), reason=f"antspyx not installed ({BENCH})")

#: Where each stage's settings vary: every kind of sampling, an anisotropic grid, mm and voxel sigmas, a refining grid.
THREE_STAGES = {
    "initializer": {"kind": "moments", "rotation_search": {"max_angle_deg": 90, "step_deg": 30}},
    "seed": 7,
    "stages": [
        {
            "transform": "rigid",
            "metric": {"kind": "mattes", "number_of_histogram_bins": 32},
            "sampling": {"strategy": "random", "percentage": 0.1},
            "optimizer": {"kind": "gradient_descent", "number_of_iterations": 150, "convergence_window_size": 7},
            "pyramid": {"shrink_factors": [4, 2, 1], "smoothing_sigmas": [2.0, 1.0, 0.0], "sigma_units": "voxel"},
        },
        {
            "transform": "affine",
            "metric": {"kind": "joint_hist_mi", "number_of_histogram_bins": 40},
            "sampling": {"strategy": "regular", "points": 500},
            "optimizer": {"kind": "regular_step_gd", "number_of_iterations": 80, "min_step": 0.001},
            "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.5, 0.0], "sigma_units": "mm"},
        },
        {
            "transform": {"kind": "bspline", "mesh_size": [4, 6], "refine": True},
            "sampling": {"strategy": "none"},
            "use_masks": False,
            "optimizer": {"kind": "gradient_descent", "number_of_iterations": 30},
            "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0]},
        },
    ],
    "provenance": {
        "study": "demo",
        "trial": 12,
        "score": 0.4321,
        "baseline_score": 3.5,
        "objective": "tre",
        "versions": {"autoreg": "0.1.0", "SimpleITK": "2.4"},
    },
}
GEOMETRY = Geometry((64, 48), (0.5, 0.8), "demo")


def _map(text: str) -> dict[str, list[str]]:
    """An elastix parameter file as key -> values (quotes removed); comments skipped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\((\w+)\s+(.*)\)$", line.strip())
        if m:
            assert m[1] not in out, f"{m[1]} given twice"
            out[m[1]] = shlex.split(m[2])
    return out


def _floats(values: list[str]) -> list[float]:
    return [float(v) for v in values]


def _comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.lstrip().startswith(("//", "#")))


#: The programs the exported scripts run.
PROGRAMS = ("elastix", "antsRegistration", "antsAffineInitializer")


def _stand_in(tmp: Path) -> dict[str, str]:
    """An environment whose PATH holds stand-ins of ``PROGRAMS``: each records its arguments, one per line, in
    ``tmp/PROGRAM.args``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for program in PROGRAMS:
        exe = bin_dir / program
        exe.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$@" > "{tmp / program}.args"\n')
        exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_script(script: Path, program: str, *args: Any) -> list[str]:
    """Run an exported shell script for real with stand-ins; return the arguments ``program`` was given."""
    tmp = script.parent
    for old in tmp.glob("*.args"):
        old.unlink()
    proc = subprocess.run(
        ["sh", str(script), *map(str, args)], env=_stand_in(tmp), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return _recorded(tmp, program)


def _recorded(tmp: Path, program: str) -> list[str]:
    """The arguments the last script run gave ``program`` ([] when it did not run it)."""
    path = tmp / f"{program}.args"
    return path.read_text().splitlines() if path.exists() else []


def _option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


# --- the text -----------------------------------------------------------------------------------------------------


def test_elastix_maps_translate_every_stage(tmp_path: Path) -> None:
    recipe = recipe_from_dict(THREE_STAGES)
    files = elastix_files(recipe, GEOMETRY)
    order = ["rotation_search.txt", "stage_0_rigid.txt", "stage_1_affine.txt", "stage_2_bspline.txt"]
    assert list(files) == [*order, ELASTIX_SCRIPT]
    search, rigid, affine, bspline = (_map(files[n]) for n in order)

    for m in (rigid, affine, bspline):
        assert m["Registration"] == ["MultiResolutionRegistration"]
        assert m["FixedImageDimension"] == ["2"] and m["HowToCombineTransforms"] == ["Compose"]
    assert [m["Transform"][0] for m in (rigid, affine, bspline)] == [
        "EulerTransform",
        "AffineTransform",
        "BSplineTransform",
    ]
    # pyramids: shrink factors per level and axis; sigmas in mm per axis (voxel sigmas times each axis's spacing)
    assert rigid["NumberOfResolutions"] == ["3"]
    assert rigid["FixedImagePyramidRescaleSchedule"] == ["4", "4", "2", "2", "1", "1"]
    assert rigid["MovingImagePyramidRescaleSchedule"] == ["1"] * 6  # SimpleITK shrinks the fixed grid only
    assert _floats(rigid["FixedImagePyramidSmoothingSchedule"]) == [1.0, 1.6, 0.5, 0.8, 0.0, 0.0]
    assert _floats(affine["MovingImagePyramidSmoothingSchedule"]) == [1.5, 1.5, 0.0, 0.0]
    # metrics, iterations
    assert rigid["Metric"] == ["AdvancedMattesMutualInformation"] and rigid["NumberOfHistogramBins"] == ["32"]
    assert affine["NumberOfHistogramBins"] == ["40"]
    assert rigid["MaximumNumberOfIterations"] == ["150"] and affine["MaximumNumberOfIterations"] == ["80"]
    assert bspline["MaximumNumberOfIterations"] == ["30"]
    # sampling: 10 % of each level's voxels; 500 points as a grid step per level; all voxels
    assert rigid["ImageSampler"] == ["RandomCoordinate"]
    assert rigid["NumberOfSpatialSamples"] == [str(round(0.1 * 64 * 48 / s**2)) for s in (4, 2, 1)]
    level_voxels = [32 * 24, 64 * 48]
    steps = [max(1, round((n / 500) ** 0.5)) for n in level_voxels]
    assert affine["ImageSampler"] == ["Grid"] and affine["SampleGridSpacing"] == [str(s) for s in steps for _ in "xy"]
    assert bspline["ImageSampler"] == ["Full"]
    # optimizers
    assert rigid["Optimizer"] == ["AdaptiveStochasticGradientDescent"] and rigid["NewSamplesEveryIteration"] == ["true"]
    assert affine["Optimizer"] == ["RegularStepGradientDescent"] and _floats(affine["MinimumStepLength"]) == [0.001]
    # the rotation search: centres of mass, then angles -90..90 degrees in 30-degree steps on one coarse level
    assert search["Optimizer"] == ["FullSearch"] and search["Transform"] == ["EulerTransform"]
    assert search["AutomaticTransformInitializationMethod"] == ["CenterOfGravity"]
    name, number, low, high, step = search["FullSearchSpace0"]
    assert (name, number) == ("rotation", "0") and float(low) == pytest.approx(-math.pi / 2)
    assert math.pi / 2 <= float(high) < math.pi / 2 + float(step) / 2 and float(step) == pytest.approx(math.pi / 6)
    assert search["NumberOfResolutions"] == ["1"] and search["ImageSampler"] == ["Full"]
    assert search["Metric"] == rigid["Metric"] and search["NumberOfHistogramBins"] == ["32"]  # the first stage's
    assert "initializer.txt" not in files  # no shift search: the search map places the centres itself
    # then the stages start from it; seeds seed + i + 1
    assert rigid["AutomaticTransformInitialization"] == affine["AutomaticTransformInitialization"] == ["false"]
    assert [m["RandomSeed"] for m in (rigid, affine, bspline)] == [["8"], ["9"], ["10"]]
    # the BSpline grid: 4x6 cells over 32x38.4 mm, refined over 2 levels
    assert _floats(bspline["FinalGridSpacingInPhysicalUnits"]) == pytest.approx([32 / 4, 38.4 / 6])
    assert _floats(bspline["GridSpacingSchedule"]) == [2.0, 1.0]

    # what elastix cannot do is said, in comments
    notes = _comments(files["stage_0_rigid.txt"])
    assert "differs: optimizer gradient_descent" in notes and "convergence_window_size" in notes
    assert "not translated: variance_for_joint_pdf_smoothing" in _comments(files["stage_1_affine.txt"])
    assert "not translated: use_masks false" in _comments(files["stage_2_bspline.txt"])
    # the header says where it came from and how to run it
    head = files["stage_1_affine.txt"]
    assert "study 'demo', trial 12, tre 0.4321 (baseline 3.5)" in head
    assert "-p rotation_search.txt -p stage_0_rigid.txt -p stage_1_affine.txt -p stage_2_bspline.txt" in head
    assert "size 64x48, spacing 0.5x0.8" in head

    # run_elastix.sh passes the maps in order, and the masks when given
    write_folder(tmp_path / "elx", files)
    args = _run_script(tmp_path / "elx" / ELASTIX_SCRIPT, "elastix", "F.png", "M.png", tmp_path / "out", "FM.png")
    assert _option(args, "-f") == ["F.png"] and _option(args, "-m") == ["M.png"]
    assert [Path(p).name for p in _option(args, "-p")] == order
    assert _option(args, "-fMask") == ["FM.png"] and _option(args, "-mMask") == []
    assert (tmp_path / "out").is_dir()


def test_ants_command_translates_every_stage(tmp_path: Path) -> None:
    recipe = recipe_from_dict(THREE_STAGES)
    text = ants_script(recipe, GEOMETRY)
    (tmp_path / "ants.sh").write_text(text)
    args = _run_script(tmp_path / "ants.sh", "antsRegistration", "F.nii.gz", "M.nii.gz", tmp_path / "r_", "FM.nii.gz")

    assert _option(args, "--dimensionality") == ["2"]
    assert _option(args, "--output") == [f"[{tmp_path}/r_,{tmp_path}/r_Warped.nii.gz]"]
    # the rotation search: antsAffineInitializer, 30-degree steps over +-0.5 pi, its result starts the stages
    search = _recorded(tmp_path, "antsAffineInitializer")
    assert search == ["2", "F.nii.gz", "M.nii.gz", f"{tmp_path}/r_rotation_search.mat", "30.0", "0.5", "0"]
    assert _option(args, "--initial-moving-transform") == [f"{tmp_path}/r_rotation_search.mat"]
    assert _option(args, "--random-seed") == ["8"]
    assert _option(args, "--transform") == ["Rigid[0.5]", "Affine[0.5]", "BSpline[0.5,2x3]"]  # one finest voxel
    assert _option(args, "--metric") == [
        "Mattes[F.nii.gz,M.nii.gz,1,32,Random,0.1,1]",
        f"MI[F.nii.gz,M.nii.gz,1,40,Regular,{500 / (64 * 48):.8g},1]",
        "Mattes[F.nii.gz,M.nii.gz,1,50,None,1.0,1]",
    ]
    assert _option(args, "--convergence") == ["[150x150x150,1e-06,7]", "[80x80,1e-06,10]", "[30x30,1e-06,10]"]
    assert _option(args, "--shrink-factors") == ["4x2x1", "2x1", "2x1"]
    assert _option(args, "--smoothing-sigmas") == ["2.0x1.0x0.0vox", "1.5x0.0mm", "1.0x0.0mm"]
    assert _option(args, "--masks") == ["[FM.nii.gz,NULL]", "[FM.nii.gz,NULL]", "[NULL,NULL]"]

    notes = _comments(text)
    assert "study 'demo', trial 12, tre 0.4321" in notes and "Usage: sh SCRIPT FIXED MOVING OUTPREFIX" in notes
    assert (
        "initializer.rotation_search (angles -90.0 .. 90.0 degrees in steps of 30.0) -> antsAffineInitializer" in notes
    )
    assert "stage 1 (affine): differs: optimizer regular_step_gd" in notes
    assert "stage 1 (affine): sampling points 500" in notes
    assert "stage 0 (rigid): differs: gradient_descent" in notes


def test_a_rotation_search_with_shifts_runs_after_an_initializer_map(tmp_path: Path) -> None:
    """FullSearch sets absolute parameters: the centres go first, in their own map, so that shifts are relative."""
    recipe = recipe_from_dict(
        {
            "initializer": {
                "kind": "geometry",
                "rotation_search": {"max_angle_deg": 20, "step_deg": 10, "max_shift_fraction": 0.25, "shift_steps": 2},
            },
            "stages": [{"transform": "similarity"}],
        }
    )
    files = elastix_files(recipe, Geometry((40, 60), (2.0, 1.0)))
    assert list(files) == ["initializer.txt", "rotation_search.txt", "stage_0_similarity.txt", ELASTIX_SCRIPT]
    init, search = _map(files["initializer.txt"]), _map(files["rotation_search.txt"])
    assert init["AutomaticTransformInitializationMethod"] == ["GeometricalCenter"]
    assert _floats(init["FullSearchSpace0"][2:]) == [0.0, 0.0, 1.0]  # one point: angle 0
    assert search["AutomaticTransformInitialization"] == ["false"]
    space = search["FullSearchSpace0"]
    assert space[0::5] == ["rotation", "shift_x", "shift_y"] and space[1::5] == ["0", "1", "2"]
    # shifts of 0.25 x the smallest extent (60 mm), in 2 steps each way
    assert [float(space[7]), float(space[9])] == [-15.0, 7.5] and 15.0 <= float(space[8]) < 15.1
    notes = ants_script(recipe, Geometry((40, 60), (2.0, 1.0)))
    assert "not translated: the shift search (2 steps of 7.5 mm each way)" in notes


@pytest.mark.parametrize(
    ("metric", "elastix", "ants"),
    [
        ({"kind": "mattes", "number_of_histogram_bins": 20}, "AdvancedMattesMutualInformation", "Mattes[F,M,1,20,"),
        ({"kind": "joint_hist_mi"}, "AdvancedMattesMutualInformation", "MI[F,M,1,20,"),
        ({"kind": "ants_nc", "radius": 3}, "AdvancedMattesMutualInformation", "CC[F,M,1,3,"),
        ({"kind": "correlation"}, "AdvancedNormalizedCorrelation", "GC[F,M,1,1,"),
        ({"kind": "mean_squares"}, "AdvancedMeanSquares", "MeanSquares[F,M,1,1,"),
    ],
)
def test_each_metric_has_its_peer(metric: dict, elastix: str, ants: str, tmp_path: Path) -> None:
    recipe = recipe_from_dict({"stages": [{"transform": "affine", "metric": metric}]})
    maps = elastix_files(recipe, Geometry((64, 64), (1.0, 1.0)))
    assert _map(maps["stage_0_affine.txt"])["Metric"] == [elastix]
    (tmp_path / "a.sh").write_text(ants_script(recipe, Geometry((64, 64), (1.0, 1.0))))
    assert _option(_run_script(tmp_path / "a.sh", "antsRegistration", "F", "M", "o_"), "--metric")[0].startswith(ants)
    if metric["kind"] == "ants_nc":  # not elastix's global correlation, which fails across modalities
        assert "elastix has no local correlation metric" in maps["stage_0_affine.txt"]
        assert _map(maps["stage_0_affine.txt"])["NumberOfHistogramBins"] == ["32"]


@pytest.mark.parametrize(
    ("optimizer", "elastix"),
    [
        ({"kind": "gradient_descent"}, "AdaptiveStochasticGradientDescent"),
        ({"kind": "regular_step_gd"}, "RegularStepGradientDescent"),
        ({"kind": "cg_line_search"}, "ConjugateGradient"),
        ({"kind": "lbfgsb"}, "QuasiNewtonLBFGS"),
        ({"kind": "lbfgs2"}, "QuasiNewtonLBFGS"),
    ],
)
def test_each_optimizer_has_its_peer_or_a_comment(optimizer: dict, elastix: str) -> None:
    recipe = recipe_from_dict({"stages": [{"transform": "rigid", "optimizer": optimizer}]})
    text = elastix_files(recipe, Geometry((64, 64), (1.0, 1.0)))["stage_0_rigid.txt"]
    assert _map(text)["Optimizer"] == [elastix]
    ants = ants_script(recipe, Geometry((64, 64), (1.0, 1.0)))
    if optimizer["kind"] not in ("gradient_descent", "cg_line_search"):
        assert f"differs: optimizer {optimizer['kind']} -> ANTs' conjugate-gradient line search" in ants
    if optimizer["kind"] != "regular_step_gd":
        assert "differs:" in _comments(text)


def test_displacement_is_gaussian_in_ants_and_an_approximating_bspline_in_elastix(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        {
            "stages": [
                {"transform": "affine"},
                {
                    "transform": {
                        "kind": "displacement",
                        "variance_for_update_field": 0.5,
                        "variance_for_total_field": 3.0,
                    },
                    "pyramid": {"shrink_images": True},
                },
            ]
        }
    )
    geometry = Geometry((64, 64), (2.0, 2.0))
    text = elastix_files(recipe, geometry)["stage_1_displacement.txt"]
    assert _map(text)["Transform"] == ["BSplineTransform"]
    assert _floats(_map(text)["FinalGridSpacingInPhysicalUnits"]) == pytest.approx([3.0 * 2.0] * 2)  # sqrt(3 v) px
    assert "differs: displacement" in _comments(text)
    (tmp_path / "a.sh").write_text(ants_script(recipe, geometry))
    args = _run_script(tmp_path / "a.sh", "antsRegistration", "F", "M", "o_")
    assert _option(args, "--transform")[1] == "GaussianDisplacementField[2.0,0.5,3.0]"
    # SyN's symmetric scheme is ANTs' SyN transform, with the same step and variances
    data = recipe.model_dump()
    data["stages"][1]["transform"].update(symmetric=True, gradient_step=0.2)
    (tmp_path / "s.sh").write_text(ants_script(type(recipe).model_validate(data), geometry))
    args = _run_script(tmp_path / "s.sh", "antsRegistration", "F", "M", "o_")
    assert _option(args, "--transform")[1] == "SyN[0.2,0.5,3.0]"


def test_a_file_in_the_way_of_the_elastix_folder_is_one_line(tmp_path: Path) -> None:
    from autoreg.errors import UserError

    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        write_folder(tmp_path / "taken", {"a.txt": "a"})


def test_cli_exports_a_tuned_study_for_both_peers(pair_yaml, run_cli, tmp_path: Path) -> None:
    pair = pair_yaml(transform="affine", stages=["rigid", "affine"], extra={"trial_timeout": 30})
    study = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", study, "-q").code == 0
    res = run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "elx", "--format", "elastix", "--repeats", 0)
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "elx").iterdir()) == [
        ELASTIX_SCRIPT,
        "stage_0_rigid.txt",
        "stage_1_affine.txt",
    ]
    res = run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "a.sh", "--format", "ants", "--repeats", 0)
    assert res.code == 0, res.err
    text = (tmp_path / "a.sh").read_text()
    assert re.search(r"study 'syn', trial \d+, \w+ [0-9.]+ \(baseline [0-9.]+\)", text)
    assert "fixed image 'syn' (size 64x64, spacing 1.0x1.0)" in text
    assert text.count("--transform") == 2
    # a file where the folder should go is one line, exit 2
    res = run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "a.sh", "--format", "elastix", "--repeats", 0)
    assert res.code == 2 and len(res.err_lines) == 1 and "not a folder" in res.err


# --- the peers run the exports ------------------------------------------------------------------------------------


def _linear(kind: str, optimizer: dict) -> dict:
    return {
        "transform": kind,
        "metric": {"kind": "mattes", "number_of_histogram_bins": 24},
        "sampling": {"strategy": "random", "percentage": 0.25},
        "optimizer": optimizer,
        "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "sigma_units": "voxel"},
    }


RSGD = {"kind": "regular_step_gd", "learning_rate": 2.0, "number_of_iterations": 300}
GD = {
    "kind": "gradient_descent",
    "number_of_iterations": 200,
    "estimate_learning_rate": "each_iteration",
    "maximum_step_size_in_physical_units": 0.25,
    "convergence_minimum_value": 1e-7,
    "convergence_window_size": 20,
}
BSPLINE = {
    "transform": {"kind": "bspline", "mesh_size": [6, 6]},
    "metric": {"kind": "mattes", "number_of_histogram_bins": 24},
    "sampling": {"strategy": "random", "percentage": 0.2},
    "optimizer": {"kind": "lbfgsb", "number_of_iterations": 50},
    "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "sigma_units": "voxel"},
}
SEARCH = {
    "kind": "geometry",
    "rotation_search": {"max_angle_deg": 60, "step_deg": 10, "max_shift_fraction": 0.1, "shift_steps": 2},
}
#: name -> (ground-truth transform of the synthetic pair, its magnitude, the recipe). "rigid-search": a rotation of
#: about 30 degrees and a large shift, which only the rotation search (with shifts) brings within reach.
CASES = {
    "affine-rsgd": ("affine", 1.0, {"stages": [_linear("affine", RSGD)]}),
    "rigid-affine-gd": ("affine", 1.0, {"stages": [_linear("rigid", GD), _linear("affine", GD)]}),
    "affine-bspline": ("bspline", 1.0, {"stages": [_linear("affine", RSGD), BSPLINE]}),
    "rigid-search": ("rigid", 3.0, {"initializer": SEARCH, "stages": [_linear("rigid", GD), _linear("affine", GD)]}),
}


def _make_case(name: str, folder: Path) -> dict[str, Any]:
    """The pair written to ``folder``, the recipe, and autoreg's own TRE (mean, px) on it."""
    truth, magnitude, recipe_data = CASES[name]
    pair = synthetic_pair(2, truth, magnitude=magnitude)
    paths = write_pair(pair, folder)
    recipe = recipe_from_dict({**recipe_data, "seed": 1})
    data = load_images(paths["fixed"], paths["moving"])
    result = register(recipe, PairData(data.spec, data.fixed, data.moving))
    return {
        "paths": paths,
        "recipe": recipe,
        "fixed": data.fixed,
        "fp": pair.fixed_points,
        "mp": pair.moving_points,
        "before": tre_stats(pair.fixed_points - pair.moving_points, data.fixed).mean_vox,
        "autoreg": tre_stats(
            transform_points(result.transform, pair.fixed_points) - pair.moving_points, data.fixed
        ).mean_vox,
        "autoreg_start": transform_points(result.initial_transform, pair.fixed_points),
    }


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Callable[[str], dict[str, Any]]:
    """``case(name)``: one registration by autoreg per case, shared by the elastix and the ANTs test."""
    made: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in made:
            made[name] = _make_case(name, tmp_path_factory.mktemp(f"pair-{name}"))
        return made[name]

    return get


def _check_tre(case: dict[str, Any], peer: str, mapped: np.ndarray) -> None:
    """The peer, running autoreg's recipe, registers about as well as autoreg: within 2x + 0.5 px of its TRE."""
    got = tre_stats(mapped - case["mp"], case["fixed"]).mean_vox
    print(f"TRE mean (px): before {case['before']:.3f}, autoreg {case['autoreg']:.3f}, {peer} {got:.3f}")
    assert math.isfinite(got)
    assert case["autoreg"] < 0.3 * case["before"], "autoreg itself should register this pair"
    assert got <= 2 * case["autoreg"] + 0.5, f"{peer} {got:.3f} px vs autoreg {case['autoreg']:.3f} px"


def run_elastix_export(
    recipe: Recipe, paths: dict[str, Path], fixed_points: np.ndarray, tmp: Path, *, stages: bool = True
) -> np.ndarray:
    """Export, read the parameter files in the order run_elastix.sh passes them (``stages=False``: only the maps
    before the stages'), run itk-elastix, map the points with transformix (fixed -> moving, ITK's convention)."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(2)
    fixed_image = load_images(paths["fixed"], paths["moving"]).fixed
    write_folder(tmp / "elx", elastix_files(recipe, Geometry.of(fixed_image)))
    args = _run_script(tmp / "elx" / ELASTIX_SCRIPT, "elastix", paths["fixed"], paths["moving"], tmp / "elx_out")
    params = itk.ParameterObject.New()
    for file in _option(args, "-p"):
        if stages or not Path(file).name.startswith("stage_"):
            params.AddParameterFile(file)
    f = itk.imread(str(paths["fixed"]), itk.F)
    m = itk.imread(str(paths["moving"]), itk.F)
    method = itk.ElastixRegistrationMethod.New(f, m)
    method.SetParameterObject(params)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    points = tmp / "fixed_points.txt"
    points.write_text(
        f"point\n{len(fixed_points)}\n" + "".join(" ".join(f"{c:.6f}" for c in p) + "\n" for p in fixed_points)
    )
    itk.transformix_pointset(
        m, method.GetTransformParameterObject(), fixed_point_set_file_name=str(points), output_directory=str(tmp)
    )
    found = re.findall(r"OutputPoint = \[([^\]]*)\]", (tmp / "outputpoints.txt").read_text())
    return np.array([[float(c) for c in row.split()] for row in found])


def run_ants_export(recipe: Recipe, paths: dict[str, Path], fixed_points: np.ndarray, tmp: Path) -> np.ndarray:
    """Export, take the script's antsRegistration arguments as the shell expands them, run them with ANTsPy's
    antsRegistration, map the points with the forward transforms (fixed -> moving)."""
    import ants
    import pandas as pd

    fixed_image = load_images(paths["fixed"], paths["moving"]).fixed
    (tmp / "ants.sh").write_text(ants_script(recipe, Geometry.of(fixed_image)))
    args = _run_script(tmp / "ants.sh", "antsRegistration", paths["fixed"], paths["moving"], tmp / "ants_")
    search = _recorded(tmp, "antsAffineInitializer")
    if search:  # the recipe's rotation search: ANTsPy's affine_initializer runs this program with such a list
        assert ants.lib.antsAffineInitializer(search) == 0
    ants.registration(args, None)  # a list of arguments runs antsRegistration itself
    written = sorted(str(p) for p in tmp.glob("ants_[0-9]*") if "Inverse" not in p.name)
    assert written, "antsRegistration wrote no transform"
    dim = fixed_points.shape[1]
    cols = list("xyz"[:dim])
    out = ants.apply_transforms_to_points(dim, pd.DataFrame(fixed_points, columns=cols), written[::-1])
    return out[cols].to_numpy(dtype=float)


@needs_elastix
@pytest.mark.parametrize("name", list(CASES))
def test_elastix_registers_the_export_as_well_as_autoreg(name: str, case, tmp_path: Path) -> None:
    c = case(name)
    _check_tre(c, "elastix", run_elastix_export(c["recipe"], c["paths"], c["fp"], tmp_path))


@needs_elastix
def test_elastix_rotation_search_starts_where_autoreg_does(case, tmp_path: Path) -> None:
    """The initializer and rotation-search maps alone (FullSearch over angle and shifts) reach autoreg's own start."""
    c = case("rigid-search")
    maps = elastix_files(c["recipe"], Geometry.of(c["fixed"]))
    assert [n for n in maps if not n.startswith("stage_")] == ["initializer.txt", "rotation_search.txt", ELASTIX_SCRIPT]
    mapped = run_elastix_export(c["recipe"], c["paths"], c["fp"], tmp_path, stages=False)
    assert np.abs(mapped - c["autoreg_start"]).max() < 0.05, "elastix's search should pick autoreg's angle and shift"


@needs_ants
@pytest.mark.parametrize("name", list(CASES))
def test_ants_registers_the_export_as_well_as_autoreg(name: str, case, tmp_path: Path) -> None:
    c = case(name)
    _check_tre(c, "ANTs", run_ants_export(c["recipe"], c["paths"], c["fp"], tmp_path))


#: Stages that between them use every metric, optimizer, sampling, interpolator and transform kind.
EVERY_KIND = [
    {
        "transform": "translation",
        "metric": {"kind": "joint_hist_mi"},
        "sampling": {"strategy": "regular", "percentage": 0.3},
        "optimizer": {"kind": "cg_line_search", "number_of_iterations": 5, "scales": "none"},
    },
    {
        "transform": "rigid",
        "metric": {"kind": "ants_nc"},
        "sampling": {"strategy": "none"},
        "optimizer": {"kind": "lbfgs2", "number_of_iterations": 5, "scales": "physical_shift"},
    },
    {
        "transform": "similarity",
        "metric": {"kind": "correlation"},
        "sampling": {"strategy": "random", "points": 800},
        "optimizer": {"kind": "lbfgsb", "number_of_iterations": 5},
        "interpolator": "bspline",
    },
    {
        "transform": "affine",
        "metric": {"kind": "mean_squares"},
        "sampling": {"strategy": "regular", "points": 900},
        # unscaled, elastix's steps of up to a voxel move the matrix entries by as much and the later stages lose the
        # image (the export notes it): unscaled steps are the translation stage's, where they are millimetres
        "optimizer": {"kind": "regular_step_gd", "number_of_iterations": 5, "scales": "physical_shift"},
        "interpolator": "nearest",
    },
    # displacement before bspline: antsRegistration fails on any stage after a BSpline one (the export says so)
    {
        "transform": {"kind": "displacement"},
        "optimizer": {"kind": "gradient_descent", "number_of_iterations": 3},
        "pyramid": {"shrink_images": True},
    },
    {
        "transform": {"kind": "bspline", "control_point_spacing": 16, "refine": True},
        "optimizer": {"kind": "gradient_descent", "number_of_iterations": 5},
    },
]


@pytest.mark.parametrize("peer", ["elastix", "ants"])
def test_every_kind_of_setting_runs_in_the_peer(peer: str, tmp_path: Path) -> None:
    """Each translated component name and parameter is one the peer accepts (few iterations: not about accuracy)."""
    if not (_installed("itk-elastix", "itk") if peer == "elastix" else _installed("antspyx", "ants")):
        pytest.skip(f"{peer} not installed ({BENCH})")
    pair = synthetic_pair(2, "affine")
    paths = write_pair(pair, tmp_path / "data")
    recipe = recipe_from_dict({"stages": EVERY_KIND, "initializer": {"kind": "geometry"}})
    run = run_elastix_export if peer == "elastix" else run_ants_export
    mapped = run(recipe, paths, pair.fixed_points, tmp_path)
    assert mapped.shape == pair.fixed_points.shape and np.all(np.isfinite(mapped))
