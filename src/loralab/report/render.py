"""Report → markdown, CSV and JSON text (the HTML page is ``html.py``)."""

from __future__ import annotations

import csv
import io
import json
import math

from loralab.report.build import RERUN, Report, left_out
from loralab.report.cost import cost_rows
from loralab.report.stats import CONFIDENCE, MIN_SEEDS, N_RESAMPLES
from loralab.report.tables import Table, task_name

FEW = "†"
DEGENERATE = "‡"  # some seed's score is degenerate (loralab.tasks.metrics): a convention, not a measurement
SUBSET = "§"  # scored on the first k examples of the evaluation set (max_eval_samples), not the whole set


def num(x: float | None, scaled: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2f}" if scaled else f"{x:.4g}"


def cell_text(t: Table, row, col, *, bold_md: bool = True) -> str:
    """``mean ± sd [low, high] (n=k)`` with † under MIN_SEEDS seeds, ‡k where k seeds' scores are
    degenerate, and excluded runs noted."""
    if col == "avg":
        s = t.avg.get(row)
        if s is None:
            return "–"
        if s.n == 0:
            return f"{num(s.mean, t.scaled)} (mean of cells)"
        core = _summary_text(s, t.scaled)
    else:
        c = t.cells.get((row, col))
        if c is None:
            return "–"
        core = _summary_text(c.summary, t.scaled)
        if c.degenerate:
            core += f" {DEGENERATE}{c.degenerate}"
        core += subset_mark(t, c)
        if c.excluded:
            core += " (+" + ", ".join(f"{n} {status}" for status, n in sorted(c.excluded.items())) + ")"
    mean, _, rest = core.partition(" ")
    if bold_md and (row, col) in t.best:
        mean = f"**{mean}**"
    return f"{mean} {rest}".strip()


def subset_mark(t: Table, c) -> str:
    """`` §k`` when the cell's runs scored k examples under the table's ``max_eval_samples`` (``§≤k`` where the record
    holds no count, ``§j–k`` where its runs differ); empty for a whole evaluation set (a count below the cap)."""
    cap = t.max_eval_samples
    if cap is None or all(n is not None and n < cap for n in c.examples):
        return ""
    known = sorted({n for n in c.examples if n is not None})
    if not known:
        return f" {SUBSET}≤{cap:,}"
    return f" {SUBSET}{known[0]:,}" + (f"–{known[-1]:,}" if len(known) > 1 else "")


def _summary_text(s, scaled) -> str:
    text = num(s.mean, scaled)
    if s.n > 1:
        text += f" ± {num(s.sd, scaled)} [{num(s.low, scaled)}, {num(s.high, scaled)}]"
    text += f" (n={s.n})" + (FEW if s.n < MIN_SEEDS else "")
    return text


def col_name(t: Table, col) -> str:
    """A column's header: a task column showing one evaluation's metric of several (an SFT run's headline,
    ``boolq/accuracy``) names that metric, so it does not read as the task's score."""
    if t.col_field == "task":
        evaluated = [m for m in t.col_metrics.get(col, ()) if "/" in m]
        return task_name(col) + (f" ({'/'.join(evaluated)})" if evaluated else "")
    return f"seed {col}" if t.col_field == "seed" else str(col)


def row_name(t: Table, row) -> str:
    return task_name(row) if t.row_field == "task" else f"seed {row}" if t.row_field == "seed" else str(row)


def legend(t: Table) -> str:
    return (_legend(t) + (degenerate_note(t) if any(c.degenerate for c in t.cells.values()) else "")
            + (subset_note(t) if any(subset_mark(t, c) for c in t.cells.values()) else ""))


def subset_note(t: Table) -> str:
    return (f" {SUBSET}k: each run scored on k examples, the first k of the evaluation set (max_eval_samples "
            f"{t.max_eval_samples}), not the whole set: not a full-set score, and kept apart from runs with another "
            f"cap (≤k: the record holds no count).")


def degenerate_note(t: Table) -> str:
    worst = "the largest finite number" if t.lower_better else "0"
    return (f" {DEGENERATE}k: k seeds' scores are degenerate (a constant prediction's correlation, F1 without a "
            f"positive prediction, a non-finite value), recorded as {worst} by convention and counted in the mean; in "
            f"a paired comparison a degenerate score loses to any non-degenerate one.")


def _legend(t: Table) -> str:
    pct = int(CONFIDENCE * 100)
    best = "lowest" if t.lower_better else "highest"
    where = "along the row" if t.col_field == "method" else "in the column"
    if t.pooled:
        return (f"Cells pool every run with the row's {t.row_field} and the column's {t.col_field} (methods, "
                f"seeds and anything else the table does not split by): mean ± sd over those runs [{pct} % "
                f"percentile-bootstrap interval] (n runs); {FEW} fewer than {MIN_SEEDS} runs; bold: {best} mean "
                f"{where}" + ("; avg: mean of the cell means." if t.avg else "."))
    return (f"Cells: mean ± sd over seeds [{pct} % percentile-bootstrap interval of the mean, {N_RESAMPLES:,} "
            f"resamples] (n seeds); {FEW} fewer than {MIN_SEEDS} seeds (interval missing or unreliable); "
            f"bold: {best} mean {where}" + ("; avg: mean over the columns per seed." if t.avg else "."))


