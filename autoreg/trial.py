"""The trial record: what a trial stores in the study, under which names, and how every reader gets it back.

The objective writes a trial's facts with :func:`write` (names checked against :class:`TrialRecord`'s fields, so a
misspelt attribute is a bug caught at once, not a silently missing column); export, report, progress, artifacts and
evaluate read :class:`TrialRecord` from :func:`records`. :func:`best_and_baseline` is the one rule for which trial is
the best and which is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict

BASELINE = "baseline"
SUGGESTED = "suggested"
USER_PREFIX = "user:"
#: A warm start: an earlier study's recipe, given to the sampler as a point of this study's space.
WARM_PREFIX = "warm:"
#: The default recipe as a point of the space (``default:<kind>`` per kind a ``deformable`` stage may draw).
DEFAULT_POINT = "default"
#: A default point's deformable way on another trial's linear stages: ``default:<way>@<that trial's number>``.
CROSSED_SEP = "@"
#: How ``pruned_at`` begins for a trial cut by its time limit.
TIME_LIMIT = "time limit"
#: How ``pruned_at`` begins for a suggested trial never run: its predicted seconds were far over its share of the
#: study's time. It ran no registration, so it does not count toward ``--trials`` (``not_run_numbers``).
NOT_RUN = "not run"
#: ``fail_reason`` of a trial stopped by the user (Ctrl-C) or its tune's end: it measured nothing, so it gives its
#: place in ``--trials`` (``interrupted_numbers``), and a queued point is queued again by the next tune.
INTERRUPTED = "interrupted"
#: Statistics of a finished trial, each the mean over its pairs (``folding_fraction``: the worst pair).
SCORE_KEYS = (
    "tre_mean",
    "tre_median",
    "tre_p90",
    "tre_max",
    "tre_mean_vox",
    "tre_report_mean",
    "relative_tre",
    "holdout_loss",
    "holdout_nmi",
    "folding_fraction",
    "score_std",
)


class TrialRecord(BaseModel):
    """One trial as autoreg reads it: Optuna's state, value and params, and autoreg's own attributes."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    # --- Optuna's own ---
    number: int
    state: str
    value: float | None = None
    params: dict[str, Any] = {}
    intermediate: dict[int, float] = {}
    # --- written by autoreg (user attributes) ---
    worker: str | None = None
    #: ``baseline`` (trial 0: the SimpleITK-notebooks default), ``suggested`` (the sampler's), ``user:<file>`` (a
    #: recipe run as it is), ``warm:<file>`` (an earlier study's recipe, as a point of this space), ``default`` or
    #: ``default:<kind>`` (the default recipe as a point of this space), ``default:<kind>@<n>`` (that point's
    #: deformable stage on trial n's linear stages).
    role: str = SUGGESTED
    #: A suggested trial drawn over the first deformable stage only, on trial n's linear stages and with its seed
    #: (``study.condition_on_best_linear``).
    linear_from: int | None = None
    #: The whole recipe that ran (any recipe format); every trial stores it, so export never re-derives it.
    recipe: dict[str, Any] | None = None
    seed: int | None = None
    threads: int | None = None
    time_limit_s: float | None = None
    predicted_s: float | None = None
    runtime_s: float | None = None
    #: One entry per pyramid level of every stage and pair: stage, level, shrink, iterations, seconds, TRE.
    levels: list[dict[str, Any]] = []
    #: Per pair: its statistics (TRE or holdout, runtime, stop conditions, repeat values).
    pairs: dict[str, dict[str, Any]] = {}
    tre_mean: float | None = None
    tre_median: float | None = None
    tre_p90: float | None = None
    tre_max: float | None = None
    tre_mean_vox: float | None = None
    #: Mean TRE on the landmarks kept aside (the search never saw them): the honest score.
    tre_report_mean: float | None = None
    #: Mean over pairs of each pair's TRE over its TRE before registration (the value of multi-pair studies).
    relative_tre: float | None = None
    holdout_loss: float | None = None
    holdout_nmi: float | None = None
    folding_fraction: float | None = None
    #: Optuna's constraints held (``FOLDING_CONSTRAINT``: the result folds no more than the study allows).
    feasible: bool = True
    score_std: float | None = None
    repeat_scores: list[float] | None = None
    fail_reason: str | None = None
    fail_detail: str | None = None
    pruned_at: str | None = None
    retry_of: int | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        return cls(
            number=trial.number,
            state=trial.state.name,
            value=trial.value if trial.state == TrialState.COMPLETE else None,
            params=dict(trial.params),
            intermediate={int(k): float(v) for k, v in trial.intermediate_values.items()},
            feasible=all(v <= 0.0 for v in trial.constraints.values()),
            **trial.user_attrs,
        )

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.value is not None and math.isfinite(self.value)

    @property
    def origin(self) -> str:
        """The role as a reader needs it: a conditioned suggestion names the trial whose linear stages it took."""
        return self.role if self.linear_from is None else f"{self.role}, linear stages of trial {self.linear_from}"

    @property
    def out_of_time(self) -> bool:
        """Cut by its time limit (pruned, not judged by the pruner or the cost model)."""
        return self.state == "PRUNED" and (self.pruned_at or "").startswith(TIME_LIMIT)

    @property
    def not_run(self) -> bool:
        """Skipped before its registration for its predicted seconds (pruned by the cost model, not by a run)."""
        return is_not_run(self.state, self.pruned_at)

    @property
    def interrupted(self) -> bool:
        """Failed because its tune was stopped, not because of its recipe."""
        return is_interrupted(self.state, self.fail_reason)

    @property
    def reason(self) -> str | None:
        """Why a trial failed, was pruned or cannot be the best (it folds past the study's limit), in a few words
        (None for the others)."""
        if self.state == "FAIL":
            return self.fail_reason or "no reason recorded"
        if self.state == "PRUNED":
            return f"pruned at {self.pruned_at}" if self.pruned_at else "pruned"
        if self.state == "COMPLETE" and not self.feasible:
            return "infeasible: folds past the study's max_folding_percent"
        return None

    def scores(self) -> dict[str, float]:
        """The statistics this trial recorded (``SCORE_KEYS`` that are set), plus its runtime."""
        out = {k: getattr(self, k) for k in SCORE_KEYS if getattr(self, k) is not None}
        if self.runtime_s is not None:
            out["runtime_s"] = self.runtime_s
        return out

    def last_level_tre(self) -> float | None:
        """The TRE after the last pyramid level this trial finished (a cut trial's best known score)."""
        tres = [lv["tre_mean"] for lv in self.levels if lv.get("tre_mean") is not None]
        return tres[-1] if tres else None


