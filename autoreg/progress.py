"""Live progress of a running study, read from its storage (so it counts every worker's trials).

In a terminal, a bar redrawn in place (rich) with a line per running trial that ticks every second; elsewhere (a log
file, a pipe), a plain line per change and one a minute while trials run, so that logs stay readable.
"""

from __future__ import annotations

import heapq
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from .trial import TrialRecord, best_and_baseline

if TYPE_CHECKING:
    import SimpleITK as sitk
    from rich.console import Console, RenderableType

log = logging.getLogger(__name__)

#: The time-left estimate uses the durations of this many most recent finished trials (later trials of a search run
#: other recipes than its first ones, so the recent ones predict the next ones best).
RECENT_TRIALS = 20
#: Without a change, a plain progress line is still written this often while trials run (a long trial shows it lives).
HEARTBEAT_S = 60.0
#: In a terminal, the storage is read this often (the elapsed times on screen tick at every redraw regardless).
LIVE_POLL_S = 1.0
#: At most this many running trials get a line of their own in the terminal display.
LIVE_RUNNING_LINES = 12


@dataclass(frozen=True)
class RunningTrial:
    """A trial some worker runs now; ``last_step``/``last_value``: its latest intermediate value (reported at rungs)."""

    number: int
    worker: str | None
    started: datetime | None
    last_step: int | None = None
    last_value: float | None = None
    reports: int = 0

    def elapsed(self, now: datetime | None = None) -> float | None:
        if self.started is None:
            return None
        if now is None:
            now = datetime.now(self.started.tzinfo)  # Optuna stores naive local times
        return max(0.0, (now - self.started).total_seconds())


@dataclass(frozen=True)
class Snapshot:
    total: int
    complete: int
    failed: int
    pruned: int
    running: int
    best: float | None
    baseline: float | None
    running_trials: tuple[RunningTrial, ...] = ()
    #: Seconds each finished trial took (start to end as the storage recorded it), in trial order.
    durations: tuple[float, ...] = ()
    #: Suggestions never run for their predicted cost (``trial.NOT_RUN``): not in ``pruned``, ``total`` or ``finished``,
    #: as they are not in the count of ``--trials``.
    not_run: int = 0
    #: Trials stopped by Ctrl-C (``trial.INTERRUPTED``): not in ``failed``, ``total`` or ``finished``, as they give
    #: their place in ``--trials`` to another.
    interrupted: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.failed + self.pruned


def _seconds_of(trial: optuna.trial.FrozenTrial, record: TrialRecord) -> float | None:
    """A finished trial's wall time: the storage's start and end (what a worker spent on it), else its runtime_s."""
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        return max(0.0, (trial.datetime_complete - trial.datetime_start).total_seconds())
    return record.runtime_s


def snapshot(study: optuna.Study) -> Snapshot:
    """The study now, from one read of its storage."""
    frozen = study.get_trials(deepcopy=False)
    trials = [TrialRecord.of(t) for t in frozen]
    by: dict[str, int] = {}
    for t in trials:
        state = "NOT_RUN" if t.not_run else "INTERRUPTED" if t.interrupted else t.state
        by[state] = by.get(state, 0) + 1
    best, baseline = best_and_baseline(trials)
    running, durations = [], []
    for ft, rec in zip(frozen, trials):
        if ft.state == TrialState.RUNNING:
            steps = sorted(rec.intermediate)
            running.append(
                RunningTrial(
                    number=rec.number,
                    worker=rec.worker,
                    started=ft.datetime_start,
                    last_step=steps[-1] if steps else None,
                    last_value=rec.intermediate[steps[-1]] if steps else None,
                    reports=len(steps),
                )
            )
        elif ft.state.is_finished() and not (rec.not_run or rec.interrupted):  # neither says how long a trial takes
            seconds = _seconds_of(ft, rec)
            if seconds is not None:
                durations.append(seconds)
    return Snapshot(
        total=len(trials) - by.get("WAITING", 0) - by.get("NOT_RUN", 0) - by.get("INTERRUPTED", 0),
        complete=by.get("COMPLETE", 0),
        failed=by.get("FAIL", 0),
        pruned=by.get("PRUNED", 0),
        running=by.get("RUNNING", 0),
        best=best.value if best is not None else None,
        baseline=baseline.value if baseline is not None else None,
        running_trials=tuple(running),
        durations=tuple(durations),
        not_run=by.get("NOT_RUN", 0),
        interrupted=by.get("INTERRUPTED", 0),
    )


