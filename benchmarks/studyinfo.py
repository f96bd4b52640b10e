"""Figures read back from a finished study (pure reading, shared by the benchmarks)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from autoreg.study import JOURNAL_NAME, StorageSpec, open_storage


def load(study_dir, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = StorageSpec(str(study_dir / JOURNAL_NAME), local_journal=True)
    return optuna.load_study(study_name=name, storage=open_storage(spec))


def figures(study: optuna.Study) -> dict:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    states = [t.state for t in trials]
    values = [t.value if t.state == TrialState.COMPLETE else None for t in trials]
    done = [v for v in values if v is not None]
    best = min(done) if done else None
    baseline = next((t for t in trials if t.user_attrs.get("role") == "baseline"), None)
    within = None
    if best is not None:
        running = float("inf")
        for t, v in zip(trials, values):
            if v is not None:
                running = min(running, v)
            if running <= 1.1 * best:
                within = t.number
                break
    within_gain = None  # first trial whose best-so-far closed 90 % of the gap between the baseline and the best
    base_value = baseline.value if baseline is not None and baseline.value is not None else None
    if best is not None and base_value is not None and base_value > best:
        running = float("inf")
        for t, v in zip(trials, values):
            if v is not None:
                running = min(running, v)
            if running <= best + 0.1 * (base_value - best):
                within_gain = t.number
                break
    reasons: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.FAIL:
            r = t.user_attrs.get("fail_reason", "?")
            reasons[r] = reasons.get(r, 0) + 1
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    best_trial = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, default=None)
    within_s = _seconds_until(trials, starts, lambda best_so_far: best is not None and best_so_far <= 1.1 * best)
    within_gain_s = _seconds_until(
        trials, starts, lambda best_so_far: within_gain is not None and best_so_far <= best + 0.1 * (base_value - best)
    )
    return {
        "trials": len(trials),
        "complete": states.count(TrialState.COMPLETE),
        "failed": states.count(TrialState.FAIL),
        "pruned": states.count(TrialState.PRUNED),
        "fail_reasons": reasons,
        "best": best,
        "best_trial": best_trial.number if best_trial else None,
        "best_tre_median": best_trial.user_attrs.get("tre_median") if best_trial else None,
        "best_tre_p90": best_trial.user_attrs.get("tre_p90") if best_trial else None,
        "baseline": baseline.value if baseline is not None else None,
        "baseline_state": baseline.state.name if baseline is not None else None,
        "within_10pct_at_trial": within,
        "within_10pct_of_gain_at_trial": within_gain,
        "within_10pct_s": within_s,
        "within_10pct_of_gain_s": within_gain_s,
        "span_s": span,
        "registration_s": sum(t.user_attrs.get("runtime_s", 0.0) for t in trials),
    }


def _seconds_until(trials, starts, reached) -> float | None:
    """Wall time from the study's first trial start until the best value so far, taken in order of completion
    (workers finish out of number order), first satisfies ``reached``."""
    if not starts:
        return None
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.datetime_complete and t.value is not None),
        key=lambda t: t.datetime_complete,
    )
    running = float("inf")
    for t in done:
        running = min(running, t.value)
        if reached(running):
            return (t.datetime_complete - min(starts)).total_seconds()
    return None
