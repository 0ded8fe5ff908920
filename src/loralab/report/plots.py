"""Figures for the report, as standalone SVG documents (text): training curves per task (seed
003's loss/metric plots) and accuracy against cost with the Pareto front (peft's
``method_comparison`` leaderboard).

matplotlib is a dependency of loralab (the HTML page is the report's main output); it is
imported here only, so the text formats never load it.
"""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np

from loralab.report.records import Run
from loralab.report.stats import pareto_front
from loralab.report.tables import runs_headline, scale, task_name

GIB = 1024**3


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("the report's plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "loralab-report", "svg.fonttype": "path", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    return buf.getvalue()


PALETTE = ("#0072B2", "#FF7F00", "#2CA02C", "#E7298A", "#000000", "#44AA99", "#8C564B", "#332288", "#BCBD22",
           "#D62728", "#A6761D", "#CC79A7")
"""Twelve qualitative colours of distinct hue, picked greedily from the Okabe-Ito, Tol, ColorBrewer
and tab10 palettes for the largest smallest CIELAB distance: ΔE76 >= 41 between any two of the first
ten, >= 36 among all twelve (tab10 has 28 between its purple and pink, tab20 17 within its pairs).
None is light enough to vanish on white or is the grey of dominated points."""

SLOTS = {"LoRA": 0, "DoRA": 1, "PiSSA": 2, "CorDA (IPA)": 3, "CorDA": 3, "Full FT": 4, "rsLoRA": 5, "OLoRA": 6,
         "LoRA-FA": 7, "LoRA-FA QR-init": 8, "SVD LoRA-FA": 9, "SVD LoRA-FA corrected": 10, "CorDA (KPA)": 11}
"""A method's own slot of ``PALETTE``, so it has the same colour in every report."""


def colours(labels) -> dict:
    """label -> colour (``#rrggbb``), the same in every figure of a report. A method named in
    ``SLOTS`` takes its own colour (the same in every report); any other label (a variant such as
    ``LoRA (r=4)``, another method) the first free colour, its method's own first where free. Past
    twelve labels colours repeat (the learning-rate panel's dashes still tell the lines apart)."""
    labels = list(labels)
    out = {label: PALETTE[SLOTS[label]] for label in labels if label in SLOTS}
    for label in labels:
        if label in out:
            continue
        used = set(out.values())
        method = label.rsplit(" (", 1)[0] if label.endswith(")") else label
        free = [c for c in PALETTE if c not in used]
        own = PALETTE[SLOTS[method]] if method in SLOTS else None
        out[label] = own if own in free else free[0] if free else PALETTE[len(out) % len(PALETTE)]
    return out


def series(runs: list[Run], key: str, factor: float = 1.0):
    """Mean and sd over seeds of one history key against step. Returns (steps, mean, sd, n) arrays;
    sd is 0 where only one seed logged that step."""
    at = defaultdict(list)
    for r in runs:
        for entry in r.history:
            if key in entry and "step" in entry and isinstance(entry[key], (int, float)):
                at[entry["step"]].append(entry[key] * factor)
    steps = np.array(sorted(at), dtype=float)
    vals = [np.array(at[s]) for s in sorted(at)]
    mean = np.array([v.mean() for v in vals])
    sd = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])
    return steps, mean, sd, np.array([v.size for v in vals])


def _last_step(r: Run) -> float:
    steps = [e["step"] for e in r.history if isinstance(e.get("step"), (int, float))]
    return float(r.train_info.get("steps") or (max(steps) if steps else 0))


def _gid(kind: str, label: str) -> str:
    """An SVG id naming what an artist draws (``final-LoRA``), for the page's checks."""
    return kind + "-" + "".join(c if c.isalnum() else "_" for c in label)


