"""``loralab report RESULTS... [--by ROWS,COLUMNS] [--metric M] [--format md|csv|html|json] [--out DIR]``:
tables with statistics over seeds, curves, Pareto plots and a self-contained HTML page.

Without ``--out`` the chosen format goes to stdout (markdown by default); with ``--out DIR`` the
page and the tables are written to ``DIR/report.{html,md,csv,json}`` (or only ``--format``'s file).
Unreadable files are named on stderr and skipped, and so is what the tables leave out (a ``--metric`` some
groups did not record); the exit code is 0 when there is something to report, 1 when no result record was
found, 2 for bad options (a ``--metric`` no record holds among them) or a missing path.
"""

import shlex
import sys
from pathlib import Path

FORMATS = ("md", "csv", "html", "json")


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="RESULTS", help="result files or folders (searched recursively for *.json)")
    parser.add_argument("--by", default="method,task", metavar="ROWS,COLUMNS",
                        help="table rows and columns, two of method, task, set, seed, model, layer, init, optimizer, "
                             "evaluation (default method,task; seeds are pooled into each cell unless seed is one of "
                             "them; evaluation: one column per evaluation an SFT run's record holds, e.g. commonsense170k's "
                             "eight, with their average)")
    parser.add_argument("--metric", action="append", metavar="NAME|TASK=NAME",
                        help="metric to tabulate: NAME for every task (repeat for more tables) or TASK=NAME to replace "
                             "one task's headline (default: the headline each run recorded; older records: CoLA "
                             "matthews_correlation, STS-B pearson, else accuracy); a name no record holds is an error "
                             "naming the ones they hold")
    parser.add_argument("--compare", action="append", metavar="A,B",
                        help="paired comparison of two table rows over shared tasks and seeds (repeatable; default: "
                             "every row against --baseline)")
    parser.add_argument("--baseline", metavar="ROW", help="row the default comparisons use (default LoRA, else the first row)")
    parser.add_argument("--format", choices=FORMATS, help="output format (default md on stdout; every format with --out)")
    parser.add_argument("--out", metavar="DIR", help="write report.<format> file(s) to DIR instead of stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list JSON files that are not result records")


def command_line(args) -> str:
    """The command that rebuilds this report (shown on the page)."""
    words = ["loralab", "report", *args.paths]
    if args.by != "method,task":
        words += ["--by", args.by]
    for flag in ("metric", "compare"):
        for value in getattr(args, flag) or []:
            words += [f"--{flag}", value]
    if args.baseline:
        words += ["--baseline", args.baseline]
    return shlex.join(words)


def run(args) -> int:
    from loralab.report import ReportError, build_report
    from loralab.report.render import problem_lines, to_csv, to_json, to_markdown

    try:
        report = build_report(args.paths, by=args.by, metrics=args.metric, compare=args.compare, baseline=args.baseline)
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problem_lines(report):
        if args.verbose or not line.startswith("ignored"):
            print(line, file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if not report.runs:
        print(f"no result records found in {', '.join(args.paths)}", file=sys.stderr)
        return 1

    def html() -> str:
        from loralab.report.html import to_html

        return to_html(report, command=command_line(args))

    writers = {"md": lambda: to_markdown(report), "csv": lambda: to_csv(report), "json": lambda: to_json(report), "html": html}
    try:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for fmt in [args.format] if args.format else FORMATS:
                path = out / f"report.{fmt}"
                path.write_text(writers[fmt]())
                print(f"wrote {path}", file=sys.stderr)
        else:
            sys.stdout.write(writers[args.format or "md"]())
    except ImportError as exc:  # matplotlib missing from a stripped-down install
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
