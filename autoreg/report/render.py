"""The report's HTML: :class:`~autoreg.report.data.ReportData` and its figures through the Jinja2 template
``templates/report.html.j2`` (autoescaped). The page works offline: plotly.js inlined once, images as data URIs.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from . import figures
from .data import ReportData, finite

TEMPLATE = "report.html.j2"
#: Failed or pruned trial numbers listed per reason before "…".
MAX_LISTED_TRIALS = 30
#: Optional trial-table columns: shown when any trial recorded them.
TRIAL_COST_FIELDS = ("runtime_s", "predicted_s", "time_limit_s", "worker")


def fmt(v: Any, spec: str = ".4g") -> str:
    """Numbers to 4 significant digits (non-finite ones as they are), None as a dash, anything else as text."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The template environment: autoescape on, undefined names an error."""
    env = Environment(
        loader=PackageLoader("autoreg.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["data_uri"] = data_uri
    return env


def plot_div(fig: go.Figure, div_id: str) -> Markup:
    """One figure as plotly's own div and script (plotly.js itself is inlined once by the template)."""
    return Markup(
        fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
        )
    )


@dataclass(frozen=True)
class Card:
    title: str
    value: str
    detail: str


def summary_cards(data: ReportData) -> list[Card]:
    """Trial counts, the best and the default recipe's scores, and the improvement between them."""
    c = data.counts
    finished = c.get("COMPLETE", 0) + c.get("PRUNED", 0) + c.get("FAIL", 0)
    detail = f"{c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
    cards = [Card("trials", str(finished), detail + (f", {c['RUNNING']} running" if c.get("RUNNING") else ""))]
    b, best = data.baseline, data.best
    unit = f" {data.objective_unit}" if data.objective_unit else ""
    if best is not None:
        cards.append(Card(f"best {data.objective}", fmt(best.value) + unit, f"trial {best.number} ({best.origin})"))
    if b is not None:
        cards.append(
            Card(
                f"default recipe {data.objective}",
                fmt(b.value) + unit if finite(b.value) else b.state.lower(),
                f"trial {b.number}" + (f": {b.reason}" if b.reason else ""),
            )
        )
    if best is not None and best.tre_report_mean is not None:
        kept = sum(len(v.get("report", [])) for v in data.split.values())
        cards.append(
            Card(
                "honest score",
                fmt(best.tre_report_mean) + (f" {data.unit}" if data.unit else ""),
                f"the best trial's mean TRE on the {kept} landmarks the search never saw",
            )
        )
    elif any("note" in v for v in data.split.values()):
        cards.append(Card("honest score", "-", "too few landmarks to keep some aside"))
    if data.before is not None:
        worse = best is not None and best.value > data.before
        cards.append(
            Card(
                f"before registration {data.objective}",
                fmt(data.before) + unit,
                "the identity, on the landmarks the search selects with"
                + ("; no trial ended below it" if worse else ""),
            )
        )
    if best is not None and b is not None and finite(b.value) and best.value and best.value > 0:
        harm = data.before is not None and b.value > data.before
        cards.append(
            Card(
                "improvement",
                f"{b.value / best.value:.3g}×",
                f"{(1 - best.value / b.value) * 100:.1f} % lower than the default"
                + (", which ended worse than before registration" if harm else ""),
            )
        )
    return cards


def trial_table(data: ReportData) -> tuple[list[str], list[list[Any]]]:
    """Every trial: number, state, role, value, its folding (deformable studies), the cost fields any trial recorded,
    and why it failed, was pruned or is infeasible."""
    extra = [f for f in TRIAL_COST_FIELDS if any(getattr(t, f) is not None for t in data.trials)]
    folds = any(t.folding_fraction is not None for t in data.trials)  # a deformable study: how much each one folds
    header = ["trial", "state", "role", data.objective_label, *(["folded (%)"] if folds else []), *extra, "reason"]
    rows = [
        [
            t.number,
            t.state.lower(),
            t.origin,
            t.value,
            *([None if t.folding_fraction is None else 100 * t.folding_fraction] if folds else []),
            *(getattr(t, f) for f in extra),
            t.reason or "",
        ]
        for t in data.trials
    ]
    return header, rows


#: columns of the landmark table that are not lengths: no unit in their header
UNITLESS_COLUMNS = ("landmark", "set")


def landmark_rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    """The TRE table of one pair, the default recipe's TRE as a last column when known, units in the header."""
    keys = list(table.rows[0].keys())
    unit = f" ({table.unit})" if table.unit else ""
    header = [k if k in UNITLESS_COLUMNS else k + unit for k in keys]
    rows = [[r[k] for k in keys] for r in table.rows]
    if table.baseline is not None:
        header.append("tre_default_recipe" + unit)
        for row, v in zip(rows, table.baseline):
            row.append(v)
    return header, rows


def plots(data: ReportData) -> dict[str, Any]:
    """The figures the data allow, as HTML divs: history, intermediate, importances, slices (list), tre (list)."""
    done = any(t.complete for t in data.trials)
    return {
        "history": plot_div(figures.history_figure(data), "history") if done else None,
        "intermediate": (
            plot_div(figures.intermediate_figure(data), "intermediate")
            if any(t.intermediate for t in data.trials)
            else None
        ),
        "importances": plot_div(figures.importance_figure(data), "importances") if data.importances else None,
        "slices": [
            plot_div(figures.slice_figure(data, p), f"slice-{i}") for i, p in enumerate(figures.slice_params(data))
        ]
        if done
        else [],
        "tre": [plot_div(figures.landmark_figure(t), f"tre-{i}") for i, t in enumerate(data.landmarks)],
    }


def render_html(data: ReportData) -> str:
    """The report as one HTML document that works offline (plotly.js inlined once, images as data URIs)."""
    from plotly.offline import get_plotlyjs

    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            data=data,
            plots=plots(data),
            cards=summary_cards(data),
            trial_table=trial_table(data),
            landmark_tables=[landmark_rows(t) for t in data.landmarks],
            max_listed=MAX_LISTED_TRIALS,
            plotly_js=Markup(get_plotlyjs()),
        )
    )
