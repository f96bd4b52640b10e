"""A real PostgreSQL server as the study storage (``--storage postgresql://...``): what several machines share.

The fixture starts a throw-away cluster (``initdb`` + ``pg_ctl``, trust authentication, 127.0.0.1 on a free port)
and stops it afterwards. The tests skip, saying why, where PostgreSQL's server programs or the ``psycopg`` driver
are missing (``.ci/run`` installs Debian's ``postgresql``; ``psycopg[binary]`` is in the ``test`` extra).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoreg.recipe import load_recipe

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _tune(pair: Path, url: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--storage", url, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_workers_share_a_postgres_study_and_a_rerun_continues_it(postgres_url, pair_yaml, tmp_path) -> None:
    pair = pair_yaml(size=(64, 64), name="pg-two-workers", extra={"search": {"stage0.pyramid.levels": 1}})
    first = _tune(pair, postgres_url, "--trials", 4, "--jobs", 2, "-q")
    assert first.returncode == 0, first.stderr
    assert "not-a-secret" not in first.stdout + first.stderr  # the password is never printed
    second = _tune(pair, postgres_url, "--trials", 6, "--jobs", 2, "-q")
    assert second.returncode == 0, second.stderr

    study = optuna.load_study(study_name="pg-two-workers", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    assert all(t.state.is_finished() for t in trials)
    assert trials[0].user_attrs["role"] == "baseline"
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) >= 2, workers  # two processes per run, two runs

    out = tmp_path / "best.yaml"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "export",
            str(pair),
            "--storage",
            postgres_url,
            "-o",
            str(out),
            "--repeats",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    recipe = load_recipe(out)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert recipe.provenance is not None
    assert recipe.provenance["score"] == pytest.approx(min(t.value for t in done))
    assert "not-a-secret" not in out.read_text()  # provenance names the storage without its password


def _kill_the_tune_mid_trial(pair: Path, postgres_url: str) -> None:
    """Start (or resume) the tune and SIGKILL it once a trial has been in its registration for a while."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--storage", postgres_url, "--trials", "50"]
        + ["--jobs", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                study = optuna.load_study(study_name="pg-crash", storage=postgres_url)
            except KeyError:
                continue
            trials = study.get_trials(deepcopy=False)
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and "threads" in t.user_attrs
                and (datetime.now() - t.datetime_start).total_seconds() > 0.2
            ]
            if sum(t.state.is_finished() for t in trials) >= 1 and running:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return
        raise AssertionError("no trial was caught RUNNING")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_killed_worker_s_trial_is_failed_and_retried_over_postgres(postgres_url, pair_yaml, tmp_path) -> None:
    # slow trials (dense ANTS correlation, one level) so that the kill lands inside a registration
    pair = pair_yaml(
        size=(96, 96),
        name="pg-crash",
        extra={
            "search": {
                "stage0.metric.kind": "ants_nc",
                "stage0.pyramid.levels": 1,
                "initializer.rotation_search": False,
                "stage0.optimizer.number_of_iterations": {"low": 300, "high": 500},
            }
        },
    )
    killed = None
    for _attempt in range(5):  # a trial may end between being seen RUNNING and the kill: then kill the tune again
        _kill_the_tune_mid_trial(pair, postgres_url)
        study = optuna.load_study(study_name="pg-crash", storage=postgres_url)
        left = [t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        if left:
            [killed] = left  # one worker: the trial its crash left RUNNING
            break
    assert killed is not None, "no kill landed inside a trial in 5 tries"
    total = len(study.get_trials(deepcopy=False)) + 1
    rerun = _tune(pair, postgres_url, "--trials", total, "--jobs", 1, "-q")
    assert rerun.returncode == 0, rerun.stderr
    after = {t.number: t for t in optuna.load_study(study_name="pg-crash", storage=postgres_url).get_trials()}
    assert after[killed].state == TrialState.FAIL
    assert "worker died" in after[killed].user_attrs["fail_reason"]
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].state.is_finished()
