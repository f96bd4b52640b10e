"""Landmark (fiducial) file readers returning physical points in ITK's LPS frame.

Every reader returns a float64 array of shape ``(n, dim)`` in the same physical frame SimpleITK uses
(LPS, millimetres or whatever unit the image spacing is in), so landmark errors can be measured directly
against points mapped through a SimpleITK transform. Every problem with a file is a ``UserError`` naming
the file and the PAIR.yaml key, in one line.

Supported formats, chosen from the file name:

* ``.csv``: a header naming the columns ``x,y`` or ``x,y,z`` (any case, extra columns such as ``label``
  allowed); coordinates are already physical LPS.
* ``.fcsv``: 3D Slicer markups fiducial CSV. ``# CoordinateSystem = RAS|LPS|0|1`` selects the frame;
  when absent RAS is assumed (files written before Slicer 4.11 carried no such line and were RAS).
* ``.mrk.json`` (any ``.json``): 3D Slicer markups JSON. ``coordinateSystem`` defaults to LPS when
  absent, as in the Slicer schema (``markups-schema-v1.0.x``, ``"default": "LPS"``) and as Slicer's own
  reader does; Slicer writes LPS since 4.11. The first markup with control points is used.
* anything else: an elastix point file (``point`` or ``index``, then the count, then one point a line).

Slicer formats are always 3D; a 2D result (``dim=2``) is accepted only when every z is 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autoreg.errors import UserError, special_file
from autoreg.registration.core import SLICE_PLANE_KEY

__all__ = ["read_landmarks", "write_landmarks_csv"]

#: Landmark files larger than this are refused before reading: a million 3D points in CSV take about 40 MB.
MAX_LANDMARK_BYTES = 64_000_000
#: Column order of a Slicer .fcsv file without a ``# columns =`` line (Slicer 4.6 and later).
FCSV_DEFAULT_COLUMNS: tuple[str, ...] = (
    "id",
    "x",
    "y",
    "z",
    "ow",
    "ox",
    "oy",
    "oz",
    "vis",
    "sel",
    "lock",
    "label",
    "desc",
    "associatedNodeID",
)

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


class ImageLike(Protocol):
    """What an elastix ``index`` file needs of an image: its dimension and its index-to-physical map."""

    def GetDimension(self) -> int: ...

    def TransformContinuousIndexToPhysicalPoint(self, index: Sequence[float]) -> Sequence[float]: ...


def read_landmarks(
    path: str | Path,
    *,
    image: ImageLike | None = None,
    dim: int | None = None,
    key: str = "landmarks",
) -> np.ndarray:
    """Read a landmark file as physical LPS points, a float64 array of shape ``(n, dim)``.

    The format comes from the file name (see the module docstring); ``image`` is needed only for elastix
    ``index`` files, ``dim`` (2 or 3) is checked when given, ``key`` names the setting in error messages.
    """
    if dim is not None and dim not in (2, 3):
        raise ValueError(f"dim must be 2, 3 or None, not {dim!r}")
    path = Path(path)
    text = _read_text(path, key)
    name = path.name.lower()
    plane = _plane_of(image) if dim == 2 else None
    slicer_dim = None if plane is not None else dim  # on a slice's plane, Slicer's 3D points are read whole first
    if name.endswith(".fcsv"):
        points = _parse_fcsv(text, path, key, slicer_dim)
    elif name.endswith(".json"):
        points = _parse_markups_json(text, path, key, slicer_dim)
    elif name.endswith(".csv"):
        points = _parse_csv(text, path, key)
    else:
        points = _parse_elastix(text, path, key, image)
    if plane is not None and points.shape[1] == 3:
        points = _on_plane(points, plane, path, key)
    if dim is not None and points.shape[1] != dim:
        raise UserError(
            f"has {points.shape[1]}D points; expected {dim}D landmarks",
            file=path,
            key=key,
        )
    return points


def write_landmarks_csv(path: str | Path, points: Any) -> None:
    """Write points of shape ``(n, 2)`` or ``(n, 3)`` as a CSV with header ``x,y[,z]``.

    Floats are written with ``repr`` precision so that reading the file back gives the same numbers.
    """
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (n, 2) or (n, 3), not {array.shape}")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["x", "y", "z"][: array.shape[1]])
        for row in array:
            writer.writerow([repr(float(v)) for v in row])


# --------------------------------------------------------------------------------------------------
# Helpers shared by the formats.


def _read_text(path: Path, key: str) -> str:
    """Read the whole file as UTF-8 text (a BOM tolerated); a missing, unreadable or blank file is a UserError."""
    if not path.exists():
        raise UserError(
            "file not found; expected a landmark file (.csv, .fcsv, .mrk.json or elastix .txt)", file=path, key=key
        )
    if path.is_dir():
        raise UserError("is a directory; expected a landmark file", file=path, key=key)
    special = special_file(path)
    if special:
        raise UserError(f"is {special}; expected a landmark file", file=path, key=key)
    size = path.stat().st_size
    if size > MAX_LANDMARK_BYTES:
        raise UserError(
            f"is {size} bytes; expected a landmark file under {MAX_LANDMARK_BYTES} bytes", file=path, key=key
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError("is not a UTF-8 text file; expected a text landmark file", file=path, key=key) from None
    except OSError as err:
        raise UserError(
            f"cannot be read ({err.strerror or type(err).__name__}); expected a readable landmark file",
            file=path,
            key=key,
        ) from None
    if not text.strip():
        raise UserError("file is empty; expected landmark points", file=path, key=key)
    return text


def _show(value: Any, limit: int = 40) -> str:
    """Quote a value from the file for a one-line message (repr escapes newlines; long values are cut)."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _number(value: Any, where: str, what: str, path: Path, key: str) -> float:
    """Parse one coordinate as a finite float, naming ``where`` (row/line) and ``what`` (column) if it is not."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise UserError(
            f"{where}: {what} is {_show(value)}, not a number; expected numeric coordinates", file=path, key=key
        ) from None
    if not math.isfinite(number):
        raise UserError(
            f"{where}: {what} is {_show(value)}; expected finite coordinates (no NaN or inf)", file=path, key=key
        )
    return number


def _nonempty(points: list[list[float]], path: Path, key: str) -> np.ndarray:
    """Turn the parsed rows into the result array, refusing a file that holds no points."""
    if not points:
        raise UserError("holds no points; expected at least one landmark", file=path, key=key)
    return np.asarray(points, dtype=np.float64)


def _plane_of(image: Any) -> tuple[float, float] | None:
    """(z, thickness) of the slice a 2D image was read from (``data.read_image``), if it was one."""
    if image is None or not hasattr(image, "HasMetaDataKey") or not image.HasMetaDataKey(SLICE_PLANE_KEY):
        return None
    z, thickness = (float(v) for v in image.GetMetaData(SLICE_PLANE_KEY).split())
    return z, thickness


def _on_plane(points: np.ndarray, plane: tuple[float, float], path: Path, key: str) -> np.ndarray:
    """3D points on a one-slice volume's plane (within half its thickness) as the slice's 2D points."""
    z, thickness = plane
    off = np.flatnonzero(np.abs(points[:, 2] - z) > thickness / 2)
    if off.size:
        first = int(off[0])
        raise UserError(
            f"point {first + 1} has z = {float(points[first, 2]):.6g}, off the image's one slice at z = {z:.6g} "
            f"({thickness:.4g} thick)",
            file=path,
            key=key,
        )
    return points[:, :2].copy()


def _slicer_to_dim(points: np.ndarray, dim: int | None, path: Path, key: str) -> np.ndarray:
    """Slicer points are 3D; for ``dim == 2`` keep x,y only when every z is exactly 0."""
    if dim != 2:
        return points
    nonzero = np.flatnonzero(points[:, 2] != 0.0)
    if nonzero.size:
        first = int(nonzero[0])
        raise UserError(
            f"point {first + 1} has z = {float(points[first, 2]):.6g}; 2D landmarks from a 3D Slicer file need z = 0 "
            "for every point",
            file=path,
            key=key,
        )
    return points[:, :2].copy()


# --------------------------------------------------------------------------------------------------
# Plain CSV.


def _parse_csv(text: str, path: Path, key: str) -> np.ndarray:
    """Parse a CSV whose header names x, y and optionally z (case-insensitive); other columns are ignored."""
    rows = [(number, row) for number, row in _csv_rows(text) if any(cell.strip() for cell in row)]
    if not rows:
        raise UserError("holds only empty cells; expected a header x,y or x,y,z and landmark rows", file=path, key=key)
    header_line, header = rows[0]
    names = [cell.strip().lower() for cell in header]
    expected = "expected a header naming the columns x,y or x,y,z"
    for name in ("x", "y", "z"):
        if names.count(name) > 1:
            raise UserError(
                f"header {_show(','.join(header), 60)} has column {name!r} twice; {expected}", file=path, key=key
            )
    if "x" not in names or "y" not in names:
        raise UserError(
            f"line {header_line}: header {_show(','.join(header), 60)} lacks column x or y; {expected}",
            file=path,
            key=key,
        )
    columns = [names.index("x"), names.index("y")] + ([names.index("z")] if "z" in names else [])
    axes = "xyz"[: len(columns)]
    points: list[list[float]] = []
    for row_number, (line, row) in enumerate(rows[1:], start=1):
        where = f"row {row_number} (line {line})"
        if len(row) != len(header):
            raise UserError(
                f"{where} has {len(row)} columns; expected {len(header)} like the header", file=path, key=key
            )
        points.append([_number(row[c], where, f"column {a}", path, key) for c, a in zip(columns, axes)])
    return _nonempty(points, path, key)


def _csv_rows(text: str) -> list[tuple[int, list[str]]]:
    """Split CSV text into rows, each with the (1-based) line number it starts on."""
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[str]]] = []
    line = 1
    for row in reader:
        rows.append((line, row))
        line = reader.line_num + 1
    return rows


# --------------------------------------------------------------------------------------------------
# 3D Slicer markups fiducial CSV (.fcsv).

_FCSV_SYSTEM = re.compile(r"^#\s*CoordinateSystem\s*=\s*(.*?)\s*$", re.IGNORECASE)
_FCSV_COLUMNS = re.compile(r"^#\s*columns\s*=\s*(.*?)\s*$", re.IGNORECASE)


def _parse_fcsv(text: str, path: Path, key: str, dim: int | None) -> np.ndarray:
    """Parse a Slicer .fcsv: ``#`` comment lines give the coordinate system and column order; rows hold points."""
    system = "RAS"  # Slicer's frame before 4.11, when .fcsv files carried no CoordinateSystem line.
    columns: list[str] = list(FCSV_DEFAULT_COLUMNS)
    data_lines: list[str] = []
    data_numbers: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            if match := _FCSV_SYSTEM.match(stripped):
                system = _fcsv_system(match.group(1), number, path, key)
            elif match := _FCSV_COLUMNS.match(stripped):
                columns = [name.strip().lower() for name in match.group(1).split(",")]
            continue
        if stripped:
            data_lines.append(line)
            data_numbers.append(number)
    names = [name.lower() for name in columns]
    if not all(axis in names for axis in "xyz"):
        raise UserError(
            f"'# columns =' line names {_show(','.join(columns), 60)}; expected it to include x, y and z",
            file=path,
            key=key,
        )
    indices = [names.index(axis) for axis in "xyz"]
    points: list[list[float]] = []
    rows = list(csv.reader(data_lines))
    for row_number, (line, row) in enumerate(zip(data_numbers, rows), start=1):
        where = f"row {row_number} (line {line})"
        if len(row) <= max(indices):
            raise UserError(
                f"{where} has {len(row)} columns; expected at least {max(indices) + 1} "
                f"({','.join(columns[: max(indices) + 1])})",
                file=path,
                key=key,
            )
        points.append([_number(row[i], where, f"column {a}", path, key) for i, a in zip(indices, "xyz")])
    array = _nonempty(points, path, key)
    if system == "RAS":
        array = array * _RAS_TO_LPS
    return _slicer_to_dim(array, dim, path, key)


