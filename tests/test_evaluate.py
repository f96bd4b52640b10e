"""Recipes you can trust: the standalone script, evaluation with repeats, the variability-aware objective, holdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import quick_recipe

from autoreg.recipe import load_recipe, save_recipe

FAST = {"trial_timeout": 30}


def _params(tx: sitk.Transform) -> np.ndarray:
    tx = tx.Downcast()
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        return np.concatenate([_params(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())])
    return np.concatenate([np.asarray(tx.GetParameters()), np.asarray(tx.GetFixedParameters())])


@pytest.mark.parametrize("stages", [["affine"], ["affine", "bspline"]], ids=["affine", "affine-bspline"])
def test_exported_script_reproduces_apply(stages, pair_yaml, run_cli, tmp_path: Path) -> None:
    """`export --format python` runs with SimpleITK alone and gives apply's transform, bit for bit (1 thread)."""
    pair = pair_yaml(transform="affine", stages=stages, extra={**FAST, "deterministic": True})
    study = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 3, "--jobs", 1, "--study-dir", study, "-q").code == 0
    assert run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.yaml", "--repeats", 0).code == 0
    res = run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.py", "--format", "python", "--repeats", 0)
    assert res.code == 0, res.err
    script = (tmp_path / "r.py").read_text()
    assert "import autoreg" not in script and "from autoreg" not in script
    fixed, moving = pair.parent / "fixed.png", pair.parent / "moving.png"
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "r.py"), str(fixed), str(moving), str(tmp_path / "script.tfm")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = run_cli(
        "apply", tmp_path / "r.yaml", "--fixed", fixed, "--moving", moving, "--transform-out", tmp_path / "apply.tfm"
    )
    assert res.code == 0, res.err
    a = _params(sitk.ReadTransform(str(tmp_path / "apply.tfm")))
    b = _params(sitk.ReadTransform(str(tmp_path / "script.tfm")))
    np.testing.assert_array_equal(a, b)


def test_the_script_registers_with_the_masks_the_study_used_and_warns_without_them(
    pair_yaml, run_cli, tmp_path: Path
) -> None:
    """A recipe tuned with a mask reproduces only with that mask: the script takes it, and says so when it is left out
    (as apply does); the mask on a sub-box grid lands by its physical geometry in both."""
    pair = pair_yaml(transform="affine", stages=["affine"], extra={**FAST, "deterministic": True})
    mask = sitk.Image(40, 40, sitk.sitkUInt8) + 1
    mask.SetOrigin((10.0, 12.0))  # a sub-box of the 64x64 fixed image
    sitk.WriteImage(mask, str(pair.parent / "mask.nrrd"))
    doc = yaml.safe_load(pair.read_text())
    pair.write_text(yaml.safe_dump({**doc, "masks": {"fixed": "mask.nrrd"}}))
    study = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", study, "-q").code == 0
    assert run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.yaml", "--repeats", 0).code == 0
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["provenance"]["fingerprint"]["pairs"][0]["masks"]["fixed"]
    res = run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.py", "--format", "python", "--repeats", 0)
    assert res.code == 0, res.err
    fixed, moving = pair.parent / "fixed.png", pair.parent / "moving.png"

    def script(*extra: str) -> subprocess.CompletedProcess:
        out = [sys.executable, "-I", str(tmp_path / "r.py"), str(fixed), str(moving), str(tmp_path / "s.tfm"), *extra]
        return subprocess.run(out, capture_output=True, text=True, cwd=tmp_path, timeout=300)

    bare = script()
    assert bare.returncode == 0 and "tuned with fixed mask" in bare.stderr, bare.stderr
    masked = script("--fixed-mask", str(pair.parent / "mask.nrrd"))
    assert masked.returncode == 0 and masked.stderr == "", masked.stderr
    files = ["--fixed", fixed, "--moving", moving, "--transform-out", tmp_path / "a.tfm"]
    res = run_cli("apply", tmp_path / "r.yaml", *files, "--fixed-mask", pair.parent / "mask.nrrd")
    assert res.code == 0 and res.err == "", res.err
    a = _params(sitk.ReadTransform(str(tmp_path / "a.tfm")))
    np.testing.assert_array_equal(a, _params(sitk.ReadTransform(str(tmp_path / "s.tfm"))))
    res = run_cli("apply", tmp_path / "r.yaml", *files)
    assert res.code == 0 and "tuned with fixed mask" in res.err


