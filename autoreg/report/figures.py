"""The report's figures: ``optuna.visualization`` plots of the study snapshot, with the baseline (trial 0, the
SimpleITK-notebooks default recipe) added where it means something, and the per-landmark TRE bars optuna has no plot
for. Every function takes :class:`~autoreg.report.data.ReportData` and returns a plotly figure; no HTML here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.graph_objects as go
from optuna.importance import BaseImportanceEvaluator
from optuna.visualization import plot_intermediate_values, plot_optimization_history, plot_param_importances, plot_slice

from ..trial import BASELINE, TrialRecord
from .data import LandmarkTable, ReportData, completed_study, finite

#: Values spanning more than this factor (largest / smallest, all positive) are drawn on a log axis.
LOG_AXIS_RATIO = 30.0
#: Parameters shown as slice plots (the most important first).
MAX_SLICE_PARAMS = 6
#: Bars in the importance plot (parameters with importance 0 are left out).
MAX_IMPORTANCE_PARAMS = 20
#: Lines drawn in the intermediate-values plot (the best, the baseline and the most recent others).
MAX_INTERMEDIATE_LINES = 200

COLOURS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#d62728",
    "FAIL": "#7f7f7f",
    "RUNNING": "#9467bd",
    "baseline": "#ff7f0e",
    "best": "#2ca02c",
    "before": "#aaaaaa",
}
_NAMES = {
    "best": "best trial",
    "baseline": "default recipe",
    "COMPLETE": "completed",
    "PRUNED": "pruned",
    "RUNNING": "running",
}


def log_axis(values: Iterable[float | None]) -> bool:
    """Whether these values need a log axis to stay readable (all positive, spanning more than ``LOG_AXIS_RATIO``)."""
    vals = [v for v in values if finite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > LOG_AXIS_RATIO


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g} s"


def trial_hover(t: TrialRecord) -> str:
    """A trial's hover text: its role, and its measured and predicted cost where recorded."""
    parts = [f"trial {t.number} ({t.origin})"]
    if t.runtime_s is not None or t.predicted_s is not None or t.time_limit_s is not None:
        parts.append(
            f"runtime {_seconds(t.runtime_s)}, predicted {_seconds(t.predicted_s)}, limit {_seconds(t.time_limit_s)}"
        )
    return "<br>".join(parts)


def _by_number(data: ReportData) -> dict[int, TrialRecord]:
    return {t.number: t for t in data.trials}


def _baseline_done(data: ReportData) -> TrialRecord | None:
    b = data.baseline
    return b if b is not None and b.complete else None


