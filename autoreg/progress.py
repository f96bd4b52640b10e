"""Live progress of a running study, read from its storage (so it counts every worker's trials)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import TrialState

from .objective import ROLE_ATTR


@dataclass(frozen=True)
class Snapshot:
    total: int
    complete: int
    failed: int
    pruned: int
    running: int
    best: float | None
    baseline: float | None

    @property
    def finished(self) -> int:
        return self.complete + self.failed + self.pruned


def snapshot(study: optuna.Study) -> Snapshot:
    trials = study.get_trials(deepcopy=False)
    by = {s: 0 for s in TrialState}
    best = baseline = None
    for t in trials:
        by[t.state] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = t.value if best is None else min(best, t.value)
            if t.user_attrs.get(ROLE_ATTR) == "baseline":
                baseline = t.value
    return Snapshot(
        total=len(trials) - by[TrialState.WAITING],
        complete=by[TrialState.COMPLETE],
        failed=by[TrialState.FAIL],
        pruned=by[TrialState.PRUNED],
        running=by[TrialState.RUNNING],
        best=best,
        baseline=baseline,
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(snap: Snapshot, *, target: int | None, start_finished: int, elapsed: float, timeout: float | None) -> str:
    done_now = max(0, snap.finished - start_finished)
    left = []
    if timeout is not None:
        left.append(max(0.0, timeout - elapsed))
    if target is not None and done_now > 0:
        remaining = max(0, target - snap.finished)
        left.append(elapsed / done_now * remaining)
    eta = f", ~{_duration(min(left))} left" if left else ""
    total = f"/{target}" if target is not None else ""
    return (
        f"trials {snap.finished}{total} done ({snap.running} running) | best {_fmt(snap.best)} | "
        f"baseline {_fmt(snap.baseline)} | failed {snap.failed}, pruned {snap.pruned} | {_duration(elapsed)}{eta}"
    )


class ProgressMonitor:
    """A thread printing a progress line whenever the study changes (at most every ``interval`` seconds)."""

    def __init__(self, study: optuna.Study, emit: Callable[[str], None], *, target: int | None, timeout: float | None,
                 interval: float = 2.0):
        self.study, self.emit, self.target, self.timeout, self.interval = study, emit, target, timeout, interval
        self.start = time.monotonic()
        self.start_finished = snapshot(study).finished
        self._stop = threading.Event()
        self._last: Snapshot | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                snap = snapshot(self.study)
            except Exception:  # noqa: BLE001 - a storage hiccup must not kill the display
                continue
            if snap != self._last:
                self._last = snap
                self.emit(
                    progress_line(snap, target=self.target, start_finished=self.start_finished,
                                  elapsed=time.monotonic() - self.start, timeout=self.timeout)
                )