def test_evaluate_deterministic_repeats_are_identical_and_random_ones_spread(
    pair_yaml, run_cli, tmp_path: Path
) -> None:
    pair = pair_yaml(transform="affine", stages=["affine"])
    recipe = quick_recipe(["affine"], 2, strategy="random", percentage=0.05, shrink=(2, 1), sigmas=(1.0, 0.0))
    save_recipe(recipe, tmp_path / "r.yaml")
    res = run_cli(
        "evaluate", tmp_path / "r.yaml", pair, "--repeats", 3, "--deterministic", "--json", tmp_path / "d.json"
    )
    assert res.code == 0, res.err
    det = json.loads((tmp_path / "d.json").read_text())
    values = det["pairs"]["syn"]["values"]
    assert len(values) == 3 and values[0] == values[1] == values[2]
    assert det["overall"]["std"] == 0.0
    res = run_cli("evaluate", tmp_path / "r.yaml", pair, "--repeats", 3, "--json", tmp_path / "r.json")
    assert res.code == 0, res.err
    rnd = json.loads((tmp_path / "r.json").read_text())
    assert len(set(rnd["pairs"]["syn"]["values"])) > 1  # other seeds, other samples, other results
    assert rnd["overall"]["std"] > 0
    assert "std" in res.out and "syn" in res.out


def test_evaluate_scores_every_landmark_not_only_the_search_s_selection(pair_yaml, run_cli, tmp_path: Path) -> None:
    """The search never sees a share of the landmarks (its honest score); `evaluate` of a recipe uses them all."""
    from autoreg.data import load_pair
    from autoreg.pipeline import Pipeline
    from autoreg.registration import register
    from autoreg.scoring import transform_points, tre_stats

    pair = pair_yaml(transform="affine", stages=["affine"])
    pipe = Pipeline.load(pair)
    everything = load_pair(pipe.cfg.pairs[0])
    assert len(pipe.pairs[0].fixed_points) < len(everything.fixed_points)  # the split took some away
    recipe = quick_recipe(["affine"], 2, strategy="regular", percentage=0.2, shrink=(2, 1), sigmas=(1.0, 0.0))
    recipe = recipe.with_(threads=1, deterministic=True)
    save_recipe(recipe, tmp_path / "r.yaml")
    res = run_cli(
        "evaluate", tmp_path / "r.yaml", pair, "--repeats", 1, "--deterministic", "--json", tmp_path / "e.json"
    )
    assert res.code == 0, res.err
    value = json.loads((tmp_path / "e.json").read_text())["pairs"]["syn"]["values"][0]
    tx = register(recipe, everything).transform
    expected = tre_stats(transform_points(tx, everything.fixed_points) - everything.moving_points, everything.fixed)
    assert value == pytest.approx(expected.mean, rel=1e-9)


def test_variability_aware_objective_scores_the_worst_repeat(pair_yaml, run_cli, tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from autoreg.config import load_config
    from autoreg.study import load_existing, storage_spec

    pair = pair_yaml(
        transform="affine", stages=["affine"], extra={**FAST, "objective": {"repeats": 3, "aggregate": "worst"}}
    )
    study_dir = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 3, "--jobs", 1, "--study-dir", study_dir, "-q").code == 0
    cfg = load_config(pair)
    study = load_existing(cfg, storage_spec(cfg, study_dir, None))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done
    for t in done:
        scores = t.user_attrs["repeat_scores"]
        assert len(scores) == 3
        assert t.value == pytest.approx(max(scores))
        assert t.user_attrs["score_std"] >= 0


def test_export_stores_the_measured_spread(pair_yaml, run_cli, tmp_path: Path) -> None:
    pair = pair_yaml(transform="affine", stages=["affine"], extra=FAST)
    study = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", study, "-q").code == 0
    assert run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.yaml", "--repeats", 2).code == 0
    spread = load_recipe(tmp_path / "r.yaml").provenance["spread"]
    assert spread["repeats"] == 2 and spread["metric"] == "tre_mean"
    assert set(spread["overall"]) >= {"mean", "std", "min", "max"}


def test_a_best_whose_score_does_not_repeat_is_exported_with_a_warning() -> None:
    from autoreg.evaluate import spread
    from autoreg.export import lucky_draw
    from autoreg.trial import TrialRecord

    best = TrialRecord(number=14, state="COMPLETE", value=0.0715)
    measured = {"repeats": 5, "overall": spread([0.0715, 0.29, 0.20, 43.2, 10.5])}
    line = lucky_draw(best, measured, "tre_mean")
    assert line is not None and line.startswith("trial 14 scored 0.0715, but 5 repeats") and "max 43.2" in line
    assert lucky_draw(best, {"repeats": 3, "overall": spread([0.07, 0.08, 0.075])}, "tre_mean") is None
    assert "failed in every one of 3 repeats" in lucky_draw(best, {"repeats": 3, "overall": spread([])}, "tre_mean")
    assert lucky_draw(best, measured, "relative_tre") is None  # repeats are scored in TRE: not comparable
    # identical repeats have no spread, not a rounding one (three equal values gave std 6.8e-17)
    same = spread([0.1] * 3)  # numpy: std 1.7e-17
    assert same["std"] == 0.0 and same["mean"] == 0.1