def notes_lines(report: Report) -> list[str]:
    return ["### Notes", ""] + [f"- {note}" for note in report.notes] + [""] if report.notes else []


def comparison_rows(t: Table) -> list[list[str]]:
    rows = []
    for c in t.comparisons:
        interval = f"[{num(c.low, t.scaled)}, {num(c.high, t.scaled)}]" if c.low is not None else "–"
        p = "–" if c.p is None else f"{c.p:.3g}"
        tasks, seeds = len({k[0] for k in c.keys}), len({k[1] for k in c.keys})
        rows.append([f"{c.a} − {c.b}", f"{c.n} ({tasks} × {seeds})", f"{c.mean_diff:+.2f}" if t.scaled else f"{c.mean_diff:+.4g}", interval,
                     f"{c.wins}/{c.losses}/{c.ties}", p])
    return rows


COMPARISON_HEADER = ["A − B", "pairs (tasks × seeds)", "mean difference", "95 % interval", "wins/losses/ties", "sign test p"]


def comparison_header(t: Table) -> list[str]:
    return [h.replace("tasks", f"{t.col_field}s") for h in COMPARISON_HEADER]


def comparison_intro(t: Table) -> str:
    n = max(c.n for c in t.comparisons)
    text = (f"Paired comparison (A − B) over the ({t.col_field}, seed) pairs both rows have: mean difference, "
            f"{int(CONFIDENCE * 100)} % percentile-bootstrap interval over the pairs, two-sided sign test "
            f"(ties dropped; with {n} pair{'s' if n != 1 else ''} no p can be below {min(1.0, 2 * 0.5 ** n):.3g}).")
    if all(len({k[1] for k in c.keys}) == 1 for c in t.comparisons):
        text += f" One seed: the pairs are {t.col_field}s, so the interval shows spread across {t.col_field}s, not seed noise."
    return text


def table_grid(t: Table, bold_md: bool = True) -> tuple[list[str], list[list[str]]]:
    header = [t.row_field, "trainable params"] + [col_name(t, c) for c in t.cols] + (["avg"] if t.avg else [])
    body = []
    for row in t.rows:
        line = [row_name(t, row), t.params.get(row, "–")] + [cell_text(t, row, c, bold_md=bold_md) for c in t.cols]
        if t.avg:
            line.append(cell_text(t, row, "avg", bold_md=bold_md))
        body.append(line)
    return header, body


def _md_table(header, body) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


COST_HEADER = ["experiments", "row", "runs", "init s, mean [min, max]", "init peak", "train s, mean [min, max]", "train peak"]
COST_LEGEND = ("Cost per run, over the row's tasks and seeds: the adapter init (decomposition, calibration "
               "included) and training; peaks are the largest over the runs (CUDA max allocated, or CPU peak "
               "resident set). Seconds are wall time: runs that shared a GPU (`--runs-per-gpu`), or ran on a busy machine, "
               "measure them under that contention.")


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def _secs(v) -> str:
    return "–" if v is None else f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def cost_table_rows(report: Report) -> list[list[str]]:
    return [[c.experiment_set, c.label, str(c.n), _secs(c.init_seconds), _gib(c.init_peak_bytes), _secs(c.train_seconds),
             _gib(c.peak_bytes)] for c in cost_rows(report.used)]


def to_markdown(report: Report) -> str:
    out = []
    for t in report.tables:
        header, body = table_grid(t)
        out += [f"### {t.title}", ""] + _md_table(header, body) + ["", legend(t), ""]
        if t.comparisons:
            out += [comparison_intro(t), ""]
            out += _md_table(comparison_header(t), comparison_rows(t)) + [""]
    if report.used:
        out += ["### Cost", ""] + _md_table(COST_HEADER, cost_table_rows(report)) + ["", COST_LEGEND, ""]
    out += notes_lines(report)
    if report.not_success:
        out += ["### Runs that did not finish", ""]
        out += _md_table(["status", "experiment", "seed", "phase", "error", "file"], [
            [r.status, r.experiment, str(r.seed), str((r.error or {}).get("phase", "–")), error_line(r), str(r.source)]
            for r in report.not_success]) + [""]
    out += problem_lines(report, markdown=True)
    return "\n".join(out).rstrip() + "\n"


def error_line(r) -> str:
    e = r.error or {}
    if not e:
        return "–"
    msg = str(e.get("message", "")).splitlines()[0] if e.get("message") else ""
    return f"{e.get('type', 'error')}: {msg}"[:200].replace("|", "\\|")


