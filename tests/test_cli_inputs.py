"""Inputs a sweep of every command found mishandled: each is one line on stderr and a non-zero exit, at once.

Pipes and devices given as files (a hang or an endless read), outputs the system refuses, an empty choice list, a
fixed pyramid finer than the images, pairs of two dimensions in one study, a study where nothing completed, a
closed stdout, and scheduler addresses that are not one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import yaml
from conftest import quick_recipe

from autoreg.recipe import save_recipe


def _one_line(result, code: int, *fragments: str) -> str:
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err_lines
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _rigid_recipe(folder: Path, dim: int) -> Path:
    recipe = folder / f"rigid{dim}d.yaml"
    save_recipe(quick_recipe(["rigid"], dim), recipe)
    return recipe


def _edit(path: Path, **changes) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
@pytest.mark.parametrize("where", ["pair file", "image", "landmarks", "recipe"])
def test_a_named_pipe_given_as_a_file_is_refused_without_reading_it(where, pair_yaml, run_cli, tmp_path) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # no writer: opening it to read would wait forever
    path = pair_yaml(stages=["rigid"])

    def blocked(signum, frame):
        raise TimeoutError(f"the {where} pipe was opened for reading")

    previous = signal.signal(signal.SIGALRM, blocked)  # a regression fails here instead of hanging the suite
    signal.alarm(20)
    try:
        _run_with_pipe(where, pipe, path, run_cli, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_with_pipe(where: str, pipe: Path, path: Path, run_cli, tmp_path: Path) -> None:
    if where == "pair file":
        result = run_cli("check", pipe)
    elif where == "image":
        result = run_cli("check", _edit(path, fixed=str(pipe)))
    elif where == "landmarks":
        result = run_cli("check", _edit(path, landmarks={"fixed": str(pipe), "moving": str(pipe)}))
    else:
        result = run_cli(
            "apply", pipe, "--fixed", path.parent / "fixed.png", "--moving", path.parent / "moving.png",
            "--transform-out", tmp_path / "t.tfm",
        )  # fmt: skip
    _one_line(result, 2, "is a named pipe")


def test_a_device_or_a_huge_file_as_landmarks_is_refused_before_reading(
    pair_yaml, run_cli, tmp_path, monkeypatch
) -> None:
    path = pair_yaml(stages=["rigid"])
    _one_line(run_cli("check", _edit(path, landmarks={"fixed": "/dev/zero", "moving": "/dev/zero"})), 2, "a device")
    import autoreg.landmarks

    big = tmp_path / "big.csv"
    big.write_text("x,y\n" + "1,2\n" * 100)
    monkeypatch.setattr(autoreg.landmarks, "MAX_LANDMARK_BYTES", 50)
    _one_line(run_cli("check", _edit(path, landmarks={"fixed": str(big), "moving": str(big)})), 2, "under 50 bytes")


def test_outputs_the_system_refuses_fail_before_any_work(pair_yaml, run_cli, tmp_path) -> None:
    path = pair_yaml(stages=["rigid"])
    recipe = _rigid_recipe(tmp_path, 2)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    t0 = time.perf_counter()
    _one_line(run_cli("crossval", path, "--out", a_file), 2, "--out", "is a file")
    _one_line(run_cli("crossval", path, "--out", "/dev/null"), 2, "--out")
    if Path("/proc/self").is_dir():  # a folder where no file can be made
        _one_line(run_cli("evaluate", recipe, path, "--json", "/proc/x.json"), 2, "--json", "cannot write")
    assert time.perf_counter() - t0 < 30  # refused when the options are read, not after registering


def test_an_empty_choice_list_names_its_key(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["affine"], extra={"search": {"stage0.sampling.strategy": []}})
    _one_line(run_cli("check", path), 2, "search.stage0.sampling.strategy", "empty list")


def test_a_fixed_pyramid_coarser_than_the_images_is_refused(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["affine"], extra={"search": {"stage0.pyramid.shrink_factors": [64, 32]}})
    line = _one_line(run_cli("check", path), 2, "search.stage0.pyramid.shrink_factors", "shrink factor 64")
    assert "at most 16" in line  # the synthetic 2D pair is 64 voxels across: 16 leaves 4
    ok = pair_yaml(stages=["affine"], extra={"search": {"stage0.pyramid.shrink_factors": [16, 1]}})
    assert run_cli("check", ok).code == 0


def test_pairs_of_two_dimensions_in_one_study_are_refused(pair_yaml, run_cli, tmp_path) -> None:
    two = pair_yaml(stages=["rigid"], folder="two")
    three = pair_yaml(dim=3, stages=["rigid"], folder="three")
    doc = {
        "name": "mixed",
        "pairs": [
            {"name": "a", "fixed": str(two.parent / "fixed.png"), "moving": str(two.parent / "moving.png")},
            {"name": "b", "fixed": str(three.parent / "fixed.nii.gz"), "moving": str(three.parent / "moving.nii.gz")},
        ],
        "stages": ["rigid"],
    }
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump(doc))
    _one_line(run_cli("check", mixed), 2, "pairs[1].fixed", "is 3D but the study's first pair is 2D")
    holdout = _edit(two, holdout=[doc["pairs"][1]])
    _one_line(run_cli("check", holdout), 2, "holdout[0].fixed", "3D")


def test_a_recipe_of_another_dimension_cannot_be_enqueued(pair_yaml, run_cli, tmp_path) -> None:
    three = pair_yaml(dim=3, stages=["rigid"], folder="three")
    tuned = tmp_path / "tuned3d.yaml"
    assert run_cli("tune", three, "--trials", "1", "--jobs", "1", "-q").code == 0
    assert run_cli("export", three, "-o", tuned).code == 0
    two = pair_yaml(stages=["rigid"], folder="two", extra={"enqueue": [str(tuned)]})
    _one_line(run_cli("check", two), 2, "tuned on 3D images")


def test_a_tune_where_no_trial_completed_exits_1_with_the_reasons(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid"], extra={"trial_timeout": 0.0001})
    result = run_cli("tune", path, "--trials", "2", "--jobs", "1", "-q")
    line = _one_line(result, 1, "no trial of the study completed (cut at its time limit: 2 of 2)")
    assert "2 of 2" in line
    assert "best: no completed trial yet" in result.out


def test_a_closed_stdout_ends_quietly(pair_yaml) -> None:
    path = pair_yaml(stages=["rigid"])
    code = f"import sys; from autoreg.cli import entry; sys.argv = ['autoreg', 'check', {str(path)!r}]; entry()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `autoreg check PAIR.yaml | head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and err == "", err


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("bogus", "expected a scheduler address"),
        ("tcp://127.0.0.1:99999", "expected a scheduler address"),
        ("tcp://user:secret@127.0.0.1:8786", "tcp://user:***@127.0.0.1:8786"),
        ("missing/scheduler.json", "scheduler file"),
    ],
)
def test_a_scheduler_address_that_is_not_one_is_refused_at_once(address, fragment) -> None:
    pytest.importorskip("distributed")
    from autoreg.dask_cluster import connect
    from autoreg.errors import UserError

    with pytest.raises(UserError) as err:
        connect(address)
    assert fragment in str(err.value) and "secret" not in str(err.value)


def test_a_scheduler_file_that_is_not_one_and_a_closed_port(tmp_path) -> None:
    pytest.importorskip("distributed")
    import socket

    from autoreg.dask_cluster import connect
    from autoreg.errors import UserError

    garbage = tmp_path / "scheduler.json"
    garbage.write_bytes(b"\x00\xff not json")
    with pytest.raises(UserError, match="not a Dask scheduler file"):
        connect(str(garbage))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the Dask scheduler"):
        connect(f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10  # refused, not Dask's retries until its timeout


def test_a_dashboard_host_that_cannot_be_bound_is_one_line(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid"])
    assert run_cli("tune", path, "--trials", "1", "--jobs", "1", "-q").code == 0
    _one_line(run_cli("dashboard", path, "--host", "192.0.2.1", "--port", "18091"), 2, "--host", "cannot listen")


def test_apply_refuses_outputs_it_cannot_write_before_registering(pair_yaml, run_cli, tmp_path) -> None:
    three = pair_yaml(dim=3, stages=["rigid"], folder="three")
    recipe = _rigid_recipe(tmp_path, 3)
    images = ["--fixed", three.parent / "fixed.nii.gz", "--moving", three.parent / "moving.nii.gz"]
    line = _one_line(
        run_cli("apply", recipe, *images, "--transform-out", tmp_path / "t.tfm", "--image-out", tmp_path / "w.png"),
        2,
        "--image-out",
    )
    assert "3D" in line  # a PNG would have held the first slice only
    _one_line(run_cli("apply", recipe, *images, "--transform-out", tmp_path / "t.xyz"), 2, "--transform-out", ".tfm")
    assert not (tmp_path / "t.tfm").exists()


def test_a_dataset_with_landmarks_on_some_pairs_only_is_refused(pair_yaml, run_cli, tmp_path) -> None:
    one = pair_yaml(stages=["rigid"], folder="one")
    two = pair_yaml(stages=["rigid"], folder="two", seed=1)

    def entry(path: Path, landmarks: bool) -> dict:
        out = {
            "name": path.parent.name,
            "fixed": str(path.parent / "fixed.png"),
            "moving": str(path.parent / "moving.png"),
        }
        if landmarks:
            out["landmarks"] = yaml.safe_load(path.read_text())["landmarks"]
            out["landmarks"] = {k: str(path.parent / v) for k, v in out["landmarks"].items()}
        return out

    doc = {"name": "partial", "pairs": [entry(one, True), entry(two, False)], "stages": ["rigid"]}
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(doc))
    _one_line(run_cli("check", partial), 2, "pairs[1].landmarks", "pairs[0].landmarks has them", "kind: holdout")
    partial.write_text(yaml.safe_dump({**doc, "objective": {"kind": "holdout"}}))
    assert run_cli("check", partial).code == 0  # the holdout metric, asked for


def test_a_blank_storage_is_not_the_default_journal(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid"])
    _one_line(run_cli("tune", path, "--storage", "", "--trials", "1"), 2, "--storage")


def test_check_says_how_long_a_slow_baseline_will_take(pair_yaml, run_cli, monkeypatch) -> None:
    import autoreg.cli

    path = pair_yaml(dim=3, stages=["affine", "bspline"])
    assert "the baseline (trial 0" not in run_cli("check", path).out  # a small volume: nothing to say
    monkeypatch.setattr(autoreg.cli, "SLOW_BASELINE_S", 0.0)
    out = run_cli("check", path).out
    assert re.search(r"the baseline \(trial 0, SimpleITK's default recipe\) is predicted at about \d+ s", out), out


def test_apply_refuses_landmarks_off_the_images_as_tune_does(pair_yaml, run_cli, tmp_path) -> None:
    path = pair_yaml(stages=["rigid"])
    recipe = _rigid_recipe(tmp_path, 2)
    far = tmp_path / "far.csv"
    far.write_text("x,y\n1000,1000\n1010,1000\n")
    result = run_cli(
        "apply", recipe, "--fixed", path.parent / "fixed.png", "--moving", path.parent / "moving.png",
        "--transform-out", tmp_path / "t.tfm", "--fixed-landmarks", far, "--moving-landmarks", far,
    )  # fmt: skip
    _one_line(
        result,
        2,
        "--fixed-landmarks",
        "lies outside the fixed image (and 1 more), which spans [-0.5, 63.5] x [-0.5, 63.5]",
    )


def _jpeg_at_72_dpi(png: Path, jpg: Path) -> None:
    """The PNG as a JPEG whose JFIF header says 72 dots per inch (SimpleITK writes none; photo tools write 72)."""
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(png)), sitk.sitkUInt8), str(jpg))
    data = bytearray(jpg.read_bytes())
    at = data.find(b"JFIF\x00")
    data[at + 7] = 1  # density in dots per inch
    data[at + 8 : at + 12] = (72).to_bytes(2, "big") * 2
    jpg.write_bytes(bytes(data))
    assert sitk.ReadImage(str(jpg)).GetSpacing() == pytest.approx((25.4 / 72,) * 2)  # what ITK makes of it


def test_a_jpeg_s_print_resolution_is_not_its_pixel_size(pair_yaml, run_cli, tmp_path) -> None:
    """A JPEG registers in pixels, as a PNG does (its dpi is a print size): its pixel landmarks fit, the TRE is in px,
    and apply and the exported script read it the same way."""
    path = pair_yaml(stages=["rigid"], extra={"trial_timeout": 30})
    folder = path.parent
    for which in ("fixed", "moving"):
        _jpeg_at_72_dpi(folder / f"{which}.png", folder / f"{which}.jpg")
    _edit(path, fixed="fixed.jpg", moving="moving.jpg")
    result = run_cli("check", path)
    assert result.code == 0, result.err
    assert "spacing 1x1" in result.out and "0.3528" not in result.out, result.out
    study = tmp_path / "study"
    assert run_cli("tune", path, "--trials", 1, "--jobs", 1, "--study-dir", study, "-q").code == 0
    assert run_cli("export", path, "--study-dir", study, "-o", tmp_path / "r.py", "--format", "python").code == 0
    assert run_cli("export", path, "--study-dir", study, "-o", tmp_path / "r.yaml").code == 0
    files = [folder / "fixed.jpg", folder / "moving.jpg"]
    res = run_cli(
        "apply", tmp_path / "r.yaml", "--fixed", files[0], "--moving", files[1], "--transform-out", tmp_path / "a.tfm"
    )
    assert res.code == 0, res.err
    proc = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "r.py"), *map(str, files), str(tmp_path / "s.tfm")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    a, b = (sitk.ReadTransform(str(tmp_path / f)) for f in ("a.tfm", "s.tfm"))
    assert a.TransformPoint((20.0, 30.0)) == pytest.approx(b.TransformPoint((20.0, 30.0)), abs=1e-6)


def test_check_warns_about_a_landmark_row_copied_in_both_files(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid"])
    for which in ("fixed", "moving"):
        csv = path.parent / yaml.safe_load(path.read_text())["landmarks"][which]
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join([*lines, lines[3]]) + "\n")  # row 3 again, at the end of both files
    result = run_cli("check", path)
    assert result.code == 0
    assert "1 landmark row(s) repeat an earlier one in both files (first: row 21 = row 3)" in result.out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder where no folder can be made")
def test_a_study_folder_that_cannot_be_made_names_study_dir(pair_yaml, run_cli) -> None:
    path = pair_yaml(stages=["rigid"])
    _one_line(run_cli("tune", path, "--study-dir", "/proc/no_study_here", "--trials", "1", "-q"), 2, "--study-dir")


def test_a_log_scaled_range_must_be_above_zero(pair_yaml, run_cli) -> None:
    """A learning rate from -1 to 0 was accepted; Optuna then failed every trial that drew it."""
    path = pair_yaml(stages=["affine"], extra={"search": {"stage0.optimizer.learning_rate": {"low": -1, "high": 0}}})
    _one_line(run_cli("check", path), 2, "search.stage0.optimizer.learning_rate", "above 0")
