"""``loralab tasks``: every training task, evaluation and group, one aligned line each.

A training task's line says its model kind, what it trains on and what it evaluates by default
(with the metric); an evaluation's line its family, output type, headline metric and source; a
group's line its members and their headline metric.
"""

from __future__ import annotations

from pathlib import PurePosixPath


def add_arguments(parser):
    pass


def trains_on(task) -> str:
    """The data a training task trains on, as a user would look it up: the GLUE task's train split,
    or the hub dataset id of an SFT task (the file name for a JSON file fetched by URL)."""
    if hasattr(task, "folder"):  # GLUE
        return f"GLUE {task.folder} train (nyu-mll/glue {task.hub_name})"
    hub = task.hub
    if hub.get("path") == "json" and hub.get("data_files"):
        return PurePosixPath(str(hub["data_files"])).name
    return hub["path"] + (f" ({hub['name']})" if hub.get("name") else "")


def evaluates(task, evals: dict, groups: dict) -> str:
    """What a training task evaluates when ``eval_tasks`` is absent, with the headline metric(s):
    GLUE's dev split and its metrics, or the SFT task's default evaluations (a whole group by name)."""
    if hasattr(task, "metrics"):  # GLUE
        return f"{task.folder} dev: {', '.join(task.metrics)}"
    names = tuple(task.default_evals)
    if not names:
        return "nothing by default (name eval_tasks)"
    headlines = ", ".join(dict.fromkeys(evals[n].headline for n in names if n in evals))
    group = next((g for g, members in groups.items() if tuple(members) == names), None)
    shown = f"group {group} ({len(names)} evaluations)" if group else ", ".join(names)
    return f"{shown}: {headlines}"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


def run(args) -> int:
    from loralab.tasks import TASKS
    from loralab.tasks.evaluate import EVALS, GROUPS

    tasks = [("training task", "kind", "trains on", "evaluates by default: metric")]
    tasks += [(name, task.kind, trains_on(task), evaluates(task, EVALS, GROUPS)) for name, task in TASKS.items()]
    print("\n".join(_aligned(tasks)))
    evals = [("evaluation", "family", "output", "headline", "source")]
    evals += [(name, ev.family, ev.output_type, ev.headline, ev.description) for name, ev in EVALS.items()]
    print("\n" + "\n".join(_aligned(evals)))
    groups = [("group", "headline", "members")]
    groups += [(name, ", ".join(dict.fromkeys(EVALS[m].headline for m in members if m in EVALS)), ", ".join(members))
               for name, members in GROUPS.items()]
    print("\n" + "\n".join(_aligned(groups)))
    return 0
