"""``autoreg dashboard``: optuna-dashboard's HTTP API over a study that ``autoreg tune`` fills in another process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autoreg.cli import main
from autoreg.synthetic import make_pair, write_pair

#: Nothing we wait for may take longer than this (process start-up, first trial, first artifact).
WAIT_S = 60.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_pair_yaml(folder: Path, name: str = "syn") -> Path:
    """A 96x96 synthetic affine pair with landmarks and its PAIR.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_pair(make_pair((96, 96), transform="affine", seed=0), folder)
    doc = {
        "name": name,
        "fixed": paths["fixed"].name,
        "moving": paths["moving"].name,
        "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
        "stages": ["affine"],
        "trial_timeout": 20,
        # quick trials, so that new ones keep arriving while the test watches
        "search": {
            "stage0.optimizer.number_of_iterations": {"low": 20, "high": 80},
            "stage0.metric.kind": ["mattes", "mean_squares", "correlation"],
        },
    }
    path = folder / "PAIR.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - 127.0.0.1 only
        return json.loads(resp.read().decode("utf-8"))


def cli(*argv: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """``python -m autoreg.cli ARGV`` in its own process group; stopped (SIGINT, then SIGKILL) on exit."""
    fh = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoreg.cli", *argv], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        fh.close()


def wait_for(what: str, check, *, procs: tuple[subprocess.Popen, ...] = (), logs: tuple[Path, ...] = ()) -> Any:
    """Poll ``check()`` until it returns something truthy; fail with the logs after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError) as err:
            last = err
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process exited while waiting for {what}\n{_tails(logs)}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what} (last error: {last})\n{_tails(logs)}")


def _tails(logs: tuple[Path, ...]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(encoding='utf-8')[-3000:]}" for log in logs if log.exists())


@pytest.mark.slow
def test_dashboard_lists_the_study_and_its_trials_while_tune_runs(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data")
    study_dir = tmp_path / "study"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tune_log, dash_log = tmp_path / "tune.log", tmp_path / "dashboard.log"
    with started(
        ["tune", str(pair), "--trials", "400", "--jobs", "1", "--study-dir", str(study_dir), "-q"], tune_log
    ) as tune:
        wait_for("the study's journal", lambda: (study_dir / "journal.log").exists(), procs=(tune,), logs=(tune_log,))
        with started(["dashboard", str(pair), "--study-dir", str(study_dir), "--port", str(port)], dash_log) as dash:
            logs = (tune_log, dash_log)
            studies = wait_for(
                "the study in /api/studies",
                lambda: [s for s in get_json(f"{base}/api/studies")["study_summaries"] if s["study_name"] == "syn"],
                procs=(tune, dash),
                logs=logs,
            )
            study_id = studies[0]["study_id"]
            assert studies[0]["directions"] == ["minimize"]

            def finished_trial_with_artifacts() -> dict | None:
                detail = get_json(f"{base}/api/studies/{study_id}")
                done = [t for t in detail["trials"] if t["state"] == "Complete" and t["artifacts"]]
                return {"detail": detail, "trial": done[0]} if done else None

            found = wait_for(
                "a completed trial with artifacts", finished_trial_with_artifacts, procs=(tune, dash), logs=logs
            )
            assert tune.poll() is None, "the tune finished before the dashboard was checked: give it more trials"
            detail, trial = found["detail"], found["trial"]
            assert len(detail["trials"]) > 0
            assert detail["objective_names"] == ["tre_mean"]
            # the dotted, readable parameter names (the default recipe, trial 0, may have no params of its own; a
            # running trial shows the parameters drawn so far, so only finished ones)
            with_params = wait_for(
                "a finished trial with parameters",
                lambda: [
                    t
                    for t in get_json(f"{base}/api/studies/{study_id}")["trials"]
                    if t["params"] and t["state"] == "Complete"
                ],
                procs=(tune, dash),
                logs=logs,
            )
            names = {p["name"] for p in with_params[0]["params"]}
            assert "stage0.optimizer.kind" in names and "initializer.kind" in names, names
            assert trial["user_attrs"] and any(a["key"] == "tre_mean" for a in trial["user_attrs"])
            files = {a["filename"]: a for a in trial["artifacts"]}
            assert set(files) == {"transform-syn.tfm", "alignment-syn.png", "tre-syn.csv"}
            png = files["alignment-syn.png"]
            assert png["mimetype"] == "image/png"
            with urllib.request.urlopen(  # noqa: S310 - 127.0.0.1 only
                f"{base}/artifacts/{study_id}/{trial['trial_id']}/{png['artifact_id']}", timeout=10
            ) as resp:
                assert resp.read(8) == PNG_SIGNATURE
            # trials keep arriving while the dashboard serves
            n = len(detail["trials"])
            wait_for(
                "more trials",
                lambda: len(get_json(f"{base}/api/studies/{study_id}")["trials"]) > n,
                procs=(tune, dash),
                logs=logs,
            )
            assert dash.poll() is None
    assert dash.returncode == 0  # Ctrl-C (SIGINT) is how a dashboard is meant to stop
    out = dash_log.read_text(encoding="utf-8")
    assert f"at http://127.0.0.1:{port}/dashboard/" in out and "dashboard stopped" in out


def _empty_study(study_dir: Path, name: str = "syn") -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    optuna.create_study(study_name=name, storage=storage)


def test_dashboard_before_tune_is_one_clear_error(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data")
    code, _, err = cli("dashboard", pair, "--study-dir", tmp_path / "none", "--port", free_port())
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no study found" in err


def test_dashboard_on_a_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data")
    _empty_study(tmp_path / "study")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = cli("dashboard", pair, "--study-dir", tmp_path / "study", "--port", port)
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err and "Traceback" not in err
    assert out == ""  # no "serving at" line for a server that never started


def test_dashboard_never_prints_a_storage_password(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data")
    code, out, err = cli(
        "dashboard", pair, "--storage", "postgresql://alice:hunter2@127.0.0.1:1/db", "--port", free_port()
    )
    assert code == 2
    assert "hunter2" not in out + err
    assert "alice" in out + err


def test_dashboard_rejects_a_bad_port(tmp_path: Path) -> None:
    pair = write_pair_yaml(tmp_path / "data")
    _empty_study(tmp_path / "study")
    code, _, err = cli("dashboard", pair, "--study-dir", tmp_path / "study", "--port", 70000)
    assert code == 2 and "--port" in err