def history_figure(data: ReportData) -> go.Figure:
    """optuna's optimization history, plus the pruned trials' last values and the default recipe's score."""
    fig = plot_optimization_history(data.study, target_name=data.objective_label)
    trials = _by_number(data)
    for trace in fig.data:
        if trace.mode == "markers" and trace.name == data.objective_label:  # the completed trials
            trace.update(
                name="completed trial",
                marker={"color": COLOURS["COMPLETE"], "size": 7},
                text=[trial_hover(trials[int(n)]) for n in trace.x],
                hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
            )
        elif trace.mode == "lines":  # optuna's "Best Value"
            trace.update(name="best so far", line={"shape": "hv", "color": COLOURS["best"], "width": 2})
    pruned = [t for t in data.trials if t.state == "PRUNED" and t.intermediate]
    if pruned:
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in pruned],
                y=[t.intermediate[max(t.intermediate)] for t in pruned],
                mode="markers",
                name="pruned (last reported)",
                marker={"color": COLOURS["PRUNED"], "symbol": "x", "size": 7},
                text=[f"trial {t.number}: {t.reason}" for t in pruned],
                hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
            )
        )
    b = _baseline_done(data)
    if b is not None:
        numbers = [t.number for t in data.trials]
        fig.add_trace(
            go.Scatter(  # a trace, not a shape: shapes take log10 coordinates on a log axis
                x=[min(numbers), max(numbers)],
                y=[b.value, b.value],
                mode="lines",
                name="default recipe level",
                line={"dash": "dash", "color": COLOURS["baseline"]},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[b.number],
                y=[b.value],
                mode="markers+text",
                name=f"default recipe (trial {b.number})",
                text=[f"default recipe: {b.value:.4g}"],
                textposition="top right",
                marker={"color": COLOURS["baseline"], "symbol": "star", "size": 15},
                hovertext=[trial_hover(b)],
                hovertemplate="%{hovertext}<br>%{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Optimization history", xaxis_title="trial", height=420, legend={"orientation": "h", "y": -0.2}
    )
    if log_axis([t.value for t in data.trials if t.complete] + ([b.value] if b else [])):
        fig.update_yaxes(type="log")
    return fig


def _trace_trial(name: str) -> int:
    """The trial number of one of optuna's intermediate-value traces (named ``Trial<number>``)."""
    if not name.startswith("Trial"):
        raise ValueError(f"unexpected trace name from optuna.visualization: {name!r}")
    return int(name[len("Trial") :])


def intermediate_figure(data: ReportData) -> go.Figure:
    """optuna's intermediate values (steps named by stage and level), best and default recipe drawn bold."""
    fig = plot_intermediate_values(data.study)
    trials = _by_number(data)
    special = {t.number for t in (data.best, data.baseline) if t is not None}
    numbered = [(_trace_trial(tr.name), tr) for tr in fig.data]
    recent = {n for n, _ in numbered[-MAX_INTERMEDIATE_LINES:]}
    kept, shown = [], set()
    for n, trace in numbered:
        if n not in recent and n not in special:
            continue
        t = trials[n]
        kind = (
            "best" if data.best is not None and n == data.best.number else "baseline" if t.role == BASELINE else t.state
        )
        name = _NAMES.get(kind, kind.lower())
        bold = kind in ("best", "baseline")
        trace.update(
            name=name,
            legendgroup=name,
            showlegend=name not in shown,
            opacity=1.0 if bold else 0.45,
            line={
                "color": COLOURS.get(kind, COLOURS["RUNNING"]),
                "width": 3 if bold else 1,
                "dash": "dot" if kind == "PRUNED" else "solid",
            },
            marker={"color": COLOURS.get(kind, COLOURS["RUNNING"])},
            hovertext=trial_hover(t),
            hovertemplate="%{hovertext}<br>%{y:.4g}<extra></extra>",
        )
        shown.add(name)
        kept.append(trace)
    fig.data = tuple(kept)
    steps = sorted({s for t in data.trials for s in t.intermediate})
    fig.update_layout(
        title="Intermediate values per level",
        yaxis_title=data.objective_label,
        xaxis_title=None,
        height=420,
        showlegend=True,
        legend={"orientation": "h", "y": -0.3},
    )
    fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=[data.step_labels.get(s, str(s)) for s in steps])
    if log_axis(v for t in data.trials for v in t.intermediate.values()):
        fig.update_yaxes(type="log")
    return fig


class _Computed(BaseImportanceEvaluator):
    """Importances computed once by ``data.param_importances``, handed to optuna's plot as an evaluator."""

    def __init__(self, importances: dict[str, float]):
        self.importances = importances

    def evaluate(self, study: Any, params: list[str] | None = None, *, target: Any = None) -> dict[str, float]:
        names = params if params is not None else list(self.importances)
        return {k: self.importances[k] for k in names}


