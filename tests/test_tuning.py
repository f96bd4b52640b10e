"""``autoreg tune`` / ``export`` end to end: real SimpleITK registrations on small synthetic pairs.

Every study lives in ``tmp_path`` (``--study-dir``). The CLI runs in-process through ``autoreg.cli.main`` except
where a process must die (SIGKILL, Ctrl-C): those run ``python -m autoreg.cli`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import SimpleITK as sitk
import yaml
from conftest import real_pair_yaml
from optuna.trial import FrozenTrial, TrialState

from autoreg.cli import main
from autoreg.config import load_config
from autoreg.data import load_pair
from autoreg.fingerprint import fingerprint_dataset
from autoreg.objective import trial_seed
from autoreg.recipe import default_recipe, recipe_from_dict, recipe_from_yaml, recipe_to_dict
from autoreg.scoring import tre
from autoreg.space import build_space
from autoreg.synthetic import make_pair, write_pair
from autoreg.trial import FOLDING_CONSTRAINT

#: Any single trial of these tests is cut off here (a pathological recipe must not stall the suite).
TRIAL_TIMEOUT = 30.0
#: A subprocess that has not reached the state we wait for by then is a failure, not a hang.
SUBPROCESS_WAIT_S = 120.0

_PAIR_CACHE: dict[tuple, Any] = {}


# --- helpers ----------------------------------------------------------------------------------------------------


def _pair(size: tuple[int, ...], seed: int, transform: str = "affine"):
    key = (size, seed, transform)
    if key not in _PAIR_CACHE:
        _PAIR_CACHE[key] = make_pair(size, transform=transform, seed=seed)
    return _PAIR_CACHE[key]


def write_study_files(
    folder: Path,
    *,
    name: str = "syn",
    stages: tuple[str, ...] = ("affine",),
    size: tuple[int, ...] = (64, 64),
    seed: int = 1,
    extra: dict[str, Any] | None = None,
    pair: Any = None,
) -> Path:
    """A synthetic pair (PNG + landmark CSVs; ``pair`` instead of the cached one of ``size`` and ``seed``, as NIfTI)
    and a PAIR.yaml next to it; returns the yaml's path."""
    folder.mkdir(parents=True, exist_ok=True)
    if pair is not None:
        paths = write_pair(pair, folder, fmt="nii.gz")
    else:
        paths = write_pair(_pair(size, seed), folder, fmt="png" if len(size) == 2 else "nii.gz")
    doc: dict[str, Any] = {
        "name": name,
        "fixed": paths["fixed"].name,
        "moving": paths["moving"].name,
        "landmarks": {"fixed": paths["fixed_landmarks"].name, "moving": paths["moving_landmarks"].name},
        "stages": list(stages),
        "trial_timeout": TRIAL_TIMEOUT,
    }
    doc.update(extra or {})
    path = folder / "PAIR.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def cli(*argv: Any) -> Run:
    """``autoreg.cli.main`` in-process with stdout/stderr captured (usable from module-scoped fixtures too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Run(code, out.getvalue(), err.getvalue())


def tune(pair: Path, study_dir: Path, *args: Any) -> Run:
    return cli("tune", pair, "--study-dir", study_dir, *args)


def load_study(study_dir: Path, name: str = "syn") -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = study_dir / "journal.log"
    assert journal.is_file(), f"no journal at {journal}"
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def trials_of(study_dir: Path, name: str = "syn") -> list[FrozenTrial]:
    return load_study(study_dir, name).get_trials(deepcopy=False)


def suggested(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials whose recipe came from the search space (not the baseline, a user recipe or a retry)."""
    return [t for t in trials if t.user_attrs.get("role") is None and "retry_of" not in t.user_attrs]


def stripped(recipe_dict: dict) -> dict:
    """A recipe without what a trial sets itself (seed, threads, provenance)."""
    return {k: v for k, v in recipe_dict.items() if k not in ("seed", "threads", "provenance")}


# --- one study shared by several tests ----------------------------------------------------------------------


@dataclass
class Tuned:
    pair: Path
    study_dir: Path
    run: Run


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    """``tune --trials 8 --jobs 1 --seed 3`` on a 64x64 affine pair, run once for the module."""
    root = tmp_path_factory.mktemp("tuned")
    pair = write_study_files(root / "data")
    study_dir = root / "study"
    run = tune(pair, study_dir, "--trials", 8, "--jobs", 1, "--seed", 3)
    return Tuned(pair, study_dir, run)


@pytest.fixture(scope="module")
def resumed(tuned: Tuned, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[FrozenTrial], Run, list[FrozenTrial]]:
    """A copy of the tuned study continued with ``--trials 12``: (trials before, the run, trials after)."""
    assert tuned.run.code == 0, tuned.run.err
    study_dir = tmp_path_factory.mktemp("resumed") / "study"
    shutil.copytree(tuned.study_dir, study_dir)
    before = trials_of(study_dir)
    run = tune(tuned.pair, study_dir, "--trials", 12, "--jobs", 1, "--seed", 3, "-q")
    return before, run, trials_of(study_dir)


# --- 1. a study: storage, trial count, baseline, summary ---------------------------------------------------


def test_tune_runs_the_requested_trials_in_a_journal(tuned: Tuned) -> None:
    assert tuned.run.code == 0, tuned.run.err
    journal = tuned.study_dir / "journal.log"
    assert journal.is_file() and journal.stat().st_size > 0
    study = load_study(tuned.study_dir)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state.is_finished() for t in trials)
    assert study.user_attrs["objective"] == "tre_mean"
    assert study.user_attrs["seed"] == 3
    assert study.user_attrs["stages"] == ["affine"]


def test_trial_zero_is_the_default_recipe(tuned: Tuned) -> None:
    first = trials_of(tuned.study_dir)[0]
    assert first.user_attrs["role"] == "baseline"
    assert first.state == TrialState.COMPLETE
    expected = recipe_to_dict(default_recipe(["affine"], 2))
    assert stripped(first.user_attrs["recipe"]) == stripped(expected)
    assert first.user_attrs["recipe"]["seed"] == first.user_attrs["seed"]


def test_trial_one_is_the_default_recipe_as_a_point_the_sampler_learns_from(tuned: Tuned) -> None:
    second = trials_of(tuned.study_dir)[1]
    assert second.user_attrs["role"] == "default"
    assert second.params["stage0.optimizer.number_of_iterations"] == 100  # a point of the space, seen by TPE
    ran = second.user_attrs["recipe"]["stages"][0]
    assert ran["metric"] == {**ran["metric"], "kind": "mattes", "number_of_histogram_bins": 50}
    assert ran["optimizer"]["kind"] == "gradient_descent" and ran["optimizer"]["learning_rate"] == 1.0
    # [4, 2, 1] as closely as this 64x64 pair allows: no level under 16 voxels a side
    assert ran["pyramid"]["shrink_factors"] == [2, 1]


