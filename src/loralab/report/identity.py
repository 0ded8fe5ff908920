"""Which records are the same run: a record's identity includes its experiment's name.

A re-run of one experiment folder (same name, task, seed, model and configuration) replaces the older
record (``build.build_report``). Two experiment folders of one set that ran the same method with the
same configuration (``set/lora-long`` beside ``set/lora-long-ref``) are two experiments, not one
re-run: where they ran the same task and seed, each row label gets the experiment's name
(``LoRA [lora-long]``, ``LoRA [lora-long-ref]``), so both are kept and shown side by side, never one
left out as superseded and never pooled as if they were more seeds.
"""

from __future__ import annotations

import re
from collections import defaultdict

SEED_PART = re.compile(r"seed[-_]?\d+")


def experiment_tag(run) -> str:
    """The run's experiment name without what the table already shows: the set (its first part), the task and
    the seed (``svd-family/tuned/pissa/stsb/seed0`` → ``tuned/pissa``), so the runs of one experiment over
    tasks and seeds share a tag. A name with nothing else left is shown whole."""
    task_names = {run.task, run.task.split("/")[-1]}
    parts = [p for p in run.experiment.split("/")[1:] if p not in task_names and not SEED_PART.fullmatch(p)]
    return "/".join(parts) or run.experiment


def qualify_experiments(runs) -> None:
    """Append ``[experiment]`` to the labels of a (set, label) whose successful runs hold one (task, seed, model)
    under two experiment names; every run of that label (unfinished ones too) gets its tag, so rows stay whole.
    Where two clashing experiments' tags coincide, the full names (less the set) tell them apart."""
    names = defaultdict(set)
    for r in runs:
        if r.status == "success":
            names[(r.experiment_set, r.label, r.task, r.seed, r.model)].add(r.experiment)
    clashes = defaultdict(list)
    for key, experiments in names.items():
        if len(experiments) > 1:
            clashes[key[:2]].append(experiments)
    for group, clashing in clashes.items():
        members = [r for r in runs if (r.experiment_set, r.label) == group]
        tags = {r.experiment: experiment_tag(r) for r in members}
        if any(len({tags[e] for e in experiments}) < len(experiments) for experiments in clashing):
            tags = {e: e.partition("/")[2] or e for e in tags}
        for r in members:
            r.label += f" [{tags[r.experiment]}]"
