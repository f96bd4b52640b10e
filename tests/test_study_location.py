"""A study lives beside its PAIR.yaml (``studies/<name>``), so every command finds it from any working directory."""

from __future__ import annotations

import json
from pathlib import Path


def test_export_and_report_find_the_study_from_another_directory(pair_yaml, run_cli, tmp_path, monkeypatch) -> None:
    pair = pair_yaml(extra={"search": {"stage0.pyramid.levels": 1}})
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    tuned = run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q")
    assert tuned.code == 0, tuned.err
    beside = pair.parent / "studies" / "syn"
    assert (beside / "journal.log").is_file() and not (here / "studies").exists()
    assert json.loads((beside / "study.json").read_text())["directory"] == str(beside.resolve())
    assert str(beside) in tuned.out  # the summary says where the study lives

    monkeypatch.chdir(elsewhere)
    exported = run_cli("export", Path("..") / pair.relative_to(tmp_path), "-o", "r.yaml", "--repeats", "0")
    assert exported.code == 0, exported.err
    reported = run_cli("report", pair, "-o", "r.html")
    assert reported.code == 0, reported.err
    assert (elsewhere / "r.yaml").is_file() and (elsewhere / "r.html").is_file()
    again = run_cli("tune", pair, "--trials", "3", "--jobs", "1", "-q")  # resumes the same study
    assert again.code == 0 and "3 trials" in again.out, again.out


def test_no_study_names_where_it_looked_and_study_dir(pair_yaml, run_cli) -> None:
    pair = pair_yaml()
    for cmd in (("export", "-o", pair.parent / "r.yaml"), ("report", "-o", pair.parent / "r.html"), ("dashboard",)):
        result = run_cli(cmd[0], pair, *cmd[1:])
        assert result.code == 2
        assert len(result.err_lines) == 1, result.err
        line = result.err_lines[0]
        assert str(pair.parent / "studies" / "syn" / "journal.log") in line and "--study-dir" in line, line


def test_a_study_in_the_old_place_is_still_used(pair_yaml, run_cli, tmp_path, monkeypatch, caplog) -> None:
    """Studies tuned before (kept in ./studies/<name> of the working directory) are not lost."""
    pair = pair_yaml()
    monkeypatch.chdir(tmp_path)
    tuned = run_cli("tune", pair, "--trials", "2", "--jobs", "1", "-q", "--study-dir", tmp_path / "studies" / "syn")
    assert tuned.code == 0, tuned.err
    exported = run_cli("export", pair, "-o", "r.yaml", "--repeats", "0")
    assert exported.code == 0, exported.err
    assert "old default" in caplog.text
