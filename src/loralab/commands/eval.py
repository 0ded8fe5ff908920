"""``loralab eval``: score a model (base, adapter, or merged) on chosen evaluations, or re-score saved
generations without a model (as bigcode's ``--load_generations_path``).

Data-parallel under ``torchrun --nproc_per_node N -m loralab eval ...`` (or ``accelerate launch``):
every rank loads the model on its GPU, generates its share of the prompts (``distributed.share``:
prompt i on rank i mod N) and gets every completion back (``merge_shared``); rank 0 prints and
writes the output and generation files. Greedy completions are the one-process completions.

    loralab eval --model ID_OR_PATH [--adapter DIR] --tasks gsm8k,humaneval [--max-samples N]
                 [--output metrics.json] [--generations-out FILE.jsonl]
    loralab eval --tasks gsm8k,humaneval --generations FILE.jsonl --output metrics.json

``--tasks`` takes evaluation names and groups (``commonsense`` = its eight tasks), or GLUE tasks (``glue/sst2``,
...: a call of their own, the dev split scored by a sequence-classification model, an adapter's trained head loaded
with it, ``tasks.glue.score_dev``). The output maps task -> {metric: value, ...} plus ``headline`` (the metric a
table shows) and ``seconds`` (load, generate, score, total); a live run adds ``generation`` (the effective settings:
the source protocol, overridden by every flag given), and a scorer may add ``warnings`` (e.g. code: most programs
do not compile, with the likely cause). Its ``meta_info`` says what was scored (model, adapter with its weights'
sha256, each evaluation's data file or hub split, every flag: ``tasks.eval_output``, whose ``task_metrics`` readers
use). Generation lines are ``{"task", "id", "completion", "prompt"}`` plus the scorer's verdict (``tasks.verdicts``);
``prompt`` (the exact text the completion continues) is optional in a file to re-score, and code builds its programs
from it when present. Re-scoring (``tasks.rescore``) also reads bigcode's generations.json,
honours ``--max-samples``, adds ``coverage`` and warns when problems have no rows.

Every evaluation's data is loaded before the model (``tasks.data_check``; GLUE tasks' dev splits too:
all that are missing named at once with the reason, exit 2). An evaluation that fails later is reported and the others still run (exit 1).
SIGINT/SIGTERM stop the call: the finished evaluations are printed and written with
``interrupted`` {signal, finished, unfinished}, exit 130/143.
"""

from __future__ import annotations

import json
import os
import sys
import time

from loralab.signals import stop_on_signals


