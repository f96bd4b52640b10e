"""The trial record's rules: which trial is the best (feasible before infeasible) and what the sampler is told."""

from __future__ import annotations

from optuna.trial import TrialState, create_trial

from autoreg.trial import FOLDING_CONSTRAINT, TrialRecord, best_and_baseline


def _rec(number: int, value: float | None, feasible: bool = True, role: str = "suggested") -> TrialRecord:
    return TrialRecord(
        number=number, state="COMPLETE" if value is not None else "FAIL", value=value, feasible=feasible, role=role
    )


def test_the_best_is_the_lowest_feasible_trial_not_the_lowest_value() -> None:
    trials = [_rec(0, 5.0, role="baseline"), _rec(1, 1.0, feasible=False), _rec(2, 3.0), _rec(3, 2.0, False)]
    best, baseline = best_and_baseline(trials)
    assert best is not None and best.number == 2
    assert baseline is not None and baseline.number == 0


def test_without_a_feasible_trial_the_lowest_value_is_the_best() -> None:
    best, _ = best_and_baseline([_rec(0, 4.0, False), _rec(1, 2.0, False), _rec(2, None)])
    assert best is not None and best.number == 1


def test_feasibility_is_read_from_optuna_s_constraints() -> None:
    def frozen(**constraints: float) -> TrialRecord:
        return TrialRecord.of(create_trial(state=TrialState.COMPLETE, value=1.0, constraints=constraints or None))

    assert not frozen(**{FOLDING_CONSTRAINT: 0.4}).feasible
    assert frozen(**{FOLDING_CONSTRAINT: -0.1}).feasible
    assert frozen(**{FOLDING_CONSTRAINT: 0.0}).feasible  # exactly at the limit
    assert frozen().feasible  # a linear trial (no folding measured)


def test_export_within_never_trades_a_feasible_best_for_a_faster_fold() -> None:
    from autoreg.export import fastest_within

    def rec(number: int, value: float, runtime: float, feasible: bool) -> TrialRecord:
        return TrialRecord(
            number=number, state="COMPLETE", value=value, runtime_s=runtime, recipe={"k": 1}, feasible=feasible
        )

    best, fold, quick = rec(1, 1.0, 50.0, True), rec(2, 1.01, 1.0, False), rec(3, 1.02, 10.0, True)
    assert fastest_within([best, fold, quick], best, 5.0).number == 3
