"""Cross-validation over a dataset's pairs: what a tuned recipe scores on pairs its study never saw.

The pairs are dealt into K folds (seeded). For each fold a study tunes on the other folds' pairs, and its best recipe
registers the held-out pairs: their TRE over every landmark is the out-of-sample score. Each pair is also registered
with the SimpleITK-notebooks default recipe, and tuned alone (its own study), whose best is the in-sample reference a
recipe from other pairs is measured against. Studies run through a ``tune`` callable (the CLI's, or the library's),
so that this module only plans, scores and summarises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import StudyConfig, load_config
from .data import load_pair
from .errors import UserError
from .evaluate import evaluate
from .recipe import Recipe, default_recipe
from .yamlio import load_yaml_file

#: ``tune(pair_file, study_dir, trials, jobs, seed) -> the study's best recipe``.
TuneFn = Callable[[Path, Path, int, int, int], Recipe]
CROSSVAL_JSON = "crossval.json"


@dataclass
class PairOutcome:
    """One pair's mean TRE (every landmark) before registration, with the default recipe, with the recipe tuned on
    the other folds (out of sample) and with its own study's best (in sample)."""

    name: str
    fold: int
    before: float | None = None
    default: float | None = None
    out_of_sample: float | None = None
    own_best: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class CrossValidation:
    name: str
    folds: list[list[str]]
    trials: int
    unit: str
    pairs: list[PairOutcome]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "folds": self.folds,
            "trials": self.trials,
            "unit": self.unit,
            "pairs": [asdict(p) for p in self.pairs],
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, Any]:
        """How often the out-of-sample recipe beat the default and came within 10 % of the pair's own best."""
        scored = [p for p in self.pairs if p.out_of_sample is not None]
        beats = [p for p in scored if p.default is not None and p.out_of_sample <= p.default]
        near = [p for p in scored if p.own_best is not None and p.out_of_sample <= 1.1 * p.own_best]
        return {
            "pairs": len(self.pairs),
            "scored": len(scored),
            "not_worse_than_default": len(beats),
            "within_10pct_of_own_best": len(near),
            "mean_out_of_sample": float(np.mean([p.out_of_sample for p in scored])) if scored else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossValidation:
        return cls(
            data["name"],
            data["folds"],
            data["trials"],
            data.get("unit", ""),
            [PairOutcome(**{k: v for k, v in p.items()}) for p in data["pairs"]],
        )


def assign_folds(names: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """The pairs dealt into ``k`` folds after a seeded shuffle (``k`` = number of pairs: leave-one-out)."""
    order = list(names)
    np.random.default_rng(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def fold_document(pair_file: Path, cfg: StudyConfig, keep: Sequence[str], name: str) -> dict[str, Any]:
    """A PAIR.yaml document tuning only the pairs ``keep`` (paths made absolute, holdout pairs dropped)."""
    doc = dict(load_yaml_file(pair_file, what="PAIR.yaml"))
    raw_pairs = {spec.name: raw for spec, raw in zip(cfg.pairs, doc.get("pairs") or [])}
    pairs = []
    for spec in cfg.pairs:
        if spec.name not in keep:
            continue
        entry = dict(raw_pairs[spec.name])
        entry.update(name=spec.name, fixed=str(spec.fixed), moving=str(spec.moving))
        if spec.has_landmarks:
            entry["landmarks"] = {"fixed": str(spec.fixed_landmarks), "moving": str(spec.moving_landmarks)}
        masks = {k: str(v) for k, v in (("fixed", spec.fixed_mask), ("moving", spec.moving_mask)) if v is not None}
        if masks:
            entry["masks"] = masks
        pairs.append(entry)
    doc.update(name=name, pairs=pairs)
    doc.pop("holdout", None)
    if cfg.enqueue:
        doc["enqueue"] = [str(p) for p in cfg.enqueue]
    return doc


def tune_fold(pair_file: Path, study_directory: Path, trials: int, jobs: int, seed: int) -> Recipe:
    """One study of a cross-validation, run as ``autoreg tune`` runs it, quietly; its best recipe."""
    from .tuning import run_tune

    result = run_tune(pair_file, trials=trials, jobs=jobs, seed=seed, study_dir=study_directory)
    if result.interrupted:
        raise KeyboardInterrupt
    if result.best_recipe is None:
        raise UserError("no trial of this fold's study completed", file=pair_file)
    return result.best_recipe


def crossval(
    pair_file: str | Path,
    *,
    folds: int,
    trials: int,
    jobs: int,
    seed: int,
    out_dir: Path,
    tune: TuneFn = tune_fold,
    own: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> CrossValidation:
    """Tune on K-1 folds, score the held-out fold, for every fold; each pair also against the default recipe and
    (``own``) its own study's best. Writes the fold studies and ``crossval.json`` into ``out_dir``."""
    import yaml

    pair_file = Path(pair_file).resolve()
    cfg = load_config(pair_file)
    if len(cfg.pairs) < 2:
        raise UserError("cross-validation needs a dataset of several pairs ('pairs:')", file=cfg.path, key="pairs")
    if not 2 <= folds <= len(cfg.pairs):
        raise UserError(f"expected 2 to {len(cfg.pairs)} folds for {len(cfg.pairs)} pairs (got {folds})", key="--folds")
    if not cfg.uses_landmarks:
        raise UserError("cross-validation scores TRE: every pair needs landmarks", file=cfg.path, key="pairs")
    names = [p.name for p in cfg.pairs]
    dealt = assign_folds(names, folds, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {p.name: load_pair(p) for p in cfg.pairs}  # every landmark: held-out pairs are scored on all of them
    outcomes = {n: PairOutcome(n, next(i for i, f in enumerate(dealt) if n in f)) for n in names}
    dim = next(iter(full.values())).dim
    default = default_recipe(cfg.stages, dim, seed=seed)
    for n, pair in full.items():
        outcomes[n].before = _identity_tre(pair)
        outcomes[n].default = _score(default, pair, outcomes[n])

    def study(keep: Sequence[str], label: str) -> Recipe:
        folder = out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "pair.yaml"
        path.write_text(
            yaml.safe_dump(fold_document(pair_file, cfg, keep, f"{cfg.name}-{label}"), sort_keys=False),
            encoding="utf-8",
        )
        progress(f"{label}: tuning on {', '.join(keep)} ({trials} trials)")
        return tune(path, folder / "study", trials, jobs, seed)

    for i, held in enumerate(dealt):
        recipe = study([n for n in names if n not in held], f"fold{i + 1}")
        for n in held:
            outcomes[n].out_of_sample = _score(recipe, full[n], outcomes[n])
            progress(f"fold {i + 1}: {n} out of sample {_fmt(outcomes[n].out_of_sample)}")
    if own:
        for n in names:
            recipe = study([n], f"own-{n}")
            outcomes[n].own_best = _score(recipe, full[n], outcomes[n])
    result = CrossValidation(cfg.name, dealt, trials, _unit(full[names[0]]), [outcomes[n] for n in names])
    (out_dir / CROSSVAL_JSON).write_text(json.dumps(result.as_dict(), indent=2), encoding="utf-8")
    return result


def _score(recipe: Recipe, pair: Any, outcome: PairOutcome) -> float | None:
    ev = evaluate(recipe, [pair], repeats=1, use_landmarks=True)
    if ev.pairs[0].failures:
        outcome.notes.append(f"failed: {ev.pairs[0].failures[0]}")
        return None
    return ev.pairs[0].values[0]


def _identity_tre(pair: Any) -> float:
    import SimpleITK as sitk

    from .scoring import tre

    return tre(sitk.Transform(pair.dim, sitk.sitkIdentity), pair.fixed_points, pair.moving_points, pair.fixed).mean


def _unit(pair: Any) -> str:
    from .images import physical_unit

    return physical_unit(pair.fixed)


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def table(result: CrossValidation) -> list[str]:
    """The text table ``autoreg crossval`` prints: one row per pair, then the summary."""
    u = result.unit
    lines = [
        f"cross-validation of {result.name}: {len(result.folds)} folds, {result.trials} trials per study "
        f"(TRE over every landmark, {u})",
        f"{'pair':28s} {'fold':>4s} {'before':>9s} {'default':>9s} {'out of sample':>14s} {'own best':>9s}",
    ]
    for p in result.pairs:
        lines.append(
            f"{p.name:28s} {p.fold + 1:4d} {_fmt(p.before):>9s} {_fmt(p.default):>9s} "
            f"{_fmt(p.out_of_sample):>14s} {_fmt(p.own_best):>9s}  {'; '.join(p.notes)}"
        )
    s = result.summary()
    lines.append(
        f"out of sample: not worse than the default on {s['not_worse_than_default']} of {s['scored']} pairs, "
        f"within 10 % of the pair's own best on {s['within_10pct_of_own_best']}; mean "
        f"{_fmt(s['mean_out_of_sample'])} {u}"
    )
    return lines
