"""Faults with real processes and files: a torn journal line, concurrent tunes, a SIGKILLed tune's workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import alive, descendants
from optuna.trial import TrialState

from autoreg.recipe import load_recipe

pytestmark = pytest.mark.slow


def autoreg(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autoreg.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


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


# --- processes together -------------------------------------------------------------------------------------


def _suggested_params(sdir: Path, name: str = "syn") -> list[tuple]:
    from autoreg.study import StorageSpec, open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(StorageSpec(str(sdir / "journal.log"), True)))
    return [
        tuple(sorted(t.params.items()))
        for t in study.get_trials(deepcopy=False)
        if t.params and "role" not in t.user_attrs and "retry_of" not in t.user_attrs
    ]


def test_two_tunes_on_one_study_propose_no_duplicates(pair_yaml, tmp_path) -> None:
    """Two processes started together on one study: each draws its own sampler stream (its launch number)."""
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    assert autoreg("tune", pair, "--trials", 1, "--jobs", 1, "-q", "--study-dir", sdir).returncode == 0
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoreg.cli",
                "tune",
                str(pair),
                "--trials",
                "15",
                "--jobs",
                "1",
                "-q",
                "--study-dir",
                str(sdir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    params = _suggested_params(sdir)
    assert len(params) >= 12
    assert len(set(params)) == len(params), f"{len(params) - len(set(params))} duplicate proposals"


def _wait_gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(pids)
    for pid in left:  # do not leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return left


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list children")


@needs_proc
def test_a_sigkilled_tune_leaves_no_workers_mid_trial(pair_yaml, tmp_path) -> None:
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            "500",
            "--jobs",
            "2",
            "-q",
            "--study-dir",
            str(sdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from autoreg.study import StorageSpec, open_storage

        deadline, workers = time.monotonic() + 120, set()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            workers = {p for p in descendants(proc.pid) if "loky" in Path(f"/proc/{p}/cmdline").read_text()}
            if not (sdir / "journal.log").exists() or len(workers) < 2:
                continue
            study = optuna.load_study(
                study_name="syn", storage=open_storage(StorageSpec(str(sdir / "journal.log"), True))
            )
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if TrialState.RUNNING in states and TrialState.COMPLETE in states:
                break
        else:
            pytest.fail("no trial was caught RUNNING with two workers up")
        everything = descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not _wait_gone(everything, 10.0), "processes outlived the killed tune"


@needs_proc
def test_a_sigkilled_process_leaves_no_idle_workers(pair_yaml, tmp_path) -> None:
    """loky keeps idle workers for ~300 s: they go too when the process that launched them is killed."""
    pair, sdir = _quick_pair(pair_yaml), tmp_path / "s"
    code = (
        "import sys, time; from autoreg.cli import main; "
        f"main(['tune', {str(pair)!r}, '--trials', '4', '--jobs', '2', '-q', '--study-dir', {str(sdir)!r}]); "
        "print('idle', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        assert any(line.startswith("idle") for line in iter(proc.stdout.readline, ""))
        everything = descendants(proc.pid)
        assert len([p for p in everything if "loky" in Path(f"/proc/{p}/cmdline").read_text()]) >= 2
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not _wait_gone(everything, 10.0), "idle workers outlived the killed process"


def test_a_dead_worker_s_retry_takes_its_trial_s_place_in_the_budget() -> None:
    from optuna.trial import create_trial

    from autoreg.workers import budget_spent

    def trial(number: int, state: TrialState, **attrs) -> optuna.trial.FrozenTrial:
        t = create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs)
        t.number = number
        return t

    done = [trial(i, TrialState.COMPLETE) for i in range(3)]
    assert budget_spent(done, 3) and not budget_spent(done, 4)
    assert not budget_spent([*done, trial(3, TrialState.WAITING, role="baseline")], 4)  # queued: not counted
    died = [*done[:2], trial(2, TrialState.FAIL, fail_reason="worker died")]
    # the others filled the budget before the death was seen: the retry still runs
    assert not budget_spent([*died, trial(3, TrialState.WAITING, retry_of=2)], 3)
    # once it runs (or ran), the killed trial no longer counts: 3 trials in all, the retry among them
    assert budget_spent([*died, trial(3, TrialState.RUNNING, retry_of=2)], 3)
    assert not budget_spent([*died, trial(3, TrialState.COMPLETE, retry_of=2)], 4)


def test_a_suggestion_never_run_for_its_cost_gives_its_place_in_the_budget_up_to_the_budget() -> None:
    from optuna.trial import create_trial

    from autoreg.trial import NOT_RUN
    from autoreg.workers import budget_spent

    def trial(number: int, pruned_at: str | None = None) -> optuna.trial.FrozenTrial:
        state = TrialState.PRUNED if pruned_at else TrialState.COMPLETE
        t = create_trial(
            state=state, value=None if pruned_at else 1.0, user_attrs={"pruned_at": pruned_at} if pruned_at else {}
        )
        t.number = number
        return t

    ran = [trial(0), trial(1, "time limit 60 s"), trial(2, "stage 1 level 0")]  # pruned after running: they count
    assert budget_spent(ran, 3)
    skipped = [trial(3 + i, f"{NOT_RUN}: predicted 90 s, over 3x the trial budget (20 s)") for i in range(3)]
    assert not budget_spent([*ran, *skipped], 4)  # three registrations run of four: one more is asked for
    assert budget_spent([*ran, *skipped, trial(6)], 4)
    # at most the budget's own count of them is free: a space whose every point is too slow still ends
    assert budget_spent([trial(0), *skipped, trial(6, f"{NOT_RUN}: predicted 90 s")], 2)


def test_a_heartbeat_that_loses_its_database_stops_quietly() -> None:
    """The beat runs in its own thread: an uncaught error there would print a traceback beside the one-line error."""
    import threading

    from autoreg.workers import _Heartbeat

    class Dying:
        beats = 0

        def get_heartbeat_interval(self) -> float:
            return 0.01

        def record_heartbeat(self, trial_id: int) -> None:
            self.beats += 1
            if self.beats > 2:
                raise optuna.exceptions.StorageInternalError("server closed the connection")

    seen: list[BaseException] = []
    previous, threading.excepthook = threading.excepthook, lambda args: seen.append(args.exc_value)
    try:
        beat = _Heartbeat(Dying(), 0)
        assert beat.thread is not None
        beat.thread.join(timeout=5)
        assert not beat.thread.is_alive() and beat.storage.beats == 3
        beat.close()
    finally:
        threading.excepthook = previous
    assert seen == []


def test_ctrl_c_fails_the_trial_of_a_worker_that_is_already_gone(tmp_path) -> None:
    """A Ctrl-C that broke loky's pool (a cross-validation's second fold) ended the worker with its trial RUNNING,
    and the tune returned without failing it; ``abort`` now fails a gone worker's trial 'interrupted' too."""
    import socket
    from types import SimpleNamespace

    from autoreg.tuning import LocalRunner

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    runner = LocalRunner(SimpleNamespace(), study, jobs=1, timeout=None)
    runner._done.set()
    assert runner.abort() == [trial.number]
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "interrupted"


def test_an_ignored_sigint_stays_ignored() -> None:
    """``cmd &`` in a script starts it with SIGINT ignored; a tune must not start honouring it part-way."""
    from autoreg.workers import StopRequest

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.install()
        assert signal.getsignal(signal.SIGINT) == stop._on_sigint
        stop.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