# --- the time-left estimate -------------------------------------------------------------------------------------


def time_left(
    *,
    target: int | None,
    started: int,
    finished: int,
    running_elapsed: Sequence[float],
    durations: Sequence[float],
    workers: int,
    timeout_left: float | None = None,
) -> float | None:
    """Seconds until the study has ``target`` finished trials, or None when nothing tells yet.

    How long trials last is measured on the recent ``durations`` together with the running trials, whose elapsed
    times say they last at least that long (:class:`Durations`): so the long trials still running count, and the
    estimate is not the mean of those that happened to end first. ``workers`` then run the trials not yet started
    (``target - started``) as each frees up: a schedule, so that one trial left over many workers is one trial's
    time and many trials are ``trials * mean / workers``. With a ``timeout_left``, the smaller of the two.
    """
    guesses = [] if timeout_left is None else [max(0.0, timeout_left)]
    if target is not None:
        if finished >= target:
            guesses.append(0.0)
        elif durations:
            law = Durations(durations[-RECENT_TRIALS:], running_elapsed)
            mean = law.rest(0.0)
            free = sorted(law.rest(e) for e in running_elapsed)
            free += [0.0] * max(0, workers - len(free))  # idle workers (more trials running than workers: all busy)
            heapq.heapify(free)
            for _ in range(max(0, target - started)):
                heapq.heapreplace(free, free[0] + mean)
            guesses.append(max(free, default=0.0))
    return min(guesses) if guesses else None


class Durations:
    """The law of a trial's duration from finished trials and running ones (which have lasted at least their elapsed
    time so far): the Kaplan-Meier survival curve. Past the longest time seen, a trial still going is taken to
    last as long again."""

    def __init__(self, finished: Sequence[float], running: Sequence[float]) -> None:
        obs = sorted([(float(d), True) for d in finished] + [(float(e), False) for e in running])
        self.steps: list[tuple[float, float]] = []  # (t, S just after t): the share of trials lasting longer than t
        at_risk, alive, i = len(obs), 1.0, 0
        while i < len(obs):
            t, ended, gone = obs[i][0], 0, 0
            while i < len(obs) and obs[i][0] == t:
                ended, gone, i = ended + obs[i][1], gone + 1, i + 1
            if ended:
                alive *= 1.0 - ended / at_risk
                self.steps.append((t, alive))
            at_risk -= gone
        self.longest = obs[-1][0] if obs else 0.0

    def survival(self, t: float) -> float:
        """The share of trials that last longer than ``t`` seconds."""
        alive = 1.0
        for when, s in self.steps:
            if when > t:
                break
            alive = s
        return alive

    def rest(self, elapsed: float) -> float:
        """The expected seconds still to run of a trial that has run ``elapsed`` (0: a whole trial's expected time)."""
        alive = self.survival(elapsed)
        if alive <= 0.0:  # every trial seen ended by now: this one is the longest yet
            return elapsed
        area, prev, s = 0.0, elapsed, alive
        for when, after in self.steps:
            if when <= elapsed:
                continue
            area += s * (when - prev)
            prev, s = when, after
        area += s * max(0.0, self.longest - prev)
        area += s * max(self.longest, elapsed)  # those outlasting everything seen: as long again
        return area / alive


# --- text -------------------------------------------------------------------------------------------------------


def score_unit(objective: str, fixed: sitk.Image | None) -> str | None:
    """The unit a study's score is named in: a TRE statistic is a length in the fixed image's physical space
    (:func:`~autoreg.images.physical_unit`: px or mm); a relative TRE or a holdout metric has none."""
    if fixed is None or not objective.startswith("tre"):
        return None
    from .images import physical_unit

    return physical_unit(fixed)


def _fmt(v: float | None, unit: str | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g} {unit}" if unit else f"{v:.4g}"


