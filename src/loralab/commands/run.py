"""``loralab run DIR [DIR ...] [-v] [--resume] [--sharding ddp|fsdp] [--gpus N|all [--gpus-per-run K | --runs-per-gpu M]]``:
train, save, evaluate each experiment folder in turn.

Under ``torchrun`` / ``accelerate launch`` every process runs this command and they train each
experiment together (``loralab.distributed``; ``--sharding fsdp`` for models that do not fit one
GPU); rank 0 alone prints. ``--gpus`` instead runs the folders concurrently, one ``loralab run``
per GPU (``loralab.sweep``), skipping folders that already have a success result.

Every folder is checked before the first one trains; any problem stops everything with exit
code 2 and no result file. Every run that starts writes a record, whatever its ending:
exit 0 success, 1 failed (the error, its phase and the record's path on stderr), 3 diverged,
130 cancelled (SIGINT/SIGTERM; a checkpoint is written first when training).
"""

import os
import sys


def add_arguments(parser):
    parser.add_argument("experiments", nargs="+", metavar="DIR", help="experiment folder(s); a shell glob runs a whole table")
    parser.add_argument("-v", "--verbose", action="store_true", help="the training progress bar on stderr (the bars of generation, "
                        "tokenization and model loading show without it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint of each experiment whose configuration matches "
                             "(refused, naming the changed keys, when it changed); no checkpoint: start afresh")
    parser.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                        help="under torchrun/accelerate: ddp (each GPU holds the model) or fsdp (FSDP2 shards it)")
    parser.add_argument("--gpus", metavar="N|all",
                        help="run the folders concurrently, one run per GPU (subprocesses); folders with a "
                             "success result for the same configuration are skipped")
    parser.add_argument("--gpus-per-run", type=int, default=1, metavar="K",
                        help="with --gpus: GPUs per run, each run a torchrun launch of K processes")
    parser.add_argument("--runs-per-gpu", type=int, default=1, metavar="M",
                        help="with --gpus: M runs share each GPU at once (small models, whose steps leave a GPU idle)")


def _error(message: str) -> None:
    """An error found before the process group exists: printed once, by rank 0 of a torchrun launch
    (every rank finds it and exits 2; torchrun itself then reports exit 1 with its own traceback)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def run(args) -> int:
    from loralab import distributed
    from loralab.config import ConfigError
    from loralab.experiment import read_experiment

    experiments, failed = [], False
    for path in args.experiments:
        try:
            experiments.append(read_experiment(path))
        except ConfigError as exc:
            _error(str(exc))
            failed = True
    if args.sharding == "fsdp":  # before any model is built (the step factory refuses it again)
        for exp in experiments:
            if exp.params.speed.get("grad_reduce") == "after_backward":
                from loralab.run.step import GRAD_REDUCE_UNDER_FSDP

                _error(f"{exp.name}: {GRAD_REDUCE_UNDER_FSDP}")
                failed = True
    if failed:
        return 2
    if args.gpus is not None:
        return _sweep(args, experiments)
    for flag, value in (("--gpus-per-run", args.gpus_per_run), ("--runs-per-gpu", args.runs_per_gpu)):
        if value != 1:
            print(f"error: {flag} {value} needs --gpus N|all (the sweep's GPUs)", file=sys.stderr)
            return 2
    try:
        launch = distributed.init(experiments[0].params.device, args.sharding)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_all(args, experiments, launch)
    finally:
        distributed.shutdown()


def _sweep(args, experiments) -> int:
    from loralab import sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: --gpus starts its own processes; run it without torchrun/accelerate", file=sys.stderr)
        return 2
    try:
        gpus = sweep.parse_gpus(args.gpus, sweep.visible_gpus())
        return sweep.run_sweep(experiments, gpus, per_run=args.gpus_per_run, runs_per_gpu=args.runs_per_gpu,
                               resume=args.resume, sharding=args.sharding)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_all(args, experiments, launch) -> int:
    from loralab import run as run_path
    from loralab.config import ConfigError

    code = 0
    who = "" if launch.is_main else f"rank {launch.rank}: "  # ranks other than 0 report only failures
    for exp in experiments:
        try:
            outcome = run_path.run_experiment(exp, verbose=args.verbose, resume=args.resume)
        except ConfigError as exc:
            print(f"{who}error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # after the record was written (a signal during the write)
            if launch.is_main:
                print("cancelled while the result was being written: it may be missing or incomplete", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the record could not be written (InvalidRecord, disk)
            outcome = run_path.Outcome("failed", {}, None, exc)
        if outcome.status == "cancelled":
            if launch.is_main:
                print(f"cancelled: result written to {outcome.path}", file=sys.stderr)
            return 130
        if outcome.status == "diverged":  # seen by every rank at the same step: they go on together
            if launch.is_main:
                print(f"diverged: {outcome.error}; result written to {outcome.path or '?'}", file=sys.stderr)
            code = 3
            continue
        if outcome.status == "failed":
            exc = outcome.error
            print(f"{who}failed: {exp.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                  + (f"; result written to {outcome.path}" if outcome.path else ""), file=sys.stderr)
            code = code or 1
            if launch.distributed:  # a failure may be this rank's alone: stop, so the launcher stops the others
                return code
            continue
        if launch.is_main:
            scores = outcome.result["eval"]
            degenerate = set(scores.get("degenerate") or [])
            metrics = ", ".join(f"{k}={_number(k, v)}" + (" (degenerate)" if k in degenerate else "")
                                for k, v in scores.items() if k != "degenerate") or "no evaluation"
            print(f"{exp.name}: {outcome.result['run_info']['method']} {metrics} -> {outcome.path}")
    return code


def _number(key: str, value) -> str:
    """A metric for the closing line: counts (``gsm8k/n``, ``humaneval/programs``) as integers, scores to four
    decimals (``tasks.evaluate.format_metric``, as ``loralab eval`` prints them)."""
    from loralab.tasks.evaluate import format_metric

    return format_metric(key, value)