def _fcsv_system(value: str, line: int, path: Path, key: str) -> str:
    """Map a .fcsv CoordinateSystem value (name, or the older number 0/1/2) to "RAS" or "LPS"."""
    upper = value.strip().upper()
    if upper in ("0", "RAS"):
        return "RAS"
    if upper in ("1", "LPS"):
        return "LPS"
    if upper in ("2", "IJK"):
        raise UserError(
            f"line {line}: CoordinateSystem is IJK (image indices), which is not supported; "
            "expected RAS or LPS (export the points in world coordinates)",
            file=path,
            key=key,
        )
    raise UserError(f"line {line}: CoordinateSystem is {_show(value)}; expected RAS, LPS, 0 or 1", file=path, key=key)


# --------------------------------------------------------------------------------------------------
# 3D Slicer markups JSON (.mrk.json).


def _parse_markups_json(text: str, path: Path, key: str, dim: int | None) -> np.ndarray:
    """Parse Slicer markups JSON: the first markup with control points, converted from its coordinateSystem."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "expected a 3D Slicer markups .mrk.json file",
            file=path,
            key=key,
        ) from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise UserError('has no "markups" list; expected a 3D Slicer markups .mrk.json file', file=path, key=key)
    node = next(
        (m for m in markups if isinstance(m, dict) and isinstance(m.get("controlPoints"), list) and m["controlPoints"]),
        None,
    )
    if node is None:
        raise UserError("has no markup with control points; expected at least one placed landmark", file=path, key=key)
    system = node.get("coordinateSystem", "LPS")  # Default of the Slicer schema and of Slicer's reader.
    if not isinstance(system, str) or system.strip().upper() not in ("LPS", "RAS"):
        raise UserError(f'coordinateSystem is {_show(system)}; expected "LPS" or "RAS"', file=path, key=key)
    points: list[list[float]] = []
    for number, point in enumerate(node["controlPoints"], start=1):
        where = f"control point {number}"
        if not isinstance(point, dict):
            raise UserError(f'{where} is {_show(point)}; expected an object with a "position"', file=path, key=key)
        status = point.get("positionStatus", "defined")
        if status != "defined":
            raise UserError(
                f"{where} (label {_show(point.get('label', ''))}) has positionStatus {_show(status)}; "
                'expected every landmark to be placed ("defined")',
                file=path,
                key=key,
            )
        position = point.get("position")
        if not isinstance(position, list) or len(position) != 3:
            raise UserError(f"{where} has position {_show(position)}; expected a list [x, y, z]", file=path, key=key)
        points.append([_number(v, where, f"position {a}", path, key) for v, a in zip(position, "xyz")])
    array = _nonempty(points, path, key)
    if system.strip().upper() == "RAS":
        array = array * _RAS_TO_LPS
    return _slicer_to_dim(array, dim, path, key)


# --------------------------------------------------------------------------------------------------
# elastix point files.


def _parse_elastix(text: str, path: Path, key: str, image: ImageLike | None) -> np.ndarray:
    """Parse an elastix point file: ``point`` (physical LPS) or ``index`` (mapped through ``image``), count, rows."""
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    kind_line, kind = lines[0]
    kind = kind.lower()
    if kind not in ("point", "index"):
        raise UserError(
            f"line {kind_line} is {_show(lines[0][1])}; expected an elastix point file whose first "
            "line is 'point' or 'index' (or use .csv, .fcsv or .mrk.json)",
            file=path,
            key=key,
        )
    if kind == "index" and image is None:
        raise UserError(
            "is an elastix 'index' file but no image was given to map indices to physical points; "
            "expected a 'point' file, or the image",
            file=path,
            key=key,
        )
    if len(lines) < 2:
        raise UserError(
            f"has no point count after '{kind}'; expected the number of points on the second line", file=path, key=key
        )
    count_line, count_text = lines[1]
    try:
        count = int(count_text)
    except ValueError:
        raise UserError(
            f"line {count_line} is {_show(count_text)}; expected the number of points (an integer)", file=path, key=key
        ) from None
    rows = lines[2:]
    if count != len(rows):
        raise UserError(
            f"line {count_line} says {count} points but {len(rows)} follow; expected them to agree", file=path, key=key
        )
    points: list[list[float]] = []
    width: int | None = None
    for row_number, (line, content) in enumerate(rows, start=1):
        where = f"point {row_number} (line {line})"
        values = content.split()
        if width is None:
            width = len(values)
            if width not in (2, 3):
                raise UserError(f"{where} has {width} coordinates; expected 2 or 3", file=path, key=key)
        elif len(values) != width:
            raise UserError(
                f"{where} has {len(values)} coordinates; expected {width} like the first point", file=path, key=key
            )
        points.append([_number(v, where, f"coordinate {a}", path, key) for v, a in zip(values, "xyz")])
    array = _nonempty(points, path, key)
    if kind == "index":
        assert image is not None
        if image.GetDimension() != array.shape[1]:
            raise UserError(
                f"holds {array.shape[1]}D indices but the image is {image.GetDimension()}D; "
                "expected indices of the same dimension as the image",
                file=path,
                key=key,
            )
        array = np.asarray(
            [image.TransformContinuousIndexToPhysicalPoint([float(v) for v in row]) for row in array], dtype=np.float64
        )
    return array


#: Fewer landmarks than this in a pair: no split (a report set of two or three points would say little).
MIN_LANDMARKS_TO_SPLIT = 10


def split_landmarks(points: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the selection and the report landmarks: about ``fraction`` of the points, evenly along a Morton
    (z-order) curve through them from a seeded offset, so that both sets spread over the image."""
    n = len(points)
    if fraction <= 0 or n < MIN_LANDMARKS_TO_SPLIT:
        return np.arange(n), np.arange(0)
    lo, hi = points.min(axis=0), points.max(axis=0)
    cells = np.floor((points - lo) / np.where(hi > lo, hi - lo, 1.0) * 1023.999).astype(np.int64)
    order = np.argsort([_morton(c) for c in cells], kind="stable")
    offset = np.random.default_rng(seed).random() / fraction  # where along the curve the every-k-th count starts
    marks = np.floor((np.arange(-1, n) + offset) * fraction)
    chosen = np.diff(marks) > 0
    report = np.sort(order[chosen])
    return np.setdiff1d(np.arange(n), report), report


def _morton(cell: np.ndarray) -> int:
    """Interleave the bits of a cell's coordinates (10 bits each): nearby cells get nearby codes."""
    code = 0
    for bit in range(10):
        for axis, c in enumerate(cell):
            code |= ((int(c) >> bit) & 1) << (bit * len(cell) + axis)
    return code
