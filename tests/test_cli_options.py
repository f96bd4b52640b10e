"""Options are checked at the door: each bad value is one line on stderr and exit 2, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _one_line(result, *fragments: str) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("autoreg: error: ") and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.parametrize(
    "option, value",
    [
        ("--timeout", "0"),
        ("--timeout", "-5"),
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "soon"),
        ("--seed", "-1"),
        ("--seed", str(2**31)),
        ("--seed", "1e3"),
        ("--trials", "0"),
        ("--trials", "-3"),
        ("--trials", "many"),
        ("--jobs", "0"),
        ("--jobs", "100000"),
    ],
)
def test_tune_option_values(option: str, value: str, pair_yaml, tmp_path) -> None:
    """A real process (a bad value used to hang: --timeout nan ran forever, --jobs 100000 forked without end)."""
    sdir = tmp_path / "s"
    done = subprocess.run(
        [sys.executable, "-m", "autoreg.cli", "tune", str(pair_yaml()), option, value, "--study-dir", str(sdir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autoreg: error: {option}: "), done.stderr
    assert not sdir.exists()  # refused before the study was made


def test_study_dir_that_is_a_file_or_a_device(pair_yaml, run_cli, tmp_path) -> None:
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for cmd in (
        ("tune", "--trials", "1"),
        ("export", "-o", tmp_path / "r.yaml"),
        ("report", "-o", tmp_path / "r.html"),
    ):
        for where in (a_file, a_file / "below", "/dev/null"):
            line = _one_line(run_cli(cmd[0], pair_yaml(), *cmd[1:], "--study-dir", where), "--study-dir")
            assert "is a file" in line or "device" in line


@pytest.mark.parametrize("name", ["trailing\n", "bad\nname", "tab\there", "bell\x07", "x" * 101, "", "../up", "a b"])
def test_study_name_with_control_characters_or_too_long(name: str, pair_yaml, run_cli) -> None:
    path = pair_yaml()
    doc = yaml.safe_load(path.read_text())
    doc["name"] = name
    path.write_text(yaml.safe_dump(doc))
    line = _one_line(run_cli("check", path), ": name: ")
    assert len(line) < len(str(path)) + 200


def test_a_hundred_character_name_is_fine(pair_yaml, run_cli) -> None:
    assert run_cli("check", pair_yaml(name="n" * 100)).code == 0


def _recipe(tmp_path: Path) -> Path:
    from autoreg.recipe import default_recipe, save_recipe

    path = tmp_path / "r.yaml"
    save_recipe(default_recipe(["rigid"], 2), path)
    return path


def test_apply_threads_below_one(pair_yaml, run_cli, tmp_path) -> None:
    data = pair_yaml().parent
    for value in ("0", "-2"):
        _one_line(
            run_cli(
                "apply",
                _recipe(tmp_path),
                "--fixed",
                data / "fixed.png",
                "--moving",
                data / "moving.png",
                "--transform-out",
                tmp_path / "t.tfm",
                "--threads",
                value,
            ),
            "--threads",
        )
    assert not (tmp_path / "t.tfm").exists()


def test_outputs_into_a_missing_folder_fail_before_any_work(pair_yaml, run_cli, tmp_path) -> None:
    missing = tmp_path / "no" / "such"
    pair = pair_yaml()
    _one_line(run_cli("evaluate", _recipe(tmp_path), pair, "--json", missing / "e.json"), "--json")
    _one_line(run_cli("export", pair, "-o", missing / "r.yaml", "--study-dir", tmp_path / "s"), "--output")
    _one_line(run_cli("report", pair, "-o", missing / "r.html", "--study-dir", tmp_path / "s"), "--output")
    _one_line(run_cli("report", pair, "-o", tmp_path, "--study-dir", tmp_path / "s"), "--output", "is a folder")
    _one_line(
        run_cli("apply", tmp_path / "r.yaml", "--fixed", "f", "--moving", "m", "--transform-out", missing / "t.tfm"),
        "--transform-out",
    )


@pytest.mark.parametrize(
    "cmd, option, value",
    [
        ("export", "--repeats", "-1"),
        ("evaluate", "--repeats", "0"),
        ("dashboard", "--port", "0"),
        ("dashboard", "--port", "70000"),
    ],
)
def test_other_ranges(cmd: str, option: str, value: str, pair_yaml, run_cli, tmp_path) -> None:
    pair = pair_yaml()
    args = {"export": (pair, "-o", tmp_path / "r.yaml"), "evaluate": (_recipe(tmp_path), pair), "dashboard": (pair,)}[
        cmd
    ]
    _one_line(run_cli(cmd, *args, option, value), option)


def test_argparse_errors_are_one_line_too(run_cli) -> None:
    _one_line(run_cli("tune"), "required: pair", "autoreg tune --help")
    _one_line(run_cli("tune", "p.yaml", "--no-such-option"), "unrecognized arguments")