def line_styles(lines: dict, tol: float = 0.01) -> dict:
    """label -> matplotlib line style for lines drawn on one panel (``lines``: label -> (steps,
    values)): a line that coincides with others (same steps, every value within ``tol`` of the
    panel's value span) is dashed in an interleaved phase (line j of m draws the j-th of every m
    dashes), so every colour shows where they overlap; any other line is solid."""
    values = [v for _, v in lines.values() if len(v)]
    span = (max(v.max() for v in values) - min(v.min() for v in values)) if values else 0.0
    groups: list[list] = []
    for label, (steps, vals) in lines.items():
        if not len(vals):
            continue
        for group in groups:
            s0, v0 = lines[group[0]]
            if np.array_equal(steps, s0) and np.all(np.abs(vals - v0) <= tol * span):
                group.append(label)
                break
        else:
            groups.append([label])
    dash = 3.0
    return {label: (j * dash, (dash, dash * (len(g) - 1))) if len(g) > 1 else "-"
            for g in groups for j, label in enumerate(g)}


def _final_by_method(ax, by_label: dict, metric: str, f: float, colour: dict, drawn: list) -> None:
    """The evaluation panel when runs evaluated once, at the end: one column per method (all would
    share the last step), the mean as a bar with ± sd over seeds and its value written beside it,
    each seed's score a hollow dot spread across the column."""
    for i, (label, rs) in enumerate(by_label.items()):
        ys = np.array([r.metrics[metric] * f for r in rs if metric in r.metrics], dtype=float)
        if ys.size == 0:
            continue
        c = colour[label]
        xs = i + (np.arange(ys.size) - (ys.size - 1) / 2) * (0.5 / ys.size)  # seeds side by side, not stacked
        ax.scatter(xs, ys, s=16, facecolors="none", edgecolors=c, linewidths=0.8, zorder=2, gid=_gid("seeds", label))
        ax.errorbar([i], [ys.mean()], yerr=[ys.std(ddof=1)] if ys.size > 1 else None, fmt="_", ms=16, mew=2,
                    color=c, capsize=4, zorder=3, gid=_gid("final", label))
        ax.annotate(f"{ys.mean():.2f}", (i, ys.mean()), xytext=(0, 5), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7, color=c)
        drawn.append(f"{label}: final {metric}")
    ax.set_xticks(range(len(by_label)), [lab if len(lab) <= 28 else lab[:27] + "…" for lab in by_label],
                  rotation=30, ha="right")  # the legend above has the full labels
    ax.set_xlim(-0.6, len(by_label) - 0.4)
    ax.set_xlabel("final evaluation, per method (bar: mean ± sd over seeds; dots: seeds)")