def test_seed_option_sets_the_registration_seeds(tuned: Tuned) -> None:
    assert load_study(tuned.study_dir).user_attrs["seed"] == 3
    for t in trials_of(tuned.study_dir):
        assert t.user_attrs["seed"] == trial_seed(3, t.number), f"trial {t.number}"


def test_tune_summary_names_best_baseline_and_study(tuned: Tuned) -> None:
    trials = trials_of(tuned.study_dir)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: (t.value, t.number))
    out = tuned.run.out
    assert f"best tre_mean: {best.value:.4g} px (trial {best.number})" in out  # (PNG files: no spacing, pixels)
    assert f"baseline (SimpleITK-notebooks default) tre_mean: {trials[0].value:.4g} px" in out
    assert f"study: {tuned.study_dir}" in out
    assert "done: 8 trials" in out
    assert "Traceback" not in tuned.run.err


def test_rerun_continues_the_same_study_to_the_new_total(resumed) -> None:
    before, run, after = resumed
    assert run.code == 0, run.err
    assert len(before) == 8
    assert [t.number for t in after] == list(range(12))
    assert all(t.state.is_finished() for t in after)
    for old, new in zip(before, after):  # the first eight are kept as they were
        assert (new.state, new.value, new.params) == (old.state, old.value, old.params)
    assert sum(t.user_attrs.get("role") == "baseline" for t in after) == 1  # no second baseline
    assert sum(t.user_attrs.get("role") == "default" for t in after) == 1  # nor a second default point
    assert "done: 12 trials" in run.out


def test_rerun_explores_new_points(resumed) -> None:
    before, _, after = resumed
    old = [t.params for t in suggested(before)]
    new = [t.params for t in suggested(after[len(before) :])]
    assert new
    assert not [p for p in new if p in old]


# --- 2. what a trial records ---------------------------------------------------------------------------------


def test_complete_trials_record_scores_levels_and_worker(tuned: Tuned) -> None:
    complete = [t for t in trials_of(tuned.study_dir) if t.state == TrialState.COMPLETE]
    assert len(complete) >= 4
    worker = f"{socket.gethostname()}:{os.getpid()}"  # --jobs 1 runs in this process
    for t in complete:
        a = t.user_attrs
        for key in (
            "tre_mean",
            "tre_median",
            "tre_p90",
            "tre_max",
            "runtime_s",
            "levels",
            "seed",
            "worker",
            "recipe",
            "pairs",
        ):
            assert key in a, f"trial {t.number} lacks {key}"
        assert a["tre_mean"] == pytest.approx(t.value, rel=1e-12)
        assert 0 <= a["tre_median"] <= a["tre_p90"] <= a["tre_max"]
        assert a["tre_mean"] <= a["tre_max"]
        assert a["runtime_s"] > 0
        assert isinstance(a["seed"], int) and a["seed"] == a["recipe"]["seed"]
        assert a["worker"] == worker
        recipe = recipe_from_dict(a["recipe"])
        levels = a["levels"]
        assert isinstance(levels, list)
        assert len(levels) == sum(len(s.pyramid.shrink_factors) for s in recipe.stages)
        for lvl in levels:
            assert {"stage", "level", "shrink", "iterations", "tre_mean", "pair"} <= set(lvl)
            assert math.isfinite(lvl["tre_mean"])
        assert levels[-1]["stop_condition"]
        assert set(a["pairs"]) == {"syn"}
        stats = a["pairs"]["syn"]
        assert stats["tre_mean"] == pytest.approx(t.value, rel=1e-12)
        assert stats["stop_conditions"] and all(isinstance(s, str) for s in stats["stop_conditions"])


def test_stored_recipe_is_replayed_by_its_params(tuned: Tuned) -> None:
    """``FixedTrial(trial.params)`` through ``space.suggest`` gives back the recipe the trial stored."""
    cfg = load_config(tuned.pair)
    space = build_space(cfg, fingerprint_dataset([load_pair(p) for p in cfg.pairs]))
    trials = suggested(trials_of(tuned.study_dir))
    assert len(trials) >= 5
    for t in trials:
        stored = t.user_attrs["recipe"]
        replay = space.suggest(optuna.trial.FixedTrial(t.params, t.number), seed=t.user_attrs["seed"])
        replay = replay.with_(threads=stored["threads"])
        assert recipe_to_dict(replay) == stored, f"trial {t.number}"


