"""``autoreg tune ... --dask-scheduler ADDRESS`` on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes (one thread each, with their nannies) started by the tests on 127.0.0.1.

The study's journal lives in the test's folder, which the workers share (same machine): the "shared filesystem"
case. ``dask_storage="scheduler"`` makes the workers behave as if they did not see it (DaskStorage through the
scheduler, artifacts sent to the tune). Workers are killed with SIGKILL in the middle of a trial: both of them with
the journal (the cluster loses the pairs' data with them), one with PostgreSQL (conftest's throw-away server).
Skipped, saying why, without dask.distributed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install 'autoreg[dask]'")

from conftest import synthetic_pair  # noqa: E402
from distributed import Client  # noqa: E402

from autoreg.artifacts import artifact_store, trial_artifacts  # noqa: E402
from autoreg.synthetic import write_pair  # noqa: E402

WAIT_S = 120.0
N_WORKERS = 2


class Cluster:
    """A scheduler and worker processes of this machine; ``client`` looks at them from the test."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        scheduler_file = root / "scheduler.json"
        self.procs.append(
            self._spawn(
                "scheduler",
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
            )
        )
        deadline = time.monotonic() + WAIT_S
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(scheduler_file.read_text())["address"]
        for i in range(N_WORKERS):
            self.procs.append(
                self._spawn(
                    f"worker{i}",
                    [
                        sys.executable,
                        "-m",
                        "distributed.cli.dask_worker",
                        self.address,
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                        "--local-directory",
                        str(root / f"w{i}"),
                    ],
                )
            )
        self.client = Client(self.address, set_as_default=False, timeout=30)
        self.wait_for_workers()

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        try:  # in a folder of its own: nothing may depend on the tune's working directory
            return subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.root, start_new_session=True)
        finally:
            log.close()

    def wait_for_workers(self, n: int = N_WORKERS) -> None:
        self.client.wait_for_workers(n, timeout=WAIT_S)

    def identities(self) -> dict[str, str]:
        from autoreg.dask_cluster import identity

        return self.client.run(identity)

    def executing(self) -> int:
        """Tasks executing in the workers' threads right now (a cancelled one runs until it returns)."""
        return sum(self.client.run(lambda dask_worker: len(dask_worker.state.executing)).values())

    def close(self) -> None:
        try:
            self.client.close(timeout=10)
        finally:
            for proc in reversed(self.procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(self.procs):
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask-cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def ready(cluster: Cluster) -> Cluster:
    """The cluster with all its workers (a killed one is restarted by its nanny) and none busy."""
    cluster.wait_for_workers()
    deadline = time.monotonic() + WAIT_S
    while cluster.executing() and time.monotonic() < deadline:
        time.sleep(0.2)
    return cluster


def write_study(
    folder: Path,
    name: str,
    *,
    size: tuple[int, ...] = (64, 64),
    extra: dict[str, Any] | None = None,
    stages: tuple[str, ...] = ("affine",),
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_pair(
        synthetic_pair(len(size), "affine" if "affine" in stages else "rigid", size=size),
        folder,
        fmt="png" if len(size) == 2 else "nii.gz",
    )
    doc = {
        "name": name,
        "fixed": paths["fixed"].name,
        "moving": paths["moving"].name,
        "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
        "stages": list(stages),
        "trial_timeout": 60,
        **(extra or {}),
    }
    path = folder / "PAIR.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def autoreg(*args: Any, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoreg.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def open_study(name: str, study_dir: Path | None = None, url: str | None = None) -> optuna.Study:
    from autoreg.study import StorageSpec, open_storage

    spec = StorageSpec(url) if url else StorageSpec(str(study_dir / "journal.log"), True)
    return optuna.load_study(study_name=name, storage=open_storage(spec))


def check_artifacts(study: optuna.Study, study_dir: Path) -> None:
    """The best trial, and every completed trial that stored any, has its transform, picture and TRE table.

    A trial whose worker was killed while uploading may hold only part of its set; it failed, so nothing reads it.
    """
    store = artifact_store(study_dir)
    with_files = 0
    for t in study.get_trials(deepcopy=False):
        files = trial_artifacts(study, t)
        if t.number == study.best_trial.number:
            assert files, "the best trial has no artifacts"
        if files:
            with_files += 1
            kinds = {n.split("-")[0] for n in files}
            if t.state == TrialState.COMPLETE:
                assert kinds == {"transform", "alignment", "tre"}, files
            else:
                assert kinds <= {"transform", "alignment", "tre"}, files
            for artifact_id in files.values():
                with store.open_reader(artifact_id) as fh:
                    assert len(fh.read()) > 0
    assert with_files >= 1


# --- a study on the cluster -----------------------------------------------------------------------------------


def test_tune_on_a_dask_cluster_runs_the_exact_budget_in_its_workers(ready: Cluster, tmp_path: Path) -> None:
    pair = write_study(tmp_path / "data", "dask-basic", extra={"search": {"stage0.pyramid.levels": 1}})
    study_dir = tmp_path / "shared" / "study"
    run = autoreg("tune", pair, "--trials", 10, "--dask-scheduler", ready.address, "--study-dir", study_dir)
    assert run.returncode == 0, run.stderr
    assert f"2 Dask worker(s) at {ready.address} x 1 ITK thread(s)" in run.stdout
    assert "storage direct, artifacts written to the study folder" in run.stdout
    assert "Traceback" not in run.stderr
    study = open_study("dask-basic", study_dir)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(10))
    assert all(t.state.is_finished() for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    assert workers <= set(ready.identities().values()), workers  # the trials ran in the cluster's workers
    assert len(workers) == 2
    check_artifacts(study, study_dir)
    report = autoreg("report", pair, "--study-dir", study_dir, "-o", tmp_path / "report.html")
    assert report.returncode == 0, report.stderr
    assert "stored with trial" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert not list(study_dir.glob(".cluster-*"))  # the tune's token files are gone


def test_workers_that_do_not_share_the_folder_go_through_the_scheduler(ready: Cluster, tmp_path: Path) -> None:
    """DaskStorage over the study's journal in the scheduler's process, artifacts sent to the tune."""
    import autoreg as api

    pair = write_study(tmp_path / "data", "dask-unshared", extra={"search": {"stage0.pyramid.levels": 1}})
    events: list = []
    result = api.tune(
        pair,
        trials=8,
        study_dir=tmp_path / "study",
        dask_scheduler=ready.address,
        dask_storage="scheduler",
        progress=events.append,
    )
    assert not result.interrupted
    lines = [e.text for e in events if e.kind == "cluster"]
    assert sum("storage through the scheduler (DaskStorage), artifacts sent to the tune" in ln for ln in lines) == 2
    trials = result.study.get_trials(deepcopy=False)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    assert {t.user_attrs["worker"] for t in trials} <= set(ready.identities().values())
    check_artifacts(result.study, tmp_path / "study")
    assert result.best_recipe is not None and result.best_score <= result.baseline_score
    # the scheduler no longer holds the tune's storage
    held = ready.client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.extensions["optuna"].storages))
    assert not [n for n in held if n.startswith("autoreg-")]


