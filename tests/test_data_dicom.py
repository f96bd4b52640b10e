"""Image input: a folder holding one DICOM series wherever an image path goes, and a stderr that carries only the
one error line (ITK, GDCM and HDF5 write to the C-level stderr; ``-v`` shows what they said)."""

from __future__ import annotations

import locale
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import quick_recipe, synthetic_pair

from autoreg.config import load_config
from autoreg.data import file_digest, load_pair
from autoreg.recipe import save_recipe

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"


def write_series(image: sitk.Image, folder: Path, series_uid: str, description: str = "autoreg test") -> Path:
    """A 3D image as a DICOM series (one int16 file per slice), tagged as SimpleITK's DicomSeriesReadModifyWrite
    example does: the same series UID in every file, each slice's position, spacing and orientation."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 1000), sitk.sitkInt16)
    d = image.GetDirection()
    tags = {
        "0008|0060": "MR",
        "0008|103e": description,
        "0020|000d": STUDY_UID,
        "0020|000e": series_uid,
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
        "0018|0050": str(image.GetSpacing()[2]),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C": Python's default encoding
    try:  # would turn ASCII for every later test in the process
        for k in range(image.GetDepth()):
            slice_k = image[:, :, k]
            for tag, value in tags.items():
                slice_k.SetMetaData(tag, value)
            slice_k.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
            slice_k.SetMetaData("0020|0013", str(k + 1))
            writer.SetFileName(str(folder / f"s{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
            writer.Execute(slice_k)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return folder


def _geometry(image: sitk.Image, spacing=(0.9, 0.9, 1.5), origin=(-12.0, 7.5, 30.0)) -> sitk.Image:
    image = sitk.Image(image)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture
def dicom_pair(tmp_path: Path) -> dict[str, Path]:
    """The 3D synthetic pair (32^3) as two DICOM series folders, a mask series, and a folder with two series."""
    pair = synthetic_pair(3, "rigid")
    fixed, moving = _geometry(pair.fixed), _geometry(pair.moving)
    mask = sitk.Cast(fixed > 20, sitk.sitkFloat32)
    return {
        "fixed": write_series(fixed, tmp_path / "fixed_dcm", "1.2.826.0.1.3680043.2.1125.11"),
        "moving": write_series(moving, tmp_path / "moving_dcm", "1.2.826.0.1.3680043.2.1125.12"),
        "mask": write_series(mask, tmp_path / "mask_dcm", "1.2.826.0.1.3680043.2.1125.13"),
        "two": write_series(
            moving,
            write_series(fixed, tmp_path / "two", "1.2.826.0.1.3680043.2.1125.21", "T1"),
            "1.2.826.0.1.3680043.2.1125.22",
            "T2",
        ),
    }


def _pair_yaml(path: Path, **doc: Any) -> Path:
    path.write_text(yaml.safe_dump({"name": "dcm", "stages": ["rigid"], **{k: str(v) for k, v in doc.items()}}))
    return path


def test_a_dicom_folder_reads_with_its_geometry(dicom_pair, tmp_path) -> None:
    path = _pair_yaml(tmp_path / "PAIR.yaml", fixed=dicom_pair["fixed"], moving=dicom_pair["moving"])
    path.write_text(path.read_text() + f"masks: {{fixed: {dicom_pair['mask']}, moving: {dicom_pair['mask']}}}\n")
    pair = load_pair(load_config(path).pairs[0])
    assert pair.fixed.GetSize() == (32, 32, 32) and pair.fixed.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(pair.fixed.GetSpacing(), (0.9, 0.9, 1.5), atol=1e-6)
    np.testing.assert_allclose(pair.fixed.GetOrigin(), (-12.0, 7.5, 30.0), atol=1e-4)
    expected = sitk.GetArrayViewFromImage(synthetic_pair(3, "rigid").fixed) > 20
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(pair.fixed_mask).astype(bool), expected)
    assert pair.fixed_mask_coverage.inside_image == 1.0


def test_check_tune_and_apply_take_dicom_folders(dicom_pair, tmp_path, run_cli) -> None:
    path = _pair_yaml(tmp_path / "PAIR.yaml", fixed=dicom_pair["fixed"], moving=dicom_pair["moving"])
    path.write_text(path.read_text() + f"masks: {{fixed: {dicom_pair['mask']}}}\n")
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "fixed  size 32x32x32  spacing 0.9x0.9x1.5" in result.out
    assert "fixed mask: covers" in result.out
    result = run_cli("tune", path, "--trials", "1", "--jobs", "1", "--study-dir", tmp_path / "study", "-q")
    assert result.code == 0, result.err
    recipe = tmp_path / "R.yaml"
    save_recipe(quick_recipe(["rigid"], 3, strategy="random", percentage=0.2, iterations=20), recipe)
    result = run_cli(
        "apply",
        recipe,
        "--fixed",
        dicom_pair["fixed"],
        "--moving",
        dicom_pair["moving"],
        "--fixed-mask",
        dicom_pair["mask"],
        "--transform-out",
        tmp_path / "t.tfm",
        "--image-out",
        tmp_path / "w.nii.gz",
    )
    assert result.code == 0, result.err
    assert sitk.ReadImage(str(tmp_path / "w.nii.gz")).GetSize() == (32, 32, 32)


def test_a_single_dicom_file_is_a_2d_image(tmp_path, pair_yaml, run_cli) -> None:
    """One DICOM file reads as a 3D image one slice thick; it registers as the 2D image it is (so does a 1-slice
    mask)."""
    path = pair_yaml()
    folder = path.parent
    write_series(
        sitk.JoinSeries(sitk.ReadImage(str(folder / "fixed.png"), sitk.sitkFloat32)),
        tmp_path / "one",
        "1.2.826.0.1.3680043.2.1125.31",
    )
    (dcm,) = (tmp_path / "one").iterdir()
    mask = sitk.Image((64, 64, 1), sitk.sitkUInt8) + 1
    sitk.WriteImage(mask, str(folder / "slab.nrrd"))
    path.write_text(path.read_text().replace("fixed: fixed.png", f"fixed: {dcm}") + "masks: {fixed: slab.nrrd}\n")
    pair = load_pair(load_config(path).pairs[0])
    assert pair.dim == 2 and pair.fixed.GetSize() == (64, 64) and pair.fixed_mask.GetSize() == (64, 64)
    assert run_cli("check", path).code == 0


def test_a_folder_digest_follows_its_files(dicom_pair) -> None:
    """Provenance digests a series folder by its files' names and bytes (a file digest of a folder used to crash)."""
    folder = dicom_pair["fixed"]
    before = file_digest(folder)
    assert before == file_digest(folder)
    first = min(folder.iterdir())
    first.write_bytes(first.read_bytes()[:-1] + b"\x01")
    assert file_digest(folder) != before


