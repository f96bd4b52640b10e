"""Storage URLs: passwords never printed, unreachable or unsupported storages fail with one clear line."""

from __future__ import annotations

import pytest

from autoreg.study import redact


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://alice:s3cret@db.example:5432/studies", "postgresql://alice:***@db.example:5432/studies"),
        ("mysql+pymysql://bob:hunter2@127.0.0.1/optuna", "mysql+pymysql://bob:***@127.0.0.1/optuna"),
        ("redis://carol:pa55@127.0.0.1:6379/0", "redis://carol:***@127.0.0.1:6379/0"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
        ("/some/where/journal.log", "/some/where/journal.log"),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cret@127.0.0.1:1/studies",  # nothing listens on port 1 (or no driver installed)
        "ftp://alice:s3cret@127.0.0.1/x",  # not a storage
    ],
)
def test_bad_storage_is_one_line_without_the_password(url: str, pair_yaml, run_cli, tmp_path) -> None:
    result = run_cli("tune", pair_yaml(), "--trials", "1", "--storage", url, "--study-dir", tmp_path / "s", "-q")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "--storage" in lines[0], result.err
    assert "s3cret" not in result.err + result.out


def test_a_dead_worker_s_trial_is_retried_once_not_forever() -> None:
    """A recipe that kills its worker must not kill every retry of itself: the first death is retried, a retry's
    death is final."""
    import optuna
    from optuna.trial import TrialState

    from autoreg.study import reap_stale_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    dead = "no-such-host-ever:1"
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    first.set_user_attr("worker", dead)
    assert reap_stale_trials(study, alone=True) == [first.number]
    trials = study.get_trials(deepcopy=False)
    assert trials[first.number].state == TrialState.FAIL
    retry = [t for t in trials if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].user_attrs["retry_of"] == first.number

    again = study.ask()  # the retry runs, and its worker dies too
    assert again.number == retry[0].number
    again.set_user_attr("worker", dead)
    assert reap_stale_trials(study, alone=True) == [again.number]
    after = study.get_trials(deepcopy=False)
    assert after[again.number].state == TrialState.FAIL
    assert "not queued again" in after[again.number].user_attrs["fail_reason"]
    assert not [t for t in after if t.state in (TrialState.WAITING, TrialState.RUNNING)]


def test_a_trial_whose_worker_died_before_naming_itself_is_retried_by_the_next_ask() -> None:
    """A worker killed between asking for a trial and naming itself leaves a RUNNING trial no one owns; the next
    worker to ask (under the same lock) fails it and runs it again, with the point it was queued with, so the budget
    stays exact and no trial stays RUNNING."""
    import optuna
    from optuna.trial import TrialState

    from autoreg.workers import ask_named

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25}, user_attrs={"role": "default"})
    orphan = study.ask()  # popped from the queue; its worker dies before set_user_attr("worker", ...)

    trial = ask_named(study, 2, "alive:2")
    assert trial is not None and trial.user_attrs["worker"] == "alive:2"
    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[trial.number].user_attrs == {"role": "default", "retry_of": orphan.number, "worker": "alive:2"}
    assert trial.suggest_float("x", 0, 1) == 0.25  # the queued point, which the orphan never suggested
    study.tell(trial, 1.0)

    last = ask_named(study, 2, "alive:2")  # the budget: the retry took the orphan's place, one more to go
    assert last is not None and "retry_of" not in last.user_attrs
    study.tell(last, 2.0)
    assert ask_named(study, 2, "alive:2") is None
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.parametrize(
    "role, runs_as_is",
    [
        ("baseline", True),
        ("user:mine.yaml", True),
        ("default:bspline", False),
        ("warm:a.yaml", False),
        ("linear_from", False),
    ],
)
def test_a_dead_worker_s_retry_runs_what_the_trial_ran(role: str, runs_as_is: bool) -> None:
    """A recipe run as it is is retried as it is; a point of the space (a default point, a warm start) is retried as
    that point, so that the sampler sees it, and keeps its role, so that a resumed study does not queue it again; a
    suggestion conditioned on another trial's linear stages keeps that donor (and so its seed)."""
    import optuna
    from optuna.trial import TrialState

    from autoreg.study import reap_stale_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    recipe = {"autoreg_recipe": 2, "stages": []}
    params = {} if runs_as_is else {"x": 0.25}
    user_attrs = {"linear_from": 7} if role == "linear_from" else {"role": role}
    study.enqueue_trial(params, user_attrs={**user_attrs, **({"recipe": recipe} if runs_as_is else {})})
    first = study.ask()
    if not runs_as_is:
        first.suggest_float("x", 0, 1)
    first.set_user_attr("worker", "no-such-host-ever:1")
    assert reap_stale_trials(study, alone=True) == [first.number]
    [retry] = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert {k: v for k, v in retry.user_attrs.items() if k not in ("retry_of", "recipe")} == user_attrs
    assert retry.user_attrs["retry_of"] == first.number
    assert ("recipe" in retry.user_attrs) == runs_as_is
    again = study.ask()
    assert again.number == retry.number
    if not runs_as_is:
        assert again.suggest_float("x", 0, 1) == 0.25


