"""One trial: recipe (suggested or enqueued) -> predicted cost -> register every pair -> report levels -> score.

Failures are recorded on the trial (``fail_reason``, ``fail_detail``) and the trial is marked FAIL by returning
NaN; they never raise out of the objective, so a study never stops because one recipe could not run. Trials stopped
for cost (predicted far beyond the study's budget, or cut at their time limit) are PRUNED: unlike a FAIL, which
TPE ignores, a pruned trial teaches the sampler to avoid such settings.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import SimpleITK as sitk

from .config import StudyConfig
from .cost import CostModel, time_limit
from .data import PairData
from .errors import RegistrationFailed, RegistrationPruned
from .recipe import Recipe, recipe_from_dict, recipe_to_dict
from .registration import LevelRecord, register
from .registration.core import NO_OVERLAP
from .scoring import folding_fraction, has_deformable, holdout_metric, tre
from .space import SearchSpace
from .trial import (
    BASELINE,
    FOLDING_CONSTRAINT,
    INTERRUPTED,
    NOT_RUN,
    SUGGESTED,
    TIME_LIMIT,
    first_run,
    linear_donor,
    read,
    records,
    write,
)

log = logging.getLogger(__name__)

#: A trial may run this many times its predicted seconds (the model's error and the machine's noise) ...
LIMIT_FACTOR = 3.0
#: ... and at least this long.
MIN_LIMIT_S = 5.0
#: A suggested trial predicted to need more than this many times its share of the study's time is not run.
OVER_BUDGET_FACTOR = 3.0
#: Report steps per stage: after the coarsest level, after the level before full resolution, at the stage's end.
RUNGS = ("coarsest level", "before the finest level", "end")


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The registration seed of a trial: a function of the study seed and the trial number only."""
    return int((study_seed * 1_000_003 + trial_number * 7919 + 17) % (2**31 - 2))


def repeat_seed(seed: int, repeat: int) -> int:
    """The sampling seed of repeat ``repeat`` of a recipe whose seed is ``seed`` (repeat 0 is the recipe's own)."""
    return int((seed + repeat * 104_729) % (2**31 - 2))


def rung_of(level: int, levels: int) -> int | None:
    """Which report step a stage's level is (an index into ``RUNGS``), or None for the levels in between."""
    if level == levels - 1:
        return 2
    if level == 0:
        return 0
    if level == levels - 2:
        return 1
    return None


def report_step(pair_index: int, n_stages: int, stage: int, rung: int) -> int:
    """Steps are comparable across trials whatever their number of levels: pair, stage, then rung."""
    return (pair_index * n_stages + stage) * len(RUNGS) + rung


@dataclass
class PairScore:
    value: float
    stats: dict[str, Any]


def score_pair(
    recipe: Recipe,
    pair: PairData,
    use_landmarks: bool,
    *,
    seed: int,
    level_callback=None,
    folding: bool = False,
    time_limit: float | None = None,
    should_stop=None,
    cost: CostModel | None = None,
) -> tuple[PairScore, Any]:
    """Register one pair and score it: mean TRE with landmarks, else the holdout loss (2 - NMI)."""
    result = register(
        recipe,
        pair,
        seed=seed,
        level_callback=level_callback,
        time_limit=time_limit,
        should_stop=should_stop,
        cost=cost,
    )
    stats: dict[str, Any] = {"runtime_s": round(result.seconds, 4), "stop_conditions": result.stop_conditions}
    if use_landmarks:
        t = tre(result.transform, pair.fixed_points, pair.moving_points, pair.fixed)
        stats.update({f"tre_{k}": v for k, v in t.as_dict().items() if k != "n"})
        value = t.mean
        if pair.report_fixed_points is not None:  # recorded, never optimised
            stats["tre_report_mean"] = tre(
                result.transform, pair.report_fixed_points, pair.report_moving_points, pair.fixed
            ).mean
    else:
        h = holdout_metric(result.transform, pair.fixed, pair.moving, pair.fixed_mask)
        stats.update({"holdout_loss": h.loss, "holdout_nmi": h.nmi, "overlap": h.overlap})
        value = h.loss
    if folding and has_deformable(result.transform):
        stats["folding_fraction"] = folding_fraction(result.transform, pair.fixed)
    return PairScore(value, stats), result