@pytest.mark.parametrize("across", ["mean", "relative"])
def test_value_combines_the_pairs(tmp_path: Path, across: str) -> None:
    """Several pairs: the plain mean of their TREs, or each pair's TRE over its TRE before registration, averaged
    (no single hard pair dominates); each pair's score is reported as one step (the Wilcoxon pruner's instance)."""
    from autoreg.pipeline import Pipeline

    data = tmp_path / "data"
    for i, seed in enumerate((1, 2)):
        write_pair(_pair((64, 64), seed), data / f"p{i}")
    doc = {
        "name": "two",
        "pairs": [
            {
                "name": f"p{i}",
                "fixed": f"p{i}/fixed.png",
                "moving": f"p{i}/moving.png",
                "landmarks": {"fixed": f"p{i}/fixed_landmarks.csv", "moving": f"p{i}/moving_landmarks.csv"},
            }
            for i in range(2)
        ],
        "stages": ["affine"],
        "trial_timeout": TRIAL_TIMEOUT,
        "objective": {"across_pairs": across},
    }
    pair = data / "PAIR.yaml"
    pair.write_text(yaml.safe_dump(doc), encoding="utf-8")
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    before = {
        p.name: tre(sitk.Transform(2, sitk.sitkIdentity), p.fixed_points, p.moving_points, p.fixed).mean
        for p in Pipeline.load(pair).pairs
    }  # the selection landmarks, at identity
    complete = [t for t in trials_of(tmp_path / "study", "two") if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        per = t.user_attrs["pairs"]
        assert set(per) == {"p0", "p1"}
        assert per["p0"]["tre_mean"] != per["p1"]["tre_mean"]
        mean = (per["p0"]["tre_mean"] + per["p1"]["tre_mean"]) / 2
        relative = (per["p0"]["tre_mean"] / before["p0"] + per["p1"]["tre_mean"] / before["p1"]) / 2
        assert t.value == pytest.approx(relative if across == "relative" else mean, rel=1e-12)
        assert t.user_attrs["tre_mean"] == pytest.approx(mean, rel=1e-12)
        assert set(t.intermediate_values) == {0, 1}  # one step per pair
        assert {lvl["pair"] for lvl in t.user_attrs["levels"]} == {"p0", "p1"}
    assert load_study(tmp_path / "study", "two").user_attrs["objective"] == (
        "relative_tre" if across == "relative" else "tre_mean"
    )


# --- 3. failures are recorded and the study goes on ----------------------------------------------------------

_TOO_SPARSE = """\
stages:
  - transform: affine
    metric: {kind: mattes, number_of_histogram_bins: 50}
    sampling: {strategy: random, percentage: 0.0005}
    pyramid: {shrink_factors: [4, 1], smoothing_sigmas: [1.0, 0.0], sigma_units: voxel}
"""


def test_a_failing_user_recipe_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "sparse.yaml").write_text(_TOO_SPARSE, encoding="utf-8")
    pair = write_study_files(data, extra={"enqueue": ["sparse.yaml"]})
    run = tune(pair, tmp_path / "study", "--trials", 4, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    assert len(trials) == 4
    user = trials[1]
    assert user.user_attrs["role"] == "user:sparse.yaml"
    assert user.state == TrialState.FAIL
    reason = user.user_attrs["fail_reason"]
    assert isinstance(reason, str) and 0 < len(reason) <= 200 and "\n" not in reason
    assert "Traceback" not in reason
    assert "1 failed" in run.out
    others = [t for t in trials if t.number != 1]
    assert all(t.state == TrialState.COMPLETE for t in others), [(t.number, t.state) for t in others]


def test_a_recipe_that_steps_the_images_apart_is_pruned_with_the_reason(tmp_path: Path) -> None:
    """Pruned at the level it reported (the sampler learns from pruned trials, not failed ones), not 'complete' at a
    TRE larger than the image: plain gradient descent with a step far too long (the engine's test of it)."""
    from conftest import quick_recipe, synthetic_pair

    from autoreg.recipe import GradientDescent, save_recipe

    data = tmp_path / "data"
    data.mkdir()
    base = quick_recipe(["rigid"], 2, shrink=(2, 1), sigmas=(1.0, 0.0))
    wild = GradientDescent(learning_rate=1e3, number_of_iterations=50, estimate_learning_rate="never", scales="none")
    save_recipe(
        base.model_copy(update={"stages": (base.stages[0].model_copy(update={"optimizer": wild}),)}), data / "wild.yaml"
    )
    pair = write_study_files(data, stages=("rigid",), pair=synthetic_pair(2, "rigid"), extra={"enqueue": ["wild.yaml"]})
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    wild_trial = trials_of(tmp_path / "study")[1]
    assert wild_trial.user_attrs["role"] == "user:wild.yaml" and wild_trial.state == TrialState.PRUNED
    assert wild_trial.user_attrs["pruned_at"].startswith("no overlap (after stage 0 level 0 ")
    assert wild_trial.intermediate_values  # the level it ended was reported


#: A displacement stage without any smoothing and a fixed step: its field folds (about 14 % of the voxels here).
_FOLDS = """
autoreg_recipe: 2
initializer: {kind: geometry}
deterministic: true
stages:
  - transform: {kind: affine}
    metric: {kind: mean_squares}
    optimizer: {kind: gradient_descent, number_of_iterations: 50, estimate_learning_rate: once}
    pyramid: {shrink_factors: [2, 1], smoothing_sigmas: [1.0, 0.0], sigma_units: voxel}
  - transform: {kind: displacement, grid_spacing: 1.0, variance_for_update_field: 0.0, variance_for_total_field: 0.0}
    metric: {kind: mean_squares}
    optimizer: {kind: gradient_descent, learning_rate: 0.1, number_of_iterations: 30, estimate_learning_rate: never}
    pyramid: {shrink_factors: [1], smoothing_sigmas: [0.0], sigma_units: voxel, shrink_images: true}
"""


def test_a_result_that_folds_is_infeasible_for_the_sampler_and_never_the_best(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "folds.yaml").write_text(_FOLDS, encoding="utf-8")
    pair = write_study_files(data, stages=("affine", "displacement"), extra={"enqueue": ["folds.yaml"]})
    run = tune(pair, tmp_path / "study", "--trials", 4, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = {t.number: t for t in trials_of(tmp_path / "study")}
    folds = trials[1]
    assert folds.user_attrs["role"] == "user:folds.yaml" and folds.state == TrialState.COMPLETE
    assert folds.user_attrs["folding_fraction"] > 0.001
    # Optuna's constraint, which TPE reads: the percent folded beyond the default limit of 0.1 %
    assert folds.constraints[FOLDING_CONSTRAINT] == pytest.approx(100 * folds.user_attrs["folding_fraction"] - 0.1)
    done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    feasible = [t for t in done if t.user_attrs["folding_fraction"] <= 0.001]
    assert all(t.constraints[FOLDING_CONSTRAINT] <= 0 for t in feasible)
    exported = tmp_path / "best.yaml"
    assert cli("export", pair, "--study-dir", tmp_path / "study", "-o", exported).code == 0
    best = yaml.safe_load(exported.read_text())["provenance"]["trial"]
    assert feasible and best == min(feasible, key=lambda t: t.value).number
    lower = sum(t.value < trials[best].value for t in done if t not in feasible)
    assert (f"{lower} trial(s) scored lower but fold more than 0.1 %" in run.out) == (lower > 0), run.out


def test_a_trial_timeout_prunes_trials_not_the_study(tmp_path: Path) -> None:
    """Time-limited trials are PRUNED (the sampler learns from them; it ignores FAILed ones), with the reason."""
    pair = write_study_files(tmp_path / "data", extra={"trial_timeout": 0.001})
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1, "-q")
    assert run.code == 1 and "no trial of the study completed (cut at its time limit: 3 of 3)" in run.err
    trials = trials_of(tmp_path / "study")
    assert len(trials) == 3
    assert all(t.state == TrialState.PRUNED for t in trials)
    for t in trials:
        assert t.user_attrs["pruned_at"].startswith("time limit 0.001 s (stopped in ")
        assert t.user_attrs["time_limit_s"] == 0.001
    assert "best: no completed trial yet" in run.out
    # a cut baseline is reported as cut, with what it finished
    assert "baseline (SimpleITK-notebooks default) tre_mean: cut at its time limit 0.001 s" in run.out
    # nothing to export yet: one clear line, exit 2
    exp = cli("export", pair, "--study-dir", tmp_path / "study", "-o", tmp_path / "best.yaml")
    assert exp.code == 2
    assert len(exp.err_lines) == 1 and "no completed trial" in exp.err
    assert not (tmp_path / "best.yaml").exists()


def test_a_trial_cut_by_the_study_s_end_is_interrupted_not_pruned(tmp_path: Path, monkeypatch) -> None:
    """A trial whose limit is the study's end (--timeout), not its own, and that runs into it, says nothing of its
    recipe: FAIL 'interrupted' (the sampler ignores it, it gives its place, a queued point runs again next time)
    rather than PRUNED. Registrations after the baseline here run until their limit."""
    import autoreg.objective as objective
    from autoreg.errors import RegistrationFailed

    real, calls = objective.score_pair, []

    def slow(recipe, pair, *args, **kwargs):
        calls.append(kwargs["time_limit"])
        if len(calls) == 1:  # the baseline
            return real(recipe, pair, *args, **kwargs)
        time.sleep(kwargs["time_limit"])
        raise RegistrationFailed("time limit", "stopped in stage 0 level 0")

    monkeypatch.setattr(objective, "score_pair", slow)
    pair = write_study_files(tmp_path / "data", extra={"trial_timeout": None})
    run = tune(pair, tmp_path / "study", "--trials", 5, "--jobs", 1, "--timeout", 2, "-q")
    trials = trials_of(tmp_path / "study")
    assert trials[0].state == TrialState.COMPLETE
    assert len(trials) >= 2 and f", {len(trials) - 1} interrupted by Ctrl-C or the --timeout, not counted)" in run.out
    for cut in trials[1:]:  # own limits of at least 5 s: the study's end (2 s) came first
        assert cut.state == TrialState.FAIL and cut.user_attrs["fail_reason"] == "interrupted", cut.user_attrs
        assert cut.user_attrs["fail_detail"].startswith("the study's --timeout ended it after ")
    # a trial cut by its own limit is judged by it: PRUNED
    short = write_study_files(tmp_path / "short", extra={"trial_timeout": 0.2})
    calls.clear()
    assert tune(short, tmp_path / "short_study", "--trials", 2, "--jobs", 1, "--timeout", 600, "-q").code == 0
    own = trials_of(tmp_path / "short_study")[1]
    assert own.state == TrialState.PRUNED and own.user_attrs["pruned_at"].startswith("time limit 0.2 s")


def test_time_limits_come_from_the_predicted_cost_and_spare_the_baseline(tmp_path: Path, monkeypatch) -> None:
    """Every trial records its predicted and measured seconds; its limit is a multiple of the prediction. The
    baseline (the reference of every study) has no automatic limit."""
    import autoreg.objective as objective

    monkeypatch.setattr(objective, "LIMIT_FACTOR", 1e-6)
    monkeypatch.setattr(objective, "MIN_LIMIT_S", 0.001)
    pair = write_study_files(tmp_path / "data", extra={"trial_timeout": None})
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    assert trials[0].user_attrs["role"] == "baseline" and trials[0].state == TrialState.COMPLETE
    assert trials[0].user_attrs["time_limit_s"] is None
    assert all(t.user_attrs["predicted_s"] > 0 and t.user_attrs["runtime_s"] > 0 for t in trials)
    assert [t.state for t in trials[1:]] == [TrialState.PRUNED] * 2
    for t in trials[1:]:
        assert t.user_attrs["time_limit_s"] == pytest.approx(max(0.001, 1e-6 * t.user_attrs["predicted_s"]))
        assert t.user_attrs["pruned_at"].startswith("time limit")


def test_a_trial_predicted_over_budget_is_not_run_but_the_default_point_is(tmp_path: Path, monkeypatch) -> None:
    """With a budget, a suggested trial predicted far past its share is pruned unrun, with the reason, and gives its
    place in --trials to another (up to --trials of them); the default point (TPE's anchor, run before the model has
    learnt from this study) runs under its time limit instead."""
    import autoreg.objective as objective

    monkeypatch.setattr(objective, "OVER_BUDGET_FACTOR", 1e-9)  # every prediction is over budget
    pair = write_study_files(tmp_path / "data", extra={"trial_timeout": None})
    run = tune(pair, tmp_path / "study", "--trials", 4, "--jobs", 1, "--timeout", 600, "-q")
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    assert [t.user_attrs.get("role") for t in trials[:2]] == ["baseline", "default"]
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert trials[1].user_attrs["time_limit_s"] == objective.MIN_LIMIT_S  # the limit still holds it
    assert len(trials) == 4 + 4  # two run, four not run and free, two not run and counted
    for t in trials[2:]:
        assert t.state == TrialState.PRUNED and "runtime_s" in t.user_attrs
        assert t.user_attrs["pruned_at"].startswith("not run: predicted"), t.user_attrs["pruned_at"]
        assert "over 1e-09x the trial budget" in t.user_attrs["pruned_at"], t.user_attrs["pruned_at"]
    assert "6 not run: predicted too slow for their share of --timeout" in run.out
    assert "the study reached --trials 4 early: 6 suggestions were predicted too slow" in run.out  # why it ended


@pytest.mark.slow
def test_the_baseline_never_holds_a_study_hostage(tmp_path: Path) -> None:
    """With --timeout the study ends on time even when SimpleITK's default (trial 0) needs longer than the whole
    budget; the cut baseline is reported as cut."""
    # ~5 s for the default recipe at one thread (deterministic)
    pair = write_study_files(
        tmp_path / "data", size=(128, 128, 128), extra={"trial_timeout": None, "deterministic": True}
    )
    run = tune(pair, tmp_path / "study", "--timeout", 1.5, "--jobs", 1, "-q")
    trials = trials_of(tmp_path / "study")
    n = len(trials)
    assert run.code == 1 and "no trial of the study completed (" in run.err and f"time limit: 1 of {n}" in run.err
    for t in trials[1:]:  # cut by the study's end, not by their own limits: nothing said of their recipes
        assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted"
    base = trials[0]
    assert base.user_attrs["role"] == "baseline" and base.state == TrialState.PRUNED
    assert base.user_attrs["time_limit_s"] <= 1.5
    assert base.user_attrs["runtime_s"] <= 1.5 + 2.0
    assert "baseline (SimpleITK-notebooks default) tre_mean: cut at its time limit" in run.out


def test_a_baseline_that_made_the_alignment_worse_is_called_so(tmp_path: Path) -> None:
    """At 0.002 mm spacing SimpleITK's default smooths by sigmas of 2 and 1 mm (1000 and 500 voxels) and ends above
    the TRE before registration (as it did on a histology pair at that spacing); the summary and the report say so
    rather than claim an improvement over the default alone."""
    small = make_pair((96, 96), seed=1, spacing=(0.002, 0.002), magnitude=0.5)
    pair = write_study_files(tmp_path / "data", pair=small, extra={"trial_timeout": None})
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1)
    assert run.code == 0, run.err
    before = next(ln for ln in run.out.splitlines() if ln.startswith("before registration (the identity) tre_mean: "))
    value = before.rsplit(": ", 1)[1]
    assert f"mm, worse than before registration ({value})" in run.out
    html = tmp_path / "report.html"
    assert cli("report", pair, "--study-dir", tmp_path / "study", "-o", html).code == 0
    text = html.read_text(encoding="utf-8")
    assert "before registration tre_mean" in text and "which ended worse than before registration" in text


