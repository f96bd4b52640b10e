"""Live progress of a running study, read from its storage (so it counts every worker's trials)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import optuna

from .trial import best_and_baseline, records


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
    trials = records(study)
    by: dict[str, int] = {}
    for t in trials:
        by[t.state] = by.get(t.state, 0) + 1
    best, baseline = best_and_baseline(trials)
    return Snapshot(
        total=len(trials) - by.get("WAITING", 0),
        complete=by.get("COMPLETE", 0),
        failed=by.get("FAIL", 0),
        pruned=by.get("PRUNED", 0),
        running=by.get("RUNNING", 0),
        best=best.value if best is not None else None,
        baseline=baseline.value if baseline is not None else None,
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
