"""Landmark readers: the same LPS points written in every format read back alike; bad files are one-line UserErrors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoreg.errors import UserError
from autoreg.landmarks import read_landmarks, write_landmarks_csv

REAL_LANDMARKS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "afids_mni152nlin6asym_colin27_t1" / "fixed_landmarks.csv"
)


# --------------------------------------------------------------------------------------------------
# Images with non-trivial geometry and points in their physical (LPS) space.


def _image_3d() -> sitk.Image:
    """A small 3D image with anisotropic spacing, an offset origin and a rotation about z."""
    image = sitk.Image([12, 10, 8], sitk.sitkFloat32)
    image.SetSpacing((0.7, 1.1, 2.0))
    image.SetOrigin((-10.0, 5.0, 3.0))
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


def _image_2d() -> sitk.Image:
    """A small 2D image with anisotropic spacing, an offset origin and a rotation."""
    image = sitk.Image([16, 12], sitk.sitkFloat32)
    image.SetSpacing((0.5, 1.3))
    image.SetOrigin((4.0, -7.0))
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    image.SetDirection((c, -s, s, c))
    return image


def _points(image: sitk.Image) -> np.ndarray:
    """A few physical points inside ``image`` (from fractional indices), in LPS."""
    fractions = [(0.1, 0.2, 0.3), (0.5, 0.5, 0.5), (0.9, 0.15, 0.75), (0.33, 0.81, 0.05)]
    size = image.GetSize()
    return np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([f * (n - 1) for f, n in zip(frac, size)])
            for frac in fractions
        ],
        dtype=np.float64,
    )


# --------------------------------------------------------------------------------------------------
# Writers of each format (test-side, independent of the readers).


def _write_fcsv(path: Path, lps: np.ndarray, system: str | None) -> None:
    """Write 3D LPS points as a Slicer .fcsv in ``system`` (None: no CoordinateSystem line, which means RAS)."""
    coords = lps * ([-1.0, -1.0, 1.0] if system in (None, "RAS", "0") else 1.0)
    lines = ["# Markups fiducial file version = 4.11"]
    if system is not None:
        lines.append(f"# CoordinateSystem = {system}")
    lines.append("# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID")
    for i, row in enumerate(coords, start=1):
        x, y, z = (repr(float(v)) for v in row)
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i},{x},{y},{z},0,0,0,1,1,1,0,F-{i},,")
    path.write_text("\n".join(lines) + "\n")


def _write_mrk_json(path: Path, lps: np.ndarray, system: str | None) -> None:
    """Write 3D LPS points as Slicer markups JSON in ``system`` (None: key absent, which means LPS)."""
    coords = lps * ([-1.0, -1.0, 1.0] if system == "RAS" else 1.0)
    node: dict = {"type": "Fiducial", "coordinateUnits": "mm"}
    if system is not None:
        node["coordinateSystem"] = system
    node["controlPoints"] = [
        {"id": str(i), "label": f"F-{i}", "position": [float(v) for v in p], "positionStatus": "defined"}
        for i, p in enumerate(coords, start=1)
    ]
    document = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        "Schema/markups-schema-v1.0.3.json#",
        "markups": [{"type": "Line", "controlPoints": []}, node],
    }
    path.write_text(json.dumps(document, indent=2))


def _write_elastix(path: Path, rows: np.ndarray, kind: str) -> None:
    """Write an elastix point file of ``kind`` 'point' or 'index'."""
    body = "\n".join(" ".join(repr(float(v)) for v in row) for row in rows)
    path.write_text(f"{kind}\n{len(rows)}\n{body}\n")


def _to_index(image: sitk.Image, lps: np.ndarray) -> np.ndarray:
    """Continuous indices of physical points in ``image``."""
    return np.array([image.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in lps])


# --------------------------------------------------------------------------------------------------
# Round trips: every format gives back the same LPS points.

Writer = Callable[[Path, np.ndarray, sitk.Image], None]

FORMATS_3D: dict[str, tuple[str, Writer]] = {
    "csv": ("pts.csv", lambda p, pts, img: write_landmarks_csv(p, pts)),
    "fcsv_ras": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, pts, "RAS")),
    "fcsv_lps": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, pts, "LPS")),
    "fcsv_numeric_ras": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, pts, "0")),
    "fcsv_numeric_lps": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, pts, "1")),
    "fcsv_default_ras": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, pts, None)),
    "mrk_json_ras": ("pts.mrk.json", lambda p, pts, img: _write_mrk_json(p, pts, "RAS")),
    "mrk_json_lps": ("pts.mrk.json", lambda p, pts, img: _write_mrk_json(p, pts, "LPS")),
    "mrk_json_default_lps": ("pts.mrk.json", lambda p, pts, img: _write_mrk_json(p, pts, None)),
    "elastix_point": ("pts.txt", lambda p, pts, img: _write_elastix(p, pts, "point")),
    "elastix_index": ("pts.pts", lambda p, pts, img: _write_elastix(p, _to_index(img, pts), "index")),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS_3D))
def test_3d_formats_agree(tmp_path: Path, fmt: str) -> None:
    image = _image_3d()
    expected = _points(image)
    name, write = FORMATS_3D[fmt]
    path = tmp_path / name
    write(path, expected, image)
    got = read_landmarks(path, image=image, dim=3, key="landmarks.fixed")
    assert got.dtype == np.float64
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_ras_fcsv_really_flips_x_and_y(tmp_path: Path) -> None:
    path = tmp_path / "one.fcsv"
    path.write_text("# CoordinateSystem = RAS\nF_1,1.5,-2.5,3.5,0,0,0,1,1,1,0,F-1,,\n")
    np.testing.assert_array_equal(read_landmarks(path), [[-1.5, 2.5, 3.5]])


FORMATS_2D: dict[str, tuple[str, Writer]] = {
    "csv": ("pts.csv", lambda p, pts, img: write_landmarks_csv(p, pts)),
    "elastix_point": ("pts.txt", lambda p, pts, img: _write_elastix(p, pts, "point")),
    "elastix_index": ("pts.txt", lambda p, pts, img: _write_elastix(p, _to_index(img, pts), "index")),
    "fcsv_ras_z0": ("pts.fcsv", lambda p, pts, img: _write_fcsv(p, np.c_[pts, np.zeros(len(pts))], "RAS")),
    "mrk_json_lps_z0": ("pts.mrk.json", lambda p, pts, img: _write_mrk_json(p, np.c_[pts, np.zeros(len(pts))], "LPS")),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS_2D))
def test_2d_formats_agree(tmp_path: Path, fmt: str) -> None:
    image = _image_2d()
    expected = _points(image)
    name, write = FORMATS_2D[fmt]
    path = tmp_path / name
    write(path, expected, image)
    got = read_landmarks(path, image=image, dim=2, key="landmarks.moving")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_write_landmarks_csv_is_exact(tmp_path: Path) -> None:
    points = _points(_image_3d())
    path = tmp_path / "out.csv"
    write_landmarks_csv(path, points)
    assert path.read_text().splitlines()[0] == "x,y,z"
    np.testing.assert_array_equal(read_landmarks(path), points)
    write_landmarks_csv(path, points[:, :2])
    assert path.read_text().splitlines()[0] == "x,y"
    np.testing.assert_array_equal(read_landmarks(path, dim=2), points[:, :2])


def test_csv_header_is_flexible(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text("\ufefflabel, Z ,X , y,name\nAC,3,1,2,first\nPC,6.5,4,5,second\n\n")
    np.testing.assert_array_equal(read_landmarks(path, dim=3), [[1, 2, 3], [4, 5, 6.5]])


def test_real_landmark_file() -> None:
    if not REAL_LANDMARKS.is_file():
        pytest.skip(f"../shared/data not present: {REAL_LANDMARKS} is missing")
    points = read_landmarks(REAL_LANDMARKS, dim=3, key="landmarks.fixed")
    assert points.shape == (32, 3)
    assert points.dtype == np.float64
    assert np.isfinite(points).all()


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the file and the key.

KEY = "landmarks.fixed"

# name -> (file name, content or None for "do not create", read_landmarks keyword arguments, expected words)
ERROR_CASES: dict[str, tuple[str, str | None, dict, str]] = {
    "missing_csv": ("absent.csv", None, {}, "not found"),
    "missing_txt": ("absent.txt", None, {}, "not found"),
    "empty_csv": ("empty.csv", "", {}, "empty"),
    "blank_fcsv": ("blank.fcsv", "\n  \n", {}, "empty"),
    "empty_json": ("empty.mrk.json", "", {}, "empty"),
    "empty_txt": ("empty.txt", "", {}, "empty"),
    "csv_no_header": ("nohead.csv", "1,2,3\n4,5,6\n", {}, "header"),
    "csv_bad_header": ("badhead.csv", "a,b,c\n1,2,3\n", {}, "header"),
    "csv_semicolons": ("semi.csv", "x;y;z\n1;2;3\n", {}, "header"),
    "csv_duplicate_column": ("dup.csv", "x,y,x\n1,2,3\n", {}, "twice"),
    "csv_header_only": ("headonly.csv", "x,y,z\n", {}, "no points"),
    "csv_non_numeric": ("text.csv", "x,y,z\n1,2,3\n4,five,6\n", {}, "row 2"),
    "csv_empty_cell": ("cell.csv", "x,y,z\n1,,3\n", {}, "row 1"),
    "csv_too_few_columns": ("few.csv", "x,y,z\n1,2,3\n4,5\n", {}, "row 2 (line 3) has 2 columns"),
    "csv_too_many_columns": ("many.csv", "x,y\n1,2,3\n", {}, "row 1"),
    "csv_nan": ("nan.csv", "x,y,z\n1,2,3\nnan,5,6\n", {}, "NaN"),
    "csv_inf": ("inf.csv", "x,y\n1,-inf\n", {}, "finite"),
    "csv_dim_mismatch": ("three.csv", "x,y,z\n1,2,3\n", {"dim": 2}, "expected 2D"),
    "csv_2d_for_3d": ("two.csv", "x,y\n1,2\n", {"dim": 3}, "expected 3D"),
    "fcsv_ijk": ("ijk.fcsv", "# CoordinateSystem = 2\nF,1,2,3\n", {}, "IJK"),
    "fcsv_unknown_system": ("weird.fcsv", "# CoordinateSystem = XYZ\nF,1,2,3\n", {}, "RAS, LPS"),
    "fcsv_non_numeric": ("text.fcsv", "# CoordinateSystem = LPS\nF,1,two,3\n", {}, "row 1 (line 2)"),
    "fcsv_short_row": ("short.fcsv", "# CoordinateSystem = LPS\nF,1,2\n", {}, "columns"),
    "fcsv_no_points": ("none.fcsv", "# CoordinateSystem = LPS\n# columns = id,x,y,z\n", {}, "no points"),
    "fcsv_columns_lack_z": ("noz.fcsv", "# columns = id,x,y\nF,1,2\n", {}, "x, y and z"),
    "fcsv_2d_nonzero_z": ("z.fcsv", "# CoordinateSystem = LPS\nF,1,2,0\nG,1,2,0.5\n", {"dim": 2}, "point 2"),
    "fcsv_nan": ("nan.fcsv", "# CoordinateSystem = LPS\nF,1,2,nan\n", {}, "NaN"),
    "json_invalid": ("bad.mrk.json", '{"markups": [', {}, "not valid JSON"),
    "json_no_markups": ("nomark.mrk.json", '{"other": 1}', {}, "markups"),
    "json_no_points": (
        "nopts.mrk.json",
        '{"markups": [{"type": "Fiducial", "controlPoints": []}]}',
        {},
        "control points",
    ),
    "json_bad_system": (
        "sys.mrk.json",
        json.dumps({"markups": [{"coordinateSystem": "IJK", "controlPoints": [{"position": [1, 2, 3]}]}]}),
        {},
        "coordinateSystem",
    ),
    "json_short_position": (
        "pos.mrk.json",
        json.dumps({"markups": [{"controlPoints": [{"position": [1, 2]}]}]}),
        {},
        "control point 1",
    ),
    "json_string_position": (
        "str.mrk.json",
        json.dumps({"markups": [{"controlPoints": [{"position": [1, 2, 3]}, {"position": [1, "b", 3]}]}]}),
        {},
        "control point 2",
    ),
    "json_nan": ("nan.mrk.json", '{"markups": [{"controlPoints": [{"position": [1, NaN, 3]}]}]}', {}, "NaN"),
    "json_missing_point": (
        "miss.mrk.json",
        json.dumps(
            {"markups": [{"controlPoints": [{"label": "AC", "position": [0, 0, 0], "positionStatus": "missing"}]}]}
        ),
        {},
        "positionStatus",
    ),
    "json_2d_nonzero_z": (
        "z.mrk.json",
        json.dumps({"markups": [{"controlPoints": [{"position": [1, 2, 3]}]}]}),
        {"dim": 2},
        "z = 0",
    ),
    "elastix_bad_first_line": ("bad.txt", "1 2 3\n4 5 6\n", {}, "'point' or 'index'"),
    "elastix_index_without_image": ("idx.txt", "index\n1\n1 2 3\n", {}, "no image"),
    "elastix_index_wrong_dimension": ("idx2.txt", "index\n1\n1 2\n", {"image": _image_3d()}, "image is 3D"),
    "elastix_no_count": ("nocount.txt", "point\n", {}, "number of points"),
    "elastix_bad_count": ("count.txt", "point\ntwo\n1 2 3\n4 5 6\n", {}, "line 2"),
    "elastix_count_mismatch": ("mismatch.txt", "point\n3\n1 2 3\n4 5 6\n", {}, "says 3 points but 2 follow"),
    "elastix_ragged": ("ragged.txt", "point\n2\n1 2 3\n4 5\n", {}, "point 2 (line 4)"),
    "elastix_four_d": ("four.txt", "point\n1\n1 2 3 4\n", {}, "expected 2 or 3"),
    "elastix_non_numeric": ("word.txt", "point\n1\n1 x 3\n", {}, "point 1 (line 3)"),
    "elastix_inf": ("inf.txt", "point\n1\n1 inf 3\n", {}, "finite"),
    "elastix_dim_mismatch": ("dim.txt", "point\n1\n1 2 3\n", {"dim": 2}, "expected 2D"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_user_errors(tmp_path: Path, case: str) -> None:
    name, content, kwargs, words = ERROR_CASES[case]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as caught:
        read_landmarks(path, key=KEY, **kwargs)
    message = str(caught.value)
    assert name in message
    assert KEY in message
    assert "\n" not in message
    assert "Traceback" not in message
    assert words in message, message
    assert caught.value.key == KEY
    assert caught.value.file == str(path)


def test_directory_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "points.csv"
    folder.mkdir()
    with pytest.raises(UserError, match="directory") as caught:
        read_landmarks(folder, key=KEY)
    assert "\n" not in str(caught.value) and KEY in str(caught.value)


def test_binary_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x90")
    with pytest.raises(UserError, match="UTF-8") as caught:
        read_landmarks(path, key=KEY)
    assert "binary.csv" in str(caught.value)


def test_value_with_newline_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('x,y\n1,"2\nthree"\n')
    with pytest.raises(UserError, match="row 1") as caught:
        read_landmarks(path, key=KEY)
    assert "\n" not in str(caught.value)