def test_the_value_before_registration_is_the_objective_of_the_identity() -> None:
    from autoreg.config import PairSpec
    from autoreg.data import PairData
    from autoreg.objective import value_before

    pairs = []
    for seed in (1, 2):
        p = _pair((64, 64), seed)
        spec = PairSpec(name=f"p{seed}", fixed=Path("f"), moving=Path("m"))
        pairs.append(PairData(spec, p.fixed, p.moving, p.fixed_points, p.moving_points))
    each = [tre(sitk.Transform(2, sitk.sitkIdentity), p.fixed_points, p.moving_points, p.fixed).mean for p in pairs]
    assert value_before(pairs, "tre_mean") == pytest.approx(np.mean(each)) and min(each) > 1.0
    assert value_before(pairs, "relative_tre") == 1.0
    assert value_before(pairs, "holdout_loss") is None


def test_user_recipe_trial_params_describe_its_recipe(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    recipe = default_recipe(["affine"], 2).with_(
        stages=[
            {
                "transform": "affine",
                "sampling": {"strategy": "regular", "percentage": 0.5},
                "pyramid": {"shrink_factors": [2, 1], "smoothing_sigmas": [1.0, 0.0], "sigma_units": "voxel"},
            }
        ]
    )
    (data / "mine.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe)), encoding="utf-8")
    pair = write_study_files(data, extra={"enqueue": ["mine.yaml"]})
    run = tune(pair, tmp_path / "study", "--trials", 2, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    user = trials_of(tmp_path / "study")[1]
    assert user.user_attrs["role"] == "user:mine.yaml"
    stage = user.user_attrs["recipe"]["stages"][0]
    ran = {
        "initializer.kind": "geometry",
        "stage0.metric.kind": stage["metric"]["kind"],
        "stage0.sampling.strategy": stage["sampling"]["strategy"],
        "stage0.optimizer.kind": stage["optimizer"]["kind"],
    }
    contradicting = {k: (user.params[k], v) for k, v in ran.items() if k in user.params and user.params[k] != v}
    assert not contradicting


# --- 4. search-space overrides --------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_overrides_fix_narrow_and_drop(tmp_path: Path) -> None:
    search = {
        "stage0.metric.kind": "mattes",
        "stage0.optimizer.number_of_iterations": {"low": 20, "high": 30},
        "stage0.metric.number_of_histogram_bins": "drop",
    }
    pair = write_study_files(tmp_path / "data", extra={"search": search})
    run = tune(pair, tmp_path / "study", "--trials", 6, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    assert len(trials) == 6
    sugg = suggested(trials)
    assert len(sugg) == 4  # after the baseline and the default's point, which keeps to the overrides too
    assert trials[1].user_attrs["role"] == "default"
    assert 20 <= trials[1].params["stage0.optimizer.number_of_iterations"] <= 30
    for t in sugg:
        assert "stage0.metric.kind" not in t.params and "stage0.metric.number_of_histogram_bins" not in t.params
        assert 20 <= t.params["stage0.optimizer.number_of_iterations"] <= 30
        stage = t.user_attrs["recipe"]["stages"][0]
        assert stage["metric"]["kind"] == "mattes"
        assert stage["metric"]["number_of_histogram_bins"] == 50  # dropped: the default recipe's
        assert 20 <= stage["optimizer"]["number_of_iterations"] <= 30
    # the baseline stays the SimpleITK default recipe whatever the overrides
    assert stripped(trials[0].user_attrs["recipe"]) == stripped(recipe_to_dict(default_recipe(["affine"], 2)))


@pytest.mark.parametrize("key", ["stage0.metric.binz", "stage1.metric.bins", "pyramid.levels", "foo"])
def test_unknown_search_key_is_a_user_error(tmp_path: Path, key: str) -> None:
    pair = write_study_files(tmp_path / "data", extra={"search": {key: 32}})
    run = tune(pair, tmp_path / "study", "--trials", 2, "--jobs", 1, "-q")
    assert run.code == 2, (run.out, run.err)
    assert len(run.err_lines) == 1, run.err
    assert f"search.{key}" in run.err and str(pair) in run.err
    assert "Traceback" not in run.err


# --- 5. parallel workers ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_jobs_share_the_budget_exactly(tmp_path: Path) -> None:
    pair = write_study_files(tmp_path / "data")
    run = tune(pair, tmp_path / "study", "--trials", 10, "--jobs", 2)
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    assert [t.number for t in trials] == list(range(10))
    assert all(t.state.is_finished() for t in trials)
    workers = {t.user_attrs["worker"] for t in trials}
    hosts = {w.rpartition(":")[0] for w in workers}
    pids = {int(w.rpartition(":")[2]) for w in workers}
    assert hosts == {socket.gethostname()}
    assert len(pids) == 2, workers
    assert os.getpid() not in pids
    assert "2 worker(s) x 1 ITK thread(s)" in run.out
    assert all(t.user_attrs.get("threads") == 1 for t in trials)


# --- 6. crash safety -------------------------------------------------------------------------------------------


def _spawn_tune(pair: Path, study_dir: Path, log_dir: Path, trials: int = 500) -> subprocess.Popen:
    """``python -m autoreg.cli tune`` in its own process; Ctrl-C restored (a background shell ignores it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "stdout.txt", "ab")
    err = open(log_dir / "stderr.txt", "ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoreg.cli",
                "tune",
                str(pair),
                "--trials",
                str(trials),
                "--jobs",
                "1",
                "--study-dir",
                str(study_dir),
            ],
            stdout=out,
            stderr=err,
            cwd=log_dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    finally:
        out.close()
        err.close()


def _wait_for_running(
    proc: subprocess.Popen, study_dir: Path, name: str, min_finished: int, min_elapsed: float = 0.3
) -> FrozenTrial:
    """Poll the journal until >= ``min_finished`` trials are finished and one has been RUNNING inside its
    registration for ``min_elapsed`` seconds; returns that trial.

    A trial records its recipe (all params suggested, then ``threads``) just before its registration starts; a
    trial already that long in its registration is neither at a journal write nor about to ask for the next one.
    """
    deadline = time.monotonic() + SUBPROCESS_WAIT_S
    pid = f":{proc.pid}"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tune exited early with {proc.returncode}"
        if (study_dir / "journal.log").is_file():
            try:
                trials = trials_of(study_dir, name)
            except KeyError:  # the study is not created yet
                trials = []
            finished = sum(t.state.is_finished() for t in trials)
            now = datetime.now()
            running = [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and t.user_attrs.get("worker", "").endswith(pid)
                and "threads" in t.user_attrs
                and (now - t.datetime_start).total_seconds() >= min_elapsed
            ]
            if finished >= min_finished and running:
                return running[0]
        time.sleep(0.02)
    raise AssertionError(f"no RUNNING trial after {min_finished} finished within {SUBPROCESS_WAIT_S} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _slow_pair(folder: Path, extra: dict[str, Any] | None = None) -> Path:
    # 96x96: a trial lasts long enough to be caught RUNNING, and the retry stays cheap.
    return write_study_files(folder, name="crash", size=(96, 96), seed=5, extra=extra)


#: One pyramid level: a trial writes to the journal (trial.report) only when its registration ends, so a worker
#: killed well inside a trial does not hold the journal's lock (a stale lock stalls the next run for 30 s).
_ONE_LEVEL = {"search": {"stage0.pyramid.levels": 1}}

#: Suggested trials that spend their time inside the registration's ``Execute`` (dense ANTS correlation at full
#: resolution; no rotation search, whose ``Execute`` has no Python callbacks).
_ITK_BOUND = {
    "search": {
        "stage0.metric.kind": "ants_nc",
        "stage0.pyramid.levels": 1,
        "initializer.rotation_search": False,
        "stage0.optimizer.number_of_iterations": {"low": 300, "high": 500},
    }
}


@pytest.mark.slow
def test_sigkill_leaves_a_trial_that_the_next_run_fails_and_retries(tmp_path: Path) -> None:
    pair = _slow_pair(tmp_path / "data", _ONE_LEVEL)
    study_dir = tmp_path / "study"
    killed: FrozenTrial | None = None
    for _attempt in range(3):  # the kill may land between two trials: then try again on the same study
        proc = _spawn_tune(pair, study_dir, tmp_path / "logs")
        try:
            _wait_for_running(proc, study_dir, "crash", min_finished=2)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            _stop(proc)
        running = [t for t in trials_of(study_dir, "crash") if t.state == TrialState.RUNNING]
        if running:
            assert len(running) == 1
            killed = running[0]
            if "worker" not in killed.user_attrs:  # pragma: no cover - the trial ended just before the kill
                pytest.xfail(
                    f"BUG: trial {killed.number} was killed between study.ask() and its 'worker' attr: "
                    "nothing can ever reap it"
                )
            break
    assert killed is not None, "the worker was never killed in the middle of a trial"
    assert killed.user_attrs["worker"] == f"{socket.gethostname()}:{proc.pid}"
    before = trials_of(study_dir, "crash")
    finished_before = [t for t in before if t.state.is_finished()]
    assert len(finished_before) >= 2

    total = len(before) + 2  # the killed trial no longer counts: its retry and two more run
    run = tune(pair, study_dir, "--trials", total, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    assert f"trial(s) left RUNNING by a dead worker were failed and queued again: [{killed.number}]" in run.out

    after = trials_of(study_dir, "crash")
    assert len(after) == total + 1  # the budget counts the retry in the killed trial's place (workers.budget_spent)
    assert not [t.number for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in after}
    for old in finished_before:  # nothing finished was lost or changed
        new = by_number[old.number]
        assert (new.state, new.value, new.params) == (old.state, old.value, old.params)
    dead = by_number[killed.number]
    assert dead.state == TrialState.FAIL
    assert "worker died" in dead.user_attrs["fail_reason"]
    retries = [t for t in after if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state.is_finished() and retry.number > killed.number
    assert retry.params == killed.params
    assert retry.user_attrs["worker"] == f"{socket.gethostname()}:{os.getpid()}"


def _kept(before: list[FrozenTrial], after: list[FrozenTrial]) -> None:
    by_number = {t.number: t for t in after}
    for old in before:
        if old.state.is_finished():
            new = by_number[old.number]
            assert (new.state, new.value) == (old.state, old.value)


def test_interrupt_in_a_trial_fails_it_and_exits_130(tuned: Tuned, tmp_path: Path, monkeypatch) -> None:
    """KeyboardInterrupt inside a trial (in-process, deterministic): that trial FAIL 'interrupted', exit 130."""
    from autoreg.objective import Objective

    study_dir = tmp_path / "study"
    shutil.copytree(tuned.study_dir, study_dir)
    before = trials_of(study_dir)
    real_call = Objective.__call__

    def call(self, trial):
        if trial.number == 9:
            trial.set_user_attr("worker", self.worker)
            raise KeyboardInterrupt
        return real_call(self, trial)

    monkeypatch.setattr(Objective, "__call__", call)
    run = tune(tuned.pair, study_dir, "--trials", 20, "--jobs", 1, "--seed", 3)
    assert run.code == 130, run.err
    assert "interrupted: 9 trials" in run.out and ", 1 interrupted by Ctrl-C or the --timeout, not counted)" in run.out
    assert "finished trials are kept" in run.out
    assert "Traceback" not in run.err
    trials = trials_of(study_dir)
    assert len(trials) == 10
    assert trials[9].state == TrialState.FAIL and trials[9].user_attrs["fail_reason"] == "interrupted"
    assert all(t.state.is_finished() for t in trials)
    _kept(before, trials)


def test_a_baseline_stopped_by_ctrl_c_runs_again_and_gives_its_place(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the baseline: the next tune queues it again (it stayed 'fail (interrupted)' for good before) and
    the interrupted trial does not count toward --trials."""
    from autoreg.objective import Objective

    pair = write_study_files(tmp_path / "data")
    study_dir = tmp_path / "study"
    real_call = Objective.__call__

    def stopped(self, trial):
        trial.set_user_attr("worker", self.worker)
        raise KeyboardInterrupt

    monkeypatch.setattr(Objective, "__call__", stopped)
    first = tune(pair, study_dir, "--trials", 4, "--jobs", 1, "--seed", 3)
    assert first.code == 130, first.err
    assert "interrupted: 0 trials" in first.out
    assert ", 1 interrupted by Ctrl-C or the --timeout, not counted)" in first.out
    monkeypatch.setattr(Objective, "__call__", real_call)
    again = tune(pair, study_dir, "--trials", 4, "--jobs", 1, "--seed", 3)
    assert again.code == 0, again.err
    assert "queued again, as Ctrl-C stopped them before: baseline" in again.out
    assert "fail (interrupted)" not in again.out and "baseline (SimpleITK-notebooks default) tre_mean: " in again.out
    trials = trials_of(study_dir)
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].user_attrs["role"] == "baseline" and retry[0].state == TrialState.COMPLETE
    assert stripped(retry[0].user_attrs["recipe"]) == stripped(trials[0].user_attrs["recipe"])
    assert retry[0].user_attrs["seed"] == trial_seed(3, 0)  # the registration trial 0 would have run
    ran = [t for t in trials if t.number != 0]
    assert len(ran) == 4 and all(t.state.is_finished() for t in ran)  # the interrupted one gave its place
    assert "done: 4 trials" in again.out


@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_nothing_running(tmp_path: Path) -> None:
    """Ctrl-C, pressed again while nothing happens (as a user does): exit 130, nothing RUNNING, completed kept."""
    pair = _slow_pair(tmp_path / "data")
    study_dir = tmp_path / "study"
    logs = tmp_path / "logs"
    proc = _spawn_tune(pair, study_dir, logs)
    try:
        _wait_for_running(proc, study_dir, "crash", min_finished=2)
        before = trials_of(study_dir, "crash")
        deadline = time.monotonic() + SUBPROCESS_WAIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)
            patience = time.monotonic() + 1.5
            while proc.poll() is None and time.monotonic() < patience:
                if "interrupted:" in (logs / "stdout.txt").read_text():
                    patience = deadline  # it is stopping: no more Ctrl-C
                time.sleep(0.05)
        assert proc.poll() is not None, "tune did not stop on Ctrl-C"
        err = (logs / "stderr.txt").read_text()
        assert proc.returncode == 130, err[-3000:]
    finally:
        _stop(proc)
    out = (logs / "stdout.txt").read_text()
    assert "interrupted:" in out and "finished trials are kept" in out
    after = trials_of(study_dir, "crash")
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    _kept(before, after)


@pytest.mark.slow
def test_one_ctrl_c_during_a_registration_stops_tune(tmp_path: Path) -> None:
    pair = _slow_pair(tmp_path / "data", _ITK_BOUND)
    study_dir = tmp_path / "study"
    proc = _spawn_tune(pair, study_dir, tmp_path / "logs")
    try:
        _wait_for_running(proc, study_dir, "crash", min_finished=1)
        before = trials_of(study_dir, "crash")
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            now = trials_of(study_dir, "crash")
            swallowed = [t for t in now if "Python Callable" in str(t.user_attrs.get("fail_reason", ""))]
            assert not swallowed, f"Ctrl-C recorded as a failed trial: {swallowed[0].user_attrs['fail_reason']}"
            assert len(now) <= len(before) + 1, "tune went on with new trials after Ctrl-C"
            time.sleep(0.1)
        assert proc.returncode == 130
    finally:
        _stop(proc)
    assert "Traceback" not in (tmp_path / "logs" / "stderr.txt").read_text()
    after = trials_of(study_dir, "crash")
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    _kept(before, after)
    assert not [t.number for t in after if "Python Callable" in str(t.user_attrs.get("fail_reason", ""))]
    assert len(after) <= len(before) + 1


# --- 7. export and apply -----------------------------------------------------------------------------------------


def test_export_writes_the_best_recipe_with_provenance(tuned: Tuned, tmp_path: Path) -> None:
    out = tmp_path / "best.yaml"
    run = cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", out)
    assert run.code == 0, run.err
    study = load_study(tuned.study_dir)
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, t.number))
    assert f"trial {best.number}" in run.out
    recipe = recipe_from_yaml(out.read_text(encoding="utf-8"), source=str(out))
    prov = recipe.provenance
    assert prov is not None
    assert set(prov["versions"]) >= {"autoreg", "SimpleITK", "optuna"}
    assert prov["versions"]["optuna"] == optuna.__version__
    assert prov["study"] == "syn"
    assert prov["trial"] == best.number
    assert prov["score"] == best.value
    fp = prov["fingerprint"]
    assert fp["dim"] == 2 and len(fp["pairs"]) == 1
    assert fp["pairs"][0]["fixed"]["sha256"]
    assert stripped(recipe_to_dict(recipe.with_(provenance=None))) == stripped(best.user_attrs["recipe"])
    assert recipe.seed == best.user_attrs["seed"]

    # apply on the tuning pair reproduces the study's score on the landmarks it selected with, and its honest score
    # on the landmarks the search never saw (the provenance names them)
    data = tuned.pair.parent
    tfm = tmp_path / "t.tfm"
    applied = cli("apply", out, "--fixed", data / "fixed.png", "--moving", data / "moving.png", "--transform-out", tfm)
    assert applied.code == 0, applied.err
    transform = sitk.ReadTransform(str(tfm))
    fixed = sitk.ReadImage(str(data / "fixed.png"))
    fixed_points = np.loadtxt(data / "fixed_landmarks.csv", delimiter=",", skiprows=1)
    moving_points = np.loadtxt(data / "moving_landmarks.csv", delimiter=",", skiprows=1)
    report = fp["landmark_split"]["syn"]["report"]
    assert len(report) == 7 and fp["landmark_split"]["syn"]["select"] == 13  # a third of 20, spread over the image
    select = [i for i in range(len(fixed_points)) if i not in report]
    score = tre(transform, fixed_points[select], moving_points[select], fixed).mean
    assert score == pytest.approx(best.value, rel=1e-6)
    honest = tre(transform, fixed_points[report], moving_points[report], fixed).mean
    assert honest == pytest.approx(best.user_attrs["tre_report_mean"], rel=1e-6)
    assert prov["scores"]["tre_report_mean"] == best.user_attrs["tre_report_mean"]


