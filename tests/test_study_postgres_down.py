"""PostgreSQL stops under a running tune: one line, passwords hidden, every finished trial kept.

A module of its own because its test kills the module's throw-away server (conftest's ``postgres_url``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_dask import SLOW_SEARCH, write_study

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _server_pids(port: str) -> list[int]:
    """The PostgreSQL processes listening on ``port`` (started with ``-p PORT``), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            entry.name.isdigit()
            and b"-p" in cmdline
            and port.encode() in cmdline
            and any(b"postgres" in c for c in cmdline)
        ):
            pids.append(int(entry.name))
    return pids


def test_a_database_that_stops_answering_is_one_line(postgres_url: str, tmp_path: Path) -> None:
    pair = write_study(tmp_path / "data", "pg-down", size=(96, 96), extra=SLOW_SEARCH)
    cmd = [sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--trials", "40", "--jobs", "2"]
    proc = subprocess.Popen(
        [*cmd, "--storage", postgres_url, "--study-dir", str(tmp_path / "study")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                study = optuna.load_study(study_name="pg-down", storage=postgres_url)
                if sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)) >= 4:
                    break
            except KeyError:
                pass
            time.sleep(0.1)
        port = postgres_url.rsplit(":", 1)[1].split("/")[0]
        pids = _server_pids(port)
        assert pids, "the PostgreSQL server's processes were not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "Warning" not in err, err
    assert lines[0].startswith("autoreg: error: --storage: the study's storage postgresql://autoreg:***@"), err
    assert "stopped answering" in lines[0] and "every finished trial is kept" in lines[0]
    assert "not-a-secret" not in out + err
