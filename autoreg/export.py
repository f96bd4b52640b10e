"""The best trial of a study as a recipe with its provenance (YAML, a standalone SimpleITK script, or the settings of
elastix and ANTs)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import SimpleITK as sitk

from . import __version__
from .config import StudyConfig
from .errors import UserError
from .peer_export import PEER_FORMATS
from .recipe import Recipe, recipe_from_dict, recipe_to_yaml
from .study import StorageSpec, best_and_baseline_of, load_existing
from .trial import TrialRecord, records


def provenance_of(
    study: optuna.Study, trial: TrialRecord, baseline: TrialRecord | None, spec: StorageSpec
) -> dict[str, Any]:
    return {
        "versions": {"autoreg": __version__, "SimpleITK": sitk.Version.VersionString(), "optuna": optuna.__version__},
        "study": study.study_name,
        "storage": spec.display,
        "trial": trial.number,
        "role": trial.role,
        **({"linear_from": trial.linear_from} if trial.linear_from is not None else {}),
        "objective": study.user_attrs.get("objective", "score"),
        "score": trial.value,
        "scores": trial.scores(),
        "baseline_score": baseline.value if baseline is not None else None,
        "params": dict(trial.params),
        "pair_file": study.user_attrs.get("pair_file"),
        "fingerprint": study.user_attrs.get("fingerprint"),
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def fastest_within(trials: list[TrialRecord], best: TrialRecord, pct: float) -> TrialRecord:
    """The completed trial that ran fastest among those whose score is within ``pct`` % of the best (ties: the
    better score); a trial that folds beyond the limit stands in only for an infeasible best."""
    bound = best.value + abs(best.value) * pct / 100.0
    allowed = [t for t in trials if t.feasible or not best.feasible]
    near = [t for t in allowed if t.complete and t.value <= bound and t.recipe and t.runtime_s is not None]
    return min(near, key=lambda t: (t.runtime_s, t.value, t.number)) if near else best


def best_recipe(
    study: optuna.Study, spec: StorageSpec, *, source: str, within: float | None = None
) -> tuple[Recipe, TrialRecord]:
    """The best trial's recipe with its provenance; with ``within``, the fastest trial scoring within that many
    percent of the best (a recipe that runs in seconds for a little accuracy)."""
    best, baseline = best_and_baseline_of(study)
    if best is None:
        raise UserError("the study has no completed trial yet (run 'autoreg tune' longer)", file=source, key="name")
    chosen = best if within is None else fastest_within(records(study), best, within)
    recipe = recipe_from_dict(chosen.recipe, source=f"trial {chosen.number}")
    prov = provenance_of(study, chosen, baseline, spec)
    if within is not None:
        prov["within"] = {
            "pct": within,
            "best_trial": best.number,
            "best_score": best.value,
            "best_runtime_s": best.runtime_s,
            "runtime_s": chosen.runtime_s,
        }
    return recipe.with_(provenance=prov), chosen


def measured_spread(recipe: Recipe, cfg: StudyConfig, repeats: int) -> dict[str, Any]:
    """The recipe re-run ``repeats`` times on the pairs it was tuned on under other sampling seeds."""
    from .evaluate import evaluate
    from .pipeline import Pipeline

    ev = evaluate(recipe, Pipeline(cfg).pairs, repeats=repeats, use_landmarks=cfg.uses_landmarks)
    d = ev.as_dict()
    return {
        "repeats": repeats,
        "metric": d["metric"],
        "overall": d["overall"],
        "pairs": {k: {kk: v[kk] for kk in ("mean", "std", "min", "max")} for k, v in d["pairs"].items()},
    }


def stored_spread(
    study: optuna.Study, recipe: Recipe, trial: TrialRecord, cfg: StudyConfig, repeats: int
) -> dict[str, Any]:
    """The spread of a trial's recipe, measured once per study and trial and kept in the study, so that exporting
    it again (in another format) does not register it again."""
    key = f"{trial.number}/{repeats}"
    known = study.user_attrs.get("spreads", {})
    if key not in known:
        known = {**known, key: measured_spread(recipe, cfg, repeats)}
        study.set_user_attr("spreads", known)
    return known[key]


#: A trial whose repeats under other sampling seeds average more than this multiple of its own score was a lucky
#: draw: a 2D study's best scored 0.0715 mm and its five repeats 10.85 mm on average (one at 42.9, before
#: registration 10.9).
LUCKY_FACTOR = 2.0


def lucky_draw(trial: TrialRecord, spread: dict[str, Any], score_name: str) -> str | None:
    """A warning when the exported trial's score did not repeat under other sampling seeds; None when it did."""
    overall = spread.get("overall") or {}
    mean, repeats = overall.get("mean"), spread.get("repeats")
    if score_name == "relative_tre" or trial.value is None:  # repeats are scored in TRE, not relative to it
        return None
    if mean is None:
        return f"trial {trial.number}'s recipe failed in every one of {repeats} repeats under other sampling seeds"
    if mean <= LUCKY_FACTOR * trial.value:
        return None
    return (
        f"trial {trial.number} scored {trial.value:.4g}, but {repeats} repeats under other sampling seeds averaged "
        f"{mean:.4g} (max {overall.get('max'):.4g}): a lucky draw of its sampling; 'objective: {{repeats: 3}}' in "
        "PAIR.yaml scores every trial over several seeds"
    )


def export_best(
    cfg: StudyConfig, spec: StorageSpec, *, fmt: str = "yaml", repeats: int = 0, within: float | None = None
) -> tuple[str | dict[str, str], TrialRecord, str | None]:
    """The text of the export (``elastix``: file name -> text, for a folder), the trial it comes from, and a warning
    when ``repeats`` showed the trial's score to be a lucky draw."""
    study = load_existing(cfg, spec)
    recipe, trial = best_recipe(study, spec, source=str(cfg.path), within=within)
    warning = None
    if repeats > 0:
        prov = dict(recipe.provenance or {})
        prov["spread"] = stored_spread(study, recipe, trial, cfg, repeats)
        recipe = recipe.with_(provenance=prov)
        warning = lucky_draw(trial, prov["spread"], str(study.user_attrs.get("objective", cfg.score_name)))
    if fmt == "yaml":
        return recipe_to_yaml(recipe), trial, warning
    if fmt in PEER_FORMATS:
        from .peer_export import export_text, study_geometry

        return export_text(recipe, fmt, study_geometry(cfg)), trial, warning
    from .script import recipe_to_script

    return recipe_to_script(recipe), trial, warning


def write_export(out: Path, text: str | dict[str, str]) -> None:
    """One file, or for a dict of files (``--format elastix``) a folder holding them."""
    if isinstance(text, dict):
        from .peer_export import write_folder

        write_folder(out, text)
    else:
        out.write_text(text, encoding="utf-8")
