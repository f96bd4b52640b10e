"""The report's data: a study (and its pairs with the best trial's transforms) turned into plain values, no HTML.

:func:`report_data` reads a study into :class:`ReportData`: the trials as :class:`~autoreg.trial.TrialRecord`, an
in-memory snapshot of the study for ``optuna.visualization`` (so figures and tables show the same trials even while a
tune goes on), importances, per-landmark TRE and per-view pictures. :func:`build_report` does the I/O around it:
opens the study, loads the pairs and finds the best trial's transforms (stored artifacts, else registered again).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import SimpleITK as sitk
from optuna.trial import TrialState

from .. import __version__
from ..artifacts import artifact_store, load_transform, tre_rows
from ..data import PairData
from ..images import physical_unit, view_pngs
from ..objective import value_before
from ..recipe import recipe_from_dict, recipe_to_yaml
from ..trial import TrialRecord, best_and_baseline, records

log = logging.getLogger(__name__)

#: Trial states counted in the summary, in display order.
COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


@dataclass(frozen=True)
class ReasonGroup:
    """Failed or pruned trials that share a reason."""

    state: str
    reason: str
    trials: tuple[int, ...]


@dataclass(frozen=True)
class LandmarkTable:
    """Per-landmark TRE of one pair: before registration (identity), with the default recipe (if known), best."""

    pair: str
    rows: list[dict[str, float | int]]
    baseline: list[float] | None = None
    unit: str | None = None


@dataclass(frozen=True)
class ViewImages:
    """One view of a pair (the 2D image, or a 3D slice named by ``label``) before and after the best recipe."""

    label: str
    axis: str | None
    index: int | None
    size: int | None
    before_png: bytes
    after_png: bytes


@dataclass(frozen=True)
class PairImages:
    """The views of one pair; ``note`` when they are missing."""

    pair: str
    dim: int
    views: list[ViewImages] = field(default_factory=list)
    note: str | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, as plain values (and ``study``, an in-memory snapshot for the plots)."""

    study: optuna.Study
    study_name: str
    objective: str
    stages: list[str]
    pair_names: list[str]
    trials: list[TrialRecord]
    counts: dict[str, int]
    baseline: TrialRecord | None
    best: TrialRecord | None
    best_scores: dict[str, Any]
    best_recipe_yaml: str | None
    importances: dict[str, float] | None
    importance_note: str | None
    step_labels: dict[int, str]
    groups: list[ReasonGroup]
    landmarks: list[LandmarkTable] = field(default_factory=list)
    images: list[PairImages] = field(default_factory=list)
    #: The unit of TRE values (``images.physical_unit`` of the fixed images); None when unknown or mixed.
    unit: str | None = None
    transform_source: str = ""
    #: Per pair, the landmarks the search never saw (``pipeline.Pipeline.split``), as the study recorded it.
    split: dict[str, Any] = field(default_factory=dict)
    #: The study's value with no registration (``objective.value_before``), when every pair's landmarks loaded.
    before: float | None = None
    #: ``autoreg crossval``'s results for this study (``crossval.json`` in its folder), when it ran.
    crossval: dict[str, Any] | None = None
    created: str | None = None
    generated: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def objective_unit(self) -> str | None:
        """The objective's unit: TRE statistics are lengths; the holdout metric has none."""
        return self.unit if self.objective.startswith("tre") else None

    @property
    def objective_label(self) -> str:
        """The objective with its unit where it has one."""
        return f"{self.objective} ({self.objective_unit})" if self.objective_unit else self.objective


def finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def snapshot(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study's attributes and trials (numbers kept: trials are added in order)."""
    copy = optuna.create_study(study_name=study.study_name, direction=study.direction)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(study.get_trials(deepcopy=False))
    return copy


def reason_groups(trials: Iterable[TrialRecord]) -> list[ReasonGroup]:
    """Failed, pruned and infeasible trials grouped by state and reason, the largest group first."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for t in trials:
        if t.reason:
            groups[(t.state, t.reason)].append(t.number)
    return sorted(
        (ReasonGroup(s, r, tuple(n)) for (s, r), n in groups.items()), key=lambda g: (-len(g.trials), g.state, g.reason)
    )


def step_labels(stages: Sequence[str], pair_names: Sequence[str]) -> dict[int, str]:
    """Readable names of the objective's report steps: per pair, stage and rung (``objective.report_step``); with
    several pairs, each pair's whole score is one step (the Wilcoxon pruner's instance)."""
    from ..objective import RUNGS, report_step

    if len(pair_names) > 1:
        return {i: f"{name} (whole pair)" for i, name in enumerate(pair_names)}
    labels = {}
    for p, pair in enumerate(pair_names):
        for s, kind in enumerate(stages):
            for rung, what in enumerate(RUNGS):
                prefix = f"{pair} · " if len(pair_names) > 1 else ""
                labels[report_step(p, len(stages), s, rung)] = f"{prefix}stage {s} {kind} · {what}"
    return labels


def completed_study(study: optuna.Study) -> optuna.Study:
    """An in-memory study of the completed trials with a finite score and parameters (what importances rank)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if finite(t.value) and t.params]
    copy = optuna.create_study(direction=study.direction)
    copy.add_trials(done)
    return copy


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """PED-ANOVA importances over the finite completed trials with parameters (not the baseline, which runs a stored
    recipe), or None and the reason they cannot be computed."""
    done = completed_study(study)
    n = len(done.trials)
    if n < 2:
        return None, (
            f"parameter importances need at least 2 completed trials with sampled parameters and a finite "
            f"score (this study has {n}; the default recipe samples none)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # as optuna-dashboard; needs no sklearn
            result = optuna.importance.get_param_importances(done, evaluator=evaluator)
    except Exception as err:  # noqa: BLE001 - conditional spaces (Optuna 4), constant parameters...
        return None, f"parameter importances could not be computed ({type(err).__name__}: {str(err)[:200]})"
    if not result:
        return None, "parameter importances could not be computed (no parameter is shared by all completed trials)"
    return {k: float(v) for k, v in result.items()}, None


def common_unit(images: Iterable[sitk.Image]) -> str | None:
    """The one :func:`~autoreg.images.physical_unit` of these images; None if there are none or they differ."""
    units = {physical_unit(im) for im in images}
    return units.pop() if len(units) == 1 else None


def pair_results(
    pairs: Sequence[PairData],
    transforms: Mapping[str, sitk.Transform],
    baseline_transforms: Mapping[str, sitk.Transform] | None = None,
) -> tuple[list[LandmarkTable], list[PairImages]]:
    """Per pair: TRE per landmark before/after and each view before/after (pairs without a transform: a note)."""
    tables, images = [], []
    for pair in pairs:
        tx = transforms.get(pair.name)
        if tx is None:
            images.append(PairImages(pair.name, pair.dim, note="no transform of the best trial for this pair"))
            continue
        rows = tre_rows(pair, tx)
        if rows:
            base = None
            btx = (baseline_transforms or {}).get(pair.name)
            if btx is not None:
                base = [r["tre_after"] for r in tre_rows(pair, btx)]
            tables.append(LandmarkTable(pair.name, rows, base, physical_unit(pair.fixed)))
        before = view_pngs(pair.fixed, pair.moving, None, pair.every_fixed_point)
        after = view_pngs(pair.fixed, pair.moving, tx, pair.every_fixed_point)
        views = [ViewImages(v.label, v.axis, v.index, v.size, b, a) for (v, b), (_, a) in zip(before, after)]
        images.append(PairImages(pair.name, pair.dim, views))
    return tables, images


def report_data(
    study: optuna.Study,
    pairs: Sequence[PairData] = (),
    *,
    transforms: Mapping[str, sitk.Transform] | None = None,
    baseline_transforms: Mapping[str, sitk.Transform] | None = None,
    transform_source: str = "",
    pair_names: Sequence[str] | None = None,
) -> ReportData:
    """The study (and the pairs with the best trial's transforms) as :class:`ReportData`; no file I/O."""
    copy = snapshot(study)
    trials = records(copy)
    counts = dict.fromkeys(COUNTED_STATES, 0)
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    best, baseline = best_and_baseline(trials)
    recipe_yaml = None
    scores: dict[str, Any] = {}
    if best is not None:
        if best.recipe:
            recipe_yaml = recipe_to_yaml(recipe_from_dict(best.recipe, source=f"trial {best.number}"))
        scores = {**best.scores(), **({"seed": best.seed} if best.seed is not None else {})}
    stages = [str(s) for s in study.user_attrs.get("stages", [])]
    names = list(pair_names) if pair_names is not None else [p.name for p in pairs]
    importances, note = param_importances(copy)
    tables, images = pair_results(pairs, transforms or {}, baseline_transforms) if pairs else ([], [])
    objective = str(study.user_attrs.get("objective", "score"))
    return ReportData(
        study=copy,
        study_name=study.study_name,
        objective=objective,
        stages=stages,
        pair_names=names,
        trials=trials,
        counts=counts,
        baseline=baseline,
        best=best,
        best_scores=scores,
        best_recipe_yaml=recipe_yaml,
        importances=importances,
        importance_note=note,
        step_labels=step_labels(stages, names) if stages and names else {},
        groups=reason_groups(trials),
        landmarks=tables,
        images=images,
        unit=common_unit(p.fixed for p in pairs),
        transform_source=transform_source,
        before=value_before(pairs, objective) if pairs and len(pairs) == len(names) else None,
        created=study.user_attrs.get("created"),
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        versions={"autoreg": __version__, "optuna": optuna.__version__, "SimpleITK": sitk.Version.VersionString()},
    )


# --- the I/O around it ------------------------------------------------------------------------------------------


def best_transforms(
    study: optuna.Study,
    trial: TrialRecord,
    pairs: Sequence[PairData],
    study_directory: Path,
    *,
    register_missing: bool = True,
) -> tuple[dict[str, sitk.Transform], str]:
    """The trial's transform per pair: the stored artifact, else registered again from its stored recipe."""
    store = artifact_store(study_directory)
    frozen = study.get_trials(deepcopy=False)[trial.number]  # numbers are a study's trial indices
    out: dict[str, sitk.Transform] = {}
    missing = []
    for pair in pairs:
        tx = load_transform(study, frozen, pair.name, store)
        if tx is not None:
            out[pair.name] = tx
        else:
            missing.append(pair)
    source = f"stored with trial {trial.number}"
    if missing and register_missing and trial.recipe:
        from ..registration import register

        recipe = recipe_from_dict(trial.recipe, source=f"trial {trial.number}")
        for pair in missing:
            try:
                out[pair.name] = register(recipe, pair).transform
            except Exception as err:  # noqa: BLE001 - the report still shows everything else
                log.warning("pair %s: registering trial %d's recipe again failed (%s)", pair.name, trial.number, err)
        source = (
            f"trial {trial.number}'s recipe registered again (no stored transform)"
            if len(missing) == len(pairs)
            else f"stored with trial {trial.number}, registered again for {len(missing)} pair(s)"
        )
    return out, source


def build_report(cfg: Any, spec: Any, study_directory: Path) -> ReportData:
    """Open the study of ``cfg``, load its pairs and the best trial's transforms, and extract the report's data."""
    import json

    from ..crossval import CROSSVAL_JSON
    from ..data import load_pair
    from ..errors import UserError
    from ..pipeline import split_pair
    from ..study import load_existing

    study = load_existing(cfg, spec)
    frozen = snapshot(study)  # the transforms and the figures then speak of the same best trial while a tune goes on
    pairs: list[PairData] = []
    notes: list[PairImages] = []
    for p in cfg.pairs:
        try:
            pairs.append(split_pair(load_pair(p), cfg))  # the per-landmark table marks the report set
        except UserError as err:
            log.warning("pair %s: images unavailable (%s)", p.name, err)
            notes.append(PairImages(p.name, 0, note=f"images unavailable: {err}"))
    best, base = best_and_baseline(records(frozen))
    transforms: dict[str, sitk.Transform] = {}
    baseline_tx: dict[str, sitk.Transform] = {}
    source = ""
    if best is not None and pairs:
        transforms, source = best_transforms(study, best, pairs, study_directory)
        if base is not None and base.state == "COMPLETE" and base.number != best.number:
            baseline_tx, _ = best_transforms(study, base, pairs, study_directory, register_missing=False)
        elif base is not None and base.number == best.number:
            baseline_tx = dict(transforms)
    data = report_data(
        frozen,
        pairs,
        transforms=transforms,
        baseline_transforms=baseline_tx,
        transform_source=source,
        pair_names=[p.name for p in cfg.pairs],
    )
    data.images.extend(notes)
    crossval = None
    path = study_directory / "crossval" / CROSSVAL_JSON
    if path.is_file():
        try:
            crossval = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("%s unreadable (%s)", path, err)
    return replace(
        data, split=dict((study.user_attrs.get("fingerprint") or {}).get("landmark_split") or {}), crossval=crossval
    )
