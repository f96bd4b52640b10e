"""The offline HTML report of a study: what was tried, which knobs mattered, and whether the images align.

As in ``optuna.visualization``, extraction is split from rendering: :func:`report_data` turns a study (and the
pairs with the best trial's transforms) into a plain :class:`ReportData`; :func:`render_html` turns that into one
self-contained HTML file (plotly.js inlined once, images as data URIs, every text escaped). :func:`build_report`
does the I/O in between: it opens the study, loads the pairs and finds the best trial's transforms (stored as
artifacts by the workers, else registered again from the stored recipe).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import optuna
import SimpleITK as sitk
from optuna.trial import TrialState

from . import __version__
from .artifacts import artifact_store, load_transform, tre_rows
from .data import PairData
from .images import comparison_png
from .recipe import recipe_from_dict, recipe_to_yaml
from .trial import TrialRecord, best_and_baseline, records

log = logging.getLogger(__name__)

#: Parameters shown as slice plots (the most important first).
MAX_SLICE_PARAMS = 6
#: Bars in the importance plot (parameters with importance 0 are left out).
MAX_IMPORTANCE_PARAMS = 20
#: Lines drawn in the intermediate-values plot (the best, the baseline and the most recent others).
MAX_INTERMEDIATE_LINES = 200


# --- the data ----------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class PairImages:
    """PNG pictures of one pair before (identity) and after the best recipe; ``note`` when they are missing."""

    pair: str
    dim: int
    before_png: bytes | None = None
    after_png: bytes | None = None
    note: str | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything the HTML shows, as plain values."""

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
    transform_source: str = ""
    created: str | None = None
    generated: str = ""
    versions: dict[str, str] = field(default_factory=dict)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def trial_points(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of the study as a record, in trial order."""
    return records(study)


def reason_groups(trials: Iterable[TrialRecord]) -> list[ReasonGroup]:
    """Failed and pruned trials grouped by state and reason, the largest group first."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for t in trials:
        if t.state in ("FAIL", "PRUNED") and t.reason:
            groups[(t.state, t.reason)].append(t.number)
    return sorted((ReasonGroup(s, r, tuple(n)) for (s, r), n in groups.items()), key=lambda g: (-len(g.trials), g.state, g.reason))


def step_labels(stages: Sequence[str], pair_names: Sequence[str]) -> dict[int, str]:
    """Readable names of the objective's report steps (``objective.report_step``: pair, stage, rung)."""
    from .objective import RUNGS, report_step

    labels = {}
    for p, pair in enumerate(pair_names):
        for s, kind in enumerate(stages):
            for rung, what in enumerate(RUNGS):
                prefix = f"{pair} · " if len(pair_names) > 1 else ""
                labels[report_step(p, len(stages), s, rung)] = f"{prefix}stage {s} {kind} · {what}"
    return labels


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """PED-ANOVA importances over the finite completed trials, or None and the reason they cannot be computed."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite(t.value) and t.params]
    if len(done) < 2:
        return None, f"parameter importances need at least 2 completed trials with a finite score (this study has {len(done)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy = optuna.create_study(direction="minimize")
            copy.add_trials(done)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # as optuna-dashboard; needs no sklearn
            result = optuna.importance.get_param_importances(copy, evaluator=evaluator)
    except Exception as err:  # noqa: BLE001 - conditional spaces, constant parameters...
        return None, f"parameter importances could not be computed ({type(err).__name__}: {str(err)[:200]})"
    if not result:
        return None, "parameter importances could not be computed (no parameter is shared by all completed trials)"
    return {k: float(v) for k, v in result.items()}, None


def pair_results(pairs: Sequence[PairData], transforms: Mapping[str, sitk.Transform],
                 baseline_transforms: Mapping[str, sitk.Transform] | None = None
                 ) -> tuple[list[LandmarkTable], list[PairImages]]:
    """Per pair: TRE per landmark before/after and the before/after pictures (pairs without a transform: a note)."""
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
            tables.append(LandmarkTable(pair.name, rows, base))
        images.append(PairImages(
            pair.name, pair.dim,
            before_png=comparison_png(pair.fixed, pair.moving, None, pair.fixed_points),
            after_png=comparison_png(pair.fixed, pair.moving, tx, pair.fixed_points),
        ))
    return tables, images


def report_data(study: optuna.Study, pairs: Sequence[PairData] = (), *,
                transforms: Mapping[str, sitk.Transform] | None = None,
                baseline_transforms: Mapping[str, sitk.Transform] | None = None,
                transform_source: str = "", pair_names: Sequence[str] | None = None) -> ReportData:
    """The study (and the pairs with the best trial's transforms) as :class:`ReportData`; no file I/O."""
    trials = trial_points(study)
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                                  TrialState.WAITING)}
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
    importances, note = param_importances(study)
    tables, images = pair_results(pairs, transforms or {}, baseline_transforms) if pairs else ([], [])
    return ReportData(
        study_name=study.study_name,
        objective=str(study.user_attrs.get("objective", "score")),
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
        transform_source=transform_source,
        created=study.user_attrs.get("created"),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions={"autoreg": __version__, "optuna": optuna.__version__, "SimpleITK": sitk.Version.VersionString()},
    )