def test_a_bad_scheduler_address_is_one_line(tmp_path: Path) -> None:
    pair = write_study(tmp_path / "data", "dask-nowhere")
    run = autoreg(
        "tune", pair, "--trials", 2, "--dask-scheduler", "tcp://127.0.0.1:9", "--study-dir", tmp_path / "s", timeout=120
    )
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in lines[0], run.stderr


# --- a worker killed mid-trial ----------------------------------------------------------------------------------

#: Trials long enough to be caught inside their registration (dense ANTS correlation, one level), short enough
#: for a retry.
SLOW_SEARCH = {
    "search": {
        "stage0.metric.kind": "ants_nc",
        "stage0.pyramid.levels": 1,
        "initializer.rotation_search": False,
        "stage0.optimizer.number_of_iterations": {"low": 200, "high": 300},
    }
}


def _kill_workers_mid_trial(proc: subprocess.Popen, open_it, cluster: Cluster, n: int = 1) -> list[int]:
    """SIGKILL the worker processes of ``n`` trials that have been in their registration for a while; returns their
    numbers. A trial may end just before its kill lands: that worker died idle, and another trial is caught (on a
    worker the nanny restarted, if need be)."""
    pids: dict[str, int] = {}
    dead: set[str] = set()
    killed: list[int] = []
    deadline = time.monotonic() + WAIT_S
    while len(killed) < n and time.monotonic() < deadline:
        if proc.poll() is not None:  # it finished before a later kill: the first still counts
            assert killed, f"tune exited early ({proc.returncode})"
            break
        try:
            trials = open_it().get_trials(deepcopy=False)
        except (KeyError, FileNotFoundError, ValueError):
            trials = []
        finished = sum(t.state.is_finished() for t in trials)
        for t in trials:
            worker = t.user_attrs.get("worker")
            if (
                finished >= 2
                and t.state == TrialState.RUNNING
                and worker is not None
                and worker not in dead
                and "threads" in t.user_attrs
                and "retry_of" not in t.user_attrs  # a retry whose worker dies is not run a third time
                and (datetime.now() - t.datetime_start).total_seconds() > 0.3
            ):
                if worker not in pids:  # a worker the nanny started since
                    pids = {w: int(w.rpartition(":")[2]) for w in cluster.identities().values()}
                    if worker not in pids:
                        continue
                os.kill(pids[worker], signal.SIGKILL)
                dead.add(worker)
                time.sleep(0.5)
                if open_it().trials[t.number].state in (TrialState.RUNNING, TrialState.FAIL):
                    killed.append(t.number)
                break
        time.sleep(0.05)
    assert killed, "no trial was caught RUNNING in a cluster worker"
    return killed