def _two_stage_study():
    """An ``[affine, deformable]`` space of a small synthetic pair, and an empty study drawing it at random."""
    from pathlib import Path

    import optuna

    from autoreg.config import PairSpec
    from autoreg.data import PairData
    from autoreg.fingerprint import fingerprint_dataset
    from autoreg.space import SearchSpace
    from autoreg.synthetic import make_pair

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pair = make_pair((64, 64), transform="affine", seed=2, n_landmarks=8)
    spec = PairSpec(name="syn", fixed=Path("fixed"), moving=Path("moving"))
    fp = fingerprint_dataset([PairData(spec, pair.fixed, pair.moving, pair.fixed_points, pair.moving_points)])
    space = SearchSpace(fingerprint=fp, stages=("affine", "deformable"))
    return space, optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


def test_the_default_ways_run_again_on_the_best_suggested_linear_stages_at_each_third() -> None:
    """The default points ran on the default affine; once a third of the budget has finished, each default way is
    queued on the best suggested trial's linear stages (where no level was reported: several pairs), once per third
    and never twice for one trial."""
    from optuna.trial import TrialState

    from autoreg.study import cross_defaults_if_due

    space, study = _two_stage_study()

    def finish(value: float, role: str | None = None) -> int:
        trial = study.ask()
        if role:
            trial.set_user_attr("role", role)
        space.suggest(trial, seed=trial.number)
        study.tell(trial, value)
        return trial.number

    def cross() -> list[str]:
        return cross_defaults_if_due(study, space, study.get_trials(deepcopy=False), 9)

    finish(1.0, role="default:bspline")
    assert cross() == []  # 1 of 9 finished: not yet a third
    slow = study.ask()  # a way whose default ran out of its time limit is not crossed: it does not fit the budget
    slow.set_user_attr("role", "default:demons")
    slow.set_user_attr("pruned_at", "time limit 60 s (stopped in stage 1 level 1)")
    space.suggest(slow, seed=slow.number)
    study.tell(slow, state=TrialState.PRUNED)
    finish(1.5, role="default:displacement")
    assert cross() == []  # a third, but no suggested trial has finished: the default points' affine is the default
    best = finish(3.0)  # the best suggested trial, though the default point scores better
    ways = [role for role, _ in space.default_points() if role != "default:demons"]
    assert len(ways) == 4
    assert cross() == [f"{role}@{best}" for role in ways]
    assert cross() == []  # once per third
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert len(waiting) == len(ways)
    linear = {k: v for k, v in study.trials[best].params.items() if not k.startswith("stage1.")}
    for t in waiting:  # the best's linear stages, each way's deformable stage
        fixed = t.system_attrs["fixed_params"]
        assert {k: v for k, v in fixed.items() if not k.startswith("stage1.")} == linear
        assert fixed["stage1.transform.kind"] in ("bspline", "displacement")
    for value in (0.9, 0.8, 0.7, 0.6):
        finish(value)  # the queued points run
    finish(4.0)
    assert cross() == []  # two thirds finished, but the best suggested trial is the one already crossed
    newer = finish(0.1)
    assert cross() == [f"{role}@{newer}" for role in ways]
    for value in (0.9, 0.8, 0.7, 0.6):
        finish(value)
    finish(0.05)
    assert cross() == []  # both thirds spent


def test_a_default_point_whose_linear_stages_ended_best_is_not_crossed_onto_itself() -> None:
    """Its way crossed onto its own linear stages (and seed) would run the same registration again: a 3D study spent
    99 s of 400 on such a copy."""
    from autoreg.objective import RUNGS, report_step
    from autoreg.study import cross_defaults_if_due

    space, study = _two_stage_study()
    step = report_step(0, 2, 0, len(RUNGS) - 1)

    def finish(value: float, linear: float, role: str | None = None) -> int:
        trial = study.ask()
        if role:
            trial.set_user_attr("role", role)
        space.suggest(trial, seed=trial.number)
        trial.report(linear, step)
        study.tell(trial, value)
        return trial.number

    donor = finish(1.0, 0.5, role="default:bspline")
    finish(2.0, 3.0, role="default:displacement")
    finish(3.0, 4.0)
    queued = cross_defaults_if_due(study, space, study.get_trials(deepcopy=False), 9, step)
    ways = [role for role, _ in space.default_points()]
    assert "default:bspline" in ways
    assert queued == [f"{role}@{donor}" for role in ways if role != "default:bspline"]


