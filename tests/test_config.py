"""PAIR.yaml: every user error is exit 2 with ONE line on stderr naming the file and the key; valid files load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import synthetic_pair

from autoreg.config import load_config
from autoreg.data import load_pair
from autoreg.errors import UserError

LANDMARKS = {"fixed": "fixed_landmarks.csv", "moving": "moving_landmarks.csv"}


def _edit_yaml(path: Path, **changes: Any) -> Path:
    """Rewrite PAIR.yaml with top-level keys replaced (``None`` removes the key)."""
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _assert_user_error(result, yaml_path: Path, key: str | None, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, naming the file (and the key), plus any fragments."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert "Traceback" not in result.err
    assert line.startswith("autoreg: error: "), line
    assert str(yaml_path) in line, line
    if key is not None:
        assert f": {key}: " in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- errors in the file's shape ---------------------------------------------------------------------------------


def test_unknown_top_level_key(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"sampling_percentage": 0.1})
    _assert_user_error(run_cli("check", path), path, "sampling_percentage", "unknown key")


def test_unknown_key_inside_landmarks(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"landmarks": {**LANDMARKS, "format": "csv"}})
    _assert_user_error(run_cli("check", path), path, "landmarks.format", "unknown key")


def test_missing_stages(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"stages": None})
    _assert_user_error(run_cli("check", path), path, "stages", "missing")


def test_unknown_stage_name(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["warp"])
    _assert_user_error(run_cli("check", path), path, "stages", "'warp'")


@pytest.mark.parametrize("stages", [["bspline", "affine"], ["affine", "rigid"]], ids="-".join)
def test_impossible_stage_order(pair_yaml, run_cli, stages: list[str]) -> None:
    path = pair_yaml(stages=stages)
    _assert_user_error(run_cli("check", path), path, "stages", f"'{stages[1]}' after '{stages[0]}'")


def test_top_level_pair_and_pairs_list(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"pairs": [{"fixed": "fixed.png", "moving": "moving.png"}]})
    _assert_user_error(run_cli("check", path), path, "pairs", "not both")


def test_invalid_yaml(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "PAIR.yaml"
    path.write_text("name: broken\nstages: [rigid\nfixed: a.png\n")
    _assert_user_error(run_cli("check", path), path, None, "not valid YAML", "line")


@pytest.mark.parametrize("text", ["- fixed.png\n- moving.png\n", "just a string\n", ""], ids=["list", "str", "empty"])
def test_non_mapping_yaml(tmp_path: Path, run_cli, text: str) -> None:
    path = tmp_path / "PAIR.yaml"
    path.write_text(text)
    _assert_user_error(run_cli("check", path), path, None, "expected a mapping")


def test_pair_file_not_found(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "nowhere.yaml"
    _assert_user_error(run_cli("check", path), path, None, "not found")


def test_binary_pair_file(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "PAIR.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    _assert_user_error(run_cli("check", path), path, None, "UTF-8")


def test_pair_file_is_a_directory(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "PAIR.yaml"
    path.mkdir()
    _assert_user_error(run_cli("check", path), path, None, "cannot read")


def test_pairs_entry_without_moving(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"fixed": None, "moving": None, "landmarks": None, "pairs": [{"fixed": "fixed.png"}]})
    _assert_user_error(run_cli("check", path), path, "pairs[0].moving", "missing")


def test_duplicate_pair_names(pair_yaml, run_cli) -> None:
    pair = {"name": "a", "fixed": "fixed.png", "moving": "moving.png"}
    path = pair_yaml(extra={"fixed": None, "moving": None, "landmarks": None, "pairs": [pair, dict(pair)]})
    _assert_user_error(run_cli("check", path), path, "pairs[1].name", "'a'")


def test_bad_study_name(pair_yaml, run_cli) -> None:
    path = pair_yaml(name="../escape")
    _assert_user_error(run_cli("check", path), path, "name")


# --- errors in the data the file points to ----------------------------------------------------------------------


def test_missing_image_file(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"moving": "no_such_moving.png"})
    _assert_user_error(run_cli("check", path), path, "moving", "not found", "no_such_moving.png")


def test_unreadable_image(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    (path.parent / "x.png").write_text("this is not a PNG\n")
    _edit_yaml(path, fixed="x.png")
    _assert_user_error(run_cli("check", path), path, "fixed", "x.png")


def test_fixed_2d_moving_3d(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    volume = synthetic_pair(3, "rigid").moving
    sitk.WriteImage(volume, str(path.parent / "moving3d.nii.gz"))
    _edit_yaml(path, moving="moving3d.nii.gz", landmarks=None)
    _assert_user_error(run_cli("check", path), path, "moving", "2D", "3D")


def test_landmark_row_counts_differ(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    csv = path.parent / "moving_landmarks.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-3]) + "\n")  # 17 of the 20 points
    _assert_user_error(run_cli("check", path), path, "landmarks.moving", "17", "20")


def test_landmark_csv_with_wrong_columns(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    (path.parent / "fixed_landmarks.csv").write_text("a,b\n1,2\n3,4\n")
    _assert_user_error(run_cli("check", path), path, "landmarks.fixed", "fixed_landmarks.csv", "header")


def test_missing_landmark_file(pair_yaml, run_cli) -> None:
    path = pair_yaml(extra={"landmarks": {"fixed": "fixed_landmarks.csv", "moving": "gone.csv"}})
    _assert_user_error(run_cli("check", path), path, "landmarks.moving", "gone.csv", "not found")


def test_landmark_outside_its_image(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    csv = path.parent / "moving_landmarks.csv"
    header, *rows = csv.read_text().splitlines()
    rows[2] = "500.0,5.0"  # the moving image is 68 x 64 voxels of 1 mm
    csv.write_text("\n".join([header, *rows]) + "\n")
    _assert_user_error(run_cli("check", path), path, "landmarks.moving", "point 3", "outside")


def test_empty_mask(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkUInt8), str(path.parent / "empty_mask.png"))
    _edit_yaml(path, masks={"fixed": "empty_mask.png"})
    _assert_user_error(run_cli("check", path), path, "masks.fixed", "empty")


# --- valid files ------------------------------------------------------------------------------------------------


def _write_mask(image: sitk.Image, path: Path) -> None:
    """A non-empty uint8 PNG mask: the body of the phantom (intensity above the background)."""
    arr = (sitk.GetArrayFromImage(image) > 20).astype(np.uint8) * 255
    assert arr.any()
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def test_one_pair_checks(pair_yaml, run_cli) -> None:
    path = pair_yaml()
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert result.err == ""
    cfg = load_config(path)
    assert cfg.name == "syn" and cfg.stages == ("rigid",) and len(cfg.pairs) == 1
    spec = cfg.pairs[0]
    assert spec.fixed == path.parent / "fixed.png" and spec.has_landmarks
    assert cfg.uses_landmarks


def test_pairs_list_with_masks(tmp_path: Path, pair_yaml, run_cli) -> None:
    first = pair_yaml(folder="one", seed=0)
    pair_yaml(folder="two", seed=1)
    for folder, seed in (("one", 0), ("two", 1)):
        pair = synthetic_pair(2, "rigid", seed=seed)
        _write_mask(pair.fixed, tmp_path / folder / "fixed_mask.png")
        _write_mask(pair.moving, tmp_path / folder / "moving_mask.png")
    doc = {
        "name": "two_pairs",
        "pairs": [
            {
                "name": folder,
                "fixed": f"{folder}/fixed.png",
                "moving": f"{folder}/moving.png",
                "landmarks": {"fixed": f"{folder}/fixed_landmarks.csv", "moving": f"{folder}/moving_landmarks.csv"},
                "masks": {"fixed": f"{folder}/fixed_mask.png", "moving": f"{folder}/moving_mask.png"},
            }
            for folder in ("one", "two")
        ],
        "stages": ["rigid", "affine"],
    }
    path = tmp_path / "PAIRS.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert first.exists()

    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "pair one" in result.out and "pair two" in result.out

    cfg = load_config(path)
    assert [p.name for p in cfg.pairs] == ["one", "two"]
    assert [p.key for p in cfg.pairs] == ["pairs[0]", "pairs[1]"]
    for spec in cfg.pairs:
        data = load_pair(spec)
        assert data.fixed_mask is not None and data.moving_mask is not None
        assert data.fixed_mask.GetPixelID() == sitk.sitkUInt8
        assert data.fixed_mask.GetSize() == data.fixed.GetSize()
        assert set(np.unique(sitk.GetArrayViewFromImage(data.fixed_mask))) == {0, 1}
        assert data.fixed_points is not None and data.fixed_points.shape == (20, 2)


def test_paths_are_relative_to_the_yaml_folder(tmp_path: Path, pair_yaml, run_cli, monkeypatch) -> None:
    pair_yaml(folder="deep/inside")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("check", Path("..") / "deep" / "inside" / "PAIR.yaml")
    assert result.code == 0, result.err
    cfg = load_config(Path("../deep/inside/PAIR.yaml"))
    assert cfg.pairs[0].fixed.resolve() == (tmp_path / "deep" / "inside" / "fixed.png").resolve()
    assert cfg.pairs[0].moving_landmarks.resolve() == (tmp_path / "deep/inside/moving_landmarks.csv").resolve()


def test_optional_keys_are_parsed(pair_yaml) -> None:
    path = pair_yaml(
        extra={
            "seed": 7,
            "deterministic": True,
            "prune": False,
            "objective": {"kind": "holdout", "repeats": 3, "aggregate": "worst"},
            "search": {
                "stage0.metric.number_of_histogram_bins": {"low": 16, "high": 64},
                "stage0.interpolator": "bspline",
            },
        }
    )
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.deterministic and not cfg.prune
    assert cfg.objective.kind == "holdout" and cfg.objective.repeats == 3 and not cfg.uses_landmarks
    assert cfg.search["stage0.metric.number_of_histogram_bins"].low == 16 and cfg.search["stage0.interpolator"].fixed


def test_load_config_raises_user_error_with_file_and_key(pair_yaml) -> None:
    path = pair_yaml(extra={"objective": {"kind": "tre", "repeats": 0}})
    with pytest.raises(UserError) as info:
        load_config(path)
    assert info.value.file == str(path.resolve()) and info.value.key == "objective.repeats"