def test_a_folder_with_two_series_lists_them(dicom_pair, tmp_path, run_cli) -> None:
    path = _pair_yaml(tmp_path / "PAIR.yaml", fixed=dicom_pair["two"], moving=dicom_pair["moving"])
    result = run_cli("check", path)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert f"{path}: fixed: {dicom_pair['two']} holds 2 DICOM series: " in line
    assert '1.2.826.0.1.3680043.2.1125.21 (32 files, "T1")' in line
    assert '1.2.826.0.1.3680043.2.1125.22 (32 files, "T2")' in line
    assert line.endswith("put each series in a folder of its own")


# --- stderr: one line, whatever the libraries print ------------------------------------------------------------


def _truncated_mha(path: Path) -> Path:
    """An MHA file cut short: ITK's MetaIO prints 'data not read completely' to the C-level stderr."""
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)), str(path))
    path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.fixture
def bad_inputs(tmp_path: Path, dicom_pair) -> dict[str, Path]:
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image\n")
    (tmp_path / "text.png").write_text("not an image\n")
    return {
        "folder without images": tmp_path / "no_images",
        "non-image file": tmp_path / "text.png",
        "truncated file": _truncated_mha(tmp_path / "cut.mha"),
        "folder with two series": dicom_pair["two"],
    }


EXPECTED = {
    "folder without images": "is a folder without a DICOM series",
    "non-image file": "not a format SimpleITK reads; supported: NIfTI",
    "truncated file": "cannot read image",
    "folder with two series": "holds 2 DICOM series",
}


def _autoreg(*argv: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoreg.cli", *map(str, argv)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_stderr_is_one_line_from_a_real_process(bad_inputs, dicom_pair, tmp_path, case) -> None:
    """The old code printed 26 lines of HDF5 diagnostics before the error for a folder, 2 MetaIO lines for a
    truncated file."""
    path = _pair_yaml(tmp_path / "PAIR.yaml", fixed=bad_inputs[case], moving=dicom_pair["moving"])
    proc = _autoreg("check", path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"autoreg: error: {path}: fixed: ") and EXPECTED[case] in proc.stderr


def test_apply_stderr_is_one_line_from_a_real_process(bad_inputs, dicom_pair, tmp_path) -> None:
    recipe = tmp_path / "R.yaml"
    save_recipe(quick_recipe(["rigid"], 3), recipe)
    proc = _autoreg(
        "apply",
        recipe,
        "--fixed",
        dicom_pair["fixed"],
        "--moving",
        bad_inputs["folder without images"],
        "--transform-out",
        tmp_path / "t.tfm",
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("autoreg: error: --moving: ")


def test_verbose_shows_what_the_library_said(bad_inputs, dicom_pair, tmp_path) -> None:
    path = _pair_yaml(tmp_path / "PAIR.yaml", fixed=bad_inputs["truncated file"], moving=dicom_pair["moving"])
    quiet, verbose = _autoreg("check", path), _autoreg("-v", "check", path)
    assert "M_ReadElementsData" not in quiet.stderr
    assert "DEBUG autoreg.library: reading " in verbose.stderr and "M_ReadElementsData" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == quiet.stderr.strip()  # the error line still comes last


def test_python_warnings_are_logged_not_printed(pair_yaml, run_cli, monkeypatch, caplog) -> None:
    """An Optuna or SQLAlchemy warning raised on the way to a user error must not come before the error line."""
    import warnings

    from autoreg import config, pipeline

    real = config.load_config

    def noisy(path):
        warnings.warn("a library's UserWarning", UserWarning, stacklevel=2)
        warnings.warn("an experimental feature", RuntimeWarning, stacklevel=2)
        return real(path)

    monkeypatch.setattr(config, "load_config", noisy)
    monkeypatch.setattr(pipeline, "load_config", noisy)  # (check reads PAIR.yaml through the pipeline)
    path = pair_yaml()
    path.write_text(path.read_text().replace("stages:", "unknown_key: 1\nstages:"))
    result = run_cli("check", path)
    assert result.code == 2 and len(result.err_lines) == 1, result.err
    assert "unknown key" in result.err
    with caplog.at_level("DEBUG", logger="autoreg.library"):
        result = run_cli("-v", "check", path)
    assert "a library's UserWarning" in caplog.text and "RuntimeWarning: an experimental feature" in caplog.text


def test_capture_restores_fd_2() -> None:
    """What is written to fd 2 inside the capture is kept from the terminal; fd 2 works again after it."""
    script = (
        "import os\n"
        "from autoreg.quiet import captured_stderr\n"
        "with captured_stderr('x'):\n    os.write(2, b'swallowed\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "after\n", proc.stderr