def _check_killed_trials_retried(study: optuna.Study, killed: list[int], before: dict[int, Any], total: int) -> None:
    """Every trial whose worker died (those the test caught, and any other) was failed and ran again once."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    shown = [
        (n, t.state.name, t.user_attrs.get("retry_of"), t.user_attrs.get("fail_reason")) for n, t in trials.items()
    ]  # noqa: E501
    died = [n for n, t in trials.items() if "worker died" in t.user_attrs.get("fail_reason", "")]
    assert set(killed) <= set(died), shown
    # the budget is exact: each killed trial gives its place to its retry
    assert len(trials) == total + len(died), shown
    assert not [n for n, t in trials.items() if t.state in (TrialState.RUNNING, TrialState.WAITING)], shown
    for number in died:
        assert trials[number].state == TrialState.FAIL
        retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].state.is_finished(), shown
        # the retry replays what the dead trial had drawn: all of it, or (killed while its recipe was being drawn, as
        # a trial that had just started beside the one caught) its first draws, the sampler drawing the rest again
        assert retries[0].params.items() >= trials[number].params.items(), shown
    for number, (state, value) in before.items():  # nothing finished was lost or changed
        assert (trials[number].state, trials[number].value) == (state, value)


def _finished(study: optuna.Study) -> dict[int, Any]:
    return {t.number: (t.state, t.value) for t in study.get_trials(deepcopy=False) if t.state.is_finished()}


def _communicate(proc: subprocess.Popen, open_it, timeout: float = 300) -> tuple[str, str]:
    """The tune's output once it exits; if it hangs, kill it and fail with what it printed and its trials' states."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        states = [(t.number, t.state.name, t.user_attrs.get("worker")) for t in open_it().get_trials(deepcopy=False)]
        raise AssertionError(
            f"tune still running after {timeout:g} s; trials {states}\n{out[-3000:]}\n{err[-3000:]}"
        ) from None