def importance_figure(data: ReportData) -> go.Figure:
    """optuna's importance bars (PED-ANOVA, as optuna-dashboard), parameters of importance 0 left out."""
    ranked = sorted((data.importances or {}).items(), key=lambda kv: -kv[1])
    shown = [k for k, v in ranked if v > 0][:MAX_IMPORTANCE_PARAMS] or [k for k, _ in ranked[:MAX_IMPORTANCE_PARAMS]]
    fig = plot_param_importances(
        completed_study(data.study), evaluator=_Computed(dict(ranked)), params=shown, target_name=data.objective_label
    )
    fig.update_traces(marker={"color": COLOURS["COMPLETE"]})
    hidden = len(ranked) - len(shown)
    title = "Parameter importances (PED-ANOVA, as in optuna-dashboard)" + (f"; {hidden} more at 0" if hidden else "")
    fig.update_layout(title=title, xaxis_title="importance", yaxis_title=None, height=max(300, 26 * len(shown) + 140))
    fig.update_yaxes(automargin=True)
    return fig


def slice_params(data: ReportData) -> list[str]:
    """The parameters worth a slice plot: the most important first (else the most often set), of completed trials."""
    in_done = {k for t in data.trials if t.complete for k in t.params}
    if data.importances:
        ranked = sorted(data.importances, key=lambda k: -data.importances[k])
    else:
        counts = Counter(k for t in data.trials for k in t.params)
        ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return [k for k in ranked if k in in_done][:MAX_SLICE_PARAMS]


def slice_figure(data: ReportData, param: str) -> go.Figure:
    """optuna's slice plot of one parameter (colour: trial number), the default recipe's score as a dashed level
    (the baseline runs a stored recipe, not sampled parameters, so it has no point of its own here)."""
    fig = plot_slice(data.study, params=[param], target_name=data.objective_label)
    log = log_axis(t.value for t in data.trials if t.complete)
    b = _baseline_done(data)
    if b is not None:  # shapes take log10 coordinates on a log axis
        fig.add_hline(
            y=math.log10(b.value) if log else b.value,
            line={"dash": "dash", "color": COLOURS["baseline"]},
            annotation_text="default recipe",
            annotation_position="top left",
            annotation_font_color=COLOURS["baseline"],
        )
    fig.update_layout(title_text="", height=320, margin={"l": 60, "r": 20, "t": 30, "b": 50})
    fig.update_traces(
        marker={"colorbar": {"title": {"text": "trial"}, "len": 0.8}}, selector={"name": "Feasible Trial"}
    )
    if log:
        fig.update_yaxes(type="log")
    return fig


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def landmark_figure(table: LandmarkTable) -> go.Figure:
    """Per-landmark TRE before registration, with the default recipe (when known) and with the best recipe."""
    ids = [str(r["landmark"]) for r in table.rows]
    before = [float(r["tre_before"]) for r in table.rows]
    after = [float(r["tre_after"]) for r in table.rows]
    unit = f" {table.unit}" if table.unit else ""
    fig = go.Figure()
    fig.add_trace(go.Bar(x=ids, y=before, name="before (identity)", marker={"color": COLOURS["before"]}))
    series = [("before", before)]
    if table.baseline is not None:
        fig.add_trace(go.Bar(x=ids, y=table.baseline, name="default recipe", marker={"color": COLOURS["baseline"]}))
        series.append(("default recipe", table.baseline))
    fig.add_trace(go.Bar(x=ids, y=after, name="best recipe", marker={"color": COLOURS["best"]}))
    series.append(("best", after))
    means = ", ".join(f"{name} {_mean(vals):.4g}{unit}" for name, vals in series)
    fig.update_traces(hovertemplate=f"landmark %{{x}}: %{{y:.4g}}{unit}<extra>%{{fullData.name}}</extra>")
    fig.update_layout(
        title=f"TRE per landmark: {table.pair} (mean: {means})",
        barmode="group",
        xaxis_title="landmark",
        yaxis_title=f"TRE ({table.unit or 'physical units'})",
        height=380,
        legend={"orientation": "h", "y": -0.25},
    )
    fig.update_xaxes(type="category")
    if log_axis(v for _, vals in series for v in vals):  # before and after often differ 100x: keep both readable
        fig.update_yaxes(type="log", title_text=f"TRE ({table.unit or 'physical units'}, log scale)")
    return fig
