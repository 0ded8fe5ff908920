"""Runs → tables (seed 000's layout: method rows, task columns, trainable parameters, average,
best in bold), every cell a ``Summary`` over seeds, plus paired comparisons of methods.

Headline metric of a run: the one it recorded (``Run.headline``, when its metrics hold it); for
records written before runs recorded it, seed 000's convention: CoLA Matthews correlation, STS-B
Pearson, accuracy elsewhere (the first recorded metric where a task has no accuracy). Fractions
(accuracy, F1, correlations, pass@k) are shown ×100; metrics whose name says loss, perplexity or
error are shown as recorded and lower is better.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from loralab.report.evals import eval_cap, eval_count, eval_points, evaluations, headline_evaluations
from loralab.report.records import AXES, DISPLAY, Run
from loralab.report.stats import MIN_SEEDS, Paired, Summary, paired, summarize

HEADLINE = {"glue/cola": "matthews_correlation", "glue/stsb": "pearson"}
TASK_ORDER = ["glue/sst2", "glue/mrpc", "glue/cola", "glue/qnli", "glue/rte", "glue/stsb"]
TASK_NAMES = {"glue/sst2": "SST-2", "glue/mrpc": "MRPC", "glue/cola": "CoLA", "glue/qnli": "QNLI",
              "glue/rte": "RTE", "glue/stsb": "STS-B"}
METHOD_ORDER = [DISPLAY[k] for k in ("full", "lora", "rslora", "dora", "pissa", "olora", "corda", "lorafa", "lorafa_qr",
                                     "svd_lorafa", "svd_lorafa_corrected")]


class ReportError(ValueError):
    """Bad report options (an unknown --by field, --metric form or compared row); names the value and what is allowed."""


def lower_is_better(metric: str) -> bool:
    return any(s in metric.lower() for s in ("loss", "perplexity", "ppl", "error"))


def scale(metric: str) -> float:
    return 1.0 if lower_is_better(metric) else 100.0


def task_name(task: str) -> str:
    return TASK_NAMES.get(task, task.split("/")[-1])


def headline_metric(task: str, available, recorded: str | None = None) -> str | None:
    """The metric a table shows for ``task``: ``recorded`` (the run's own headline) when it is among
    ``available`` (metric names, in recorded order), else the convention above; None without metrics."""
    available = list(available)
    if recorded is not None and recorded in available:
        return recorded
    want = HEADLINE.get(task, "accuracy")
    if want in available:
        return want
    return available[0] if available else None


def runs_headline(task: str, runs) -> str | None:
    """One headline for several runs of ``task`` (a figure's axis): the headline most of them
    recorded (ties: the first recorded), else the convention over their metric names in recorded order."""
    from collections import Counter

    recorded = Counter(r.headline for r in runs if r.headline is not None and r.headline in r.metrics)
    available = list(dict.fromkeys(k for r in runs for k in r.metrics))
    return headline_metric(task, available, recorded.most_common(1)[0][0] if recorded else None)


def parse_metrics(specs: list[str] | None) -> tuple[list[str | None], dict[str, str]]:
    """``--metric`` values: ``NAME`` (one table per NAME, for every task) or ``TASK=NAME``
    (override one task's headline). Returns (names or [None] for headline, overrides)."""
    names, overrides = [], {}
    for spec in specs or []:
        if "=" in spec:
            task, _, name = spec.partition("=")
            if not task or not name:
                raise ReportError(f"--metric {spec!r}: expected NAME or TASK=NAME (e.g. glue/cola=accuracy)")
            overrides[task] = name
        elif spec:
            names.append(spec)
    return names or [None], overrides


def parse_by(by: str) -> tuple[str, str]:
    fields = [f.strip() for f in by.split(",")]
    bad = [f for f in fields if f not in AXES]
    if len(fields) != 2 or bad or fields[0] == fields[1]:
        raise ReportError(f"--by {by!r}: expected ROWS,COLUMNS, two different fields of {', '.join(AXES)}")
    return fields[0], fields[1]


@dataclass
class Cell:
    """One table cell: the scaled values of its runs (one per seed unless the seed is an axis)."""

    values: list[float]
    runs: list[Run]
    metric: str
    summary: Summary
    excluded: dict = field(default_factory=dict)  # status -> count of non-success runs for this cell
    examples: list = field(default_factory=list)  # per run: how many examples the metric was scored on (None: unrecorded)

    @property
    def degenerate(self) -> int:
        """How many of its runs flag this metric degenerate (scored by convention, not measured)."""
        return sum(self.metric in r.degenerate for r in self.runs)

    @property
    def few_seeds(self) -> bool:
        return self.summary.n < MIN_SEEDS


@dataclass
class Table:
    title: str
    split: dict  # the non-axis grouping values this table holds (experiment set, task, metric)
    row_field: str
    col_field: str
    rows: list
    cols: list
    cells: dict  # (row, col) -> Cell
    params: dict  # row -> formatted trainable parameters
    avg: dict  # row -> Summary | None
    best: set  # (row, col) pairs in bold; col may be "avg"
    lower_better: bool
    scaled: bool
    pooled: bool = False  # some cell pools runs that are not seed replicates (n counts runs)
    comparisons: list = field(default_factory=list)  # Paired
    max_eval_samples: int | None = None  # the cap every run of the table was evaluated under (None: whole sets)
    col_metrics: dict = field(default_factory=dict)  # column -> the metric names its cells show


def _sort_rows(rows):
    def key(r):
        s = str(r)
        for i, m in enumerate(METHOD_ORDER):
            if s == m or s.startswith((m + " (", m + " [")):
                return (i, s)
        return (len(METHOD_ORDER), s)

    return sorted(rows, key=key)


def _sort_cols(cols):
    return sorted(cols, key=lambda c: (TASK_ORDER.index(c) if c in TASK_ORDER else len(TASK_ORDER), str(c)))


def format_params(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def build_tables(runs: list[Run], excluded_runs: list[Run], by: str = "method,task", metrics: list[str] | None = None,
                 compare: list[str] | None = None, baseline: str | None = None) -> list[Table]:
    """Tables from successful runs (``runs``); ``excluded_runs`` (failed, cancelled, diverged)
    are counted in the cells they would have filled. One table per experiment set (unless ``set``
    is an axis), per task (unless ``task`` is an axis: an evaluation belongs to its task's runs), per evaluation cap
    (``max_eval_samples``: subset scores never share a table with full ones) and per ``--metric NAME``.
    With tasks as columns, a task whose runs hold several evaluations of their headline metric
    (commonsense170k's eight accuracies) also gets a table by evaluation, after its set's table.

    Raises ReportError for a bad ``by``, metric spec or compared row name."""
    row_field, col_field = parse_by(by)
    names, overrides = parse_metrics(metrics)
    axes = (row_field, col_field)
    split_fields = [f for f in ("set", "task") if f not in axes]
    groups = defaultdict(list)
    for r in runs:
        groups[(*(r.axis(f) for f in split_fields), eval_cap(r))].append(r)
    failed = defaultdict(lambda: defaultdict(int))
    for r in excluded_runs:  # a run that did not finish counts in every evaluation column of its row
        key = (*(r.axis(f) for f in split_fields), eval_cap(r))
        failed[(key, *(None if f == "evaluation" else r.axis(f) for f in axes))][r.status] += 1
    by_evaluation = []
    if col_field == "task" and names == [None]:
        multi = {r.task for r in runs
                 if len(headline_evaluations(r, overrides.get(r.task) or headline_metric(r.task, r.metrics, r.headline))) > 1}
        if multi:  # that metric (an override's too) of each evaluation
            per_eval = [f"{task}={metric.rpartition('/')[2]}" for task, metric in overrides.items()]
            by_evaluation = build_tables([r for r in runs if r.task in multi], [r for r in excluded_runs if r.task in multi],
                                         f"{row_field},evaluation", per_eval, compare, baseline)
    tables = []
    for split_key in sorted(groups, key=lambda k: (str(k[:-1]), k[-1] is not None, k[-1] or 0)):  # whole sets first
        members = groups[split_key]
        for name in names:
            t = _one_table(members, dict(zip(split_fields, split_key)), row_field, col_field, name, overrides,
                           failed, split_key)
            if t.cells:
                t.comparisons = _comparisons(t, compare, baseline)
                tables.append(t)
        if by_evaluation and "set" in split_fields:  # the set's tables by evaluation follow its table
            tables += [t for t in by_evaluation if (t.split["set"], t.max_eval_samples) == (split_key[0], split_key[-1])]
    placed = {id(t) for t in tables}
    return tables + [t for t in by_evaluation if id(t) not in placed]


def _one_table(members, split, row_field, col_field, name, overrides, failed, split_key) -> Table:
    by_cell = defaultdict(list)
    axes = (row_field, col_field)
    for r in members:
        want = overrides.get(r.task) or name
        if "evaluation" in axes:
            points = eval_points(r, want, headline_metric(r.task, r.metrics, r.headline), task_name(r.task))
        else:
            points = [(None, want or headline_metric(r.task, r.metrics, r.headline))]
        for evaluation, metric in points:
            if metric in r.metrics:
                row, col = (evaluation if f == "evaluation" else r.axis(f) for f in axes)
                by_cell[(row, col, metric)].append(r)
    cells, metric_of_col = {}, defaultdict(set)
    for (row, col, metric), rs in by_cell.items():
        rs = sorted(rs, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
        values = [r.metrics[metric] * scale(metric) for r in rs]
        excluded = defaultdict(int)
        for key in {(row, col), tuple(None if f == "evaluation" else v for f, v in zip(axes, (row, col)))}:
            for status, n in failed.get((split_key, *key), {}).items():
                excluded[status] += n
        cells[(row, col)] = Cell(values, rs, metric, summarize(values), dict(excluded),
                                 [eval_count(r, metric) for r in rs])
        metric_of_col[col].add(metric)
    order = {e: i for i, e in enumerate(dict.fromkeys(p for c in cells.values() for r in c.runs for p in evaluations(r)))}
    rows, cols = (_sort_axis(f, {k[i] for k in cells}, order) for i, f in enumerate(axes))
    metrics_used = sorted({c.metric for c in cells.values()})
    lower = all(lower_is_better(m) for m in metrics_used)
    scaled = all(scale(m) != 1.0 for m in metrics_used)
    params = {}
    for row in rows:
        counts = sorted({r.trainable_params for c in cols if (row, c) in cells for r in cells[(row, c)].runs
                         if r.trainable_params is not None})
        shown = sorted({format_params(n) for n in counts}, key=lambda f: counts[[format_params(n) for n in counts].index(f)])
        params[row] = "–" if not shown else shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}"
    # pooled: a cell holds runs that are not seed replicates (rows/columns other than method x task)
    pooled = any(len({r.seed for r in c.runs}) < len(c.runs) for c in cells.values())
    avg = {row: _average(cells, row, cols, pooled) for row in rows} if len(cols) > 1 else {}
    best = set()
    # bold marks the best method: down each column when methods are rows, along each row when they are columns
    if col_field == "method":
        for row in rows:
            vals = {col: cells[(row, col)].summary.mean for col in cols if (row, col) in cells}
            if len(vals) > 1:
                target = (min if lower else max)(vals.values())
                best |= {(row, col) for col, v in vals.items() if v == target}
    else:
        for col in cols + (["avg"] if avg else []):
            if col == "avg":
                vals = {row: avg[row].mean for row in rows if avg[row] is not None}
            else:
                vals = {row: cells[(row, col)].summary.mean for row in rows if (row, col) in cells}
            if len(vals) > 1:
                target = (min if lower else max)(vals.values())
                best |= {(row, col) for row, v in vals.items() if v == target}
    if col_field == "task":
        described = ", ".join(f"{task_name(col)} {'/'.join(sorted(metric_of_col[col]))}" for col in cols)
    elif "evaluation" in axes:
        described = "/".join(sorted({m.rpartition("/")[2] for m in metrics_used})) + " by evaluation"
    else:
        described = "/".join(metrics_used)
    where = " · ".join(task_name(v) if k == "task" else str(v) for k, v in split.items())
    title = (f"{where}: " if where else "") + described + (" (×100)" if scaled else "")
    splits = {(r.config.get("training_parameters") or {}).get("eval_split", "dev") for c in cells.values() for r in c.runs}
    if splits - {"dev", None}:  # scores not on the dev split (a learning-rate sweep's held-out part of train)
        named = {"holdout": "the held-out part of train (eval_split holdout)"}
        title += f", scored on {' / '.join(sorted(named.get(str(s), str(s)) for s in splits))}"
    cap = split_key[-1]
    if cap is not None:
        title += f", each evaluation scored on at most its first {cap:,} examples (max_eval_samples {cap})"
    return Table(title, {**split, "metric": name}, row_field, col_field, rows, cols, cells, params, avg, best, lower,
                 scaled, pooled, max_eval_samples=cap, col_metrics={c: sorted(metric_of_col[c]) for c in cols})


def _sort_axis(field_name, values, order):
    if field_name == "evaluation":  # the order the runs recorded them (the paper's column order)
        return sorted(values, key=lambda v: (order.get(v, len(order)), str(v)))
    return (_sort_cols if field_name == "task" else _sort_rows)(values)


def _average(cells, row, cols, pooled: bool = False) -> Summary | None:
    """Mean over the columns: per seed where every column has that seed (so sd and interval are
    over seeds), else (or when cells pool other runs) the mean of the cell means with no interval
    (n=0); None if a column is missing."""
    if any((row, c) not in cells for c in cols):
        return None
    if pooled:
        return Summary(sum(cells[(row, c)].summary.mean for c in cols) / len(cols), None, None, None, 0)
    per_seed = defaultdict(dict)
    for c in cols:
        for r, v in zip(cells[(row, c)].runs, cells[(row, c)].values):
            per_seed[r.seed][c] = v
    complete = [sum(d.values()) / len(cols) for d in per_seed.values() if len(d) == len(cols)]
    if complete:
        return summarize(complete)
    return Summary(sum(cells[(row, c)].summary.mean for c in cols) / len(cols), None, None, None, 0)


def split_pair(spec: str) -> tuple[str, str, str]:
    """``--compare A,B`` split at its first comma outside parentheses, like ``str.partition``: row
    labels of variants hold commas (``SVD LoRA-FA (lr=0.0004, r=4)``)."""
    depth = 0
    for i, ch in enumerate(spec):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            return spec[:i], ",", spec[i + 1:]
    return spec, "", ""


def _match_row(name: str, rows) -> str:
    for r in rows:
        if str(r).lower() == name.lower():
            return r
    starts = [r for r in rows if str(r).lower().startswith(name.lower())]
    if len(starts) == 1:
        return starts[0]
    raise ReportError(f"no single table row {name!r}; rows are: {', '.join(map(str, rows))}")


def _comparisons(t: Table, compare, baseline) -> list[Paired]:
    """Paired comparisons over (column, seed) keys. Default: every row against ``baseline``, or
    against LoRA where the table has it, else against the first row."""
    if "seed" in (t.row_field, t.col_field) or t.pooled or len(t.rows) < 2:
        return []

    def keyed(row):
        out, degenerate = defaultdict(list), set()
        for c in t.cols:
            if (row, c) in t.cells:
                cell = t.cells[(row, c)]
                for r, v in zip(cell.runs, cell.values):
                    out[(c, r.seed)].append(v)
                    if cell.metric in r.degenerate:
                        degenerate.add((c, r.seed))
        return {k: sum(v) / len(v) for k, v in out.items()}, degenerate

    pairs = []
    if compare:
        for spec in compare:
            a, sep, b = split_pair(spec)
            if not sep:
                raise ReportError(f"--compare {spec!r}: expected A,B (two row names)")
            try:
                pairs.append((_match_row(a.strip(), t.rows), _match_row(b.strip(), t.rows)))
            except ReportError:
                continue  # the pair is in another table
    else:
        if baseline:
            try:
                base = _match_row(baseline, t.rows)
            except ReportError:
                return []
        else:
            base = DISPLAY["lora"] if DISPLAY["lora"] in t.rows else t.rows[0]
        pairs = [(row, base) for row in t.rows if row != base]
    out = []
    for a, b in pairs:
        (va, da), (vb, db) = keyed(a), keyed(b)
        res = paired(str(a), va, str(b), vb, da, db)
        if res is not None:
            out.append(res)
    return out