def test_export_before_tune_is_a_user_error(tmp_path: Path) -> None:
    pair = write_study_files(tmp_path / "data")
    run = cli("export", pair, "--study-dir", tmp_path / "nothing", "-o", tmp_path / "best.yaml")
    assert run.code == 2
    assert len(run.err_lines) == 1, run.err
    assert "autoreg tune" in run.err
    assert not (tmp_path / "best.yaml").exists()


# --- 8. determinism of the search -------------------------------------------------------------------------------


def test_same_seed_same_trial_params(tuned: Tuned, tmp_path: Path) -> None:
    run = tune(tuned.pair, tmp_path / "again", "--trials", 5, "--jobs", 1, "--seed", 3, "-q")
    assert run.code == 0, run.err
    first = trials_of(tuned.study_dir)[:5]
    again = trials_of(tmp_path / "again")
    assert [t.params for t in again] == [t.params for t in first]
    assert [t.user_attrs["seed"] for t in again] == [t.user_attrs["seed"] for t in first]

    # trial 0 is the baseline and trial 1 the default's point, whatever the seed; the sampler's first draw differs
    other = tune(tuned.pair, tmp_path / "other", "--trials", 3, "--jobs", 1, "--seed", 4, "-q")
    assert other.code == 0, other.err
    assert [t.user_attrs.get("role") for t in first[:2]] == ["baseline", "default"]
    assert first[2].user_attrs.get("role", "suggested") == "suggested"
    assert trials_of(tmp_path / "other")[1].params == first[1].params
    assert trials_of(tmp_path / "other")[2].params != first[2].params


