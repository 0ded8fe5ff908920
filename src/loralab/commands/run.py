"""``loralab run DIR [DIR ...] [-v] [--resume]``: train, save, evaluate each experiment folder in turn.

Every folder is checked before the first one trains; any problem stops everything with exit
code 2 and no result file. Every run that starts writes a record, whatever its ending:
exit 0 success, 1 failed (the error, its phase and the record's path on stderr), 3 diverged,
130 cancelled (SIGINT/SIGTERM; a checkpoint is written first when training).
"""

import sys


def add_arguments(parser):
    parser.add_argument("experiments", nargs="+", metavar="DIR", help="experiment folder(s); a shell glob runs a whole table")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress bars on stderr")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint of each experiment whose configuration matches "
                             "(refused, naming the changed keys, when it changed); no checkpoint: start afresh")


def run(args) -> int:
    from loralab.config import ConfigError
    from loralab.experiment import read_experiment
    from loralab.lifecycle import Diverged
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
    code = 0
    for exp in experiments:
        try:
            record, path = run_experiment(exp, verbose=args.verbose, resume=args.resume)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print(f"cancelled: result written to {exc}", file=sys.stderr)
            return 130
        except Diverged as exc:
            print(f"diverged: {exc}; result written to {getattr(exc, 'result_path', '?')}", file=sys.stderr)
            code = 3
            continue
        except Exception as exc:  # noqa: BLE001 - the record is written; report and go on to the next folder
            where = getattr(exc, "result_path", None)
            print(f"failed: {exp.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                  + (f"; result written to {where}" if where else ""), file=sys.stderr)
            code = code or 1
            continue
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["eval"].items())
        print(f"{exp.name}: {record['run_info']['method']} {metrics} -> {path}")
    return code
