"""A recipe scored on pairs, repeated under different sampling seeds: the spread a user needs before trusting it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import PairData
from .objective import repeat_seed, score_pair
from .recipe import Recipe
from .registration import RegistrationFailed


@dataclass
class PairEvaluation:
    name: str
    values: list[float] = field(default_factory=list)  # the score of each repeat (mean TRE or holdout loss)
    stats: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def spread(self) -> dict[str, float | None]:
        return spread(self.values)

    @property
    def folding(self) -> float | None:
        """The largest share of the fixed grid any repeat folded (None: no deformable transform)."""
        folds = [s["folding_fraction"] for s in self.stats if "folding_fraction" in s]
        return max(folds) if folds else None


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, standard deviation (ddof 1) and range of repeated scores."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "range": None}
    a = np.asarray(values, dtype=float)
    same = bool(np.all(a == a[0]))  # identical repeats: their mean is that value, with no rounding spread
    return {
        "mean": float(a[0]) if same else float(a.mean()),
        "std": 0.0 if same or len(a) < 2 else float(a.std(ddof=1)),
        "min": float(a.min()),
        "max": float(a.max()),
        "range": float(a.max() - a.min()),
    }


@dataclass
class Evaluation:
    pairs: list[PairEvaluation]
    repeats: int
    deterministic: bool
    metric: str

    @property
    def overall(self) -> dict[str, float | None]:
        """Spread of the mean over pairs, repeat by repeat (repeats where a pair failed are left out)."""
        per_repeat = []
        for r in range(self.repeats):
            vals = [p.values[r] for p in self.pairs if r < len(p.values)]
            if len(vals) == len(self.pairs):
                per_repeat.append(float(np.mean(vals)))
        return spread(per_repeat)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "repeats": self.repeats,
            "deterministic": self.deterministic,
            "overall": self.overall,
            "pairs": {
                p.name: {**p.spread, "values": p.values, "failures": p.failures, "folding_fraction_max": p.folding}
                for p in self.pairs
            },
        }


def evaluate(
    recipe: Recipe, pairs: list[PairData], *, repeats: int = 1, use_landmarks: bool = True, deterministic: bool = False
) -> Evaluation:
    """Run ``recipe`` ``repeats`` times on every pair, sampling seed ``repeat_seed(recipe.seed, r)`` in repeat r.

    In deterministic mode (one thread) the seeds stay the recipe's own, so the repeats must be bit-identical: that
    is the check, not the spread.
    """
    if deterministic:
        recipe = recipe.with_(deterministic=True)
    out = []
    for pair in pairs:
        ev = PairEvaluation(pair.name)
        for r in range(repeats):
            seed = recipe.seed if deterministic else repeat_seed(recipe.seed, r)
            try:
                ps, _ = score_pair(recipe, pair, use_landmarks and pair.has_landmarks, seed=seed, folding=True)
            except RegistrationFailed as err:
                ev.failures.append(err.reason)
                continue
            ev.values.append(ps.value)
            ev.stats.append(ps.stats)
        out.append(ev)
    metric = "tre_mean" if use_landmarks and all(p.has_landmarks for p in pairs) else "holdout_loss"
    return Evaluation(out, repeats, deterministic, metric)