def _duration(s: float) -> str:
    s = round(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass(frozen=True)
class StudyShape:
    """What turns a running trial's report step back into words: the study's stages and pairs (see
    ``objective.report_step``)."""

    n_stages: int = 1
    n_pairs: int = 1

    @classmethod
    def of(cls, study: optuna.Study) -> StudyShape:
        attrs = study.user_attrs
        fingerprint = attrs.get("fingerprint")
        pairs = (fingerprint.get("pairs") or []) if isinstance(fingerprint, dict) else []
        return cls(n_stages=max(1, len(attrs.get("stages") or [])), n_pairs=max(1, len(pairs)))

    def where(self, t: RunningTrial) -> str | None:
        """How far a running trial got, from its latest report: a pyramid rung of one pair, or pairs done of several."""
        if t.last_step is None:
            return None
        if self.n_pairs > 1:  # each pair's score is one step
            return f"{t.reports} of {self.n_pairs} pairs done"
        from .objective import RUNGS

        stage = t.last_step // len(RUNGS) % self.n_stages
        return f"stage {stage} {RUNGS[t.last_step % len(RUNGS)]}"


def progress_line(
    snap: Snapshot,
    *,
    target: int | None,
    start_finished: int,
    elapsed: float,
    timeout: float | None,
    workers: int | None = None,
    unit: str | None = None,
    now: datetime | None = None,
) -> str:
    """The plain (log) form: one line saying everything the terminal display shows, running trials in short."""
    left = time_left(
        target=target,
        started=snap.total,
        finished=snap.finished,
        running_elapsed=[e for t in snap.running_trials if (e := t.elapsed(now)) is not None],
        durations=snap.durations,
        workers=max(workers or 1, snap.running),
        timeout_left=None if timeout is None else timeout - elapsed,
    )
    eta = f", ~{_duration(left)} left" if left is not None else ""
    total = f"/{target}" if target is not None else ""
    longest = max((e for t in snap.running_trials if (e := t.elapsed(now)) is not None), default=None)
    running = f"{snap.running} running" + (f", longest {_duration(longest)}" if longest is not None else "")
    not_run = f", not run {snap.not_run} (predicted too slow)" if snap.not_run else ""
    not_run += f", interrupted {snap.interrupted}" if snap.interrupted else ""
    return (
        f"trials {snap.finished}{total} done ({running}) | best {_fmt(snap.best, unit)} | "
        f"baseline {_fmt(snap.baseline, unit)} | failed {snap.failed}, pruned {snap.pruned}{not_run} | "
        f"{_duration(elapsed)}{eta}"
    )


# --- the terminal display ---------------------------------------------------------------------------------------


def terminal(stream: IO[str] | None = None) -> Console | None:
    """A rich console on ``stream`` (stdout) when it is an interactive terminal, else None (plain lines then)."""
    from rich.console import Console

    console = Console(file=stream or sys.stdout, highlight=False)
    return console if console.is_terminal and not console.is_dumb_terminal else None


class _LiveView:
    """What the terminal shows, rebuilt at every redraw from the latest snapshot (so elapsed times tick)."""

    def __init__(self, monitor: ProgressMonitor) -> None:
        from rich.spinner import Spinner

        self.m = monitor
        self.spinner = Spinner("dots", style="cyan")

    def __call__(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        m, snap = self.m, self.m.latest
        elapsed = time.monotonic() - m.start
        if m.target is not None:
            bar = ProgressBar(total=max(m.target, 1), completed=min(snap.finished, m.target), width=30)
            count = f"{snap.finished}/{m.target} trials"
        elif m.timeout:
            bar = ProgressBar(total=m.timeout, completed=min(elapsed, m.timeout), width=30)
            count = f"{snap.finished} trials"
        else:
            bar = ProgressBar(total=None, pulse=True, width=30)
            count = f"{snap.finished} trials"
        left = time_left(
            target=m.target,
            started=snap.total,
            finished=snap.finished,
            running_elapsed=[e for t in snap.running_trials if (e := t.elapsed()) is not None],
            durations=snap.durations,
            workers=m.workers_now(snap),
            timeout_left=None if m.timeout is None else m.timeout - elapsed,
        )
        stats = Text.assemble(
            (f" {count}", "bold"),
            "  best ",
            (_fmt(snap.best, m.unit), "bold green"),
            "  baseline ",
            _fmt(snap.baseline, m.unit),
            "  failed ",
            (str(snap.failed), "red" if snap.failed else ""),
            "  pruned ",
            str(snap.pruned),
            f"  not run {snap.not_run}" if snap.not_run else "",
            f"  interrupted {snap.interrupted}" if snap.interrupted else "",
            f"  {_duration(elapsed)} elapsed",
            "" if m.stopping else ("  ~" + _duration(left) + " left") if left is not None else "  estimating time left",
        )
        head = Table.grid(padding=(0, 1))
        head.add_row(self.spinner if not m.stopping else Text(" "), bar, stats)
        rows = Table.grid(padding=(0, 2))
        shown = sorted(snap.running_trials, key=lambda t: t.number)
        for t in shown[:LIVE_RUNNING_LINES]:
            e = t.elapsed()
            where = m.shape.where(t)
            rows.add_row(
                f"  trial {t.number}",
                t.worker or "?",
                Text(_duration(e) if e is not None else "-", style="cyan"),
                f"{where}: {_fmt(t.last_value, m.unit)}" if where else "first level running",
            )
        if len(shown) > LIVE_RUNNING_LINES:
            rows.add_row(f"  and {len(shown) - LIVE_RUNNING_LINES} more running", "", "", "")
        return Group(head, rows) if shown else head


# --- the monitor ------------------------------------------------------------------------------------------------


class ProgressMonitor:
    """A thread that shows the study's progress while the workers run: in place on ``console`` (a terminal, see
    :func:`terminal`), else through ``emit`` a line whenever the study changes (checked every ``interval``
    seconds) and every ``heartbeat`` seconds while trials run."""

    def __init__(
        self,
        study: optuna.Study,
        emit: Callable[[str], None],
        *,
        target: int | None,
        timeout: float | None,
        interval: float = 2.0,
        workers: int | None = None,
        unit: str | None = None,
        console: Console | None = None,
        heartbeat: float = HEARTBEAT_S,
    ):
        self.study, self.emit, self.target, self.timeout, self.interval = study, emit, target, timeout, interval
        self.workers, self.unit, self.console, self.heartbeat = workers, unit, console, heartbeat
        self.start = time.monotonic()
        self.latest = snapshot(study)
        self.start_finished = self.latest.finished
        self.shape = StudyShape.of(study)
        self.stopping = False
        self._peak_running = self.latest.running
        self._stop = threading.Event()
        self._last: Snapshot | None = None
        self._last_emit = self.start
        self._live = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def workers_now(self, snap: Snapshot) -> int:
        """The workers that run trials: as told, else the most trials seen running at once."""
        self._peak_running = max(self._peak_running, snap.running)
        return max(self.workers or self._peak_running, snap.running, 1)

    def __enter__(self) -> ProgressMonitor:
        if self.console is not None:
            from rich.live import Live

            self._live = Live(
                console=self.console, get_renderable=_LiveView(self), refresh_per_second=4, transient=False
            )
            self._live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._live is not None:
            try:
                self.latest = snapshot(self.study)
            except Exception as err:  # noqa: BLE001 - the last frame then shows the last snapshot read
                log.debug("progress: storage not read for the last frame (%s)", err)
            self.stopping = True
            self._live.stop()  # draws the final frame and leaves it on screen

    def _run(self) -> None:
        period = LIVE_POLL_S if self._live is not None else self.interval
        while not self._stop.wait(period):
            try:
                snap = snapshot(self.study)
            except Exception as err:  # noqa: BLE001 - a storage hiccup must not kill the display
                log.debug("progress: storage not read (%s)", err)
                continue
            self.latest = snap
            if self._live is not None:
                continue  # the live view redraws itself from self.latest
            now = time.monotonic()
            beat = snap.running > 0 and now - self._last_emit >= self.heartbeat
            if snap != self._last or beat:
                self._last, self._last_emit = snap, now
                self.emit(
                    progress_line(
                        snap,
                        target=self.target,
                        start_finished=self.start_finished,
                        elapsed=now - self.start,
                        timeout=self.timeout,
                        workers=self.workers_now(snap),
                        unit=self.unit,
                    )
                )