# --- the I/O around it ------------------------------------------------------------------------------------------


def best_transforms(study: optuna.Study, trial: TrialRecord, pairs: Sequence[PairData], study_directory: Path,
                    *, register_missing: bool = True) -> tuple[dict[str, sitk.Transform], str]:
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
        from .registration import register

        recipe = recipe_from_dict(trial.recipe, source=f"trial {trial.number}")
        for pair in missing:
            try:
                out[pair.name] = register(recipe, pair).transform
            except Exception as err:  # noqa: BLE001 - the report still shows everything else
                log.warning("pair %s: registering trial %d's recipe again failed (%s)", pair.name, trial.number, err)
        source = (f"trial {trial.number}'s recipe registered again (no stored transform)" if len(missing) == len(pairs)
                  else f"stored with trial {trial.number}, registered again for {len(missing)} pair(s)")
    return out, source


def build_report(cfg: Any, spec: Any, study_directory: Path) -> ReportData:
    """Open the study of ``cfg``, load its pairs and the best trial's transforms, and extract the report's data."""
    from .data import load_pair
    from .errors import UserError
    from .study import best_and_baseline_of, load_existing

    study = load_existing(cfg, spec)
    pairs: list[PairData] = []
    notes: list[PairImages] = []
    for p in cfg.pairs:
        try:
            pairs.append(load_pair(p))
        except UserError as err:
            log.warning("pair %s: images unavailable (%s)", p.name, err)
            notes.append(PairImages(p.name, 0, note=f"images unavailable: {err}"))
    best, base = best_and_baseline_of(study)
    transforms: dict[str, sitk.Transform] = {}
    baseline_tx: dict[str, sitk.Transform] = {}
    source = ""
    if best is not None and pairs:
        transforms, source = best_transforms(study, best, pairs, study_directory)
        if base is not None and base.state == "COMPLETE" and base.number != best.number:
            baseline_tx, _ = best_transforms(study, base, pairs, study_directory, register_missing=False)
        elif base is not None and base.number == best.number:
            baseline_tx = dict(transforms)
    data = report_data(study, pairs, transforms=transforms, baseline_transforms=baseline_tx, transform_source=source,
                       pair_names=[p.name for p in cfg.pairs])
    if notes:
        data.images.extend(notes)
    return data


# --- rendering ------------------------------------------------------------------------------------------------

_E = html.escape

_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#d62728", "FAIL": "#7f7f7f", "baseline": "#ff7f0e", "best": "#2ca02c"}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v)