def add_arguments(parser):
    parser.add_argument("--tasks", required=True, help="comma-separated evaluations or groups, e.g. gsm8k,math,humaneval,mbpp,commonsense; "
                        "or GLUE tasks alone (glue/sst2,glue/rte: dev split, a classification model)")
    parser.add_argument("--model", help="hub id, local folder, .gguf file or packaged:<name> (not with --generations); "
                        "default with --adapter: the adapter's base_model_name_or_path (packaged:<name> resolved)")
    parser.add_argument("--adapter", help="peft adapter folder to load on top of --model")
    parser.add_argument("--generations", help="re-score saved generations instead of running a model: a JSONL of "
                        "{task, id, completion[, prompt]} rows, or bigcode's generations.json (a list of programs per "
                        "problem, for one code task, as its --load_generations_path)")
    parser.add_argument("--generations-out", help="write the generations with the scorer's verdict on each (answer, "
                        "reference, correct; code: passed, status, error) to this JSONL")
    parser.add_argument("--output", help="write the metrics JSON here (default: print only)")
    parser.add_argument("--max-samples", help="evaluate only the first N problems: N for every task, or per task, e.g. gsm8k=200,mbpp=100")
    parser.add_argument("--data-dir", help="local data folder (layout of shared/data); default $LORALAB_DATA_DIR, else the hub")
    parser.add_argument("--options", default="{}", help='eval options as JSON, e.g. \'{"gsm8k": {"parser": "method_comparison"}}\'')
    parser.add_argument("--max-new-tokens", help="override the source generation length: N for every task, or per task, e.g. gsm8k=64,humaneval=96")
    parser.add_argument("--batch-size", type=int, help="the transformers backend's generation batch (default 16); "
                        "GLUE tasks: rows a forward (default 64)")
    parser.add_argument("--max-length", type=int, help="GLUE tasks: tokens a row is truncated to, as the run's max_length "
                        "(default 128, loralab run's)")
    parser.add_argument("--slots", type=int, help="the engine's slots: sequences decoded together (default 512, fewer when the KV cache budget holds fewer)")
    parser.add_argument("--n-samples", type=int, help="completions per problem (pass@k; give --temperature > 0 too)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy, every task's default unless its source samples)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    parser.add_argument("--top-k", type=int, help="top-k filtering, 0 = off (with --temperature > 0)")
    parser.add_argument("--seed", type=int, help="sampling seed (each prompt and sample draws from its own generator)")
    parser.add_argument("--backend", choices=("auto", "engine", "transformers", "vllm"), default="auto",
                        help="auto: loralab's engine, or transformers for beam search and models the engine does not run")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


GENERATION_FLAGS = ("max_new_tokens", "slots", "n_samples", "temperature", "top_p", "top_k", "seed")
"""The flags that steer generation only: refused beside GLUE tasks, which classify."""


def _glue_problems(args, glue: list[str], others: list[str], options: dict) -> list[str]:
    """What cannot go with GLUE tasks (scored by a sequence-classification model's predictions, ``_run_glue``)."""
    if not glue:
        return []
    shown = ", ".join(glue)
    problems = []
    if others:
        problems.append(f"--tasks mixes {shown} (a sequence-classification model's predictions) with generative "
                        f"evaluations ({', '.join(others)}): score them in separate calls")
    if args.generations:
        problems.append(f"--generations re-scores saved completions; {shown} score a model's predictions: give --model "
                        "or --adapter")
    given = [f"--{k.replace('_', '-')}" for k in GENERATION_FLAGS if getattr(args, k, None) is not None]
    given += ["--generations-out"] * bool(args.generations_out) + [f"--backend {args.backend}"] * (args.backend != "auto")
    if given:
        problems.append(f"{', '.join(given)} steer generation; {shown} classify (--max-samples, --batch-size and "
                        "--max-length apply)")
    problems += [f"--options names {k}, which takes no options" for k in options if k in glue]
    return problems


def _problems(args, names, options) -> list[str]:
    from loralab.tasks.evaluate import expand, validate_options
    from loralab.tasks.glue import TASKS as GLUE

    glue = [n for n in names if n in GLUE]
    others = [n for n in names if n not in GLUE]
    problems = validate_options(others, {k: v for k, v in options.items() if k not in GLUE})
    problems += _glue_problems(args, glue, others, options)
    if args.max_length is not None and (not glue or args.max_length <= 0):
        problems.append(f"--max-length = {args.max_length}: " + ("must be > 0" if glue else "applies to GLUE tasks only"))
    names = expand(others) + glue
    if args.generations and (args.model or args.adapter):
        problems.append("--generations re-scores saved completions: give no --model/--adapter with it")
    if not args.generations and not args.model:
        problems.append("give --model (live run), --adapter whose adapter_config.json names its base model, "
                        "or --generations (re-score)")
    from loralab.merge import residual_base_problem  # a CorDA adapter on the original model is another model
    from loralab.tasks.generation import setting_problems
    problems += [p for p in [getattr(args, "model_from_adapter", False)  # an explicit --model is trusted, as merge's --base
                             and residual_base_problem(args.adapter, args.model, flag="--model")] if p]

    problems += [f"--{name.replace('_', '-')} = {value}: {rule}" for name, value, rule in setting_problems(_flags(args))]
    if not names:
        problems.append(f"--tasks = {args.tasks!r}: name at least one evaluation or group (loralab tasks lists them)")
    if args.backend == "vllm" and not args.generations:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            problems.append("--backend vllm: vLLM is not installed here (pip install vllm); the default engine needs nothing more")
    problems += _per_task_problems("--max-samples", args.max_samples, names)
    problems += _per_task_problems("--max-new-tokens", args.max_new_tokens, names)
    return problems


def _flags(args) -> dict:
    """The generation settings given on the command line (``GenerationSettings`` field -> value)."""
    given = {"batch_size": args.batch_size, "slots": args.slots, "n_samples": args.n_samples, "temperature": args.temperature,
             "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "backend": args.backend}
    return {k: v for k, v in given.items() if v is not None}


def _per_task_problems(flag: str, value: str | None, names: list[str]) -> list[str]:
    """What is wrong with a per-task option (``N`` or ``task=N,...``, see ``parse_max_samples``)."""
    try:
        parsed = parse_max_samples(value, names)
    except ValueError:
        return [f"{flag} = {value!r} must be N or task=N,task=N with N > 0"]
    return ([f"{flag} names '{t}', which is not among --tasks" for t in parsed if t not in names]
            + [f"{flag} for '{t}' = {n} must be > 0" for t, n in parsed.items() if n <= 0])


def parse_max_samples(value: str | None, names: list[str]) -> dict[str, int | None]:
    """``"200"`` -> every task 200; ``"gsm8k=200,mbpp=100"`` -> those two, the rest unlimited.
    (Also parses ``--max-new-tokens``.)"""
    if value is None:
        return {}
    if "=" not in value:
        return {n: int(value) for n in names}
    pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
    return {k.strip(): int(v) for k, v in pairs}


def _load(args):
    from loralab import distributed
    from loralab.merge import quiet_corda_config
    from loralab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "causal_lm", dtype=args.dtype)
    if args.adapter:
        from peft import PeftModel

        with quiet_corda_config():  # a saved CorDA adapter's corda_config is its record, nothing to apply
            model = PeftModel.from_pretrained(model, args.adapter)
    return model.to(distributed.device_for(args.device)).eval(), tokenizer  # cuda: this rank's GPU


def run(args) -> int:
    from loralab import distributed

    if args.generations:  # re-scoring runs no model: one process's work
        return _run(args, main=True)
    launch = distributed.init(args.device)  # one process: nothing happens
    try:
        return _run(args, main=launch.is_main)
    finally:
        distributed.shutdown()


def _run(args, main: bool) -> int:
    """``run``'s body; ``main``: this process prints the metrics and writes the files (rank 0)."""
    from loralab.config import ConfigError
    from loralab.models import Unreachable, adapter_base_id
    from loralab.tasks.data_check import data_problems
    from loralab.tasks.evaluate import expand, run_eval
    from loralab.tasks.rescore import prepare, read_generations, score_job

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.adapter and not args.model and not args.generations:
        args.model, args.model_from_adapter = adapter_base_id(args.adapter), True  # the id the run recorded
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        print(f"error: --options is not valid JSON: {exc}", file=sys.stderr)
        return 2
    problems = _problems(args, names, options)
    if problems:
        print("error: " + "\n  - ".join(["loralab eval has problem(s):"] + problems), file=sys.stderr)
        return 2
    data_dir = args.data_dir or os.environ.get("LORALAB_DATA_DIR")
    from loralab.tasks.glue import TASKS as GLUE

    if names[0] in GLUE:  # GLUE alone (_glue_problems): a classification model's predictions
        return _run_glue(args, names, data_dir, main)
    names = expand(names)
    limits = parse_max_samples(args.max_samples, names)
    missing = data_problems(names, data_dir, limits)  # before any model loads or anything generates
    if missing:
        print("error: " + "\n  - ".join([f"the data of {len(missing)} evaluation(s) cannot be found (nothing was "
                                        "loaded or generated):"] + missing), file=sys.stderr)
        return 2
    if args.generations:  # every bad row named at once, then each task in turn (tasks.rescore)
        try:
            rows, where = read_generations(args.generations, names, data_dir=data_dir, options=options)
            jobs = {job.task: job for job in prepare(rows, where, names, data_dir=data_dir, options=options,
                                                     max_samples=limits, source=f"generations {args.generations}")}
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _each(args, names, lambda name: score_job(jobs[name], options), main=True)
    problem = _not_a_generator(args.model, names)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = _load(args)
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    generation, tokens = _flags(args), parse_max_samples(args.max_new_tokens, names)
    return _each(args, names, lambda name: run_eval(
        name, model, tokenizer, data_dir=data_dir, options=options, max_samples=limits.get(name),
        generation={**generation, **({"max_new_tokens": tokens[name]} if name in tokens else {})}), main)


def _each(args, names: list[str], step, main: bool) -> int:
    """``step(name) -> (metrics, generation rows)`` for each evaluation in turn. One that fails (its data,
    a missing optional package, a setting) is reported and the others still run (exit 1); SIGINT or
    SIGTERM stops, and the finished ones are still printed and written (``_emit``). The rows go to
    ``--generations-out`` after every evaluation, so an interrupted run keeps what it generated."""
    from loralab.tasks.evaluate import write_records

    start, metrics, failed, rows = time.time(), {}, [], []
    with stop_on_signals(raising=_Interrupted) as stop:
        for name in names:
            try:
                metrics[name], recs = step(name)
            except _Interrupted:
                break
            except (ValueError, OSError, ConnectionError, ImportError) as exc:  # Unreachable is a ValueError
                failed.append(name)
                metrics[name] = {"error": _reason(exc)}
                print(f"error: {name}: {_reason(exc)}", file=sys.stderr)
                continue
            rows += recs
            if main:
                print(f"{name}: {json.dumps(metrics[name])}", file=sys.stderr)
                if args.generations_out:
                    write_records(args.generations_out, rows)
    return _emit(args, metrics, failed, start, main, names, stop)


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of an error: a ``ConfigError``'s first problem (``Unreachable``: what, why, the way out)."""
    lines = getattr(exc, "problems", None) or str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0]}" if lines[0] else type(exc).__name__


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during ``loralab eval`` (``signals.stop_on_signals``)."""


def _emit(args, metrics: dict, failed: list[str], start: float, main: bool, names: list[str] = (),
          stop: dict | None = None) -> int:
    """The metrics printed (and written to ``--output``) by the main process; the exit code: 1 if a task
    failed; 128 + the signal's number after SIGINT (130) or SIGTERM (143), the output then holding the
    finished tasks and ``interrupted`` {signal, finished, unfinished}."""
    received = (stop or {}).get("signal")
    if received is not None:
        metrics = {**metrics, "interrupted": {"signal": received.name, "finished": list(metrics),
                                              "unfinished": [n for n in names if n not in metrics]}}
    elif failed and main:
        print(f"error: {len(failed)} of {len(metrics)} evaluation(s) failed ({', '.join(failed)}); "
              "the others are in the output", file=sys.stderr)
    code = 128 + int(received) if received is not None else (1 if failed else 0)
    if not main:
        return code
    from loralab.tasks.eval_output import META_KEY, meta_info_of_call
    metrics[META_KEY] = meta_info_of_call(args, names)  # what was scored: model, adapter, data; rank 0 only
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if received is not None:
        said = metrics["interrupted"]
        print(f"interrupted by {received.name}: finished {', '.join(said['finished']) or 'nothing'}; not finished "
              f"{', '.join(said['unfinished'])}" + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    print(f"done in {time.time() - start:.0f}s", file=sys.stderr)
    return code


def _run_glue(args, names: list[str], data_dir, main: bool) -> int:
    """GLUE tasks' dev splits scored by a sequence-classification model (``--model``, with ``--adapter`` loaded on
    it: its trained head comes with it, peft's ``modules_to_save``), loaded once a task (its label count), then
    ``tasks.glue.score_dev``; prints and writes as the generative path does."""
    from peft import PeftModel

    from loralab import distributed
    from loralab.merge import quiet_corda_config
    from loralab.models import Unreachable, load_model, load_tokenizer
    from loralab.tasks.glue import TASKS as GLUE
    from loralab.tasks.glue import score_dev

    if args.adapter:  # an adapter trained without a classification head would be scored by a random one
        from peft import PeftConfig

        try:
            with quiet_corda_config():
                task_type = PeftConfig.from_pretrained(args.adapter).task_type
        except (ValueError, OSError) as exc:
            print(f"error: --adapter {args.adapter}: no readable adapter_config.json ({exc})", file=sys.stderr)
            return 2
        if task_type != "SEQ_CLS":  # a str, or peft's TaskType (a str enum)
            print(f"error: --adapter {args.adapter}: its task_type is {task_type}, not SEQ_CLS: it holds no trained "
                  f"classification head for {', '.join(names)}", file=sys.stderr)
            return 2
    unreadable = []
    for name in names:  # every dev split read before any model loads, as tasks.data_check does for the others
        try:
            GLUE[name].read("dev", data_dir)
        except (OSError, ValueError) as exc:  # a missing TSV; Unreachable (the hub without --data-dir) is a ValueError
            unreadable.append(f"{name}: {_reason(exc)}")
    for i in [i for i, line in enumerate(unreadable) if ". Work offline" in line][:-1]:  # Unreachable's advice: once
        unreadable[i] = unreadable[i].split(". Work offline")[0]
    if unreadable:
        print("error: " + "\n  - ".join([f"the dev data of {len(unreadable)} GLUE task(s) cannot be read (no model was "
                                        "loaded):"] + unreadable), file=sys.stderr)
        return 2
    start, metrics, failed = time.time(), {}, []
    limits = parse_max_samples(args.max_samples, names)
    try:
        tokenizer = load_tokenizer(args.model)
        with stop_on_signals(raising=_Interrupted) as stop:
            for name in names:
                task = GLUE[name]
                try:
                    model = load_model(args.model, "seq_cls", num_labels=task.num_labels, dtype=args.dtype)
                    if args.adapter:
                        with quiet_corda_config():
                            model = PeftModel.from_pretrained(model, args.adapter)
                    model = model.to(distributed.device_for(args.device)).eval()
                    metrics[name] = score_dev(task, model, tokenizer, data_dir, limits.get(name), args.batch_size,
                                              args.max_length)
                except _Interrupted:
                    break
                except (OSError, RuntimeError) as exc:  # a head of another label count: the others run
                    failed.append(name)
                    metrics[name] = {"error": _reason(exc)}
                    print(f"error: {name} ({task.num_labels} label(s)): {_reason(exc)}", file=sys.stderr)
                if main:
                    print(f"{name}: {json.dumps(metrics[name])}", file=sys.stderr)
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _emit(args, metrics, failed, start, main, names, stop)


def _not_a_generator(model_id: str, names: list[str]) -> str | None:
    """Why ``model_id`` cannot generate (its config names only encoder architectures, e.g. MiniLM's
    ``BertModel``, whose causal-LM head transformers would initialise at random), or None."""
    from loralab.tasks.evaluate import EVALS

    if not any(EVALS[n].output_type == "generate" for n in names):
        return None
    try:
        from transformers import AutoConfig

        from loralab.models import RANDOM_PREFIX, hub_offline_reason, is_hub_id, resolve_model_path

        if model_id.startswith(RANDOM_PREFIX) or (is_hub_id(model_id) and hub_offline_reason()):
            return None  # an unreachable hub model: loading reports it at once, without the config's retries
        architectures = getattr(AutoConfig.from_pretrained(resolve_model_path(model_id)), "architectures", None) or []
    except (OSError, ValueError):
        return None  # not readable here: loading reports it
    generating = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if architectures and not any(a.endswith(generating) for a in architectures):
        return (f"--model {model_id}: its architectures ({', '.join(architectures)}) are not a causal language model, "
                "so generative evaluations would run a randomly initialised LM head")
    return None
