"""The report as one self-contained HTML page: no external file, script or font, so it opens
offline and can be mailed. Plots are SVG documents embedded as base64 ``data:`` images (each
image keeps its own ids, so matplotlib's clip-path ids cannot collide between figures); a small
inline script marks every image that decoded (``data-rendered="yes"``) for the browser test.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from html import escape

from loralab.report.build import Report, created, left_out
from loralab.report.render import (
    COST_HEADER,
    COST_LEGEND,
    FEW,
    comparison_header,
    comparison_intro,
    comparison_rows,
    cost_table_rows,
    error_line,
    legend,
    table_grid,
)
from loralab.report.tables import _sort_cols, _sort_rows, task_name

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}table.results td{white-space:nowrap;vertical-align:top}.ci{color:#666;font-size:.85em}th{background:#f3f3f3}
.few{color:#8a5a00}.legend{color:#555;font-size:.9em}.warn{background:#fff4e5;border-left:4px solid #e69500;padding:.5em 1em}
figure.plot{margin:1em 0}figure.plot img{max-width:100%}figcaption{color:#555;font-size:.9em}
details{margin:.3em 0}summary{cursor:pointer}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('figure.plot img');
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute('data-rendered', imgs[i].complete && imgs[i].naturalWidth > 0 ? 'yes' : 'no');
  }
  document.body.setAttribute('data-loaded', 'yes');
});
"""


def _img(svg: str, kind: str, caption: str) -> str:
    data = base64.b64encode(svg.encode()).decode()
    return (f'<figure class="plot" data-plot="{escape(kind)}"><img alt="{escape(caption)}" '
            f'src="data:image/svg+xml;base64,{data}"><figcaption>{escape(caption)}</figcaption></figure>')