def _log_axis(values: Sequence[float]) -> bool:
    vals = [v for v in values if _finite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 30


def history_figure(data: ReportData):
    """Every completed trial's score, the best so far, and the default recipe's score as a marked line."""
    import plotly.graph_objects as go

    done = [t for t in data.trials if t.state == "COMPLETE" and _finite(t.value)]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[t.number for t in done], y=[t.value for t in done], mode="markers", name="completed trial",
        marker={"color": _COLOURS["COMPLETE"], "size": 7},
        text=[f"trial {t.number} ({t.role})" for t in done], hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
    ))
    pruned = [t for t in data.trials if t.state == "PRUNED" and t.intermediate]
    if pruned:
        fig.add_trace(go.Scatter(
            x=[t.number for t in pruned], y=[t.intermediate[max(t.intermediate)] for t in pruned], mode="markers",
            name="pruned (last reported)", marker={"color": _COLOURS["PRUNED"], "symbol": "x", "size": 7},
            text=[f"trial {t.number}: {t.reason}" for t in pruned], hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
        ))
    xs, ys, best = [], [], math.inf
    for t in done:
        best = min(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        last = max(t.number for t in data.trials)
        fig.add_trace(go.Scatter(x=xs + [last], y=ys + [ys[-1]], mode="lines", line={"shape": "hv", "color": _COLOURS["best"],
                                                                                      "width": 2}, name="best so far"))
    b = data.baseline
    if b is not None and _finite(b.value):
        last = max(t.number for t in data.trials)
        fig.add_trace(go.Scatter(  # a trace, not a shape: shapes take log10 coordinates on a log axis
            x=[min(t.number for t in data.trials), last], y=[b.value, b.value], mode="lines", name="default recipe level",
            line={"dash": "dash", "color": _COLOURS["baseline"]}, hoverinfo="skip", showlegend=False,
        ))
        fig.add_trace(go.Scatter(x=[b.number], y=[b.value], mode="markers+text", name=f"default recipe (trial {b.number})",
                                 text=[f"default recipe: {b.value:.4g}"], textposition="top right",
                                 marker={"color": _COLOURS["baseline"], "symbol": "star", "size": 15}))
    fig.update_layout(title="Optimization history", xaxis_title="trial", yaxis_title=data.objective, height=420,
                      legend={"orientation": "h", "y": -0.2})
    if _log_axis([t.value for t in done]):
        fig.update_yaxes(type="log")
    return fig


def intermediate_figure(data: ReportData):
    """Each trial's reported value per step (coarsest level and end of each stage): where pruning cut in."""
    import plotly.graph_objects as go

    with_values = [t for t in data.trials if t.intermediate]
    keep = {t.number for t in with_values[-MAX_INTERMEDIATE_LINES:]}
    for special in (data.best, data.baseline):
        if special is not None:
            keep.add(special.number)
    fig = go.Figure()
    shown = set()
    for t in with_values:
        if t.number not in keep:
            continue
        steps = sorted(t.intermediate)
        kind = ("best" if data.best is not None and t.number == data.best.number else
                "baseline" if t.role == "baseline" else t.state)
        name = {"best": "best trial", "baseline": "default recipe", "COMPLETE": "completed", "PRUNED": "pruned",
                "FAIL": "failed"}.get(kind, kind.lower())
        fig.add_trace(go.Scatter(
            x=steps, y=[t.intermediate[s] for s in steps], mode="lines+markers", name=name, legendgroup=name,
            showlegend=name not in shown, opacity=1.0 if kind in ("best", "baseline") else 0.45,
            line={"color": _COLOURS.get(kind, "#9467bd"), "width": 3 if kind in ("best", "baseline") else 1,
                  "dash": "dot" if kind == "PRUNED" else "solid"},
            hovertemplate=f"trial {t.number}<br>%{{y:.4g}}<extra></extra>",
        ))
        shown.add(name)
    steps = sorted({s for t in with_values for s in t.intermediate})
    fig.update_layout(title="Intermediate values per level", yaxis_title=data.objective, height=420,
                      legend={"orientation": "h", "y": -0.3})
    fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=[data.step_labels.get(s, str(s)) for s in steps])
    if _log_axis([v for t in with_values for v in t.intermediate.values()]):
        fig.update_yaxes(type="log")
    return fig


def importance_figure(data: ReportData):
    """Horizontal bars of PED-ANOVA importances, the most important on top."""
    import plotly.graph_objects as go

    ranked = sorted((data.importances or {}).items(), key=lambda kv: -kv[1])
    shown = [kv for kv in ranked if kv[1] > 0][:MAX_IMPORTANCE_PARAMS] or ranked[:MAX_IMPORTANCE_PARAMS]
    items = shown[::-1]
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                           marker={"color": _COLOURS["COMPLETE"]}, hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    hidden = len(ranked) - len(items)
    title = "Parameter importances (PED-ANOVA, as in optuna-dashboard)" + (f"; {hidden} more at 0" if hidden else "")
    fig.update_layout(title=title, xaxis_title="importance", height=max(300, 26 * len(items) + 140))
    fig.update_yaxes(automargin=True)
    return fig


def _slice_params(data: ReportData) -> list[str]:
    if data.importances:
        ranked = sorted(data.importances, key=lambda k: -data.importances[k])
    else:
        counts: dict[str, int] = defaultdict(int)
        for t in data.trials:
            for k in t.params:
                counts[k] += 1
        ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return ranked[:MAX_SLICE_PARAMS]