#: The attribute names :func:`write` accepts: the record's fields that are not Optuna's own (nor derived from them).
ATTRIBUTES = frozenset(TrialRecord.model_fields) - {"number", "state", "value", "params", "intermediate", "feasible"}


#: The constraint a deformable trial sets (Optuna's ``set_constraint``: above 0 is infeasible): the percent of folded
#: voxels beyond ``objective.max_folding_percent``. TPE keeps infeasible trials out of its good group on its own.
FOLDING_CONSTRAINT = "folding_percent_over_limit"


def write(trial: optuna.Trial, **attrs: Any) -> None:
    """Store facts on a running trial; an unknown name is a programming error (``KeyError``)."""
    for name, value in attrs.items():
        if name not in ATTRIBUTES:
            raise KeyError(f"{name!r} is not a trial record attribute")
        trial.set_user_attr(name, value)


def attrs(**fields: Any) -> dict[str, Any]:
    """User attributes for ``study.enqueue_trial`` (names checked as in :func:`write`)."""
    unknown = set(fields) - ATTRIBUTES
    if unknown:
        raise KeyError(f"not trial record attributes: {sorted(unknown)}")
    return fields


def read(trial: optuna.Trial | FrozenTrial, name: str) -> Any:
    """One fact of a trial (running or finished), None when it was not written."""
    if name not in ATTRIBUTES:
        raise KeyError(f"{name!r} is not a trial record attribute")
    return trial.user_attrs.get(name)