def identity_tre(pair: PairData) -> float:
    """A pair's mean TRE with no registration at all, on the landmarks the search selects with."""
    return tre(sitk.Transform(pair.dim, sitk.sitkIdentity), pair.fixed_points, pair.moving_points, pair.fixed).mean


def value_before(pairs: Sequence[PairData], score_name: str) -> float | None:
    """A study's value for the identity (no registration): a recipe scoring above it made the images' alignment
    worse, as SimpleITK's default did on a histology pair at 0.002 mm spacing (its smoothing sigmas are in mm).
    None for the holdout metric, which has no such line without registering."""
    if not pairs or not all(p.has_landmarks for p in pairs):
        return None
    if score_name == "relative_tre":  # each pair's TRE over its own before registration
        return 1.0
    return float(np.mean([identity_tre(p) for p in pairs])) if score_name == "tre_mean" else None


def aggregate(values: list[float], how: str, std_weight: float) -> float:
    """Several repeats' scores -> one: the mean, mean + k std (stable, not lucky), or the worst."""
    a = np.asarray(values, dtype=float)
    if how == "worst":
        return float(a.max())
    if how == "mean_plus_std":
        return float(a.mean() + std_weight * (a.std(ddof=1) if len(a) > 1 else 0.0))
    return float(a.mean())


@dataclass(frozen=True)
class Budget:
    """What bounds this study's trials: its end (``time.time()``, from ``--timeout``) and each trial's fair share of
    the study's seconds (``--timeout`` x workers / ``--trials``)."""

    deadline: float | None = None
    per_trial_s: float | None = None


class Objective:
    """The callable each worker runs per trial; holds the pairs loaded once per worker."""

    def __init__(
        self,
        cfg: StudyConfig,
        pairs: list[PairData],
        space: SearchSpace,
        *,
        threads: int = 0,
        prune: bool = True,
        cost: CostModel | None = None,
        budget: Budget = Budget(),
    ):
        self.cfg = cfg
        self.pairs = pairs
        self.space = space
        self.threads = threads
        self.prune = prune
        self.cost = cost
        self.budget = budget
        self.use_landmarks = cfg.uses_landmarks
        self.n_stages = len(cfg.stages)
        #: Several pairs: each pair's score is reported as one step, the Wilcoxon pruner's instances; relative
        #: studies divide each pair's TRE by its TRE before registration (its selection landmarks at identity).
        self.per_pair_steps = len(pairs) > 1
        self.reference = {p.name: identity_tre(p) for p in pairs if p.has_landmarks} if cfg.relative else {}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        #: Polled at every optimizer iteration: true once the user asked to stop (Ctrl-C).
        self.should_stop = None
        #: The last trial's transform per pair (first repeat): the worker stores pictures of an improving trial.
        self.last_transforms: dict[str, sitk.Transform] = {}

    # --- cost and limits ----------------------------------------------------------------------------------------

    def predict(self, trial: optuna.Trial, recipe: Recipe) -> float | None:
        """Seconds the trial should take: the cost model, corrected by the trials this study finished."""
        if self.cost is None:
            return None
        fixed = [p.fixed for p in self.pairs]
        raw = self.cost.predict(recipe, [f.GetSize() for f in fixed], [f.GetSpacing() for f in fixed])
        raw *= self.cfg.objective.repeats
        done = [
            t
            for t in records(trial.study, states=(optuna.trial.TrialState.COMPLETE,))
            if t.runtime_s and t.predicted_s and t.recipe
        ]
        # optimizers differ most in how far the model is off (line searches, early convergence): learn per kind
        kinds = [s.optimizer.kind for s in recipe.stages]
        alike = [t for t in done if [s["optimizer"]["kind"] for s in t.recipe.get("stages", [])] == kinds]
        ratios = [t.runtime_s / t.predicted_s for t in (alike if len(alike) >= 3 else done)[-50:]]
        return raw * self.cost.corrected(ratios)

    def own_limit(self, trial: optuna.Trial, predicted: float | None) -> float | None:
        """``trial_timeout`` when configured; else a multiple of the prediction, capped by the trial's share of the
        budget. The baseline (trial 0) has none: it is the reference every study reports, however slow SimpleITK's
        default is."""
        if self.cfg.trial_timeout is not None:
            return self.cfg.trial_timeout
        if read(trial, "role") == BASELINE or predicted is None:
            return None
        limit = time_limit(predicted, factor=LIMIT_FACTOR, floor_s=MIN_LIMIT_S)
        if self.budget.per_trial_s is not None:
            limit = min(limit, max(MIN_LIMIT_S, OVER_BUDGET_FACTOR * self.budget.per_trial_s))
        return limit

    def time_limit(self, own: float | None) -> float | None:
        """A trial's own limit (``own_limit``), never past the study's end."""
        limit = own
        if self.budget.deadline is not None:
            left = max(0.001, self.budget.deadline - time.time())
            limit = left if limit is None else min(limit, left)
        return limit

    def over_budget(self, trial: optuna.Trial, predicted: float | None) -> bool:
        """A suggested trial predicted to need far more than its share of the study's time is not run. A default point
        runs under its time limit instead: it is TPE's one anchor for its way, and it runs first, before finished
        trials have corrected the model (which priced the histology pairs' default field at twice its seconds). So
        does a crossed one: ki67's best, ``default:symmetric@33``, was predicted at 26.9 s against a cut at 24 and ran
        17.4 s; a way whose default ran out of time is not crossed (``study.cross_defaults_if_due``)."""
        share = self.budget.per_trial_s
        return (
            share is not None
            and predicted is not None
            and (read(trial, "role") or SUGGESTED) == SUGGESTED
            and self.cfg.trial_timeout is None
            and predicted > OVER_BUDGET_FACTOR * share
        )

    def prunable(self, trial: optuna.Trial) -> bool:
        """Whether the pruner may stop this trial on its levels: a suggested one. A queued point (the baseline, a
        default or crossed point, a warm start, a user's recipe) reports its levels but runs to its end under its time
        limit: stopped on a linear stage it had from the best trial, a crossed point would tell TPE that affine is poor
        (on mmdef3d the pruner stopped 5 of 6 crossed points in their linear stage)."""
        return self.prune and (read(trial, "role") or SUGGESTED) == SUGGESTED

    def linear_end_step(self) -> int | None:
        """The report step where the stages before the first deformable one end (their score, which chooses the
        linear stages the default ways are crossed onto); None where levels are not reported (several pairs) or no
        stage is deformable."""
        first = self.space.first_deformable()
        if self.per_pair_steps or not first:
            return None
        return report_step(0, self.n_stages, first - 1, len(RUNGS) - 1)

    # --- one trial ----------------------------------------------------------------------------------------------

    def recipe_for(self, trial: optuna.Trial) -> Recipe:
        # a crossed point registers with its donor's seed, so its linear stages repeat the donor's exactly (at one
        # thread): with other seeds the same default affine ended 4.56 to 5.34 px off on rat kidney
        donor = linear_donor(trial)
        seed = trial_seed(self.cfg.seed, first_run(trial) if donor is None else donor)
        attached = read(trial, "recipe")
        # an enqueued recipe (the baseline, a user's) runs as it is and records no search parameters, so the
        # sampler never credits its score to a point of the space it did not run
        if attached:
            recipe = recipe_from_dict(attached, source=f"trial {trial.number}")
        else:
            recipe = self.space.suggest(trial, seed=seed)
        changes: dict[str, Any] = {"seed": seed, "provenance": None}
        if self.cfg.deterministic:
            changes["deterministic"] = True
        if self.threads and not recipe.deterministic:
            changes["threads"] = self.threads
        return recipe.with_(**changes)

    def pair_value(self, pair: PairData, score: float) -> float:
        """What a pair contributes to the trial's value: its score, or its TRE relative to before registration."""
        ref = self.reference.get(pair.name)
        return score / ref if ref else score

    def pair_order(self, trial: optuna.Trial) -> list[int]:
        """The order a trial registers its pairs in: shuffled per trial (seeded), so that the Wilcoxon pruner compares
        trials on varied pairs from the first one on."""
        order = list(range(len(self.pairs)))
        if self.per_pair_steps:
            np.random.default_rng(trial_seed(self.cfg.seed, trial.number)).shuffle(order)
        return order

    def _level_callback(
        self,
        trial: optuna.Trial,
        recipe: Recipe,
        pair_index: int,
        pair: PairData,
        levels: list[dict],
        prunable: bool,
    ) -> Callable:
        def on_level(rec: LevelRecord, transform: Callable[[], sitk.Transform]) -> None:
            entry = rec.as_dict()
            entry["pair"] = pair.name
            value = rec.tre_mean
            rung = rung_of(rec.level, len(recipe.stages[rec.stage].pyramid.shrink_factors))
            if self.per_pair_steps:  # several pairs: a whole pair is the unit of comparison (see __call__)
                levels.append(entry)
                return
            if value is None and rung is not None and self.prune:
                value = holdout_metric(transform(), pair.fixed, pair.moving, pair.fixed_mask).loss
                entry["holdout_loss"] = value
            levels.append(entry)
            if rung is None or value is None or not np.isfinite(value):
                return
            trial.report(float(value), report_step(pair_index, self.n_stages, rec.stage, rung))
            last = pair_index == len(self.pairs) - 1 and rec.stage == self.n_stages - 1 and rung == 2
            if prunable and not last and trial.should_prune():  # (pruning the finished trial would save nothing)
                raise RegistrationPruned(rec.stage, rec.level)

        return on_level

    def __call__(self, trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        self.last_transforms = {}
        write(trial, worker=self.worker)
        try:
            recipe = self.recipe_for(trial)
        except Exception as err:  # a bad enqueued recipe or override: record, never stop the study
            return self._fail(trial, "invalid recipe", str(err), t0)
        predicted = self.predict(trial, recipe)
        own = self.own_limit(trial, predicted)
        limit = self.time_limit(own)
        # the study's end, not the trial's own limit, bounds it (the baseline's cut is reported as its result)
        study_ends_it = limit is not None and (own is None or limit < own) and read(trial, "role") != BASELINE
        write(
            trial,
            recipe=recipe_to_dict(recipe),
            seed=recipe.seed,
            threads=recipe.effective_threads,
            predicted_s=None if predicted is None else round(predicted, 3),
            time_limit_s=limit,
        )
        if self.over_budget(trial, predicted):
            write(
                trial,
                runtime_s=round(time.perf_counter() - t0, 4),
                pruned_at=f"{NOT_RUN}: predicted {predicted:.3g} s, over {OVER_BUDGET_FACTOR:g}x the trial budget "
                f"({self.budget.per_trial_s:.3g} s)",
            )
            raise optuna.TrialPruned("predicted over budget")
        levels: list[dict] = []
        prunable = self.prunable(trial)
        repeats = self.cfg.objective.repeats
        per_repeat: list[float] = []
        per_pair: dict[str, dict[str, Any]] = {}
        try:
            for r in range(repeats):
                seed = repeat_seed(recipe.seed, r)
                values = []
                for i in self.pair_order(trial):
                    pair = self.pairs[i]
                    cb = self._level_callback(trial, recipe, i, pair, levels, prunable) if r == 0 else None
                    left = None if limit is None else max(limit - (time.perf_counter() - t0), 0.001)
                    ps, result = score_pair(
                        recipe,
                        pair,
                        self.use_landmarks,
                        seed=seed,
                        level_callback=cb,
                        folding=r == 0,
                        time_limit=left,
                        should_stop=self.should_stop,
                        cost=self.cost,
                    )
                    if r == 0:
                        self.last_transforms[pair.name] = result.transform
                    value = self.pair_value(pair, ps.value)
                    if self.cfg.objective.folding_penalty > 0:
                        value += self.cfg.objective.folding_penalty * 100.0 * ps.stats.get("folding_fraction", 0.0)
                    values.append(value)
                    if r == 0:
                        per_pair[pair.name] = ps.stats
                        if self.per_pair_steps and np.isfinite(value):
                            trial.report(float(value), i)  # the pair is the Wilcoxon pruner's instance
                            if prunable and len(values) < len(self.pairs) and trial.should_prune():
                                raise RegistrationPruned(len(self.cfg.stages) - 1, -1, pair.name)
                    per_pair[pair.name].setdefault("repeat_values", []).append(value)
                per_repeat.append(float(np.mean(values)))
        except RegistrationPruned as err:
            where = (
                f"pair {err.pair} (worse than the best trial on the pairs so far)"
                if err.pair
                else f"stage {err.stage} level {err.level}"
            )
            write(trial, levels=levels, runtime_s=round(time.perf_counter() - t0, 4), pruned_at=where)
            raise optuna.TrialPruned(str(err)) from None
        except RegistrationFailed as err:
            write(trial, levels=levels)
            if err.reason == "time limit" and study_ends_it:
                # not a verdict on the recipe: pruned, it would teach the sampler to avoid it for the clock's sake (5
                # of 21 trials of a 10 s study began with 0.001-1.75 s left against predictions of 4.5-11 s)
                detail = f"the study's --timeout ended it after {time.perf_counter() - t0:.3g} s ({err.detail})"
                return self._fail(trial, INTERRUPTED, detail, t0)
            if err.reason == "time limit":
                write(
                    trial,
                    runtime_s=round(time.perf_counter() - t0, 4),
                    pruned_at=f"{TIME_LIMIT} {limit:.3g} s ({err.detail})" if limit is not None else TIME_LIMIT,
                )
                raise optuna.TrialPruned(TIME_LIMIT) from None
            if err.reason == NO_OVERLAP:  # diverged: pruned at the level it reported, so the sampler learns to avoid it
                write(trial, runtime_s=round(time.perf_counter() - t0, 4), pruned_at=f"{NO_OVERLAP} ({err.detail})")
                raise optuna.TrialPruned(NO_OVERLAP) from None
            return self._fail(trial, err.reason, err.detail, t0)
        except MemoryError as err:
            return self._fail(trial, "out of memory", str(err), t0)
        except Exception as err:  # noqa: BLE001 - any other failure is recorded, the study goes on
            return self._fail(trial, f"{type(err).__name__}: {err}"[:200], traceback.format_exc()[-2000:], t0)

        value = aggregate(per_repeat, self.cfg.objective.aggregate, self.cfg.objective.std_weight)
        write(trial, levels=levels, pairs=per_pair, runtime_s=round(time.perf_counter() - t0, 4))
        if repeats > 1:
            write(trial, repeat_scores=per_repeat, score_std=float(np.std(per_repeat, ddof=1)))
        summary = _summary(per_pair, self.use_landmarks)
        if self.cfg.relative:
            summary["relative_tre"] = float(
                np.mean([self.pair_value(p, per_pair[p.name]["tre_mean"]) for p in self.pairs])
            )
        if "folding_fraction" in summary:
            over = 100.0 * summary["folding_fraction"] - self.cfg.objective.max_folding_percent
            trial.set_constraint(FOLDING_CONSTRAINT, over)
        write(trial, **summary)
        return value if math.isfinite(value) else float("nan")

    def _fail(self, trial: optuna.Trial, reason: str, detail: str, t0: float) -> float:
        write(trial, fail_reason=reason, fail_detail=detail[-2000:], runtime_s=round(time.perf_counter() - t0, 4))
        log.info("trial %d failed: %s", trial.number, reason)
        return float("nan")


def _summary(per_pair: dict[str, dict[str, Any]], use_landmarks: bool) -> dict[str, float]:
    """Study-level statistics: each key the mean over pairs (TRE mean, median, p90, max, or holdout loss)."""
    keys = (
        ("tre_mean", "tre_median", "tre_p90", "tre_max", "tre_mean_vox", "tre_report_mean")
        if use_landmarks
        else ("holdout_loss", "holdout_nmi")
    )
    out = {}
    for k in keys:
        vals = [s[k] for s in per_pair.values() if k in s]
        if vals:
            out[k] = float(np.mean(vals))
    folds = [s["folding_fraction"] for s in per_pair.values() if "folding_fraction" in s]
    if folds:
        out["folding_fraction"] = float(np.max(folds))
    return out