# --- 10. real data -----------------------------------------------------------------------------------------------


def test_a_searched_recipe_beats_the_baseline_on_a_real_brain_pair(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "itk_brain_pd_shift13x17"
    pair = real_pair_yaml(folder, tmp_path / "PAIR.yaml", name="brain", stages=["rigid"], trial_timeout=TRIAL_TIMEOUT)
    run = tune(pair, tmp_path / "study", "--trials", 6, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study", "brain")
    assert len(trials) == 6
    base = trials[0]
    assert base.user_attrs["role"] == "baseline" and base.state == TrialState.COMPLETE
    searched = [t for t in suggested(trials) if t.state == TrialState.COMPLETE]
    best = min(searched, key=lambda t: t.value)
    assert best.value < base.value  # a recipe the search proposed beats SimpleITK's default (5.9 px here)
    assert best.user_attrs["tre_report_mean"] < 1.0  # and holds on the landmarks it never saw (21.40 px before)


# --- export: the fastest recipe within a margin; the spread measured once ----------------------------------------


def test_export_within_writes_the_fastest_recipe_near_the_best(tuned: Tuned, tmp_path: Path) -> None:
    trials = [t for t in trials_of(tuned.study_dir) if t.state == TrialState.COMPLETE]
    best = min(trials, key=lambda t: (t.value, t.number))
    out = tmp_path / "fast.yaml"
    pct = (max(t.value for t in trials) / best.value - 1) * 100 + 1  # every completed trial qualifies
    run = cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", out, "--repeats", 0, "--within", pct)
    assert run.code == 0, run.err
    recipe = recipe_from_yaml(out.read_text())
    fastest = min(trials, key=lambda t: (t.user_attrs["runtime_s"], t.value, t.number))
    assert fastest.user_attrs["runtime_s"] <= best.user_attrs["runtime_s"]
    assert recipe.provenance["trial"] == fastest.number
    assert recipe.provenance["within"]["best_trial"] == best.number
    assert f"{fastest.user_attrs['runtime_s']:.3g} s per run" in run.out
    # within 0 %: the best itself (or a tie)
    run = cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", out, "--repeats", 0, "--within", 0)
    assert run.code == 0 and recipe_from_yaml(out.read_text()).provenance["score"] == best.value
    for bad in ("-1", "nan"):
        run = cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", out, "--within", bad)
        assert run.code == 2 and "--within" in run.err and len(run.err.strip().splitlines()) == 1


def test_the_spread_is_measured_once_per_study_and_trial(tuned: Tuned, tmp_path: Path, monkeypatch) -> None:
    import autoreg.export as export

    calls = []
    real = export.measured_spread
    monkeypatch.setattr(export, "measured_spread", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", tmp_path / "r.yaml", "--repeats", 2)
    second = cli(
        "export",
        tuned.pair,
        "--study-dir",
        tuned.study_dir,
        "-o",
        tmp_path / "r.py",
        "--repeats",
        2,
        "--format",
        "python",
    )
    assert first.code == 0 and second.code == 0, (first.err, second.err)
    assert len(calls) == 1  # the python export reused the spread the yaml export measured
    spread = recipe_from_yaml((tmp_path / "r.yaml").read_text()).provenance["spread"]
    assert spread["repeats"] == 2 and json.dumps(spread) in (tmp_path / "r.py").read_text()


# --- warm starts: earlier studies' recipes as points of this study's space ------------------------------------------


def test_warm_start_queues_earlier_recipes_as_points_the_sampler_learns_from(tuned: Tuned, tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    assert cli("export", tuned.pair, "--study-dir", tuned.study_dir, "-o", library / "a.yaml", "--repeats", 0).code == 0
    earlier = recipe_from_yaml((library / "a.yaml").read_text())
    pair = write_study_files(tmp_path / "data", seed=2)
    run = tune(pair, tmp_path / "study", "--trials", 3, "--jobs", 1, "-q", "--warm-start", library)
    assert run.code == 0, run.err
    trials = trials_of(tmp_path / "study")
    warm = [t for t in trials if t.user_attrs.get("role") == "warm:a.yaml"]
    assert len(warm) == 1 and warm[0].number == 1  # right after the baseline
    assert warm[0].params and "recipe" in warm[0].user_attrs  # a point of the space, and the recipe it ran
    ran = recipe_from_dict(warm[0].user_attrs["recipe"])
    assert ran.stages[0].optimizer.kind == earlier.stages[0].optimizer.kind
    assert ran.stages[0].metric == earlier.stages[0].metric
    # given again on resume, it is not queued twice
    run = tune(pair, tmp_path / "study", "--trials", 4, "--jobs", 1, "-q", "--warm-start", library / "a.yaml")
    assert (
        run.code == 0
        and len([t for t in trials_of(tmp_path / "study") if t.user_attrs.get("role") == "warm:a.yaml"]) == 1
    )


def test_check_refuses_recipes_whose_stages_do_not_fit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "affine.yaml").write_text(yaml.safe_dump(recipe_to_dict(default_recipe(["affine"], 2))))
    pair = write_study_files(data, stages=("translation",), extra={"enqueue": ["affine.yaml"]})
    for command in ("check", "tune"):
        run = cli(command, pair, *(("--study-dir", tmp_path / "s", "--trials", 1) if command == "tune" else ()))
        assert run.code == 2 and "enqueue" in run.err and "do not fit the study's stages" in run.err, run.err
        assert len(run.err.strip().splitlines()) == 1
    pair = write_study_files(data, stages=("affine",), extra={"warm_start": ["affine.yaml"]})
    run = cli("check", pair)
    assert run.code == 0 and "starting point warm:affine.yaml: affine" in run.out


def test_check_refuses_overrides_that_would_fail_every_trial(tmp_path: Path) -> None:
    for search, key in (
        ({"stage0.optimizer.kind": "lbfgsb"}, "stage0.optimizer.kind"),
        (
            {"stage0.metric.kind": "correlation", "stage0.metric.number_of_histogram_bins": 32},
            "stage0.metric.number_of_histogram_bins",
        ),
    ):
        pair = write_study_files(tmp_path / "data", extra={"search": search})
        run = cli("check", pair)
        assert run.code == 2 and f"search.{key}" in run.err and len(run.err.strip().splitlines()) == 1, run.err
    # the README's own example is fine
    pair = write_study_files(tmp_path / "data", extra={"search": {"stage0.pyramid.shrink_factors": [4, 2, 1]}})
    assert cli("check", pair).code == 0


def test_a_crossed_point_repeats_its_donor_s_linear_stages_exactly(tmp_path: Path) -> None:
    """A default way crossed onto a trial, and a suggestion conditioned on it, register with that trial's seed, so
    their linear stages end where the donor's did (one thread: bit-identical), and the donor is the trial whose
    linear stages ended best."""

    from autoreg.objective import RUNGS, report_step
    from autoreg.trial import crossed_from, linear_donor

    end_of_affine = report_step(0, 2, 0, len(RUNGS) - 1)

    def donor_of(t: FrozenTrial) -> FrozenTrial:
        return trials[linear_donor(t)]

    def linear(t: FrozenTrial) -> list[tuple]:
        return [
            (lv["iterations"], lv["metric_value"], lv["tre_mean"]) for lv in t.user_attrs["levels"] if lv["stage"] == 0
        ]

    # one thread per trial: on more, ITK's Mattes metric sums in the order its threads arrive (benchmarks/threads.py)
    pair = write_study_files(tmp_path / "data", stages=("affine", "deformable"), extra={"deterministic": True})
    n_trials = 20  # baseline and 5 default points, 1 suggestion, 5 crossed at 7 finished, 12 conditioned, ...
    run = tune(pair, tmp_path / "study", "--trials", n_trials, "--jobs", 1, "-q")
    assert run.code == 0, run.err
    trials = {t.number: t for t in trials_of(tmp_path / "study")}
    crossed = [t for t in trials.values() if crossed_from(t.user_attrs.get("role", ""))[1] is not None]
    assert crossed, [t.user_attrs.get("role") for t in trials.values()]
    conditioned = [t for t in trials.values() if "linear_from" in t.user_attrs]
    assert conditioned and not any("role" in t.user_attrs for t in conditioned)  # suggested: prunable, priced
    first = min(t.number for t in crossed)
    for t in crossed + conditioned:
        donor = donor_of(t)
        assert t.user_attrs["seed"] == donor.user_attrs["seed"]
        assert linear(t) == linear(donor)
        assert t.params.items() >= {k: v for k, v in donor.params.items() if k.startswith("stage0.")}.items()
    # the first donor, chosen once a third of the trials had finished: of those, the one whose affine ended lowest
    donor = donor_of(trials[first])
    by_end = sorted((t for t in trials.values() if t.datetime_complete), key=lambda t: t.datetime_complete)
    before = [t for t in by_end[: round(n_trials / 3)] if t.params and end_of_affine in t.intermediate_values]
    assert donor.intermediate_values[end_of_affine] == min(t.intermediate_values[end_of_affine] for t in before)