def slice_figure(data: ReportData):
    """Score against each of the most important parameters (one panel each), coloured by trial number."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    params = _slice_params(data)
    done = [t for t in data.trials if t.state == "COMPLETE" and _finite(t.value)]
    cols = min(3, max(1, len(params)))
    rows = max(1, math.ceil(len(params) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=params or ["no parameters"], shared_yaxes=True,
                        horizontal_spacing=0.06, vertical_spacing=0.22)
    for i, name in enumerate(params):
        pts = [t for t in done if name in t.params]
        values = [t.params[name] for t in pts]
        categorical = any(isinstance(v, (str, bool)) for v in values)
        fig.add_trace(go.Scatter(
            x=[str(v) if categorical else v for v in values], y=[t.value for t in pts], mode="markers", showlegend=False,
            marker={"color": [t.number for t in pts], "colorscale": "Blues", "cmin": 0,
                    "cmax": max([t.number for t in data.trials] or [1]), "size": 7,
                    "line": {"width": 0.5, "color": "#333"}, "showscale": i == 0,
                    "colorbar": {"title": {"text": "trial"}, "len": 0.8}},
            text=[f"trial {t.number}" for t in pts], hovertemplate="%{text}<br>%{x}<br>%{y:.4g}<extra></extra>",
        ), row=i // cols + 1, col=i % cols + 1)
        if categorical:
            fig.update_xaxes(type="category", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title="Slice plots: score against the most important parameters", height=300 * rows + 100)
    fig.update_yaxes(title_text=data.objective, col=1)
    if _log_axis([t.value for t in done]):
        fig.update_yaxes(type="log")
    return fig


def landmark_figure(table: LandmarkTable, objective: str):
    """Per-landmark TRE before registration, with the default recipe (when known) and with the best recipe."""
    import plotly.graph_objects as go

    ids = [str(r["landmark"]) for r in table.rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=ids, y=[r["tre_before"] for r in table.rows], name="before (identity)", marker={"color": "#aaaaaa"}))
    if table.baseline is not None:
        fig.add_trace(go.Bar(x=ids, y=table.baseline, name="default recipe", marker={"color": _COLOURS["baseline"]}))
    fig.add_trace(go.Bar(x=ids, y=[r["tre_after"] for r in table.rows], name="best recipe", marker={"color": _COLOURS["best"]}))
    means = [f"before {sum(r['tre_before'] for r in table.rows) / len(table.rows):.4g}"]
    if table.baseline is not None:
        means.append(f"default recipe {sum(table.baseline) / len(table.baseline):.4g}")
    means.append(f"best {sum(r['tre_after'] for r in table.rows) / len(table.rows):.4g}")
    fig.update_layout(title=f"TRE per landmark: {table.pair} (mean: {', '.join(means)})", barmode="group", xaxis_title="landmark",
                      yaxis_title="TRE (physical units)", height=380, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(type="category")
    return fig


def _plot_div(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_E(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_E(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_E(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{_E(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.6em;margin:.4em 0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:1.4em}.muted{color:#666}.note{background:#fff8e1;border:1px solid #f0d68a;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;background:#fff;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;font-size:.9em}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.plot{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:4px}
.pics{display:flex;flex-wrap:wrap;gap:16px}.pics figure{margin:0;flex:1 1 400px;max-width:660px;background:#fff;border:1px solid #ddd;padding:6px;border-radius:6px}
.pics img{width:100%;height:auto;display:block}figcaption{font-size:.9em;color:#444;margin-top:4px}
pre{background:#fff;border:1px solid #ddd;padding:10px;overflow:auto;font-size:.85em;max-height:600px}
"""


def _summary(data: ReportData) -> str:
    c = data.counts
    finished = c.get("COMPLETE", 0) + c.get("PRUNED", 0) + c.get("FAIL", 0)
    cards = [("trials", f"{finished}", f"{c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
              + (f", {c['RUNNING']} running" if c.get("RUNNING") else ""))]
    b, best = data.baseline, data.best
    if best is not None:
        cards.append((f"best {data.objective}", _fmt(best.value), f"trial {best.number} ({best.role})"))
    if b is not None:
        cards.append((f"default recipe {data.objective}", _fmt(b.value) if _finite(b.value) else b.state.lower(),
                      f"trial {b.number}" + (f": {b.reason}" if b.reason else "")))
    if best is not None and b is not None and _finite(b.value) and best.value and best.value > 0:
        cards.append(("improvement", f"{b.value / best.value:.3g}×", f"{(1 - best.value / b.value) * 100:.1f} % lower than the default"))
    html_cards = "".join(f'<div class="card"><span class="muted">{_E(k)}</span><b>{_E(v)}</b><span class="muted">{_E(s)}</span></div>'
                         for k, v, s in cards)
    meta = (f"pairs: {', '.join(data.pair_names) or '-'} · stages: {' → '.join(data.stages) or '-'} · objective: "
            f"{data.objective} (lower is better)")
    return f'<p class="muted">{_E(meta)}</p><div class="cards">{html_cards}</div>'


