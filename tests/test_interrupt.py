"""Ctrl-C ends a tune within a second, even while a trial is inside one long SimpleITK call (issue 12, item 1).

The trial is a user recipe enqueued on a small 3D pair: ANTS neighbourhood correlation of radius 4 over every voxel
(sampling none) at full resolution, thousands of iterations. One of its iterations takes seconds, and a
registration sees a stop request only between iterations; the tune must not wait for it. Real processes: the
tune runs as ``python -m autoreg.cli`` and gets a real SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import alive, descendants, quick_recipe, synthetic_pair
from optuna.trial import TrialState

from autoreg.recipe import ANTSNeighborhoodCorrelation, Recipe, save_recipe
from autoreg.synthetic import write_pair

#: What the issue asks for: the tune is gone this long after Ctrl-C.
EXIT_WITHIN_S = 2.0
WAIT_S = 180.0

needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list children")


def slow_recipe() -> Recipe:
    """One full-resolution level of dense ANTS correlation, radius 4: about 0.7 s an iteration at 64^3 on 2 threads
    here, 2.5 s at 96^3, more on the one thread a worker of two gets."""
    base = quick_recipe(("rigid",), 3, shrink=(1,), sigmas=(0.0,), iterations=5000, deterministic=True)
    stage = base.stages[0].model_copy(update={"metric": ANTSNeighborhoodCorrelation(radius=4)})
    return Recipe.model_validate({**base.model_dump(), "stages": [stage.model_dump()]})


def write_slow_study(folder: Path, size: int = 96) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_pair(synthetic_pair(3, "rigid", size=(size,) * 3), folder, fmt="nii.gz")
    save_recipe(slow_recipe(), folder / "slow.yaml")
    doc = {
        "name": "slow",
        "fixed": paths["fixed"].name,
        "moving": paths["moving"].name,
        "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
        "stages": ["rigid"],
        "enqueue": ["slow.yaml"],
        "trial_timeout": 600,
    }
    path = folder / "PAIR.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def trials_of(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    from autoreg.study import StorageSpec, open_storage

    storage = open_storage(StorageSpec(str(study_dir / "journal.log"), True))
    return optuna.load_study(study_name="slow", storage=storage).get_trials(deepcopy=False)


def is_pool_worker(pid: int) -> bool:
    """Whether ``pid`` runs loky's worker entry point (the tune's other children are loky's resource trackers)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"loky" in command and b"resource_tracker" not in command


def wait_for_slow_trial(proc: subprocess.Popen, study_dir: Path, inside_s: float = 1.0) -> int:
    """The number of the enqueued slow trial once it has been inside its registration for ``inside_s`` seconds."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tune exited early with {proc.returncode}"
        if (study_dir / "journal.log").is_file():
            try:
                trials = trials_of(study_dir)
            except KeyError:
                trials = []
            for t in trials:
                if (
                    t.state == TrialState.RUNNING
                    and str(t.user_attrs.get("role", "")).startswith("user:")
                    and "threads" in t.user_attrs
                    and (datetime.now() - t.datetime_start).total_seconds() >= inside_s
                ):
                    return t.number
        time.sleep(0.05)
    raise AssertionError(f"the slow trial was not running within {WAIT_S} s")


@needs_proc
@pytest.mark.parametrize(
    ("jobs", "size"),
    [
        (1, 96),
        (2, 96),  # the worker cannot stop within the grace: the tune kills the pool and fails the trial itself
        (2, 48),  # iterations of a few tenths of a second: the workers stop in the grace; the tune ends the idle pool
    ],
)
def test_ctrl_c_ends_tune_within_two_seconds_during_a_long_itk_call(tmp_path: Path, jobs: int, size: int) -> None:
    pair = write_slow_study(tmp_path / "data", size)
    study_dir = tmp_path / "study"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoreg.cli",
                "tune",
                str(pair),
                "--trials",
                "20",
                "--jobs",
                str(jobs),
                "--study-dir",
                str(study_dir),
            ],
            stdout=fo,
            stderr=fe,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        slow = wait_for_slow_trial(proc, study_dir)
        workers = descendants(proc.pid)
        pool = {pid for pid in workers if is_pool_worker(pid)}
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert code == 130, err.read_text()[-3000:]
    assert took < EXIT_WITHIN_S, f"tune took {took:.2f} s to exit after Ctrl-C"
    assert "interrupted:" in out.read_text()
    outlived = alive(pool)  # the tune killed them, idle ones too, before it left
    deadline = time.monotonic() + 0.5  # loky's resource trackers leave once the tune's pipe closes
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive(workers)
    for pid in left:  # never leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not outlived, f"pool workers outlived the tune: {sorted(outlived)}"
    assert not left, f"worker processes outlived the tune: {sorted(left)}"
    assert not err.read_text().strip(), err.read_text()[-3000:]  # no traceback, no loky clean-up warnings
    trials = {t.number: t for t in trials_of(study_dir)}
    assert not [n for n, t in trials.items() if t.state == TrialState.RUNNING]
    assert trials[slow].state == TrialState.FAIL and trials[slow].user_attrs["fail_reason"] == "interrupted"
