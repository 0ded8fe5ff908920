"""The report as data: runs read from files, problems, superseded duplicates and tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from loralab.report.records import Problem, Run, load_runs
from loralab.report.tables import ReportError, Table, build_tables, split_pair
from loralab.results import stamp


@dataclass
class Report:
    inputs: list[str]
    runs: list[Run]  # every readable record
    used: list[Run]  # successful, one per (set, label, task, seed): the newest
    superseded: list[tuple[Run, Run]]  # (older run left out, the newer run used instead)
    problems: list[Problem]
    tables: list[Table]
    options: dict = field(default_factory=dict)

    @property
    def not_success(self) -> list[Run]:
        return [r for r in self.runs if r.status != "success"]

    @property
    def unreadable(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "unreadable"]


def created(run) -> str:
    """Sort key of a run by its ``created_at``: the UTC stamp (``results.stamp``), so records with
    ``Z`` and with ``+00:00`` (or another offset) order by time; an unreadable time sorts first."""
    try:
        return stamp(run.created_at)
    except ValueError:
        return ""


def build_report(paths, by: str = "method,task", metrics=None, compare=None, baseline=None) -> Report:
    """Read ``paths`` (files or folders) and build every table.

    Raises FileNotFoundError for a missing path, ReportError for bad options."""
    runs, problems = load_runs(paths)
    newest: dict = {}
    superseded = []
    for r in sorted((r for r in runs if r.status == "success"), key=created):
        key = (r.experiment_set, r.label, r.task, r.seed, r.model)
        if key in newest:
            superseded.append((newest[key], r))
        newest[key] = r
    used = sorted(newest.values(), key=lambda r: str(r.source))
    tables = build_tables(used, [r for r in runs if r.status != "success"], by=by, metrics=metrics,
                          compare=compare, baseline=baseline)
    for spec in compare or []:
        a, _, b = split_pair(spec)
        if not any(c.a.lower().startswith(a.strip().lower()) and c.b.lower().startswith(b.strip().lower())
                   for t in tables for c in t.comparisons):
            rows = sorted({str(row) for t in tables for row in t.rows})
            raise ReportError(f"--compare {spec!r}: no table has both rows with shared seeds; rows are: {', '.join(rows)}")
    return Report([str(p) for p in paths], runs, used, superseded, problems, tables,
                  {"by": by, "metrics": metrics or [], "compare": compare or [], "baseline": baseline})
