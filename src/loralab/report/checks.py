"""``--metric`` checked against what the records hold: a name no record holds is an error that names
the metrics they do hold ("did you mean"); a name only some tables' runs hold is a note naming the
groups (experiment set · task) whose cells are left out for want of it."""

from __future__ import annotations

import difflib
from collections import defaultdict

from loralab.report.evals import evaluations, is_count
from loralab.report.tables import ReportError, parse_by, parse_metrics, task_name
from loralab.tasks.evaluate import COUNTS  # metrics that count things, not scores


def _held(runs) -> list[str]:
    return sorted({k for r in runs for k in r.metrics if not is_count(k) and k.rpartition("/")[2] not in COUNTS})


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x' or 'y'?)``: the known names ending in ``/name`` (an evaluation's metric), then close
    spellings; empty when none is near."""
    known = list(known)
    near = [k for k in known if k.endswith("/" + name)] + difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    near = list(dict.fromkeys(near))[:4]
    return f" (did you mean {' or '.join(repr(k) for k in near)}?)" if near else ""


def _holds(run, name: str, by_evaluation: bool) -> bool:
    """Whether ``run`` fills a cell for ``--metric name``: the metric itself, or by evaluation ``<evaluation>/name``."""
    if name in run.metrics:
        return True
    return by_evaluation and "/" not in name and any(f"{e}/{name}" in run.metrics for e in evaluations(run))


def _check(flag: str, name: str, runs, by_evaluation: bool, records: str = "record") -> str | None:
    """Raise when none of ``runs`` holds ``name``; a note naming the groups that lack it when some do; else None."""
    lacking = [r for r in runs if not _holds(r, name, by_evaluation)]
    if len(lacking) == len(runs):
        held = _held(runs)
        raise ReportError(f"{flag}: no {records} holds the metric {name!r}{did_you_mean(name, held)}; they hold: "
                          f"{', '.join(held) or 'no metric'}")
    if not lacking:
        return None
    total, short = defaultdict(int), defaultdict(int)
    for r in runs:
        total[(r.experiment_set, r.task)] += 1
    for r in lacking:
        short[(r.experiment_set, r.task)] += 1
    groups = [f"{s} · {task_name(t)}" + ("" if n == total[(s, t)] else f" ({n} of {total[(s, t)]} runs)")
              for (s, t), n in sorted(short.items())]
    held = _held(lacking)
    return (f"{flag}: no cell for {', '.join(groups)}, whose runs did not record {name!r} (they hold: "
            f"{', '.join(held) or 'no metric'}){did_you_mean(name, held)}")


def check_metrics(runs, metrics, by: str = "method,task") -> list[str]:
    """Check each ``--metric`` value against the successful ``runs``; returns the notes.

    Raises ReportError for a name no run holds, or a ``TASK=NAME`` whose task no run has or whose runs all lack it."""
    if not runs:
        return []
    names, overrides = parse_metrics(metrics)
    by_evaluation = "evaluation" in parse_by(by)
    notes = [_check(f"--metric {name!r}", name, runs, by_evaluation) for name in names if name is not None]
    for task, name in overrides.items():
        of_task = [r for r in runs if r.task == task]
        if not of_task:
            tasks = sorted({r.task for r in runs})
            raise ReportError(f"--metric '{task}={name}': no run of task {task!r}{did_you_mean(task, tasks)}; the "
                              f"tasks are: {', '.join(tasks)}")
        notes.append(_check(f"--metric '{task}={name}'", name, of_task, by_evaluation, f"record of task {task!r}"))
    return [n for n in notes if n]
