"""Faults with real processes and files: a torn journal line, concurrent tunes, a SIGKILLed tune's workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoreg.recipe import load_recipe


def autoreg(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoreg.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _quick_pair(pair_yaml, name: str = "syn") -> Path:
    return pair_yaml(name=name, extra={"search": {"stage0.pyramid.levels": 1}})


def _tear_last_line(journal: Path) -> bytes:
    """Cut the journal's last record in half, as a process killed in the middle of its write leaves it."""
    data = journal.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    last = data[start:]
    journal.write_bytes(data[:start] + last[: len(last) // 2])
    return last[: len(last) // 2]


# --- a torn journal line --------------------------------------------------------------------------------------


def test_a_torn_journal_line_never_costs_the_study(pair_yaml, tmp_path) -> None:
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    journal = sdir / "journal.log"
    first = autoreg("tune", pair, "--trials", 3, "--jobs", 1, "-q", "--study-dir", sdir)
    assert first.returncode == 0, first.stderr
    torn = _tear_last_line(journal)
    n_lines = journal.read_bytes().count(b"\n")

    again = autoreg("tune", pair, "--trials", 6, "--jobs", 2, "-q", "--study-dir", sdir)
    assert again.returncode == 0, again.stderr
    assert "torn record" in again.stderr and "Traceback" not in again.stderr
    lines = journal.read_bytes().split(b"\n")
    assert lines[n_lines] == torn  # the torn line was closed, not continued
    for number, line in enumerate(lines[:-1]):  # and every other line is a whole record
        if number != n_lines:
            assert json.loads(line)["op_code"] is not None

    out = tmp_path / "best.yaml"
    exported = autoreg("export", pair, "--study-dir", sdir, "-o", out, "--repeats", 0)
    assert exported.returncode == 0, exported.stderr
    assert "torn record" in exported.stderr
    assert load_recipe(out).provenance["score"] is not None
    reported = autoreg("report", pair, "--study-dir", sdir, "-o", tmp_path / "r.html")
    assert reported.returncode == 0, reported.stderr

    from autoreg.study import StorageSpec, open_storage  # what the dashboard serves

    study = optuna.load_study(study_name="syn", storage=open_storage(StorageSpec(str(journal), True)))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) >= 6 and sum(t.state == TrialState.COMPLETE for t in trials) >= 5


def test_a_torn_line_left_by_a_reader_is_closed_and_skipped(pair_yaml, tmp_path) -> None:
    """export alone (no tune after the crash) reads the study and closes the torn line for the next writer."""
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    assert autoreg("tune", pair, "--trials", 3, "--jobs", 1, "-q", "--study-dir", sdir).returncode == 0
    _tear_last_line(sdir / "journal.log")
    exported = autoreg("export", pair, "--study-dir", sdir, "-o", tmp_path / "r.yaml", "--repeats", 0)
    assert exported.returncode == 0, exported.stderr
    assert "torn record" in exported.stderr
    assert (sdir / "journal.log").read_bytes().endswith(b"\n")


def test_a_journal_continued_on_a_torn_line_is_read_again(pair_yaml, tmp_path) -> None:
    """A journal written by an older autoreg, whose next append continued the torn line: the torn half is skipped,
    the record glued onto it is kept, and every command works again."""
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    assert autoreg("tune", pair, "--trials", 3, "--jobs", 1, "-q", "--study-dir", sdir).returncode == 0
    journal = sdir / "journal.log"
    data = journal.read_bytes()
    lines = data.split(b"\n")[:-1]
    glued = lines[-2][: len(lines[-2]) // 2] + lines[-1]  # the last record written onto a torn one
    journal.write_bytes(b"\n".join([*lines[:-2], glued]) + b"\n")
    assert autoreg("tune", pair, "--trials", 5, "--jobs", 1, "-q", "--study-dir", sdir).returncode == 0
    exported = autoreg("export", pair, "--study-dir", sdir, "-o", tmp_path / "r.yaml", "--repeats", 0)
    assert exported.returncode == 0, exported.stderr
    assert "kept the record written after it" in exported.stderr
