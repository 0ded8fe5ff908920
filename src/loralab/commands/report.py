"""``loralab report PATH [PATH ...]``: a markdown table (method × task) from result JSON files."""


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", help="result files or folders (searched recursively)")


def run(args) -> int:
    from loralab.report import load_results, table

    records = load_results(args.paths)
    if not records:
        print("no successful result files found")
        return 1
    print(table(records))
    return 0
