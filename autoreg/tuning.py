"""A study run as a library call: what ``autoreg tune`` does, for the CLI, ``autoreg.tune`` and other commands.

``run_tune`` creates or resumes the study, fails and queues again the trials that dead workers left RUNNING, takes
the tune's launch number (its sampler streams), calibrates the cost model, runs the workers (local processes, or a
Dask cluster's workers: ``dask_cluster``) until the trial budget is spent or the time is up, and returns a
``TuneResult``. It prints nothing: what a user should see arrives as ``TuneEvent``s at ``progress``.

Ctrl-C is a request: workers stop their registration at its next iteration and record the trial FAIL
'interrupted'. A registration inside a long SimpleITK call cannot see the request, so after ``GRACE_S`` the tune
does it itself: it ends its own workers (local processes are killed, a cluster's trials cancelled), fails the trials
they were running as 'interrupted', and returns within about a second, however long that call would have taken.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import UserError

if TYPE_CHECKING:  # the CLI imports this module for its defaults: Optuna and SimpleITK load on first use
    import optuna
    from rich.console import Console

    from .config import StudyConfig
    from .progress import Snapshot
    from .recipe import Recipe
    from .study import StorageSpec
    from .trial import TrialRecord
    from .workers import StopRequest, WorkerPlan

log = logging.getLogger(__name__)

#: Trials in a study when neither ``trials`` nor ``timeout`` is given.
DEFAULT_TRIALS = 50
#: After Ctrl-C, workers get this long to stop on their own before the tune ends them and fails their trials.
GRACE_S = 0.5
#: After killing workers, how long the tune lets loky end the others.
LOKY_CLEANUP_S = 0.3
#: How often the tune looks at its workers while they run.
POLL_S = 0.1
#: Bounds of the numbers a caller may pass (the CLI's options have the same).
MAX_TRIALS = 1_000_000
MAX_JOBS = 256


@dataclass(frozen=True)
class TuneEvent:
    """Something a user of a running tune should see, as one line. ``kind``: ``started`` (the study, its storage and
    workers), ``progress`` (a live line), ``reaped`` (trials of dead workers failed and queued again), ``requeued``
    (queued points an earlier Ctrl-C stopped, queued again), ``cluster`` (what the Dask cluster reaches and does).
    ``str(event)`` is the line."""

    kind: Literal["started", "progress", "reaped", "requeued", "cluster"]
    text: str

    def __str__(self) -> str:
        return self.text


Progress = Callable[[TuneEvent], None]


@dataclass(frozen=True)
class HoldoutScore:
    """The best recipe on one pair under ``holdout:`` (never tuned on): its score, or why it failed."""

    name: str
    metric: str
    value: float | None
    failure: str | None = None


@dataclass
class TuneResult:
    """What a tune did and found (``autoreg.tune``'s return value)."""

    config: StudyConfig
    study: optuna.Study
    directory: Path
    storage: StorageSpec
    #: Ctrl-C (or a KeyboardInterrupt inside a trial) ended the run; finished trials are kept.
    interrupted: bool
    seconds: float
    snapshot: Snapshot
    best: TrialRecord | None
    baseline: TrialRecord | None
    #: Trials that dead workers left RUNNING, failed and queued again when the tune began.
    reaped: list[int] = field(default_factory=list)
    #: Trials still running at Ctrl-C after the grace, failed 'interrupted' by the tune itself.
    aborted: list[int] = field(default_factory=list)
    holdout: list[HoldoutScore] = field(default_factory=list)
    #: Where the trials ran: "N worker(s) x T ITK thread(s)" or the Dask cluster's description.
    workers: str = ""
    #: The unit of a TRE score (px or mm, ``progress.score_unit``); None for a relative TRE or a holdout metric.
    unit: str | None = None
    #: The study's trial count this run worked toward (``--trials``, or the default without ``--timeout``).
    target: int | None = None
    #: The study's value with no registration (``objective.value_before``); None for the holdout metric.
    before: float | None = None

    @property
    def cut_by_skips(self) -> bool:
        """The count was reached because suggestions were predicted too slow for their share of the time left: at
        most ``target`` of them give their place (``trial.not_run_numbers``), so that an unaffordable space ends."""
        return not self.interrupted and self.target is not None and self.snapshot.not_run >= self.target

    @property
    def metric(self) -> str:
        """What the scores are: ``tre_mean``, ``relative_tre`` (several pairs) or ``holdout_loss``."""
        return str(self.study.user_attrs.get("objective", self.config.score_name))

    @property
    def best_score(self) -> float | None:
        """The best trial's objective (mean TRE, or the holdout loss); None before a trial completed."""
        return self.best.value if self.best is not None else None

    @property
    def baseline_score(self) -> float | None:
        """Trial 0's objective: the SimpleITK-notebooks default recipe (None if it did not complete)."""
        return self.baseline.value if self.baseline is not None else None

    @property
    def best_recipe(self) -> Recipe | None:
        """The best trial's recipe as it ran (``autoreg export`` adds its provenance and measured spread)."""
        from .recipe import recipe_from_dict

        if self.best is None or self.best.recipe is None:
            return None
        return recipe_from_dict(self.best.recipe, source=f"trial {self.best.number}")


def study_config(source: Any) -> StudyConfig:
    """A PAIR.yaml path, a dict with PAIR.yaml's keys (paths relative to the working directory) or a config."""
    from .config import StudyConfig, load_config, parse_pair_file

    if isinstance(source, StudyConfig):
        return source
    if isinstance(source, Mapping):
        # errors name '<dict>' in the working directory, where its relative paths are resolved
        return parse_pair_file(dict(source), Path.cwd().resolve() / "<dict>")
    if isinstance(source, (str, os.PathLike)):
        return load_config(source)
    raise UserError(
        f"expected a PAIR.yaml path, a dict of its keys or a StudyConfig (got {type(source).__name__})", key="pair"
    )


def _check_arguments(trials: Any, timeout: Any, jobs: Any, seed: Any) -> None:
    """The CLI checks its options in argparse; a library caller gets the same one-line errors here."""
    from .config import SEED_LIMIT

    def whole(value: Any, key: str, low: int, high: int) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise UserError(f"expected a whole number from {low} to {high} (got {value!r})", key=key)

    whole(trials, "trials", 1, MAX_TRIALS)
    whole(jobs, "jobs", 1, MAX_JOBS)
    whole(seed, "seed", 0, SEED_LIMIT - 1)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise UserError(f"expected a positive, finite number of seconds (got {timeout!r})", key="timeout")


def run_tune(
    source: Any,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    jobs: int | None = None,
    seed: int | None = None,
    study_dir: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    dask_scheduler: str | None = None,
    warm_start: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
    console: Console | None = None,
    dask_storage: Literal["auto", "scheduler"] = "auto",
) -> TuneResult:
    """Create or resume the study of ``source`` and run trials until it holds ``trials`` in total (default 50
    without ``timeout``) or ``timeout`` seconds have passed; ``jobs`` local worker processes (default: all cores),
    or the workers of the Dask cluster at ``dask_scheduler`` (an address such as ``tcp://10.0.0.5:8786`` or a
    scheduler file; ``jobs`` then caps how many of its workers take part).

    ``source``: a PAIR.yaml path, a dict with its keys (paths relative to the working directory) or a
    ``StudyConfig``. ``study_dir``/``storage``/``warm_start`` as ``tune --study-dir/--storage/--warm-start`` (recipes,
    or folders of recipes, whose points start the search). ``progress`` receives ``TuneEvent``s; with ``console``
    (a rich terminal, ``progress.terminal``) the live view is drawn there in place instead.
    ``dask_storage="scheduler"`` makes every cluster worker reach the study through the scheduler (Optuna's
    ``DaskStorage``) and send its artifacts to this process, even where it sees the study folder.
    Errors in what was given raise ``UserError``; Ctrl-C returns a result with ``interrupted`` set."""
    from .pipeline import Pipeline
    from .study import TuneLock, create_or_load, storage_spec, write_study_info
    from .study import study_dir as find_study_dir

    _check_arguments(trials, timeout, jobs, seed)
    if dask_storage not in ("auto", "scheduler"):
        raise UserError(f"expected 'auto' or 'scheduler' (got {dask_storage!r})", key="dask_storage")
    cfg = study_config(source)
    if warm_start:
        cfg = replace(cfg, warm_start=(*cfg.warm_start, *(Path(p).resolve() for p in warm_start)))
    directory = find_study_dir(cfg, study_dir)
    spec = storage_spec(cfg, directory, storage)
    pipe = Pipeline(cfg, seed=seed)
    cfg = pipe.cfg
    study = create_or_load(
        cfg,
        spec,
        pipe.space,
        pipe.provenance,  # refuses changed inputs before study.json
        pipe.starting_points,
    )
    write_study_info(directory, cfg, spec, pipe.provenance)
    emit = progress or _log_event
    with TuneLock(directory) as alone:
        return _Tune(pipe, study, directory, spec, emit).run(
            trials=trials,
            timeout=timeout,
            jobs=jobs,
            alone=alone,
            dask_scheduler=dask_scheduler,
            dask_storage=dask_storage,
            live=progress is not None,
            console=console,
        )


def _log_event(event: TuneEvent) -> None:
    log.info("%s", event.text)


class Runner(Protocol):
    """Runs a tune's workers: local processes (``LocalRunner``) or a Dask cluster's (``dask_cluster.DaskRunner``)."""

    plan: WorkerPlan
    error: BaseException | None
    interrupted: bool

    def prepare(self) -> WorkerPlan: ...
    def describe(self) -> str: ...
    def start(self, stop: StopRequest) -> None: ...
    def wait(self, timeout: float) -> bool: ...
    def abort(self) -> list[int]: ...
    def close(self) -> None: ...


class _Tune:
    def __init__(self, pipe: Any, study: optuna.Study, directory: Path, spec: StorageSpec, emit: Progress):
        self.pipe, self.cfg, self.study, self.directory, self.spec, self.emit = (
            pipe,
            pipe.cfg,
            study,
            directory,
            spec,
            emit,
        )

    def run(
        self,
        *,
        trials: int | None,
        timeout: float | None,
        jobs: int | None,
        alone: bool,
        dask_scheduler: str | None,
        dask_storage: str,
        live: bool,
        console: Console | None,
    ) -> TuneResult:
        from .objective import value_before
        from .progress import ProgressMonitor, score_unit, snapshot
        from .study import (
            best_and_baseline_of,
            queue_interrupted_again,
            reap_stale_trials,
            storage_lost,
            take_launch_number,
        )
        from .workers import StopRequest, WorkerPlan, budget_lock

        study, cfg, directory = self.study, self.cfg, self.directory
        reaped = reap_stale_trials(study, alone=alone and self.spec.local_journal)
        if reaped:
            self.emit(
                TuneEvent(
                    "reaped",
                    f"{len(reaped)} trial(s) left RUNNING by a dead worker were failed and queued again: {reaped}",
                )
            )
        lock_path = str(directory / "trials.lock")
        with budget_lock(lock_path):  # two tunes started together get different numbers, hence sampler streams
            launch = take_launch_number(study)
            requeued = queue_interrupted_again(study)
        if requeued:
            self.emit(TuneEvent("requeued", f"queued again, as Ctrl-C stopped them before: {', '.join(requeued)}"))
        target = trials if trials is not None else (None if timeout else DEFAULT_TRIALS)
        plan = WorkerPlan(
            cfg=cfg,
            storage=self.spec,
            study_name=cfg.name,
            lock_path=lock_path,
            n_trials=target,
            deadline=None,  # set once the workers are ready (calibration and connecting take their time)
            seed=cfg.seed,
            threads=1,
            prune=cfg.prune,
            stop_file=str(directory / f"stop.{os.getpid()}"),
            launch=launch,
            launcher_pid=os.getpid(),
        )
        metric = str(study.user_attrs.get("objective", cfg.score_name))
        unit = score_unit(metric, self.pipe.pairs[0].fixed)
        runner: Runner
        if dask_scheduler:
            from .dask_cluster import DaskRunner

            runner = DaskRunner(
                dask_scheduler,
                plan,
                study,
                self.pipe,
                directory,
                jobs=jobs,
                timeout=timeout,
                emit=self.emit,
                route=dask_storage,
            )
        else:
            runner = LocalRunner(plan, study, jobs=jobs or os.cpu_count() or 1, timeout=timeout)
        t0 = time.monotonic()
        aborted: list[int] = []
        interrupted = False
        stop = StopRequest(plan.stop_file)
        try:
            plan = runner.plan = replace(runner.prepare(), deadline=(time.time() + timeout) if timeout else None)
            before = snapshot(study)
            self.emit(
                TuneEvent(
                    "started",
                    f"study {cfg.name}: {before.finished} trial(s) so far; storage "
                    f"{self.spec.display}; {runner.describe()}",
                )
            )
            monitor = (
                ProgressMonitor(
                    study,
                    lambda line: self.emit(TuneEvent("progress", line)),
                    target=target,
                    timeout=timeout,
                    workers=getattr(runner, "jobs", None),
                    unit=unit,
                    console=console,
                )
                if live
                else _NoMonitor()
            )
            stop.install()
            with monitor:
                runner.start(stop)
                try:
                    while not runner.wait(POLL_S):
                        if stop():
                            interrupted = True
                            if not runner.wait(GRACE_S):
                                aborted = runner.abort()
                            break
                except KeyboardInterrupt:  # a second Ctrl-C: no grace
                    interrupted = True
                    aborted = runner.abort()
                if stop() and not aborted:
                    # the workers may have ended without finishing their trials: a pool worker hit by the Ctrl-C
                    # broke loky's pool in a cross-validation's second fold, and its trial stayed RUNNING
                    aborted = runner.abort()
        finally:
            stop.uninstall()
            if plan.stop_file:
                Path(plan.stop_file).unlink(missing_ok=True)
            runner.close()
        interrupted = interrupted or runner.interrupted or stop()
        if runner.error is not None and not interrupted:
            raise storage_lost(runner.error, self.spec)
        best, base = best_and_baseline_of(study)
        holdout = self._holdout(best) if best is not None and cfg.holdout and not interrupted else []
        return TuneResult(
            config=cfg,
            study=study,
            directory=directory,
            storage=self.spec,
            interrupted=interrupted,
            seconds=time.monotonic() - t0,
            snapshot=snapshot(study),
            best=best,
            baseline=base,
            reaped=reaped,
            aborted=aborted,
            holdout=holdout,
            workers=runner.describe(),
            unit=unit,
            target=target,
            before=value_before(self.pipe.pairs, metric),
        )

    def _holdout(self, best: TrialRecord) -> list[HoldoutScore]:
        """The best recipe on the pairs listed under 'holdout:' (never tuned on): how well it generalises."""
        from .evaluate import evaluate
        from .recipe import recipe_from_dict

        recipe = recipe_from_dict(best.recipe, source=f"trial {best.number}")
        ev = evaluate(recipe, self.pipe.holdout_pairs, use_landmarks=self.cfg.uses_landmarks)
        return [
            HoldoutScore(
                p.name,
                ev.metric,
                p.values[0] if p.values else None,
                None if p.values else (p.failures[0] if p.failures else "no score"),
            )
            for p in ev.pairs
        ]


class _NoMonitor:
    def __enter__(self) -> _NoMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


# --- local worker processes ----------------------------------------------------------------------------------


class LocalRunner:
    """``jobs`` workers on this machine: one runs in a thread of the tune process itself, several in joblib's loky
    processes. Either way the tune's main thread only waits, so that it sees Ctrl-C at once."""

    #: A worker that dies is replaced after its trial is failed and queued again, this many times in all.
    ATTEMPTS = 4

    def __init__(self, plan: WorkerPlan, study: optuna.Study, *, jobs: int, timeout: float | None):
        self.plan, self.study, self.jobs, self.timeout = plan, study, jobs, timeout
        self.threads = 1
        self.error: BaseException | None = None
        self.interrupted = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop: StopRequest | None = None

    def prepare(self) -> WorkerPlan:
        from .study import cost_model
        from .workers import threads_per_worker

        cfg, target = self.plan.cfg, self.plan.n_trials
        self.threads = 1 if cfg.deterministic else threads_per_worker(self.jobs)
        cost_model(self.study, self.threads)  # measured here, before the workers start, so that they share it
        budget = self.timeout * self.jobs / target if self.timeout and target else None
        self.plan = replace(self.plan, threads=self.threads, trial_budget_s=budget)
        return self.plan

    def describe(self) -> str:
        return f"{self.jobs} worker(s) x {self.threads} ITK thread(s)"

    def start(self, stop: StopRequest) -> None:
        self._stop = stop
        self._thread = threading.Thread(target=self._run, args=(stop,), name="autoreg-workers", daemon=True)
        self._thread.start()

    def _run(self, stop: StopRequest) -> None:
        import SimpleITK as sitk

        from .workers import run_worker

        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        try:
            if self.jobs == 1:
                run_worker(self.plan, 0, stop)  # sets ITK's threads in this process: given back below
            else:
                self._parallel(stop)
        except KeyboardInterrupt:  # raised inside a trial of the in-process worker: its trial is already FAIL
            self.interrupted = True
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            self._done.set()

    def _parallel(self, stop: StopRequest) -> None:
        """Run the workers; a worker that dies is replaced after its RUNNING trial is failed and queued again."""
        from joblib import Parallel, delayed
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        from .study import reap_stale_trials
        from .workers import run_worker

        jobs = self.jobs
        for attempt in range(self.ATTEMPTS):
            try:
                Parallel(n_jobs=jobs, backend="loky")(
                    delayed(run_worker)(self.plan, i + attempt * jobs) for i in range(jobs)
                )
                return
            except TerminatedWorkerError as err:
                if stop():
                    return
                reaped = reap_stale_trials(self.study)
                log.warning("a worker died (%s); failed and re-queued trials %s", str(err).splitlines()[0], reaped)
        raise UserError("workers keep dying (out of memory?); see the failed trials", key="--jobs")

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def abort(self) -> list[int]:
        """Kill this tune's worker processes, busy or idle, then fail the trials they (or workers of this machine that
        are gone) were running 'interrupted' (in
        that order: a dead worker writes nothing after the tune, and an idle one cannot start a trial meanwhile nor
        outlive the tune by its watcher's interval). The in-process worker's trial is failed the same way; its
        thread stops at the registration's next iteration, or with the process."""
        from .processes import is_own, kill, pid_alive, pool_workers
        from .study import fail_trials, running_trials_of
        from .trial import INTERRUPTED

        host, me = socket.gethostname(), os.getpid()
        pool = pool_workers(me) if self.jobs > 1 else set()
        kill(pool)
        pids = {w: int(w.rpartition(":")[2]) for w in _workers_on(host, self.study)}
        # a worker already gone (loky ends a pool that a Ctrl-C broke) cannot finish its trial either
        ours = {w: pid for w, pid in pids.items() if pid in pool or is_own(pid, me) or not pid_alive(pid)}
        running = running_trials_of(self.study, set(ours))
        kill(set(ours.values()) - pool - {me})
        failed = fail_trials(self.study, running, reason=INTERRUPTED)
        if self.jobs > 1:  # loky sees its killed workers and shuts its pool down
            self._done.wait(LOKY_CLEANUP_S)
        return failed

    def close(self) -> None:
        """An interrupted tune whose workers stopped in time leaves loky's pool idle: end it now, as ``abort`` does,
        rather than let it outlive the tune until the workers' launcher watch sees it gone."""
        from .processes import kill, pool_workers

        if self.jobs > 1 and self._stop is not None and self._stop() and self._done.is_set():
            kill(pool_workers(os.getpid()))


def _workers_on(host: str, study: optuna.Study) -> set[str]:
    """The ``worker`` names (host:pid) of this host's RUNNING trials."""
    from optuna.trial import TrialState

    return {
        w
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if (w := t.user_attrs.get("worker", "")).rpartition(":")[0] == host and w.rpartition(":")[2].isdigit()
    }