def problem_lines(report: Report, markdown: bool = False) -> list[str]:
    """Unreadable files and superseded runs; JSON files that are not result records (bench
    tables, eval scores, a report's own report.json) are counted on stderr only, not in markdown."""
    out = []
    for p in report.unreadable:
        out.append(f"skipped {p.path}: {p.reason}")
    shown = report.superseded if markdown else report.superseded[:5]  # the terminal gets a count
    for old, new in shown:
        out.append(f"superseded {old.source} ({old.created_at}) by the newer run {new.source} ({RERUN})"
                   if old.status == "success"
                   else f"{old.source} ({old.created_at}): {left_out(old, new)}")
    if len(report.superseded) > len(shown):
        out.append(f"... and {len(report.superseded) - len(shown)} more superseded runs (all listed in the "
                   "Markdown report's 'Files not used')")
    others = [p for p in report.problems if p.kind == "not a record"]
    if others and not markdown:
        out.append(f"ignored {len(others)} JSON file(s) that are not result records: "
                   + ", ".join(str(p.path) for p in others[:5]) + (" ..." if len(others) > 5 else ""))
    if markdown and out:
        return ["### Files not used", ""] + [f"- {line}" for line in out] + [""]
    return out


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "column", "metric", "scale", "mean", "sd", "ci_low", "ci_high", "n", "seeds",
                "values", "trainable_params", "excluded_runs", "degenerate_seeds", "eval_examples", "max_eval_samples"])
    for t in report.tables:
        for (row, col), c in sorted(t.cells.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            s = c.summary
            w.writerow([t.title, row, col, c.metric, "x100" if t.scaled else "x1", s.mean, s.sd, s.low, s.high, s.n,
                        " ".join(str(r.seed) for r in c.runs), " ".join(f"{v:.6g}" for v in c.values),
                        t.params.get(row), " ".join(f"{k}={v}" for k, v in sorted(c.excluded.items())),
                        " ".join(str(r.seed) for r in c.runs if c.metric in r.degenerate),
                        " ".join("?" if n is None else str(n) for n in c.examples), t.max_eval_samples])
    return buf.getvalue()


def to_json(report: Report) -> str:
    return json.dumps(as_dict(report), indent=2, default=str)


def as_dict(report: Report) -> dict:
    tables = []
    for t in report.tables:
        tables.append({
            "title": t.title, "split": t.split, "rows_by": t.row_field, "columns_by": t.col_field,
            "rows": [str(r) for r in t.rows], "columns": [str(c) for c in t.cols],
            "column_names": [col_name(t, c) for c in t.cols], "max_eval_samples": t.max_eval_samples,
            "scale": 100 if t.scaled else 1, "lower_is_better": t.lower_better,
            "cells": [{"row": str(row), "column": str(col), "metric": c.metric, **c.summary.to_dict(),
                       "values": c.values, "seeds": [r.seed for r in c.runs], "files": [str(r.source) for r in c.runs],
                       "excluded_runs": c.excluded, "fewer_than_min_seeds": c.few_seeds,
                       "degenerate_seeds": [r.seed for r in c.runs if c.metric in r.degenerate],
                       "eval_examples": c.examples}
                      for (row, col), c in t.cells.items()],
            "trainable_params": {str(k): v for k, v in t.params.items()},
            "average": {str(k): (v.to_dict() if v else None) for k, v in t.avg.items()},
            "best": [[str(r), str(c)] for r, c in sorted(t.best, key=str)],
            "comparisons": [c.to_dict() for c in t.comparisons],
        })
    return {
        "inputs": report.inputs, "options": report.options,
        "statistics": {"interval": "percentile bootstrap of the mean (scipy.stats.bootstrap)", "confidence": CONFIDENCE,
                       "resamples": N_RESAMPLES, "min_seeds": MIN_SEEDS,
                       "sign_test": "scipy.stats.binomtest, two-sided, ties dropped"},
        "tables": tables,
        "cost": [{"experiments": c.experiment_set, "row": c.label, "runs": c.n, "init_seconds": c.init_seconds,
                  "init_peak_bytes": c.init_peak_bytes, "train_seconds": c.train_seconds, "peak_bytes": c.peak_bytes,
                  "memory_kind": c.memory_kind} for c in cost_rows(report.used)],
        "not_finished": [{"status": r.status, "experiment": r.experiment, "seed": r.seed, "task": r.task,
                          "error": r.error, "file": str(r.source)} for r in report.not_success],
        "problems": [{"file": str(p.path), "reason": p.reason, "kind": p.kind} for p in report.problems],
        "superseded": [{"file": str(o.source), "by": str(n.source), "reason": left_out(o, n)} for o, n in report.superseded],
        "notes": report.notes,
    }
