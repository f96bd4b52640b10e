"""The offline HTML report of a study: what was tried, which knobs mattered, and whether the images align.

Three parts, kept apart: :mod:`.data` reads a study (and its pairs) into plain :class:`ReportData`; :mod:`.figures`
draws it with ``optuna.visualization`` (plus the baseline, and the per-landmark TRE optuna has no plot for);
:mod:`.render` fills the Jinja2 template ``templates/report.html.j2``.
"""

from .data import ReportData, build_report, report_data, step_labels
from .render import render_html

__all__ = ["ReportData", "build_report", "render_html", "report_data", "step_labels"]
