"""``loralab bench``: peer (transformers + peft) vs loralab training throughput, side by side.

``loralab bench [--preset tiny|full]``: random-weight models of fixed shapes, one row per
workload x method x stack. ``loralab bench --experiment DIR [--random-weights] [--steps N]``:
one experiment folder's recipe through ``loralab run``'s own path and through transformers'
``Trainer`` + peft (``loralab.bench.experiment.run_experiment_bench``).
``loralab bench --eval [--model random:llama-3-8b] [--rows engine,transformers,generate_batch]``:
generation throughput on GSM8K test prompts, loralab's engine against transformers ``generate``
(batched) and ``generate_batch``, with the decode-step bound of the card
(``loralab.bench.generation``, ``generation_rows``, ``generation_table``).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=("tiny", "full"), default=None,
                        help="tiny: small random models, about a minute on CPU; full: Llama-3-8B, Llama-3.2-1B, roberta-base shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as a JSON list here (--experiment: one JSON object)")
    parser.add_argument("--experiment", type=Path, default=None, metavar="DIR",
                        help="bench one causal-LM experiment folder's recipe: loralab run vs transformers Trainer + peft")
    parser.add_argument("--random-weights", action="store_true",
                        help="--experiment: the recipe's model architecture with random weights (random:<shape> model id)")
    parser.add_argument("--task", default=None,
                        help="--experiment: train on this task instead of the recipe's (e.g. gsm8k when MetaMathQA is not on disk)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (tiny 3, full 8); --experiment: optimizer steps per stack (default 3, at least 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (tiny 1, full 3)")
    parser.add_argument("--windows", type=int, default=None,
                        help="preset rows: time the steps this many times back to back, the median window counting "
                             "(an even count: the slower middle one), each window's rate in the row's "
                             "window_throughputs (tiny 1, full 3)")
    parser.add_argument("--only", default=None, help="keep workloads whose name contains this")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to keep (e.g. fp8+lora,lora); an FP8-base row's ratios need its "
                             "float method's peer rows in the same run")
    parser.add_argument("--stacks", default=None,
                        help="comma-separated stacks to keep (peer, loralab, liger, tuned; default all), e.g. loralab "
                             "for an A/B of --speed keys; the tuned peer is held to loralab's budget (or peak) only beside its row; "
                             "--experiment: loralab, trainer (default both; the Trainer's search is capped at loralab's "
                             "peak only beside its row)")
    parser.add_argument("--peer-memory", choices=("peak", "budget"), default=None,
                        help="what the tuned peer's micro-batch search is held to: the budget loralab's probe had "
                             "(budget, the default: speed.memory_fraction of the card, as much room as loralab was "
                             "given; loralab's peak where that is higher) or loralab's measured peak on the same row "
                             "(peak, the older rule); preset rows only (--experiment's Trainer is held to loralab's peak)")
    parser.add_argument("--no-compile", action="store_true",
                        help="speed.compile = false for the loralab stack (default: loralab run's, on for causal LMs on cuda)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="speed.cuda_graphs = false for the loralab stack (default: loralab run's, on on cuda)")
    parser.add_argument("--speed", action="append", default=[], metavar="KEY=VALUE",
                        help="an explicit speed key for the loralab stack, VALUE in JSON (repeatable), e.g. "
                             "fp8_transpose_cache=0.81; FP8-only keys apply to the FP8-base rows, and those rows run "
                             "fused_lora off whatever is given (loralab run refuses it on an FP8 base); with "
                             "--experiment, over the recipe's speed keys for loralab's rows")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of each loralab row (cuda), in a second pass after all rows are timed; "
                             "under each table the GPU's busy and idle time a step and its longest idle gaps "
                             "(loralab.bench.timeline)")
    group = parser.add_argument_group("generation (--eval)")
    group.add_argument("--eval", action="store_true",
                       help="generation bench: loralab's engine vs transformers generate (batched) and generate_batch on GSM8K prompts")
    group.add_argument("--model", default=None,
                       help="a shape of loralab.shapes.MODELS (e.g. llama-3-8b, tiny-llama: random weights) or a real "
                            "model id (e.g. packaged:smollm2-135m); default random:llama-3-8b")
    group.add_argument("--rows", default=None, help="comma-separated, default engine,transformers,generate_batch")
    group.add_argument("--num-prompts", default=None, help="first N GSM8K test prompts (default all 1,319)")
    group.add_argument("--max-new-tokens", default=None, help="budget of new tokens per prompt (default 256)")
    group.add_argument("--stopping", default=None,
                       help="budget: no stop strings, EOS off (every request runs its budget); source: GSM8K's source "
                            "stop strings and EOS; auto (default): budget for random weights, source for real models")
    group.add_argument("--batch-sizes", default=None, help="batch sizes the transformers row tries, best reported (default 64,128)")
    group.add_argument("--peer-prompts", default=None,
                       help="run the transformers and generate_batch rows on the first N prompts only, full-task time "
                            "extrapolated (default: all)")
    group.add_argument("--slots", default=None, help="engine slots (sequences decoded together), also the batch of the printed bound (default 512, the engine's)")
    group.add_argument("--rank", default=None, help="LoRA rank of the all-linear adapter (default 32)")
    group.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default bfloat16; float32 on cpu)")
    group.add_argument("--data-dir", default=None, help="local data folder (layout of shared/data); default $LORALAB_DATA_DIR, else the hub")


def run(args) -> int:
    import torch

    from loralab.bench.rows import table
    from loralab.bench.runner import run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    for key in ("steps", "warmup", "windows"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise SystemExit(f"--{key} = {value}: must be a positive integer")
    if args.eval or any(getattr(args, key) is not None for key in _EVAL_ONLY):
        return _run_eval(args, device)
    if args.experiment is not None:
        return _run_experiment(args, device)
    if args.random_weights or args.task:
        raise SystemExit("--random-weights and --task go with --experiment DIR")

    def save(rows):
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(rows, indent=1) + "\n")

    speed = parse_speed(args.speed)  # explicit keys win over loralab run's defaults
    from loralab.config import triton_off_cuda

    # refused before the first row, as loralab run refuses it; naming --device only where it was given
    off_cuda = triton_off_cuda(device, speed, "--device" if args.device is not None else "the device found (no --device)")
    if off_cuda:
        raise SystemExit("--speed: " + "; ".join(off_cuda))
    if args.no_compile:
        speed["compile"] = False
    if args.no_cuda_graphs:
        speed["cuda_graphs"] = False
    from loralab.bench.workloads import BenchError

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    stacks = tuple(m.strip() for m in args.stacks.split(",")) if args.stacks else None
    try:
        rows, profiles = run_bench(args.preset or "tiny", device, steps=args.steps, warmup=args.warmup, only=args.only,
                                   speed=speed, profile=args.profile, on_row=save, methods=methods, stacks=stacks,
                                   peer_memory=args.peer_memory or "budget", windows=args.windows)
    except BenchError as exc:  # refused before any row ran
        which = " ".join(f"--{k} {getattr(args, k)!r}" for k in ("methods", "stacks") if getattr(args, k)) or "bench"
        raise SystemExit(f"{which}: {exc}") from exc
    print(table(rows))
    for text in profiles:
        print(text)
    save(rows)
    if args.output:
        if profiles:
            args.output.with_suffix(".profile.txt").write_text("\n\n".join(profiles) + "\n")
    failed = [r for r in rows if r.get("error") and not r["error"].startswith("out of memory")]
    if failed:  # an out-of-memory row is a measurement (that stack does not fit); any other error is not
        print(f"{len(failed)} row(s) failed: " + "; ".join(f"{r['workload']} {r['method']} {r['stack']}: {r['error']}"
                                                           for r in failed), file=sys.stderr)
        return 1
    return 0


def parse_speed(items: list[str]) -> dict:
    """``--speed KEY=VALUE`` options as a speed dict (VALUE parsed as JSON, else taken as a string).
    Raises SystemExit naming the item for a missing ``=``, an unknown key (with the allowed ones) or
    a value ``speed_settings.Speed`` refuses (its message)."""
    from loralab.speed_settings import Speed

    out, keys = {}, Speed.experiment_keys()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--speed {item!r}: KEY=VALUE expected (e.g. fp8_transpose_cache=0.81)")
        if key not in keys:
            raise SystemExit(f"--speed {item!r}: unknown key {key!r}; allowed: {', '.join(keys)}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    problems = Speed.problems({**Speed().record(), **out})
    if problems:
        raise SystemExit("--speed: " + "; ".join(problems))
    return out


def _run_experiment(args, device: str) -> int:
    from loralab.bench.experiment import experiment_table, run_experiment_bench
    from loralab.bench.workloads import BenchError
    from loralab.config import ConfigError

    if (args.preset or args.only or args.methods or args.profile or args.warmup or args.windows or args.no_compile
            or args.no_cuda_graphs or args.peer_memory):
        raise SystemExit("--experiment benches the folder's own method and settings (its adapter_config.json and "
                         "training_parameters.json; --speed sets speed keys over them for loralab's rows); remove "
                         "--preset, --only, --methods, --profile, --warmup, --windows, --no-compile, --no-cuda-graphs "
                         "and --peer-memory, which apply to the preset rows only")
    stacks = tuple(s.strip() for s in args.stacks.split(",") if s.strip()) if args.stacks else ("loralab", "trainer")
    try:
        result = run_experiment_bench(args.experiment, steps=args.steps or 3, random_weights=args.random_weights,
                                      task=args.task, device=args.device, stacks=stacks,
                                      speed=parse_speed(args.speed) or None)
    except (ConfigError, BenchError) as exc:
        raise SystemExit(f"loralab bench --experiment {args.experiment}: {exc}") from exc
    print(experiment_table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


_EVAL_ONLY = ("model", "rows", "num_prompts", "max_new_tokens", "stopping", "batch_sizes", "peer_prompts", "slots",
              "rank", "dtype", "data_dir")
_TRAINING_ONLY = ("preset", "experiment", "task", "steps", "warmup", "windows", "only", "methods", "stacks")
_TRAINING_SWITCHES = ("random_weights", "no_compile", "no_cuda_graphs", "profile", "speed")
DTYPES = ("float32", "bfloat16", "float16")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _positive_ints(key: str, value: str | None, default, problems: list[str]):
    """``value`` as positive integer(s) (comma-separated for a tuple default), else a problem."""
    if value is None:
        return default
    many = isinstance(default, tuple)
    try:
        numbers = tuple(int(v) for v in value.split(",")) if many else (int(value),)
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        what = "comma-separated positive integers, e.g. 64,128" if many else "a positive integer"
        problems.append(f"{_flag(key)} = {value!r}: must be {what}")
        return default
    return numbers if many else numbers[0]


def eval_settings(args, device: str):
    """``EvalBenchSettings`` from the command line, or the list of every problem with it."""
    import os

    from loralab.bench.generation import ROWS, STOPPING, EvalBenchSettings
    from loralab.config import suggest
    from loralab.models import RANDOM_PREFIX, check_model_id, random_shapes

    problems = []
    if not args.eval:
        given = [_flag(k) for k in _EVAL_ONLY if getattr(args, k) is not None]
        problems.append(f"{', '.join(given)} go(es) with --eval")
    problems += [f"{_flag(k)} is a training-bench option; it does not apply to --eval"
                 for k in _TRAINING_ONLY if getattr(args, k) is not None]
    problems += [f"{_flag(k)} is a training-bench option; it does not apply to --eval"
                 for k in _TRAINING_SWITCHES if getattr(args, k)]
    defaults = EvalBenchSettings()
    model = args.model or defaults.model
    decoders = [name for name, spec in random_shapes().items() if spec["model_type"] == "llama"]
    shape = model[len(RANDOM_PREFIX):] if model.startswith(RANDOM_PREFIX) else model
    if shape in random_shapes():
        if shape not in decoders:
            problems.append(f"--model = {args.model!r}: not a decoder shape; allowed shapes: {', '.join(decoders)}")
        model = RANDOM_PREFIX + shape
    elif model.startswith(RANDOM_PREFIX) or (":" not in model and "/" not in model and not Path(model).exists()):
        problems.append(f"--model = {args.model!r}: unknown shape{suggest(shape, decoders)}; allowed: a shape of "
                        f"{', '.join(decoders)} (random weights) or a real model id such as packaged:smollm2-135m")
    else:
        problems += [p.replace("'model_id'", "--model") for p in check_model_id(model)]
    rows = tuple(r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        problems.append(f"--rows = {args.rows!r}: allowed: a comma-separated subset of {', '.join(ROWS)} without repeats"
                        + (f"; unknown: {', '.join(unknown)}{suggest(unknown[0], ROWS)}" if unknown else ""))
    stopping = args.stopping or defaults.stopping
    if stopping not in STOPPING:
        problems.append(f"--stopping = {args.stopping!r}: allowed: {', '.join(STOPPING)}{suggest(stopping, STOPPING)}")
    dtype = args.dtype or (defaults.dtype if device == "cuda" else "float32")
    if dtype not in DTYPES:
        problems.append(f"--dtype = {args.dtype!r}: allowed: {', '.join(DTYPES)}{suggest(dtype, DTYPES)}")
    numbers = {key: _positive_ints(key, getattr(args, key), getattr(defaults, key), problems)
               for key in ("num_prompts", "max_new_tokens", "batch_sizes", "peer_prompts", "slots", "rank")}
    if problems:
        return problems
    return EvalBenchSettings(model=model, device=device, rows=rows, stopping=stopping, dtype=dtype,
                             data_dir=args.data_dir or os.environ.get("LORALAB_DATA_DIR"), **numbers)


def canonical_command(settings, output) -> str:
    """The ``loralab bench --eval`` command line that reproduces ``settings`` (every value explicit)."""
    parts = ["loralab", "bench", "--eval", "--model", settings.model, "--device", settings.device,
             "--rows", ",".join(settings.rows), "--max-new-tokens", str(settings.max_new_tokens),
             "--stopping", settings.stopping, "--batch-sizes", ",".join(map(str, settings.batch_sizes)),
             "--slots", str(settings.slots), "--rank", str(settings.rank), "--dtype", settings.dtype]
    for flag, value in (("--num-prompts", settings.num_prompts), ("--peer-prompts", settings.peer_prompts),
                        ("--data-dir", settings.data_dir), ("--output", output)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _run_eval(args, device: str) -> int:
    from loralab.bench.generation import default_output, run_eval_bench
    from loralab.bench.generation_table import table

    settings = eval_settings(args, device)
    if isinstance(settings, list):
        print("error: " + "\n  - ".join(["loralab bench --eval has problem(s):"] + settings), file=sys.stderr)
        return 2
    command = canonical_command(settings, args.output)
    output = {}

    def save(report):
        path = output.setdefault("path", args.output or default_output(settings.model, report["meta"]["created_at"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")

    report = run_eval_bench(settings, command=command, on_row=save)
    save(report)
    print(table(report))
    print(f"written: {output['path']}")
    return 0