def _failures(data: ReportData) -> str:
    if not data.groups:
        return "<p>No trial failed or was pruned.</p>"
    rows = []
    for g in data.groups:
        shown = ", ".join(str(n) for n in g.trials[:30]) + (" …" if len(g.trials) > 30 else "")
        rows.append(("failed" if g.state == "FAIL" else "pruned", g.reason, len(g.trials), shown))
    return _table(["state", "reason", "trials", "trial numbers"], rows, "groups")


def _landmark_section(data: ReportData) -> str:
    if not data.landmarks:
        return "<p>No landmarks (the objective is the holdout metric), or no transform of the best trial.</p>"
    parts = []
    for i, table in enumerate(data.landmarks):
        parts.append(f'<div class="plot">{_plot_div(landmark_figure(table, data.objective), f"tre-{i}")}</div>')
        header = list(table.rows[0].keys())
        rows = [[r[k] for k in header] + ([table.baseline[j]] if table.baseline is not None else [])
                for j, r in enumerate(table.rows)]
        if table.baseline is not None:
            header = header + ["tre_default_recipe"]
        parts.append(f"<details><summary>TRE per landmark of {_E(table.pair)} as a table</summary>"
                     f"{_table(header, rows, 'landmarks')}</details>")
    return "".join(parts)


def _image_section(data: ReportData) -> str:
    if not data.images:
        return "<p>No images (no completed trial yet).</p>"
    parts = []
    for im in data.images:
        parts.append(f"<h3>{_E(im.pair)}</h3>")
        if im.note:
            parts.append(f'<p class="note">{_E(im.note)}</p>')
            continue
        views = "one view" if im.dim == 2 else "axial, coronal and sagittal slices through the landmarks' centre (rows)"
        caption = f"{views}: checkerboard (left) and colour overlay (right; fixed magenta, moving green, aligned grey)"
        figures = []
        for label, png in (("before registration (identity)", im.before_png), ("after the best recipe", im.after_png)):
            if png is not None:
                figures.append(f"<figure>{_img(png, f'{im.pair} {label}')}<figcaption><b>{_E(label)}</b> · "
                               f"{_E(caption)}</figcaption></figure>")
        parts.append(f'<div class="pics">{"".join(figures)}</div>')
    if data.transform_source:
        parts.append(f'<p class="muted">Best transform: {_E(data.transform_source)}.</p>')
    return "".join(parts)


def render_html(data: ReportData) -> str:
    """The report as one HTML document that works offline (plotly.js inlined once, images as data URIs)."""
    from plotly.offline import get_plotlyjs

    sections = [f"<h1>autoreg report: {_E(data.study_name)}</h1>", _summary(data)]
    sections.append("<h2>Optimization history</h2>")
    if any(t.state == "COMPLETE" for t in data.trials):
        sections.append(f'<div class="plot">{_plot_div(history_figure(data), "history")}</div>')
    else:
        sections.append('<p class="note">No completed trial yet.</p>')
    sections.append("<h2>Intermediate values per level</h2>")
    if any(t.intermediate for t in data.trials):
        sections.append(f'<div class="plot">{_plot_div(intermediate_figure(data), "intermediate")}</div>')
    else:
        sections.append('<p class="note">No trial reported intermediate values.</p>')
    sections.append("<h2>Parameter importances</h2>")
    if data.importances:
        sections.append(f'<div class="plot">{_plot_div(importance_figure(data), "importances")}</div>')
    else:
        sections.append(f'<p class="note">{_E(data.importance_note or "no importances")}</p>')
    if any(t.params for t in data.trials) and any(t.state == "COMPLETE" for t in data.trials):
        sections.append("<h2>Slice plots</h2>")
        sections.append(f'<div class="plot">{_plot_div(slice_figure(data), "slices")}</div>')
    sections.append("<h2>Failed and pruned trials</h2>")
    sections.append(_failures(data))
    sections.append("<h2>TRE per landmark, before and after</h2>")
    sections.append(_landmark_section(data))
    sections.append("<h2>Fixed against moving, before and after the best recipe</h2>")
    sections.append(_image_section(data))
    sections.append("<h2>Best recipe</h2>")
    if data.best_recipe_yaml:
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in data.best_scores.items())
        sections.append(f'<p class="muted">trial {data.best.number if data.best else "-"}: {_E(scores)}</p>')
        sections.append(f"<pre>{_E(data.best_recipe_yaml)}</pre>")
    else:
        sections.append('<p class="note">No completed trial yet.</p>')
    versions = ", ".join(f"{k} {v}" for k, v in data.versions.items())
    sections.append(f'<p class="muted">Generated {_E(data.generated)}'
                    + (f" · study created {_E(str(data.created))}" if data.created else "") + f" · {_E(versions)}</p>")
    title = f"autoreg report: {data.study_name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_E(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )
