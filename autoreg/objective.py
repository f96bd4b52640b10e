"""One trial: recipe (suggested or enqueued) -> register every pair -> report levels -> score.

Failures are recorded on the trial (``fail_reason``, ``fail_detail``) and the trial is marked FAIL by returning
NaN; they never raise out of the objective, so a study never stops because one recipe could not run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
import SimpleITK as sitk

from .config import StudyConfig
from .data import PairData
from .errors import RegistrationFailed, RegistrationPruned
from .recipe import Recipe, recipe_from_dict, recipe_to_dict
from .registration import LevelRecord, register
from .scoring import folding_fraction, has_deformable, holdout_metric, tre
from .space import SearchSpace
from .trial import BASELINE, read, records, write

log = logging.getLogger(__name__)

AUTO_TIMEOUT_FACTOR = 20.0
AUTO_TIMEOUT_MIN_S = 10.0
AUTO_TIMEOUT_UNKNOWN_S = 600.0


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The registration seed of a trial: a function of the study seed and the trial number only."""
    return int((study_seed * 1_000_003 + trial_number * 7919 + 17) % (2**31 - 2))


def repeat_seed(seed: int, repeat: int) -> int:
    """The sampling seed of repeat ``repeat`` of a recipe whose seed is ``seed`` (repeat 0 is the recipe's own)."""
    return int((seed + repeat * 104_729) % (2**31 - 2))


@dataclass
class PairScore:
    value: float
    stats: dict[str, Any]


def score_pair(recipe: Recipe, pair: PairData, use_landmarks: bool, *, seed: int, level_callback=None,
               folding: bool = False, time_limit: float | None = None, should_stop=None) -> tuple[PairScore, Any]:
    """Register one pair and score it: mean TRE with landmarks, else the holdout loss (2 - NMI)."""
    result = register(recipe, pair, seed=seed, level_callback=level_callback, time_limit=time_limit,
                      should_stop=should_stop)
    stats: dict[str, Any] = {"runtime_s": round(result.seconds, 4), "stop_conditions": result.stop_conditions}
    if use_landmarks:
        t = tre(result.transform, pair.fixed_points, pair.moving_points, pair.fixed)
        stats.update({f"tre_{k}": v for k, v in t.as_dict().items() if k != "n"})
        value = t.mean
    else:
        h = holdout_metric(result.transform, pair.fixed, pair.moving, pair.fixed_mask)
        stats.update({"holdout_loss": h.loss, "holdout_nmi": h.nmi, "overlap": h.overlap})
        value = h.loss
    if folding and has_deformable(result.transform):
        stats["folding_fraction"] = folding_fraction(result.transform, pair.fixed)
    return PairScore(value, stats), result


def aggregate(values: list[float], how: str, std_weight: float) -> float:
    """Several repeats' scores -> one: the mean, mean + k std (stable, not lucky), or the worst."""
    a = np.asarray(values, dtype=float)
    if how == "worst":
        return float(a.max())
    if how == "mean_plus_std":
        return float(a.mean() + std_weight * (a.std(ddof=1) if len(a) > 1 else 0.0))
    return float(a.mean())


class Objective:
    """The callable that ``study.optimize`` runs in each worker; holds the pairs loaded once per worker."""

    def __init__(self, cfg: StudyConfig, pairs: list[PairData], space: SearchSpace, *, threads: int = 0,
                 prune: bool = True):
        self.cfg = cfg
        self.pairs = pairs
        self.space = space
        self.threads = threads
        self.prune = prune
        self.use_landmarks = cfg.uses_landmarks
        self.n_stages = len(cfg.stages)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._baseline_runtime: float | None = None
        #: Polled at every optimizer iteration: true once the user asked to stop (Ctrl-C).
        self.should_stop = None
        #: The last trial's transform per pair (first repeat): the worker stores pictures of an improving trial.
        self.last_transforms: dict[str, sitk.Transform] = {}

    def time_limit(self, trial: optuna.Trial) -> float | None:
        """The configured trial timeout, or 20x the baseline's runtime (at least 10 s; 600 s until it is known).

        Without a configured timeout the baseline itself has no limit: it is what the limit is measured from, and
        the default recipe on a large 3D pair can need more than the 600 s that cover the trials started before
        it is known."""
        if self.cfg.trial_timeout is not None:
            return self.cfg.trial_timeout
        if read(trial, "role") == BASELINE:
            return None
        if self._baseline_runtime is None:
            for t in records(trial.study, states=(optuna.trial.TrialState.COMPLETE,)):
                if t.role == BASELINE and t.runtime_s is not None:
                    self._baseline_runtime = t.runtime_s
                    break
        if self._baseline_runtime is None:
            return AUTO_TIMEOUT_UNKNOWN_S
        return max(AUTO_TIMEOUT_MIN_S, AUTO_TIMEOUT_FACTOR * self._baseline_runtime)

    def recipe_for(self, trial: optuna.Trial) -> Recipe:
        seed = trial_seed(self.cfg.seed, trial.number)
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

    def _step(self, pair_index: int, rec: LevelRecord) -> int | None:
        """Report steps comparable across trials: the first (coarsest) level and the end of each stage."""
        if rec.level == 0:
            k = 0
        elif rec.stop_condition is not None:
            k = 1
        else:
            return None
        return (pair_index * self.n_stages + rec.stage) * 2 + k

    def _level_callback(self, trial: optuna.Trial, pair_index: int, pair: PairData, levels: list[dict]) -> Callable:
        def on_level(rec: LevelRecord, transform: Callable[[], sitk.Transform]) -> None:
            entry = rec.as_dict()
            entry["pair"] = pair.name
            value = rec.tre_mean
            step = self._step(pair_index, rec)
            if value is None and step is not None and self.prune:
                value = holdout_metric(transform(), pair.fixed, pair.moving, pair.fixed_mask).loss
                entry["holdout_loss"] = value
            levels.append(entry)
            if step is None or value is None or not np.isfinite(value):
                return
            trial.report(float(value), step)
            if self.prune and trial.should_prune():
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
        write(trial, recipe=recipe_to_dict(recipe), seed=recipe.seed, threads=recipe.effective_threads)
        levels: list[dict] = []
        repeats = self.cfg.objective.repeats
        per_repeat: list[float] = []
        per_pair: dict[str, dict[str, Any]] = {}
        limit = self.time_limit(trial)
        write(trial, time_limit_s=limit)
        try:
            for r in range(repeats):
                seed = repeat_seed(recipe.seed, r)
                values = []
                for i, pair in enumerate(self.pairs):
                    cb = self._level_callback(trial, i, pair, levels) if r == 0 else None
                    left = None if limit is None else max(limit - (time.perf_counter() - t0), 0.001)
                    ps, result = score_pair(recipe, pair, self.use_landmarks, seed=seed, level_callback=cb,
                                            folding=r == 0, time_limit=left, should_stop=self.should_stop)
                    if r == 0:
                        self.last_transforms[pair.name] = result.transform
                    value = ps.value
                    if self.cfg.objective.folding_penalty > 0:
                        value += self.cfg.objective.folding_penalty * 100.0 * ps.stats.get("folding_fraction", 0.0)
                    values.append(value)
                    if r == 0:
                        per_pair[pair.name] = ps.stats
                    per_pair[pair.name].setdefault("repeat_values", []).append(value)
                per_repeat.append(float(np.mean(values)))
        except RegistrationPruned as err:
            write(trial, levels=levels, runtime_s=round(time.perf_counter() - t0, 4),
                  pruned_at=f"stage {err.stage} level {err.level}")
            raise optuna.TrialPruned(str(err)) from None
        except RegistrationFailed as err:
            write(trial, levels=levels)
            if err.reason == "time limit":
                # stopped for cost, like a pruned trial: PRUNED lets the sampler learn to avoid such settings,
                # where a FAIL would be ignored by it
                write(trial, runtime_s=round(time.perf_counter() - t0, 4), pruned_at=f"time limit {limit:.3g} s")
                raise optuna.TrialPruned("time limit") from None
            return self._fail(trial, err.reason, err.detail, t0)
        except MemoryError as err:
            return self._fail(trial, "out of memory", str(err), t0)
        except Exception as err:  # noqa: BLE001 - any other failure is recorded, the study goes on
            return self._fail(trial, f"{type(err).__name__}: {err}"[:200], traceback.format_exc()[-2000:], t0)

        value = aggregate(per_repeat, self.cfg.objective.aggregate, self.cfg.objective.std_weight)
        write(trial, levels=levels, pairs=per_pair, runtime_s=round(time.perf_counter() - t0, 4))
        if repeats > 1:
            write(trial, repeat_scores=per_repeat, score_std=float(np.std(per_repeat, ddof=1)))
        write(trial, **_summary(per_pair, self.use_landmarks))
        return value

    def _fail(self, trial: optuna.Trial, reason: str, detail: str, t0: float) -> float:
        write(trial, fail_reason=reason, fail_detail=detail[-2000:], runtime_s=round(time.perf_counter() - t0, 4))
        log.info("trial %d failed: %s", trial.number, reason)
        return float("nan")


def _summary(per_pair: dict[str, dict[str, Any]], use_landmarks: bool) -> dict[str, float]:
    """Study-level statistics: each key the mean over pairs (TRE mean, median, p90, max, or holdout loss)."""
    keys = ("tre_mean", "tre_median", "tre_p90", "tre_max", "tre_mean_vox") if use_landmarks else ("holdout_loss", "holdout_nmi")
    out = {}
    for k in keys:
        vals = [s[k] for s in per_pair.values() if k in s]
        if vals:
            out[k] = float(np.mean(vals))
    folds = [s["folding_fraction"] for s in per_pair.values() if "folding_fraction" in s]
    if folds:
        out["folding_fraction"] = float(np.max(folds))
    return out