def curves_svg(runs: list[Run], task: str, colour: dict) -> tuple[str, list[str]]:
    """One figure for one task: train loss, the headline evaluation metric and the learning rate
    against optimizer step; one line per method (mean over seeds), shaded mean ± sd. The final
    evaluation is a marker at the last step, the methods' markers side by side; where no run
    evaluated during training the panel shows the final evaluation per method instead
    (``_final_by_method``). Lines that coincide (the same learning-rate schedule, near-identical
    losses) are dashed in interleaved phases (``line_styles``), so none hides another. Returns
    (svg, what was drawn, for the page's checks)."""
    plt = _pyplot()
    by_label = defaultdict(list)
    for r in sorted(runs, key=lambda r: list(colour).index(r.label)):
        by_label[r.label].append(r)
    metric = runs_headline(task, runs)
    factor = scale(metric) if metric else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = [("train loss", "train loss", 1.0), (f"eval {metric}", f"{metric}" + (" ×100" if factor != 1 else ""), factor),
              ("lr", "learning rate", 1.0)]
    once = not any(series(rs, f"eval {metric}")[0].size for rs in by_label.values())  # evaluated at the end only
    drawn = []
    for ax, (key, ylabel, f) in zip(axes, panels):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key.startswith("eval ") and once:
            _final_by_method(ax, by_label, metric, f, colour, drawn)
            continue
        drawn_series = {label: series(rs, key, f) for label, rs in by_label.items()}
        styles = line_styles({label: (v[0], v[1]) for label, v in drawn_series.items()})
        for i, (label, rs) in enumerate(by_label.items()):
            c = colour[label]
            steps, mean, sd, n = drawn_series[label]
            if key.startswith("eval "):
                # the final evaluation (the record's ``eval``) at the run's last step: mean ± sd over seeds,
                # the methods' markers side by side (they share the last step)
                finals = [(_last_step(r), r.metrics[metric] * f) for r in rs if metric in r.metrics]
                if finals:
                    xs, ys = np.array(finals, dtype=float).T
                    dodge = (i - (len(by_label) - 1) / 2) * 0.015 * max(xs.mean(), 1.0)
                    ax.errorbar([xs.mean() + dodge], [ys.mean()], yerr=[ys.std(ddof=1)] if ys.size > 1 else None,
                                fmt="o", color=c, ms=5, capsize=3, gid=_gid("final", label))
                    drawn.append(f"{label}: final {metric}")
            if steps.size == 0:
                continue
            ax.plot(steps, mean, color=c, lw=1.4, ls=styles[label], label=f"{label} (n={max(n)})",
                    marker="." if steps.size < 3 else None, gid=_gid(key.split()[0], label))
            if n.max() > 1:
                ax.fill_between(steps, mean - sd, mean + sd, color=c, alpha=0.2, lw=0)
            drawn.append(f"{label}: {key}")
        ax.set_xlabel("step")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 1.12), frameon=False)
    fig.suptitle(f"{task_name(task)}: mean over seeds, band ± sd", y=1.2 if handles else 1.0, fontsize=10)
    fig.tight_layout()
    return _svg(fig), drawn


def efficiency_svg(runs: list[Run], tasks: list[str], colour: dict) -> str:
    """Headline metric against peak memory (GiB) and against train time (s), one row per task,
    one point per run; the Pareto front (more metric for less cost) is joined, dominated runs grey."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        rs = [r for r in runs if r.task == task]
        metric = runs_headline(task, rs)
        kinds = {r.memory_kind for r in rs if r.peak_memory is not None}
        mem_label = {"cuda": "peak CUDA memory allocated (GiB)", "rss": "peak resident memory, CPU (GiB)"}
        xlabels = [mem_label.get(next(iter(kinds)), "peak memory (GiB)") if len(kinds) == 1
                   else "peak memory (GiB; CUDA allocated or CPU RSS)", "train time (s)"]
        for col, (ax, cost) in enumerate(zip(axes[row], (lambda r: r.peak_memory / GIB if r.peak_memory else None,
                                                         lambda r: r.train_time))):
            pts = [(cost(r), r.metrics[metric] * scale(metric), r) for r in rs if metric in r.metrics and cost(r)]
            front = set(pareto_front([(c, s) for c, s, _ in pts]))
            for i, (c, s, r) in enumerate(pts):
                on = i in front
                ax.scatter([c], [s], color=colour[r.label] if on else "0.75", s=36 if on else 22,
                           edgecolors="black" if on else "none", linewidths=0.5, zorder=3 if on else 2)
            fpts = sorted((pts[i][0], pts[i][1]) for i in front)
            if fpts:
                ax.step([p[0] for p in fpts], [p[1] for p in fpts], where="post", color="black", lw=1, alpha=0.6,
                        zorder=1, label="Pareto front")
            ax.set_xlabel(xlabels[col])
            ax.set_ylabel(f"{task_name(task)} {metric}" + (" ×100" if scale(metric) != 1 else ""))
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[lab], markeredgecolor="black", markeredgewidth=0.5,
                          label=lab) for lab in sorted({r.label for r in runs}, key=list(colour).index)]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="0.75", label="dominated"))
    handles.append(plt.Line2D([], [], color="black", alpha=0.6, label="Pareto front"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), bbox_to_anchor=(0.5, 1.0 + 0.3 / len(tasks)),
               frameon=False)
    fig.tight_layout()
    return _svg(fig)