def test_trials_of_killed_workers_are_failed_and_retried_once(ready: Cluster, tmp_path: Path) -> None:
    pair = write_study(tmp_path / "data", "dask-kill", size=(96, 96), extra=SLOW_SEARCH)
    study_dir = tmp_path / "study"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            "8",
            "--dask-scheduler",
            ready.address,
            "--study-dir",
            str(study_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # both workers: the cluster loses every copy of the pairs' data, which the tune must send again
        killed = _kill_workers_mid_trial(proc, lambda: open_study("dask-kill", study_dir), ready, n=2)
        before = _finished(open_study("dask-kill", study_dir))
        out, err = _communicate(proc, lambda: open_study("dask-kill", study_dir))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    assert "were failed and queued again" in out and f"[{killed[0]}]" in out
    _check_killed_trials_retried(open_study("dask-kill", study_dir), killed, before, 8)


def test_a_killed_worker_s_trial_is_retried_over_postgres(ready: Cluster, postgres_url: str, tmp_path: Path) -> None:
    pair = write_study(tmp_path / "data", "dask-kill-pg", size=(96, 96), extra=SLOW_SEARCH)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            "8",
            "--dask-scheduler",
            ready.address,
            "--storage",
            postgres_url,
            "--study-dir",
            str(tmp_path / "study"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed = _kill_workers_mid_trial(proc, lambda: open_study("dask-kill-pg", url=postgres_url), ready)
        before = _finished(open_study("dask-kill-pg", url=postgres_url))
        out, err = _communicate(proc, lambda: open_study("dask-kill-pg", url=postgres_url))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    assert "not-a-secret" not in out + err
    _check_killed_trials_retried(open_study("dask-kill-pg", url=postgres_url), killed, before, 8)
    check_artifacts(open_study("dask-kill-pg", url=postgres_url), tmp_path / "study")


# --- Ctrl-C -----------------------------------------------------------------------------------------------------


def test_ctrl_c_cancels_the_trials_running_in_the_cluster(ready: Cluster, tmp_path: Path) -> None:
    from test_interrupt import write_slow_study

    pair = write_slow_study(tmp_path / "data")
    study_dir = tmp_path / "study"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            "20",
            "--dask-scheduler",
            ready.address,
            "--study-dir",
            str(study_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline, slow = time.monotonic() + WAIT_S, None
        while slow is None and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.1)
            try:
                trials = open_study("slow", study_dir).get_trials(deepcopy=False)
            except (KeyError, FileNotFoundError):
                continue
            slow = next(
                (
                    t.number
                    for t in trials
                    if t.state == TrialState.RUNNING
                    and "threads" in t.user_attrs
                    and str(t.user_attrs.get("role", "")).startswith("user:")
                    and (datetime.now() - t.datetime_start).total_seconds() > 1.0
                ),
                None,
            )
        assert slow is not None, "the slow trial never ran"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    print(f"ctrl-c took {took:.2f} s")
    assert took < 2.0, f"tune took {took:.2f} s to exit after Ctrl-C"
    assert "Traceback" not in err
    trials = {t.number: t for t in open_study("slow", study_dir).get_trials(deepcopy=False)}
    assert not [n for n, t in trials.items() if t.state == TrialState.RUNNING]
    assert trials[slow].state == TrialState.FAIL and trials[slow].user_attrs["fail_reason"] == "interrupted"
    # the cluster holds none of the tune's tasks, and its threads come free (one inside a long SimpleITK call
    # stops at the registration's next iteration)
    assert not [k for k in ready.client.processing().values() for k in k if "autoreg-trials" in str(k)]
    deadline = time.monotonic() + 30
    while ready.executing() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.executing() == 0
    assert len(trials) == len(open_study("slow", study_dir).get_trials(deepcopy=False))  # no trial since


@pytest.mark.slow
def test_a_lost_scheduler_is_one_line_and_the_study_resumes(tmp_path: Path) -> None:
    """The scheduler dies mid-study (a cluster of its own, not the module's): after Dask's reconnect timeout the
    tune exits with one line, not a traceback nor a wait for ever; every finished trial is kept and a local tune
    finishes the study."""
    (tmp_path / "cluster").mkdir()
    own = Cluster(tmp_path / "cluster")
    try:
        pair = write_study(tmp_path / "data", "dask-lost", size=(96, 96), extra=SLOW_SEARCH)
        study_dir = tmp_path / "study"
        tune = [sys.executable, "-m", "autoreg.cli", "tune", str(pair), "--trials", "12", "--study-dir", str(study_dir)]
        proc = subprocess.Popen(
            [*tune, "--dask-scheduler", own.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None
            try:
                if sum(t.state.is_finished() for t in open_study("dask-lost", study_dir).get_trials()) >= 3:
                    break
            except (KeyError, FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        os.killpg(own.procs[0].pid, signal.SIGKILL)  # the scheduler
        before = _finished(open_study("dask-lost", study_dir))
        out, err = _communicate(proc, lambda: open_study("dask-lost", study_dir), timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        own.close()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip().splitlines()[-1]], err
    assert err.strip().startswith("autoreg: error: --dask-scheduler: lost the Dask scheduler at "), err
    assert "every finished trial is kept" in err
    res = autoreg(*tune[3:], "--jobs", "1")  # resumed here, without the cluster
    assert res.returncode == 0, res.stderr
    trials = {t.number: t for t in open_study("dask-lost", study_dir).get_trials(deepcopy=False)}
    for number, (state, value) in before.items():
        assert (trials[number].state, trials[number].value) == (state, value)
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) >= 11
