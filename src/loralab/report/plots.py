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


def colours(labels) -> dict:
    """A fixed colour per label (tab10, then tab20), the same in every figure of a report."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


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


def curves_svg(runs: list[Run], task: str, colour: dict) -> tuple[str, list[str]]:
    """One figure for one task: train loss, the headline evaluation metric and the learning rate
    against optimizer step; one line per method (mean over seeds), shaded mean ± sd. The final
    evaluation is a marker at the last step. Returns (svg, what was drawn, for the page's checks)."""
    plt = _pyplot()
    by_label = defaultdict(list)
    for r in sorted(runs, key=lambda r: list(colour).index(r.label)):
        by_label[r.label].append(r)
    metric = runs_headline(task, runs)
    factor = scale(metric) if metric else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = [("train loss", "train loss", 1.0), (f"eval {metric}", f"{metric}" + (" ×100" if factor != 1 else ""), factor),
              ("lr", "learning rate", 1.0)]
    drawn = []
    for ax, (key, ylabel, f) in zip(axes, panels):
        for label, rs in by_label.items():
            c = colour[label]
            steps, mean, sd, n = series(rs, key, f)
            if key.startswith("eval "):
                # the final evaluation (the record's ``eval``) at the run's last step: mean ± sd over seeds
                finals = [(_last_step(r), r.metrics[metric] * f) for r in rs if metric in r.metrics]
                if finals:
                    xs, ys = np.array(finals, dtype=float).T
                    ax.errorbar([xs.mean()], [ys.mean()], yerr=[ys.std(ddof=1)] if ys.size > 1 else None, fmt="o",
                                color=c, ms=5, capsize=3)
                    drawn.append(f"{label}: final {metric}")
            if steps.size == 0:
                continue
            ax.plot(steps, mean, color=c, lw=1.4, label=f"{label} (n={max(n)})", marker="." if steps.size < 3 else None)
            if n.max() > 1:
                ax.fill_between(steps, mean - sd, mean + sd, color=c, alpha=0.2, lw=0)
            drawn.append(f"{label}: {key}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
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
