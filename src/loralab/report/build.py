"""The report as data: runs read from files, problems, superseded duplicates and tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loralab.report.checks import check_metrics
from loralab.report.records import Problem, Run, load_runs
from loralab.report.tables import ReportError, Table, build_tables, split_pair
from loralab.results import stamp


@dataclass
class Report:
    inputs: list[str]
    runs: list[Run]  # every readable record
    used: list[Run]  # successful, one per (experiment, label, task, seed, model): the newest
    superseded: list[tuple[Run, Run]]  # (older run left out, the newer run used instead; or a stopped run's record
    # and the record of its --resume, run_folder)
    problems: list[Problem]
    tables: list[Table]
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the tables leave out and why (a --metric some runs lack)

    @property
    def not_success(self) -> list[Run]:
        """Runs that did not finish: not successful, and not resumed to their end since (those are superseded)."""
        resumed = {id(old) for old, _ in self.superseded}
        return [r for r in self.runs if r.status != "success" and id(r) not in resumed]

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


RERUN = "a re-run of the same experiment, task, seed and configuration"


def left_out(old: Run, new: Run) -> str:
    """Why ``old`` is not used, as text naming ``new``: a newer run of the same experiment and seed, or its own
    --resume (finished or stopped again)."""
    if old.status == "success":
        return f"superseded by the newer run {new.source} ({RERUN})"
    if new.status == "success":
        return f"{old.status}, then resumed to its end by --resume: {new.source}"
    return f"{old.status}, then resumed by --resume and {new.status} again: {new.source}"


def run_folder(run, key: str = "checkpoint") -> str | None:
    """The output folder (``outputs/<experiment>--<time>``) of the checkpoint a record names under ``key``
    (``train_info.checkpoint``: its newest, ``.../checkpoints/step-N``; ``resumed_from``: the one a ``--resume``
    continued), or None. A resumed run goes on in the folder it was interrupted in."""
    path = run.train_info.get(key)
    parents = Path(path).parents if isinstance(path, str) and path else ()
    return str(parents[1]) if len(parents) > 1 else None  # a malformed path names no folder


def build_report(paths, by: str = "method,task", metrics=None, compare=None, baseline=None) -> Report:
    """Read ``paths`` (files or folders) and build every table.

    Raises FileNotFoundError for a missing path, ReportError for bad options."""
    runs, problems = load_runs(paths)
    newest: dict = {}
    superseded = []
    for r in sorted((r for r in runs if r.status == "success"), key=created):
        key = (r.experiment, r.label, r.task, r.seed, r.model)  # one experiment folder's run (identity.py)
        if key in newest:
            superseded.append((newest[key], r))
        newest[key] = r
    used = sorted(newest.values(), key=lambda r: str(r.source))
    finished = {folder: r for r in runs if r.status == "success" and (folder := run_folder(r, "resumed_from"))}
    unfinished: dict = {}  # output folder (or the record itself, naming none) -> the run's newest record
    for r in sorted((r for r in runs if r.status != "success"), key=created):
        folder = run_folder(r)
        if folder in finished:  # stopped, then resumed to its end (--resume): the success record counts
            superseded.append((r, finished[folder]))
            continue
        key = folder if folder is not None else id(r)
        if key in unfinished:  # stopped again after a resume: one run, its newest record
            superseded.append((unfinished[key], r))
        unfinished[key] = r
    tables = build_tables(used, list(unfinished.values()), by=by, metrics=metrics,
                          compare=compare, baseline=baseline)
    notes = check_metrics(used, metrics, by)
    for spec in compare or []:
        a, _, b = split_pair(spec)
        if not any(c.a.lower().startswith(a.strip().lower()) and c.b.lower().startswith(b.strip().lower())
                   for t in tables for c in t.comparisons):
            rows = sorted({str(row) for t in tables for row in t.rows})
            raise ReportError(f"--compare {spec!r}: no table has both rows with shared seeds; rows are: {', '.join(rows)}")
    return Report([str(p) for p in paths], runs, used, superseded, problems, tables,
                  {"by": by, "metrics": metrics or [], "compare": compare or [], "baseline": baseline}, notes)
