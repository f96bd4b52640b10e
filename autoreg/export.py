"""The best trial of a study as a recipe with its provenance (YAML, or a standalone SimpleITK script)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import optuna
import SimpleITK as sitk

from . import __version__
from .config import StudyConfig
from .errors import UserError
from .objective import RECIPE_ATTR, ROLE_ATTR
from .recipe import Recipe, recipe_from_dict, recipe_to_yaml
from .study import StorageSpec, baseline_trial, best_trial, load_existing


def provenance_of(study: optuna.Study, trial: optuna.trial.FrozenTrial, spec: StorageSpec) -> dict[str, Any]:
    base = baseline_trial(study)
    score_keys = ("tre_mean", "tre_median", "tre_p90", "tre_max", "tre_mean_vox", "holdout_loss", "folding_fraction",
                  "score_std", "runtime_s")
    return {
        "versions": {"autoreg": __version__, "SimpleITK": sitk.Version.VersionString(), "optuna": optuna.__version__},
        "study": study.study_name,
        "storage": spec.display,
        "trial": trial.number,
        "role": trial.user_attrs.get(ROLE_ATTR, "suggested"),
        "objective": study.user_attrs.get("objective", "score"),
        "score": trial.value,
        "scores": {k: trial.user_attrs[k] for k in score_keys if k in trial.user_attrs},
        "baseline_score": base.value if base is not None else None,
        "params": dict(trial.params),
        "pair_file": study.user_attrs.get("pair_file"),
        "fingerprint": study.user_attrs.get("fingerprint"),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def best_recipe(study: optuna.Study, spec: StorageSpec, *, source: str) -> tuple[Recipe, optuna.trial.FrozenTrial]:
    trial = best_trial(study)
    if trial is None:
        raise UserError("the study has no completed trial yet (run 'autoreg tune' longer)", file=source, key="name")
    recipe = recipe_from_dict(trial.user_attrs[RECIPE_ATTR], source=f"trial {trial.number}")
    return recipe.with_(provenance=provenance_of(study, trial, spec)), trial


def measured_spread(recipe: Recipe, cfg: StudyConfig, repeats: int) -> dict[str, Any]:
    """The recipe re-run ``repeats`` times on the pairs it was tuned on under other sampling seeds."""
    from .data import load_pair
    from .evaluate import evaluate

    ev = evaluate(recipe, [load_pair(p) for p in cfg.pairs], repeats=repeats, use_landmarks=cfg.uses_landmarks)
    d = ev.as_dict()
    return {"repeats": repeats, "metric": d["metric"], "overall": d["overall"],
            "pairs": {k: {kk: v[kk] for kk in ("mean", "std", "min", "max")} for k, v in d["pairs"].items()}}


def export_best(cfg: StudyConfig, spec: StorageSpec, *, fmt: str = "yaml", repeats: int = 0
                ) -> tuple[str, optuna.trial.FrozenTrial]:
    study = load_existing(cfg, spec)
    recipe, trial = best_recipe(study, spec, source=str(cfg.path))
    if repeats > 0:
        prov = dict(recipe.provenance or {})
        prov["spread"] = measured_spread(recipe, cfg, repeats)
        recipe = recipe.with_(provenance=prov)
    if fmt == "yaml":
        return recipe_to_yaml(recipe), trial
    from .script import recipe_to_script

    return recipe_to_script(recipe), trial