def _table_html(header, body, best_cells=(), css="results") -> str:
    out = [f'<table class="{css}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(body):
        tds = []
        for j, cell in enumerate(row):
            text = escape(cell)
            if (i, j) in best_cells:
                mean, _, rest = text.partition(" ")
                text = f"<b>{mean}</b> {rest}".strip()
            if css == "results" and " [" in text:  # the interval and n on a second line
                head, _, tail = text.partition(" [")
                text = f'{head}<br><span class="ci">[{tail}</span>'
            elif css == "results" and " (n=" in text:
                head, _, tail = text.partition(" (n=")
                text = f'{head}<br><span class="ci">(n={tail}</span>'

            cls = ' class="few"' if FEW in cell else ""
            tds.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _results_table(t) -> str:
    header, body = table_grid(t, bold_md=False)
    cols = list(t.cols) + (["avg"] if t.avg else [])
    best = {(i, 2 + cols.index(c)) for i, r in enumerate(t.rows) for c in cols if (r, c) in t.best}
    html = _table_html(header, body, best)
    return html.replace('<table class="results">',
                        f'<table class="results" data-rows="{len(t.rows)}" data-columns="{len(t.cols)}">', 1)


def _json_block(title: str, obj) -> str:
    return f"<details><summary>{escape(title)}</summary><pre>{escape(json.dumps(obj, indent=2, default=str))}</pre></details>"


def to_html(report: Report, command: str = "loralab report") -> str:
    """The whole page. Imports matplotlib (through ``plots``) only when there are runs to plot."""
    used = report.used
    labels = _sort_rows({r.label for r in used})
    newest = max(report.runs, key=created).created_at if report.runs else "–"
    # no generation time on the page: the same results give the same file (a committed report only
    # changes when its results do)
    parts = [(f"<h1>loralab report</h1><p>Made by <code>{escape(command)}</code> from "
              f"{escape(', '.join(report.inputs))}: {len(used)} successful run(s) in the tables, "
              f"{len(report.not_success)} not finished, {len(report.problems)} file(s) not used; newest run "
              f"{escape(newest)}.</p>")]
    if report.unreadable:
        parts.append('<div class="warn" id="unreadable"><b>Files that could not be read</b><ul>'
                     + "".join(f"<li><code>{escape(str(p.path))}</code>: {escape(p.reason)}</li>" for p in report.unreadable)
                     + "</ul></div>")
    if report.notes:
        parts.append('<div class="warn" id="notes"><b>Notes</b><ul>'
                     + "".join(f"<li>{escape(note)}</li>" for note in report.notes) + "</ul></div>")
    parts.append('<h2 id="tables">Tables</h2>')
    if not report.tables:
        parts.append("<p>No successful run to tabulate.</p>")
    for t in report.tables:
        parts.append(f"<h3>{escape(t.title)}</h3>{_results_table(t)}<p class='legend'>{escape(legend(t))}</p>")
        if t.comparisons:
            parts.append(f"<p>{escape(comparison_intro(t))}</p>")
            parts.append(_table_html(comparison_header(t), comparison_rows(t), css="comparison"))
    if used:
        from loralab.report.plots import colours, curves_svg, efficiency_svg

        colour = colours(labels)
        by_set = defaultdict(list)
        for r in used:
            by_set[r.experiment_set].append(r)
        parts.append('<h2 id="curves">Training curves</h2>')
        for name in sorted(by_set):
            for task in _sort_cols({r.task for r in by_set[name]}):
                svg, _ = curves_svg([r for r in by_set[name] if r.task == task], task, colour)
                parts.append(_img(svg, f"curves {name} {task}", f"{name} · {task_name(task)}: train loss, evaluation "
                                  "metric and learning rate against step; mean over seeds, band ± sd; where runs evaluated only "
                                  "at the end, the final evaluation per method; lines that coincide are dashed in turn"))
        parts.append('<h2 id="efficiency">Accuracy against cost</h2>')
        for name in sorted(by_set):
            tasks = _sort_cols({r.task for r in by_set[name]})
            parts.append(_img(efficiency_svg(by_set[name], tasks, colour), f"efficiency {name}",
                              f"{name}: headline metric against peak memory and train time, one point per run; "
                              "Pareto front joined, dominated runs grey"))
    if used:
        parts.append('<h2 id="cost">Cost</h2>' + _table_html(COST_HEADER, cost_table_rows(report), css="cost")
                     + f"<p class='legend'>{escape(COST_LEGEND)}</p>")
    parts.append('<h2 id="not-finished">Runs that did not finish</h2>')
    if report.not_success:
        rows = [[r.status, r.experiment, str(r.seed), str((r.error or {}).get("phase", "–")), error_line(r), str(r.source)]
                for r in report.not_success]
        parts.append(_table_html(["status", "experiment", "seed", "phase", "error", "file"], rows, css="not-finished"))
        for r in report.not_success:
            if (r.error or {}).get("traceback"):
                parts.append(f"<details><summary>traceback: {escape(r.experiment)}</summary>"
                             f"<pre>{escape(str(r.error['traceback']))}</pre></details>")
    else:
        parts.append("<p>None: every run read finished with status success.</p>")
    parts.append('<h2 id="runs">Runs</h2><p>Each run\'s configuration, environment and git state, as recorded.</p>')
    for r in sorted(report.runs, key=lambda r: (r.experiment_set, r.label, r.task, str(r.seed))):
        git = r.git or {}
        state = f"{git.get('commit') or 'unknown commit'} on {git.get('branch') or '?'}" + (
            ", dirty tree" if git.get("dirty") is True else "" if git.get("dirty") is False else ", tree state unknown")
        summary = " · ".join(x for x in (r.status, r.experiment_set, r.label, task_name(r.task), f"seed {r.seed}",
                                          ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items()), f"git {state}") if x)
        parts.append(f'<details class="run"><summary>{escape(summary)}</summary><div>'
                     f"<p>file <code>{escape(str(r.source))}</code>, created {escape(r.created_at)}</p>"
                     + _json_block("configuration", r.config)
                     + _json_block("environment", r.environment)
                     + _json_block("git state", git)
                     + _json_block("train info (without the metric history)",
                                   {k: v for k, v in r.train_info.items() if k != "metrics"})
                     + "</div></details>")
    others = [p for p in report.problems if p.kind != "unreadable"]
    if others or report.superseded:
        parts.append('<h2 id="not-used">Other files not used</h2><ul>'
                     + "".join(f"<li><code>{escape(str(p.path))}</code>: {escape(p.reason)}</li>" for p in others)
                     + "".join(f"<li><code>{escape(str(o.source))}</code>: {escape(left_out(o, n))}</li>"
                               for o, n in report.superseded)
                     + "</ul>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>loralab report</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + f"<script>{SCRIPT}</script></body></html>\n")