def test_the_donor_of_the_crossed_linear_stages_is_the_trial_whose_linear_stages_ended_best() -> None:
    """Any trial of the space whose levels were reported may give its linear stages, a default point included (its
    affine is the default one, but its seed made it a different result); not the baseline (a recipe run as it is,
    no parameters) nor a crossed trial (its donor's linear stages again); a trial stopped in its deformable stage
    counts, and one still running whose linear stages have ended; with no level reported, the best suggested
    trial."""
    from autoreg.objective import RUNGS, report_step
    from autoreg.study import crossing_donor
    from autoreg.trial import TrialRecord

    step = report_step(0, 2, 0, len(RUNGS) - 1)  # the end of stage 0 in a one-pair, two-stage study

    def rec(number: int, role: str, value: float | None, linear: float | None, state: str = "COMPLETE", params=True):
        return TrialRecord(
            number=number,
            state=state,
            value=value,
            role=role,
            params={"stage0.optimizer.kind": "gradient_descent"} if params else {},
            intermediate={} if linear is None else {0: 9.0, step: linear},
        )

    records_ = [
        rec(0, "baseline", 5.0, 1.0, params=False),
        rec(1, "default:symmetric", 3.0, 4.5),
        rec(2, "default:demons", 6.0, 4.0),
        rec(3, "suggested", 2.5, 4.8),
        rec(4, "default:symmetric@2", 2.0, 3.0),
        rec(5, "suggested", None, 4.2, state="PRUNED"),
        rec(6, "suggested", None, 0.5, state="FAIL"),
    ]
    assert crossing_donor(records_, step).number == 2
    records_.append(rec(7, "suggested", None, 3.9, state="PRUNED"))  # stopped in its field: its affine was best
    assert crossing_donor(records_, step).number == 7
    records_.append(rec(8, "suggested", None, 3.8, state="RUNNING"))  # its affine has ended, its field runs
    assert crossing_donor(records_, step).number == 8
    records_.append(rec(9, "suggested", None, None, state="RUNNING"))  # still in its affine
    assert crossing_donor(records_, step).number == 8
    assert crossing_donor(records_, None).number == 3
    assert crossing_donor([rec(1, "suggested", 3.0, None), rec(2, "suggested", 2.0, None)], step).number == 2


def test_only_suggested_trials_are_stopped_by_the_pruner() -> None:
    """Queued points report their levels but run to their end: a crossed point stopped on the linear stage it took
    from the best trial would teach TPE that this affine is poor."""
    from types import SimpleNamespace

    import optuna

    from autoreg.objective import Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for role in ("baseline", "default:symmetric", "default:symmetric@12", "warm:old.yaml", "user:mine.yaml"):
        study.enqueue_trial({}, user_attrs={"role": role})
    queued = [study.ask() for _ in range(5)]
    suggested = study.ask()
    for prune in (True, False):
        objective = SimpleNamespace(prune=prune)
        assert not any(Objective.prunable(objective, t) for t in queued)
        assert Objective.prunable(objective, suggested) is prune


def test_from_the_first_third_every_other_suggestion_draws_only_the_field_on_the_best_linear_stages() -> None:
    """A two-stage suggestion whose affine draw is poor ends before its field is seen; so from the first crossing
    mark on, every other suggestion is queued with the best linear stages so far fixed (and their trial as donor),
    and the sampler draws its first deformable stage alone. Queued points run first; a conditioned trial repeats
    its donor's linear stages, so it never becomes a donor itself."""
    import optuna
    from optuna.trial import TrialState

    from autoreg.study import condition_on_best_linear, crossing_donor
    from autoreg.trial import TrialRecord, linear_donor

    space, study = _two_stage_study()

    def condition() -> int | None:
        return condition_on_best_linear(study, space, study.get_trials(deepcopy=False), 9)

    def finish(value: float) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        space.suggest(trial, seed=trial.number)
        study.tell(trial, value)
        return study.trials[trial.number]

    finish(3.0)
    assert condition() is None  # 1 of 9 finished: not yet a third
    best = finish(1.0)
    finish(2.0)  # three finished: the mark; the trial to ask is number 3, odd: drawn whole
    assert condition() is None
    finish(2.5)
    assert condition() == best.number  # number 4, even: conditioned on the best so far
    assert condition() is None  # it waits to be asked: nothing more is queued
    conditioned = finish(0.5)
    assert linear_donor(conditioned) == best.number
    assert TrialRecord.of(conditioned).origin == f"suggested, linear stages of trial {best.number}"
    linear = {k: v for k, v in best.params.items() if not k.startswith("stage1.")}
    assert linear and conditioned.params.items() >= linear.items()
    assert any(k.startswith("stage1.") for k in conditioned.params)  # the field was drawn
    # the conditioned trial scored best, but its linear stages are its donor's: the donor stays the donor
    assert crossing_donor([TrialRecord.of(t) for t in study.trials], None).number == best.number
    finish(1.5)  # number 5, odd
    for role in ("default:displacement@1", "default:bspline@1"):
        study.enqueue_trial({}, user_attrs={"role": role})
    assert len(study.trials) % 2 == 0 and study.get_trials(states=(TrialState.WAITING,))
    assert condition() is None  # queued points run first
    finish(0.9)
    finish(0.8)
    assert condition() == best.number  # number 8
