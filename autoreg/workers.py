"""Trials in parallel: J worker processes (joblib/loky), or the workers of a Dask cluster (``dask_cluster``), each
loading its data once and running trials against the shared storage until the study holds N trials or the time is up.

The trial budget is exact: a worker counts the study's trials and asks for a new one under a lock every worker of
the tune reaches (a file lock in the study folder on one machine, a ``distributed.Lock`` on a cluster). Workers of
separate tunes on other machines (PostgreSQL) can overshoot by at most one trial each.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import SimpleITK as sitk
from optuna.trial import FrozenTrial, TrialState

from .artifacts import ArtifactRecorder
from .config import StudyConfig
from .objective import Budget, Objective
from .pipeline import Pipeline
from .processes import pid_alive
from .space import SearchSpace
from .study import (
    StorageSpec,
    condition_on_best_linear,
    cost_model,
    cross_defaults_if_due,
    fail_trials,
    make_pruner,
    make_sampler,
    open_storage,
    storage_errors,
)
from .trial import INTERRUPTED, interrupted_numbers, not_run_numbers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, as plain picklable values (the validated config, paths and strings, never storage
    objects). The config travels rather than its file, so that a study given as a dict (``autoreg.tune``) runs too."""

    cfg: StudyConfig  # with the study seed applied (``tune --seed``)
    storage: StorageSpec
    study_name: str
    lock_path: str
    n_trials: int | None
    deadline: float | None  # time.time() after which no new trial starts (and running ones stop)
    seed: int
    threads: int
    prune: bool
    stop_file: str | None = None  # created by the launching tune on Ctrl-C: workers stop after their trial
    #: Each trial's share of the study's seconds (--timeout x jobs / --trials), when both are given.
    trial_budget_s: float | None = None
    launch: int = 0  # this tune's number among the study's tunes: each draws its own sampler stream
    launcher_pid: int | None = None  # the tune process: a worker process outliving it exits (``watch_launcher``)


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """ITK threads each worker may use so that jobs x threads <= cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


@contextmanager
def budget_lock(path: str) -> Iterator[None]:
    """An exclusive lock between local workers (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Heartbeat:
    """Records heartbeats for a running trial on RDB storages, as ``study.optimize`` would."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        if interval:
            storage.record_heartbeat(trial_id)
            self.thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
            self.thread.start()

    def _beat(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except storage_errors():  # the trial's own tell meets the same error and reports it in one line
                return

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class StopRequest:
    """Ctrl-C as a request, not an exception: the running registration stops at its next iteration, its trial is
    recorded FAIL 'interrupted', and no new trial starts. (A KeyboardInterrupt raised inside SimpleITK's callbacks
    or Optuna's journal lock would be swallowed or leave the journal locked.) A second Ctrl-C interrupts at once."""

    def __init__(self, stop_file: str | None = None):
        self.event = threading.Event()
        self.stop_file = stop_file
        self._checked = 0.0
        self._previous = None

    def install(self) -> None:
        """Take SIGINT, unless it was ignored when the process started (``cmd &`` in a script): as Python itself
        does, an ignored SIGINT stays ignored (it was honoured only once a tune had started, 3 s in)."""
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                return
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        if self.stop_file:
            Path(self.stop_file).touch()

    def __call__(self) -> bool:
        """True once a stop was asked for here or, for workers, by the launching process (its stop file)."""
        if not self.event.is_set() and self.stop_file and time.monotonic() - self._checked > 0.5:
            self._checked = time.monotonic()
            if os.path.exists(self.stop_file):
                self.event.set()
        return self.event.is_set()

    def now(self) -> bool:
        """``self()`` without the half-second cache: asked once more under the budget lock, before a new trial."""
        self._checked = 0.0
        return self()


#: How often a worker process checks that the tune that launched it is alive.
WATCH_INTERVAL_S = 0.5
_watched: set[int] = set()


def watch_launcher(launcher_pid: int | None) -> None:
    """In a worker process: a daemon thread that ends the process (``os._exit``) within about a second of its
    launching tune dying, whether the worker is mid-trial or idle in loky's pool (where it would otherwise wait
    ~300 s, holding its memory). A trial it leaves RUNNING is failed and retried by the next tune; a journal line
    it leaves half-written is closed by the next writer. Started once per process."""
    if launcher_pid is None or launcher_pid == os.getpid() or launcher_pid in _watched:
        return
    _watched.add(launcher_pid)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != parent or not pid_alive(launcher_pid):
                os._exit(70)  # EX_SOFTWARE: nothing to clean up that the kernel and the next tune do not

    threading.Thread(target=watch, name="autoreg-watch-launcher", daemon=True).start()


def run_worker(plan: WorkerPlan, worker_index: int, stop: StopRequest | None = None) -> int:
    """Run trials until the budget is spent, the time is up or a stop is requested; returns how many it ran."""
    own_stop = stop is None
    stop = stop or StopRequest(plan.stop_file)
    if own_stop:  # a worker process of its own
        watch_launcher(plan.launcher_pid)
        # the launching tune already reported a torn journal line
        logging.getLogger("autoreg.study").setLevel(logging.ERROR)
        stop.install()
    try:
        return run_trials(plan, worker_index, stop)
    finally:
        if own_stop:
            stop.uninstall()


@dataclass(frozen=True)
class WorkerData:
    """What a worker's trials need from PAIR.yaml, loaded once: the config, the pairs as trials see them, the space.
    A cluster's workers receive it from the tune (``dask_cluster``) instead of reading the files themselves."""

    cfg: StudyConfig
    pairs: list
    space: SearchSpace

    @classmethod
    def of(cls, pipe: Pipeline) -> WorkerData:
        return cls(pipe.cfg, pipe.pairs, pipe.space)


def run_trials(
    plan: WorkerPlan,
    worker_index: int,
    stop: Callable[[], bool],
    *,
    data: WorkerData | None = None,
    storage: optuna.storages.BaseStorage | None = None,
    lock: Callable[[], AbstractContextManager[Any]] | None = None,
    recorder: ArtifactRecorder | None = None,
    calibrate_under_lock: bool = False,
) -> int:
    """The worker loop: ask for a trial under the budget lock, run it, until the budget is spent, the time is up or
    ``stop()`` turns true. Local workers use the defaults (files, the study's storage, a file lock, the study folder's
    artifact store); a cluster's worker passes what it reaches instead."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    # a database that went away makes Optuna retry one query slower and say so; the tune says it in one line
    logging.getLogger("optuna.storages._rdb.storage").setLevel(logging.ERROR)
    # heartbeats with ask/tell are this loop's design (``run_one`` beats itself); a worker process has no terminal
    # of its own to say so on every trial
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize", UserWarning)
    data = data or WorkerData.of(Pipeline(plan.cfg))
    storage = storage or open_storage(plan.storage)
    lock = lock or (lambda: budget_lock(plan.lock_path))
    if hasattr(storage, "get_heartbeat_interval") and storage.get_heartbeat_interval():
        with warnings.catch_warnings():  # 'experimental' since Optuna 2.9, and the documented call
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(optuna.load_study(study_name=plan.study_name, storage=storage))
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(plan.seed, worker_index, plan.launch),
        pruner=make_pruner(plan.prune, len(data.cfg.pairs)),
    )
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(plan.threads)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a trial's problems are recorded on the trial
    if calibrate_under_lock:  # workers of a cluster that start together on a new machine measure it once
        with lock():
            cost = cost_model(study, plan.threads)
    else:
        cost = cost_model(study, plan.threads)
    objective = Objective(
        data.cfg,
        data.pairs,
        data.space,
        threads=plan.threads,
        prune=plan.prune,
        cost=cost,
        budget=Budget(deadline=plan.deadline, per_trial_s=plan.trial_budget_s),
    )
    objective.should_stop = stop
    recorder = recorder or ArtifactRecorder(Path(plan.lock_path).parent)  # the study folder: <study dir>/artifacts
    fresh = getattr(stop, "now", stop)
    done = 0
    parent = os.getppid()
    while True:
        if plan.deadline is not None and time.time() >= plan.deadline:
            break
        if os.getppid() != parent:  # whoever launched this worker is gone: stop rather than run on unseen
            break
        if stop():
            break
        with lock():
            if fresh():  # a stop asked for while this worker waited for the lock: no new trial
                break
            trial = ask_named(study, plan.n_trials, objective.worker, data.space, objective.linear_end_step())
        if trial is None:
            break
        if not run_one(study, trial, objective, recorder):
            break
        done += 1
    return done


def budget_spent(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """Whether a worker may ask for no more trials. The budget counts trials asked for (not the queued ones); a
    dead worker's trial, failed and queued again, gives its place to its retry, which runs even once the count is
    reached (other workers may have filled the budget before the death was seen): nothing a user asked for is lost.
    A suggestion never run for its predicted cost gives its place too (``trial.not_run_numbers``), and so does a trial
    stopped by Ctrl-C (``trial.interrupted_numbers``)."""
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    free = retried | not_run_numbers(trials, n_trials) | interrupted_numbers(trials)
    counted, retry_waiting = 0, False
    for t in trials:
        if t.state == TrialState.WAITING:
            if "retry_of" in t.user_attrs:
                counted, retry_waiting = counted + 1, True
        elif t.number not in free:
            counted += 1
    return counted >= n_trials and not retry_waiting


def ask_named(
    study: optuna.Study,
    n_trials: int | None,
    worker: str,
    space: SearchSpace | None = None,
    linear_step: int | None = None,
) -> optuna.Trial | None:
    """Under the budget lock: the next trial, named after the worker that runs it; None once the budget is spent.

    Asking and naming are two storage calls, both made under the lock, so a RUNNING trial that names no worker
    belongs to a worker that died between them (SIGKILL, a lost cluster worker): it is failed and queued again
    here, or it would hold a place of the budget for ever."""
    trials = study.get_trials(deepcopy=False)
    unnamed = [t for t in trials if t.state == TrialState.RUNNING and "worker" not in t.user_attrs]
    if unnamed:
        log.warning("trial(s) %s lost their worker before it named itself", fail_trials(study, unnamed))
        trials = study.get_trials(deepcopy=False)
    if n_trials is not None and budget_spent(trials, n_trials):
        return None
    if space is not None and (queued := cross_defaults_if_due(study, space, trials, n_trials, linear_step)):
        log.info("queued %s: the default deformable ways on the best linear stages so far", ", ".join(queued))
    elif (
        space is not None
        and (donor := condition_on_best_linear(study, space, trials, n_trials, linear_step)) is not None
    ):
        log.info("queued a suggestion of the deformable stage only, on trial %d's linear stages", donor)
    trial = study.ask()
    trial.set_user_attr("worker", worker)  # before anything can stop us: names who runs it
    return trial


def run_one(
    study: optuna.Study, trial: optuna.Trial, objective: Objective, recorder: ArtifactRecorder | None = None
) -> bool:
    """One trial through ask/tell; Ctrl-C marks it FAIL (never left RUNNING) and propagates. An improving trial's
    pictures are stored by ``recorder`` before ``tell`` (a finished trial takes no more artifacts).

    Returns False when someone else finished the trial meanwhile: the launching tune, stopped by Ctrl-C, fails the
    trials its workers still run after a short grace (``tuning.GRACE_S``); this worker then stops."""
    beat = _Heartbeat(study._storage, trial._trial_id)  # noqa: SLF001 - heartbeats need the trial id
    try:
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return True
        except optuna.exceptions.UpdateFinishedTrialError:
            raise
        except BaseException:
            try:
                trial.set_user_attr("fail_reason", INTERRUPTED)
                study.tell(trial, state=TrialState.FAIL)
            finally:
                raise
        finally:
            beat.close()
        if value is None or math.isnan(value):
            study.tell(trial, state=TrialState.FAIL)
        else:
            if recorder is not None:
                recorder.record_if_improved(study, trial, value, objective.pairs, objective.last_transforms)
            study.tell(trial, value)
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        log.info("trial %d was finished by the launching tune (interrupted); this worker stops", trial.number)
        return False
