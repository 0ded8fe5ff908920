"""What each table row's runs cost: the adapter init's seconds and peak memory, the train time and the
training peak memory (the report's Cost table)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from loralab.report.records import Run
from loralab.report.tables import _sort_rows


@dataclass
class CostRow:
    """What one table row's runs cost (all tasks and seeds pooled): the adapter init's seconds
    (calibration and decomposition included; ``run_info.init_cost``, plus a saved decomposition's seconds for a
    run that started from its folder: ``records._init_cost``), its peak memory, the train
    time and the training peak memory, as mean and range over the runs."""

    experiment_set: str
    label: str
    n: int
    init_seconds: tuple[float, float, float] | None  # (mean, min, max)
    init_peak_bytes: int | None  # the largest over the runs
    train_seconds: tuple[float, float, float] | None
    peak_bytes: int | None
    memory_kind: str | None


def _spread(values) -> tuple[float, float, float] | None:
    values = [float(v) for v in values if v is not None]
    return (sum(values) / len(values), min(values), max(values)) if values else None


def cost_rows(runs: list[Run]) -> list[CostRow]:
    """One ``CostRow`` per (experiment set, row label) of the successful ``runs``, rows in table order."""
    groups: dict = defaultdict(list)
    for r in runs:
        groups[r.experiment_set, r.label].append(r)
    out = []
    for name in sorted({k[0] for k in groups}):
        for label in _sort_rows({k[1] for k in groups if k[0] == name}):
            rs = groups[name, label]
            init = [r.init_cost for r in rs if r.init_cost]
            init_peaks = [c.get("peak_memory_bytes", c.get("peak_rss_bytes")) for c in init]
            peaks = [r.peak_memory for r in rs if r.peak_memory is not None]
            out.append(CostRow(name, label, len(rs), _spread(c.get("seconds") for c in init),
                               max((p for p in init_peaks if p is not None), default=None),
                               _spread(r.train_time for r in rs), max(peaks, default=None),
                               next((r.memory_kind for r in rs if r.memory_kind), None)))
    return out
