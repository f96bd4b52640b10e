"""The Python API of SPEC.md: ``autoreg.tune``, ``autoreg.register``, ``autoreg.Recipe``; real registrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import SimpleITK as sitk
import yaml
from conftest import quick_recipe, synthetic_pair

import autoreg
from autoreg.errors import UserError
from autoreg.recipe import save_recipe
from autoreg.synthetic import write_pair


def parameters(transform: sitk.Transform) -> list[tuple[str, tuple[float, ...], tuple[float, ...]]]:
    """Every elementary transform of ``transform`` (composites flattened): its kind, parameters, fixed parameters."""
    out = []
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        for i in range(composite.GetNumberOfTransforms()):
            out += parameters(composite.GetNthTransform(i))
        return out
    return [(transform.GetName(), transform.GetParameters(), transform.GetFixedParameters())]


def mapped(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


@pytest.mark.parametrize("dim", [2, 3])
def test_register_on_images_in_memory_gives_the_transform_apply_writes(tmp_path: Path, dim: int) -> None:
    pair = synthetic_pair(dim, "affine" if dim == 2 else "rigid")
    stages = ("affine",) if dim == 2 else ("rigid",)
    recipe = quick_recipe(stages, dim, deterministic=True, seed=11)
    recipe_file = tmp_path / "recipe.yaml"
    save_recipe(recipe, recipe_file)
    # masks in memory: the fixed one covers a sub-box of its image, with its own origin (placed by geometry)
    box = [s // 2 for s in pair.fixed.GetSize()]
    fixed_mask = sitk.Image(box, sitk.sitkUInt8) + 1
    fixed_mask.SetOrigin(pair.fixed.TransformIndexToPhysicalPoint([s // 4 for s in pair.fixed.GetSize()]))
    fixed_mask.SetSpacing(pair.fixed.GetSpacing())
    files = {"fixed": tmp_path / "fixed.mha", "moving": tmp_path / "moving.mha", "mask": tmp_path / "mask.mha"}
    sitk.WriteImage(pair.fixed, str(files["fixed"]))
    sitk.WriteImage(pair.moving, str(files["moving"]))
    sitk.WriteImage(fixed_mask, str(files["mask"]))

    transform = autoreg.register(autoreg.Recipe.load(recipe_file), pair.fixed, pair.moving, fixed_mask=fixed_mask)
    assert isinstance(transform, sitk.Transform)

    written = tmp_path / "apply.tfm"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "apply",
            str(recipe_file),
            "--fixed",
            str(files["fixed"]),
            "--moving",
            str(files["moving"]),
            "--fixed-mask",
            str(files["mask"]),
            "--transform-out",
            str(written),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    from_apply = sitk.ReadTransform(str(written))
    ours, theirs = parameters(transform), parameters(from_apply)
    assert [k for k, _, _ in ours] == [k for k, _, _ in theirs]
    for (_, p, fp), (_, q, fq) in zip(ours, theirs):
        assert p == q and fp == fq  # bit-identical: one thread, the recipe's seed, the same engine call
    points = np.asarray(pair.fixed_points)
    assert np.array_equal(mapped(transform, points), mapped(from_apply, points))
    # and it registers: the landmarks come much closer than before
    before = np.mean(np.linalg.norm(points - pair.moving_points, axis=1))
    assert np.mean(np.linalg.norm(mapped(transform, points) - pair.moving_points, axis=1)) < before / 2


def test_register_refuses_what_apply_refuses() -> None:
    pair = synthetic_pair(2, "affine")
    recipe = quick_recipe(("affine",), 2)
    with pytest.raises(UserError, match="fixed_image: expected a SimpleITK image"):
        autoreg.register(recipe, "fixed.png", pair.moving)
    constant = sitk.Image(pair.fixed.GetSize(), sitk.sitkFloat32)
    with pytest.raises(UserError, match="moving_image: the image is constant"):
        autoreg.register(recipe, pair.fixed, constant)
    outside = sitk.Image([8, 8], sitk.sitkUInt8) + 1
    outside.SetOrigin((1000.0, 1000.0))
    with pytest.raises(UserError, match="fixed_mask: mask fixed_mask lies outside its image"):
        autoreg.register(recipe, pair.fixed, pair.moving, fixed_mask=outside)
    volume = sitk.GaussianSource(sitk.sitkFloat32, [16, 16, 16], [4, 4, 4], [8, 8, 8])
    with pytest.raises(UserError, match="moving_image: fixed image is 2D but moving image is 3D"):
        autoreg.register(recipe, pair.fixed, volume)


def _pair_files(folder: Path) -> dict[str, str]:
    paths = write_pair(synthetic_pair(2, "affine"), folder, fmt="png")
    return {k: str(v.relative_to(folder.parent)) for k, v in paths.items()}


def test_tune_from_a_dict_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    files = _pair_files(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    pair = {
        "name": "from-dict",
        "fixed": files["fixed"],
        "moving": files["moving"],
        "landmarks": {"fixed": files["fixed_landmarks"], "moving": files["moving_landmarks"]},
        "stages": ["affine"],
        "search": {"stage0.pyramid.levels": 1},
    }
    lines = []
    result = autoreg.tune(pair, trials=4, jobs=1, seed=2, study_dir=tmp_path / "study", progress=lines.append)
    assert not result.interrupted
    assert isinstance(result.study, optuna.Study) and len(result.study.trials) == 4
    assert all(t.state.is_finished() for t in result.study.trials)
    assert isinstance(result.best_recipe, autoreg.Recipe)
    assert result.best_score == min(t.value for t in result.study.trials if t.value is not None)
    assert result.baseline_score == result.study.trials[0].value
    assert result.best_score <= result.baseline_score
    assert any(e.kind == "started" for e in lines)
    # the best recipe round-trips through a file and registers the pair
    result.best_recipe.save(tmp_path / "best.yaml")
    again = autoreg.Recipe.load(tmp_path / "best.yaml")
    assert again == result.best_recipe
    p = synthetic_pair(2, "affine")
    transform = autoreg.register(again, p.fixed, p.moving)
    assert np.mean(np.linalg.norm(mapped(transform, p.fixed_points) - p.moving_points, axis=1)) < 2.0


def test_tune_from_a_path_resumes_the_same_study(tmp_path: Path) -> None:
    files = _pair_files(tmp_path / "data")
    doc = {
        "name": "from-path",
        "fixed": Path(files["fixed"]).name,
        "moving": Path(files["moving"]).name,
        "landmarks": {"fixed": Path(files["fixed_landmarks"]).name, "moving": Path(files["moving_landmarks"]).name},
        "stages": ["affine"],
        "search": {"stage0.pyramid.levels": 1},
    }
    path = tmp_path / "data" / "pair.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    first = autoreg.tune(path, trials=2, jobs=1)
    assert first.directory == tmp_path / "data" / "studies" / "from-path"
    second = autoreg.tune(str(path), trials=3, jobs=1)
    assert len(second.study.trials) == 3 and second.snapshot.finished == 3


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"trials": 0}, "trials"),
        ({"trials": 2.5}, "trials"),
        ({"jobs": 0}, "jobs"),
        ({"timeout": -1}, "timeout"),
        ({"seed": -3}, "seed"),
    ],
)
def test_tune_refuses_bad_arguments_with_a_user_error(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(UserError, match=rf"^{key}: expected"):
        autoreg.tune({"name": "x", "fixed": "f.png", "moving": "m.png", "stages": ["affine"]}, **kwargs)


def test_tune_errors_are_user_errors_not_exits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="<dict>: stages"):
        autoreg.tune({"name": "x", "fixed": "f.png", "moving": "m.png", "stages": ["warp"]}, trials=1)
    with pytest.raises(UserError, match="<dict>: colour: Extra inputs|<dict>: colour"):
        autoreg.tune({"name": "x", "fixed": "f.png", "moving": "m.png", "stages": ["affine"], "colour": 1}, trials=1)
    with pytest.raises(UserError, match="image file not found"):
        autoreg.tune({"name": "x", "fixed": "f.png", "moving": "m.png", "stages": ["affine"]}, trials=1)
    with pytest.raises(UserError, match="expected a PAIR.yaml path"):
        autoreg.tune(42, trials=1)
    with pytest.raises(UserError):
        autoreg.tune(tmp_path / "missing.yaml", trials=1)


def test_import_autoreg_is_light_and_lists_the_api() -> None:
    code = (
        "import sys, autoreg; heavy = [m for m in ('optuna', 'SimpleITK', 'pydantic') if m in sys.modules]; "
        "print(heavy, sorted(n for n in ('tune', 'register', 'Recipe') if n in dir(autoreg)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[] ['Recipe', 'register', 'tune']", done.stdout + done.stderr
