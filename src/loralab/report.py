"""Result files → tables: one row per method, one column per task, the task's headline metric
(seed 000's convention: MRPC accuracy, STS-B Pearson, CoLA Matthews), mean ± std over seeds when
several results share (method, task), and the average column."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HEADLINE = {"glue/cola": "matthews_correlation", "glue/stsb": "pearson"}
TASK_ORDER = ["glue/sst2", "glue/mrpc", "glue/cola", "glue/qnli", "glue/rte", "glue/stsb"]


def load_results(paths) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("*.json")) if p.is_dir() else [p])
    out = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "run_info" in rec and rec.get("train_info", {}).get("status") == "success":
            out.append(rec)
    return out


def headline(record) -> tuple[str, str, float]:
    task = record["run_info"]["config"]["training_parameters"]["task"]
    metric = HEADLINE.get(task, "accuracy")
    if metric not in record["eval"]:
        metric = next(iter(record["eval"]))
    return task, metric, record["eval"][metric]


def table(records, scale: float = 100.0) -> str:
    cells = defaultdict(list)
    methods, tasks = [], []
    for rec in records:
        method = rec["run_info"]["experiment_name"].split("/")[-2] if "/" in rec["run_info"]["experiment_name"] else rec["run_info"]["method"]
        task, _, value = headline(rec)
        cells[(method, task)].append(value * scale)
        methods += [method] if method not in methods else []
        tasks += [task] if task not in tasks else []
    tasks.sort(key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)
    lines = ["| method | " + " | ".join(t.split("/")[-1] for t in tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods:
        row, means = [], []
        for t in tasks:
            vals = cells.get((m, t), [])
            if not vals:
                row.append("–")
                continue
            means.append(np.mean(vals))
            row.append(f"{np.mean(vals):.2f}" + (f" ± {np.std(vals, ddof=1):.2f} (n={len(vals)})" if len(vals) > 1 else ""))
        avg = f"{np.mean(means):.2f}" if len(means) == len(tasks) else "–"
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg} |")
    return "\n".join(lines)
