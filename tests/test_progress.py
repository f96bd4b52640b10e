"""Progress of ``autoreg tune`` (issue 15): the time-left estimate on synthetic histories, the plain lines of a log,
the live display on a (fake and real) terminal, ``-q``, units in the summary, and the examples in ``--help``."""

from __future__ import annotations

import contextlib
import heapq
import io
import math
import os
import pty
import random
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from statistics import median

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from test_tuning import tune, write_study_files

from autoreg.cli import EXAMPLES, build_parser, main
from autoreg.progress import (
    Durations,
    ProgressMonitor,
    StudyShape,
    progress_line,
    snapshot,
    time_left,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# --- the estimate on synthetic histories ------------------------------------------------------------------------


def schedule(durations: list[float], workers: int, stagger: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) of each trial when ``workers`` (worker i ready at ``i * stagger`` s) take the trials in order,
    each the next one as it frees up."""
    free, out = [i * stagger for i in range(workers)], []
    for d in durations:
        start = heapq.heappop(free)
        out.append((start, start + d))
        heapq.heappush(free, start + d)
    return out


def estimate_at(runs: list[tuple[float, float]], t: float, workers: int) -> float | None:
    """What the display would say at time ``t`` of this history (the trials' order is their number)."""
    finished = [end - start for start, end in runs if end <= t]
    running = [t - start for start, end in runs if start <= t < end]
    return time_left(
        target=len(runs),
        started=sum(start <= t for start, _ in runs),
        finished=len(finished),
        running_elapsed=running,
        durations=finished,
        workers=workers,
    )


def test_steady_trials_give_the_exact_time_left() -> None:
    """100 trials of 10 s on 4 workers, seen at t = 102.5 s: 40 ended, 4 running; the last ends at 250 s."""
    runs = schedule([10.0] * 100, 4)
    assert estimate_at(runs, 102.5, 4) == pytest.approx(250 - 102.5)
    # and trials of 10 s each on 4 workers: 56 trials not started are 14 rounds, not 56 * 10 s
    assert time_left(
        target=100, started=44, finished=40, running_elapsed=[0, 0, 0, 0], durations=[10.0] * 40, workers=4
    ) == pytest.approx(150)


def test_a_burst_of_workers_is_not_read_as_one_trial_at_a_time() -> None:
    """The case that was 25x off: 16 workers start together; when the first trial ends (100 s), 15 have run 99 s.
    Elapsed time per finished trial (100 s x 49 left = 82 min) ignores that 16 run at once; the truth is ~3 rounds."""
    runs = schedule([100.0] * 50, 16, stagger=1 / 16)
    truth = max(end for _, end in runs) - 100.0
    est = estimate_at(runs, 100.0, 16)
    assert est is not None and 0.8 < est / truth < 1.25, (est, truth)
    naive = 100.0 / 1 * 49
    assert naive / truth > 10  # what the old line said


def test_one_trial_left_takes_one_trial_whatever_the_workers() -> None:
    assert time_left(
        target=10, started=9, finished=9, running_elapsed=[], durations=[20.0] * 9, workers=8
    ) == pytest.approx(20)


@pytest.mark.parametrize("workers", [1, 4, 16])
@pytest.mark.parametrize("law", ["lognormal", "bimodal", "exponential"])
def test_estimate_tracks_random_histories(law: str, workers: int) -> None:
    """Trials of random length: at each tenth of the run the estimate is within 2x of the truth at the median, and
    never off by 10x before the last tenth (where the one longest trial decides)."""
    draw = {
        "lognormal": lambda r: r.lognormvariate(2, 0.6),
        "bimodal": lambda r: 1.0 if r.random() < 0.6 else 30.0,
        "exponential": lambda r: r.expovariate(0.1),
    }[law]
    errors = []
    for seed in range(4):
        rng = random.Random(seed)
        runs = schedule([draw(rng) for _ in range(80)], workers)
        end = max(e for _, e in runs)
        for k in range(1, 9):
            t = end * k / 10
            est = estimate_at(runs, t, workers)
            if est is not None:
                errors.append(abs(math.log(est / (end - t))))
    assert math.exp(median(errors)) < 2.0
    assert math.exp(max(errors)) < 10.0


def test_the_clock_caps_the_estimate_and_nothing_known_says_nothing() -> None:
    assert (
        time_left(target=100, started=2, finished=1, running_elapsed=[5], durations=[60.0], workers=1, timeout_left=30)
        == 30
    )
    assert time_left(target=100, started=1, finished=0, running_elapsed=[5], durations=[], workers=1) is None
    assert (
        time_left(target=None, started=1, finished=0, running_elapsed=[5], durations=[], workers=1, timeout_left=12)
        == 12
    )
    assert time_left(target=5, started=5, finished=5, running_elapsed=[], durations=[1.0], workers=1) == 0


def test_a_trial_longer_than_any_seen_raises_the_estimate_as_it_runs() -> None:
    left = [
        time_left(target=20, started=11, finished=10, running_elapsed=[e], durations=[10.0] * 10, workers=1)
        for e in (5, 30, 60, 120)
    ]
    assert left == sorted(left) and left[-1] > left[1] > 9 * 10
    law = Durations([10.0] * 10, [30.0])
    assert law.rest(30.0) == pytest.approx(30.0)  # longer than any seen: as long again
    assert 5.0 < law.rest(5.0) < 10.0  # mostly 10 s trials, but one of 11 outlasted 30 s
    assert Durations([10.0] * 10, []).rest(4.0) == pytest.approx(6.0)


# --- a study to watch -------------------------------------------------------------------------------------------


def frozen(
    number: int,
    state: TrialState,
    *,
    value: float | None = None,
    seconds: float = 10.0,
    ago: float = 0.0,
    worker: str = "host:1",
    intermediate: dict[int, float] | None = None,
    role: str = "suggested",
) -> FrozenTrial:
    start = datetime.now() - timedelta(seconds=ago + seconds)  # (Optuna's times are naive local ones)
    return FrozenTrial(
        number=number,
        state=state,
        value=value,
        datetime_start=start,
        datetime_complete=None if state == TrialState.RUNNING else start + timedelta(seconds=seconds),
        params={},
        distributions={},
        user_attrs={"worker": worker, "role": role},
        system_attrs={},
        intermediate_values=intermediate or {},
        trial_id=number,
    )


def watched_study() -> optuna.Study:
    """Trial 0 the baseline (2.5), 1 best (1.25), 2 pruned, 3 failed; 4 running 65 s after its first rung."""
    study = optuna.create_study()
    study.set_user_attr("objective", "tre_mean")
    study.set_user_attr("stages", ["affine"])
    study.add_trial(frozen(0, TrialState.COMPLETE, value=2.5, role="baseline", ago=40))
    study.add_trial(frozen(1, TrialState.COMPLETE, value=1.25, ago=30))
    study.add_trial(frozen(2, TrialState.PRUNED, seconds=4, ago=20))
    study.add_trial(frozen(3, TrialState.FAIL, seconds=2, ago=10))
    study.add_trial(frozen(4, TrialState.RUNNING, seconds=65, worker="node7:4242", intermediate={0: 3.5}))
    return study


def test_snapshot_reads_running_trials_and_durations() -> None:
    snap = snapshot(watched_study())
    assert (snap.finished, snap.complete, snap.failed, snap.pruned, snap.running) == (4, 2, 1, 1, 1)
    assert (snap.best, snap.baseline) == (1.25, 2.5)
    assert snap.durations == (10.0, 10.0, 4.0, 2.0)
    (t,) = snap.running_trials
    assert (t.number, t.worker, t.last_step, t.last_value) == (4, "node7:4242", 0, 3.5)
    assert 65 <= t.elapsed() < 65 + 30


def test_a_suggestion_not_run_for_its_cost_is_neither_a_finished_trial_nor_a_duration() -> None:
    """It ran no registration and gives its place in --trials to another (``workers.budget_spent``): the count and
    the time-left estimate leave it out, the line names it."""
    from autoreg.trial import NOT_RUN

    study = watched_study()
    skipped = frozen(5, TrialState.PRUNED, seconds=0.01, ago=5)
    skipped.set_user_attr("pruned_at", f"{NOT_RUN}: predicted 90 s, over 3x the trial budget (20 s)")
    study.add_trial(skipped)
    snap = snapshot(study)
    assert (snap.finished, snap.pruned, snap.not_run, snap.total) == (4, 1, 1, 5)
    assert snap.durations == (10.0, 10.0, 4.0, 2.0)
    line = progress_line(snap, target=10, start_finished=0, elapsed=60.0, timeout=None)
    assert "trials 4/10 done" in line and "pruned 1, not run 1 (predicted too slow)" in line


def test_report_steps_read_back_as_rungs_or_pairs() -> None:
    snap = snapshot(watched_study())
    (t,) = snap.running_trials
    assert StudyShape(n_stages=1, n_pairs=1).where(t) == "stage 0 coarsest level"
    assert StudyShape(n_stages=2, n_pairs=1).where(t.__class__(4, None, None, last_step=5, reports=3)) == "stage 1 end"
    assert (
        StudyShape(n_stages=1, n_pairs=3).where(t.__class__(4, None, None, last_step=1, reports=2))
        == "2 of 3 pairs done"
    )


# --- plain lines (not a terminal) -------------------------------------------------------------------------------


def test_plain_line_says_everything_with_units() -> None:
    line = progress_line(
        snapshot(watched_study()), target=10, start_finished=0, elapsed=75.0, timeout=None, workers=1, unit="px"
    )
    assert line.startswith("trials 4/10 done (1 running, longest 1m")
    assert "best 1.25 px | baseline 2.5 px | failed 1, pruned 1 | 1m15s, ~" in line and line.endswith(" left")


def collect_lines(study: optuna.Study, seconds: float, change=None, **kwargs) -> list[str]:
    lines: list[str] = []
    with ProgressMonitor(study, lines.append, target=8, timeout=None, interval=0.05, **kwargs):
        time.sleep(seconds / 2)
        if change:
            change()
        time.sleep(seconds / 2)
    return lines


def test_plain_lines_come_once_per_change() -> None:
    study = watched_study()

    def finish_the_running_one() -> None:
        t = study.ask()  # (a new trial, told at once: one change of the counts)
        study.tell(t, 0.5)

    lines = collect_lines(study, 0.6, finish_the_running_one, unit="px", heartbeat=3600)
    assert len(lines) == 2, lines
    assert lines[0].startswith("trials 4/8 done") and "best 1.25 px" in lines[0]
    assert lines[1].startswith("trials 5/8 done") and "best 0.5 px" in lines[1]


def test_a_long_trial_gets_a_line_a_heartbeat_apart() -> None:
    lines = collect_lines(watched_study(), 0.5, heartbeat=0.1)
    assert len(lines) >= 3, lines  # nothing changed but a trial runs: a line every 0.1 s
    assert all(ln.startswith("trials 4/8 done (1 running, longest 1m") for ln in lines)


def test_no_heartbeat_when_nothing_runs() -> None:
    study = watched_study()
    study.tell(4, 0.75)
    assert len(collect_lines(study, 0.5, heartbeat=0.1)) == 1


# --- the terminal display ---------------------------------------------------------------------------------------


def live_output(study: optuna.Study, seconds: float, **kwargs) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    lines: list[str] = []
    with ProgressMonitor(study, lines.append, target=8, timeout=None, console=console, **kwargs):
        time.sleep(seconds)
    assert lines == []  # on a terminal, no plain lines
    return out.getvalue()


def test_terminal_shows_a_bar_redrawn_in_place() -> None:
    text = live_output(watched_study(), 1.3, unit="px", workers=2)
    assert "\x1b[2K" in text and "\x1b[1A" in text  # erase the previous frame and move up: in place
    frames = [f for f in re.split(r"(?:\x1b\[2K|\x1b\[1A)+", text) if "trials" in f]
    assert len(frames) >= 4, text  # 4 redraws a second
    live = frames[-2]  # (the last frame, drawn as the monitor stops, has no time left)
    assert "━" in live and "4/8 trials" in live
    for part in ("best 1.25 px", "baseline 2.5 px", "failed 1", "pruned 1", "elapsed", "left"):
        assert part in live, (part, live)
    assert "left" not in frames[-1] and "4/8 trials" in frames[-1]
    assert re.search(r"trial 4\s+node7:4242\s+1m0[5-9]s\s+stage 0 coarsest level: 3\.5 px", text), text


def test_terminal_elapsed_ticks_during_a_long_trial() -> None:
    text = live_output(watched_study(), 2.2)
    seen = set(re.findall(r"trial 4\s+node7:4242\s+(\d+m\d\ds)", text))
    assert len(seen) >= 2, seen  # the running trial's clock moves although the storage does not change


def test_terminal_detection(tmp_path: Path) -> None:
    from autoreg.progress import terminal

    with open(tmp_path / "log.txt", "w") as f:
        assert terminal(f) is None
    main_fd, child_fd = pty.openpty()
    with os.fdopen(child_fd, "w") as tty:
        assert terminal(tty) is not None
    os.close(main_fd)


# --- through the command line -----------------------------------------------------------------------------------


def test_quiet_tune_prints_no_progress_and_names_the_unit(tmp_path: Path) -> None:
    pair = write_study_files(tmp_path / "pair")
    run = tune(pair, tmp_path / "study", "--trials", 2, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    assert not [ln for ln in run.out.splitlines() if ln.startswith("trials ")], run.out
    assert re.search(r"^best tre_mean: [0-9.e+-]+ px \(trial \d\)$", run.out, re.MULTILINE), run.out
    assert re.search(
        r"^baseline \(SimpleITK-notebooks default\) tre_mean: [0-9.e+-]+ px"
        r"(, worse than before registration \([0-9.e+-]+ px\))?$",
        run.out,
        re.MULTILINE,
    ), run.out
    html = tmp_path / "report.html"
    rep = main_out("report", pair, "--study-dir", tmp_path / "study", "-o", html)
    assert re.search(r"best tre_mean [0-9.e+-]+ px \(trial \d\)", rep), rep


def main_out(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.mark.slow
def test_tune_in_a_real_terminal_draws_the_bar(tmp_path: Path) -> None:
    """``autoreg tune`` with its stdout on a pseudo-terminal, in its own process: the live display, then the
    summary as plain lines."""
    pair = write_study_files(tmp_path / "pair")
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "TERM": "xterm"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoreg.cli",
            "tune",
            str(pair),
            "--trials",
            "3",
            "--jobs",
            "1",
            "--study-dir",
            str(tmp_path / "study"),
        ],
        stdout=child_fd,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    code = proc.wait(timeout=120)
    os.close(main_fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert code == 0, proc.stderr.read().decode()
    assert "\x1b[2K" in text and "━" in text and "/3 trials" in text, text[-3000:]
    assert not re.search(r"^trials \d+/3 done", text, re.MULTILINE)  # no plain lines on a terminal
    assert "done: 3 trials" in text and re.search(r"best tre_mean: [0-9.e+-]+ px", text)


# --- --help -----------------------------------------------------------------------------------------------------


def help_of(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--help"]) == 0
    return out.getvalue()


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_every_command_help_ends_with_examples(command: str) -> None:
    text = help_of(command)
    tail = text[text.index("examples:") :]
    commands = [ln.strip() for ln in tail.splitlines() if ln.strip().startswith("autoreg ")]
    assert 2 <= len(commands) <= 4, tail
    assert all(f"autoreg {command} " in c or c.startswith(f"autoreg -v {command} ") for c in commands)


def test_top_level_help_has_one_example_per_command() -> None:
    text = help_of()
    tail = text[text.index("examples") :]
    for command in EXAMPLES:
        assert re.search(rf"^  autoreg (-v )?{command} ", tail, re.MULTILINE), (command, tail)


def test_every_example_parses(tmp_path: Path, monkeypatch) -> None:
    """The examples are real command lines: argparse takes each one (output folders exist in the working dir)."""
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for lines in EXAMPLES.values():
        for command, _what in lines:
            args = parser.parse_args(shlex.split(command)[1:])
            assert callable(args.func), command