def test_holdout_pairs_are_scored_not_tuned(pair_yaml, run_cli, tmp_path: Path) -> None:
    pair = pair_yaml(transform="affine", stages=["affine"], extra=FAST)
    doc = yaml.safe_load(pair.read_text())
    other = {"name": "held", "fixed": doc["fixed"], "moving": doc["moving"], "landmarks": doc["landmarks"]}
    doc = {
        "name": "gen",
        "pairs": [{"name": "tuned", "fixed": doc["fixed"], "moving": doc["moving"], "landmarks": doc["landmarks"]}],
        "holdout": [other],
        "stages": ["affine"],
        **FAST,
    }
    pair.write_text(yaml.safe_dump(doc))
    res = run_cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", tmp_path / "study", "-q")
    assert res.code == 0, res.err
    assert "holdout held: tre_mean" in res.out
    save_recipe(quick_recipe(["affine"], 2), tmp_path / "r.yaml")
    res = run_cli("evaluate", tmp_path / "r.yaml", pair, "--holdout-only")
    assert res.code == 0 and "held" in res.out and "tuned " not in res.out


def test_evaluate_on_a_real_pair_is_deterministic(shared_data: Path, run_cli, tmp_path: Path) -> None:
    d = shared_data / "itk_brain_t1_pd_shift13x17"
    doc = {
        "name": "t1pd",
        "fixed": str(d / "fixed.png"),
        "moving": str(d / "moving.png"),
        "landmarks": {"fixed": str(d / "fixed_landmarks.csv"), "moving": str(d / "moving_landmarks.csv")},
        "stages": ["rigid"],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    recipe = quick_recipe(["rigid"], 2, strategy="random", percentage=0.1, shrink=(2, 1), sigmas=(1.0, 0.0), bins=32)
    save_recipe(recipe, tmp_path / "r.yaml")
    res = run_cli(
        "evaluate",
        tmp_path / "r.yaml",
        tmp_path / "p.yaml",
        "--repeats",
        2,
        "--deterministic",
        "--json",
        tmp_path / "e.json",
    )
    assert res.code == 0, res.err
    e = json.loads((tmp_path / "e.json").read_text())
    values = e["pairs"]["t1pd"]["values"]
    assert values[0] == values[1] and values[0] < 1.0  # multi-modal translation recovered to < 1 px


def test_apply_and_evaluate_report_the_folding_of_a_deformable_recipe(pair_yaml, run_cli, tmp_path: Path) -> None:
    """The share of the fixed grid a deformable result folds, as the study measures it: printed by apply, the largest
    over the repeats by evaluate (text and JSON); a linear recipe has none to report."""
    from autoreg.data import load_images
    from autoreg.scoring import folding_fraction

    pair = pair_yaml(transform="affine", stages=["affine", "bspline"], extra={**FAST, "deterministic": True})
    study = tmp_path / "study"
    assert run_cli("tune", pair, "--trials", 2, "--jobs", 1, "--study-dir", study, "-q").code == 0
    assert run_cli("export", pair, "--study-dir", study, "-o", tmp_path / "r.yaml", "--repeats", 0).code == 0
    fixed, moving = pair.parent / "fixed.png", pair.parent / "moving.png"
    res = run_cli(
        "apply", tmp_path / "r.yaml", "--fixed", fixed, "--moving", moving, "--transform-out", tmp_path / "t.h5"
    )
    assert res.code == 0, res.err
    folded = folding_fraction(sitk.ReadTransform(str(tmp_path / "t.h5")), load_images(fixed, moving).fixed)
    assert f"  folded: {100 * folded:.3g} % of the fixed grid (Jacobian determinant <= 0)" in res.out
    res = run_cli(
        "evaluate", tmp_path / "r.yaml", pair, "--deterministic", "--repeats", 2, "--json", tmp_path / "e.json"
    )
    assert res.code == 0, res.err
    assert f"folds {100 * folded:.3g} % of the fixed grid" in res.out
    assert json.loads((tmp_path / "e.json").read_text())["pairs"]["syn"]["folding_fraction_max"] == folded
    linear = yaml.safe_load((tmp_path / "r.yaml").read_text())
    linear["stages"] = linear["stages"][:1]
    (tmp_path / "linear.yaml").write_text(yaml.safe_dump(linear))
    res = run_cli(
        "apply", tmp_path / "linear.yaml", "--fixed", fixed, "--moving", moving, "--transform-out", tmp_path / "l.tfm"
    )
    assert res.code == 0 and "folded" not in res.out, res.err
