"""``loralab run DIR [DIR ...] [-v]``: train, evaluate and save each experiment folder in turn.

Every folder is checked before the first one trains; any problem stops everything with exit
code 2 and no result file. Ctrl-C writes a cancelled result and exits with 130.
"""

import sys


def add_arguments(parser):
    parser.add_argument("experiments", nargs="+", metavar="DIR", help="experiment folder(s); a shell glob runs a whole table")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress bars and per-run summaries on stderr")


def run(args) -> int:
    from loralab.config import ConfigError
    from loralab.experiment import read_experiment
    from loralab.train import run_experiment

    experiments, failed = [], False
    for path in args.experiments:
        try:
            experiments.append(read_experiment(path))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return 2
    for exp in experiments:
        try:
            record, path = run_experiment(exp, verbose=args.verbose)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print(f"cancelled: result written to {exc}", file=sys.stderr)
            return 130
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["eval"].items())
        print(f"{exp.name}: {record['run_info']['method']} {metrics} -> {path}")
    return 0
