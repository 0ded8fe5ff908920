"""``loralab report``: result files → tables with statistics over seeds, curves, efficiency
(Pareto) plots and one self-contained HTML page.

Modules: ``records`` (files → runs, grouped by what each run recorded), ``identity`` (a record's
experiment is part of what it is: two folders are two rows, a re-run of one supersedes), ``evals``
(which evaluations a run scored, on how many examples, under which ``max_eval_samples``), ``stats``
(mean, sd, bootstrap interval, paired sign test, Pareto front), ``tables`` (method × task or
method × evaluation tables), ``checks`` (``--metric`` against what the records hold), ``cost``
(the Cost table), ``build`` (the report as data), ``render`` (markdown, CSV, JSON), ``plots``
(matplotlib figures as inline SVG) and ``html`` (the page).
"""

from loralab.report.build import Report, build_report
from loralab.report.records import Problem, Run, load_runs
from loralab.report.tables import ReportError

__all__ = ["Problem", "Report", "ReportError", "Run", "build_report", "load_runs"]
