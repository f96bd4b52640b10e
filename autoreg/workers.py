"""Trials in parallel: J worker processes (joblib/loky), each loading its data once and running trials against
the shared storage until the study holds N trials or the time is up.

The trial budget is exact on one machine: a worker counts the study's trials and asks for a new one under a file
lock in the study folder. Workers on other machines (PostgreSQL) can overshoot by at most one trial each.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
import SimpleITK as sitk
from optuna.trial import TrialState

from .config import load_config
from .data import load_pair
from .fingerprint import fingerprint_dataset
from .objective import Objective
from .space import build_space
from .study import StorageSpec, make_pruner, make_sampler, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, as plain picklable values (paths and strings, never objects)."""

    pair_file: str
    storage: StorageSpec
    study_name: str
    lock_path: str
    n_trials: int | None
    deadline: float | None  # time.time() after which no new trial starts
    seed: int
    threads: int
    prune: bool


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
            self.storage.record_heartbeat(self.trial_id)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


def run_worker(plan: WorkerPlan, worker_index: int) -> int:
    """Run trials until the budget is spent; returns how many this worker ran."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    cfg = load_config(plan.pair_file)
    pairs = [load_pair(p) for p in cfg.pairs]
    space = build_space(cfg, fingerprint_dataset(pairs))
    storage = open_storage(plan.storage)
    if hasattr(storage, "get_heartbeat_interval") and storage.get_heartbeat_interval():
        optuna.storages.fail_stale_trials(optuna.load_study(study_name=plan.study_name, storage=storage))
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(plan.seed, worker_index),
        pruner=make_pruner(plan.prune),
    )
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(plan.threads)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a trial's problems are recorded on the trial
    objective = Objective(cfg, pairs, space, threads=plan.threads, prune=plan.prune)
    done = 0
    parent = os.getppid()
    while True:
        if plan.deadline is not None and time.time() >= plan.deadline:
            break
        if os.getppid() != parent:  # whoever launched this worker is gone: stop rather than run on unseen
            break
        with budget_lock(plan.lock_path):
            if plan.n_trials is not None:
                n = len(study.get_trials(deepcopy=False))
                waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                if n - waiting >= plan.n_trials:
                    break
            trial = study.ask()
        run_one(study, trial, objective)
        done += 1
    return done


def run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """One trial through ask/tell; Ctrl-C marks it FAIL (never left RUNNING) and propagates."""
    beat = _Heartbeat(study._storage, trial._trial_id)  # noqa: SLF001 - heartbeats need the trial id
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException:
        try:
            trial.set_user_attr("fail_reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
        finally:
            raise
    finally:
        beat.close()
    if value is None or math.isnan(value):
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)