def crossed_role(way: str, number: int) -> str:
    """The role of default point ``way`` on trial ``number``'s linear stages."""
    return f"{way}{CROSSED_SEP}{number}"


def crossed_from(role: str) -> tuple[str, str | None]:
    """``crossed_role`` read back: the way's role and the trial number it was crossed onto (None when not crossed)."""
    way, sep, number = role.partition(CROSSED_SEP)
    return way, number if sep else None


def linear_donor(trial: optuna.Trial | FrozenTrial) -> int | None:
    """The trial whose linear stages (and seed) this one repeats: a crossed point's or a conditioned suggestion's
    donor; None for a trial that drew its own."""
    crossed = crossed_from(read(trial, "role") or SUGGESTED)[1]
    if crossed is not None:
        return int(crossed)
    donor = read(trial, "linear_from")
    return None if donor is None else int(donor)


def first_run(trial: optuna.Trial) -> int:
    """The number of the first run of what ``trial`` retries (its own when it retries nothing): a retry registers
    with its original's seed, so that it repeats that registration. A baseline stopped by Ctrl-C and run again on its
    retry's own seed ended at 9.26 mm where the same study's baseline had ended at 0.447."""
    number, retried = trial.number, read(trial, "retry_of")
    if retried is None:
        return number
    earlier = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
    while retried is not None:
        number = int(retried)
        retried = earlier[number].user_attrs.get("retry_of") if number in earlier else None
    return number


def is_not_run(state: str, pruned_at: str | None) -> bool:
    """Whether a trial in ``state`` with ``pruned_at`` was skipped for its predicted seconds (``NOT_RUN``)."""
    return state == "PRUNED" and (pruned_at or "").startswith(NOT_RUN)


def not_run_numbers(trials: Iterable[FrozenTrial], n_trials: int | None) -> set[int]:
    """The trials that give their place in ``--trials`` to another: those never run for their predicted cost, the
    first ``n_trials`` of them (so that a space whose every point is too slow still ends). On the 3D cases a third of
    60 suggestions were skipped so, and the studies ended at 7.7 of their 10 minutes having run 34 registrations."""
    numbers = [t.number for t in trials if is_not_run(t.state.name, t.user_attrs.get("pruned_at"))]
    return set(numbers if n_trials is None else numbers[:n_trials])


def interrupted_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """The trials stopped by their tune (``INTERRUPTED``): they give their place in ``--trials`` to another."""
    return {t.number for t in trials if is_interrupted(t.state.name, t.user_attrs.get("fail_reason"))}


def is_interrupted(state: str, fail_reason: str | None) -> bool:
    """Whether a trial in ``state`` with ``fail_reason`` was stopped by its tune (``INTERRUPTED``)."""
    return state == "FAIL" and fail_reason == INTERRUPTED


def write_to_storage(storage: optuna.storages.BaseStorage, trial_id: int, **attrs: Any) -> None:
    """:func:`write` for a trial this process does not run (a dead worker's, failed by whoever finds it)."""
    for name, value in attrs.items():
        if name not in ATTRIBUTES:
            raise KeyError(f"{name!r} is not a trial record attribute")
        storage.set_trial_user_attr(trial_id, name, value)


def records(study: optuna.Study, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
    """Every trial of the study (or those in ``states``) as records, in trial order."""
    trials = study.get_trials(deepcopy=False, states=tuple(states) if states is not None else None)
    return [TrialRecord.of(t) for t in trials]


def best_and_baseline(trials: Iterable[TrialRecord]) -> tuple[TrialRecord | None, TrialRecord | None]:
    """The completed feasible trial of lowest value (the earliest on ties; an infeasible one only when no trial is
    feasible) and the baseline trial (its completed run if it was retried, else its first)."""
    trials = list(trials)
    done = [t for t in trials if t.complete]
    done = [t for t in done if t.feasible] or done
    best = min(done, key=lambda t: (t.value, t.number)) if done else None
    bases = [t for t in trials if t.role == BASELINE]
    baseline = next((t for t in bases if t.state == "COMPLETE"), bases[0] if bases else None)
    return best, baseline
