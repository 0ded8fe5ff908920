"""Evaluations of causal LMs: one loop per output type, over the registry (name -> ``Eval``, built
from the family files' exports, ``registry``; its names are importable from here too).

Families and what they export (``EVALS``, a tuple of ``base.Eval`` records; groups in ``GROUPS``):
``gsm8k``; ``competition_math`` (math, math500); ``code`` (humaneval, mbpp, mbpp_sanitized);
``commonsense`` (the eight tasks and the group ``commonsense``); ``nqopen`` (nq_open; the lm-eval
bridges nq_open_lm_eval, triviaqa_lm_eval); ``language_modeling`` (wikitext2, ptb). A new
evaluation is a record in its family file; a new family is one more entry in ``FAMILIES``.
A group name (``commonsense``) stands for its members wherever evaluation names are given.

Loops (``run_eval`` picks by ``Eval.output_type``):
- ``generate``: load problems -> build prompts -> ``generation.generate`` -> score. Each prompt's
  completions go to the scorer as soon as the generator reports them (``on_complete``), so
  expensive scoring (code execution, math-verify) runs in a pool while the GPU keeps generating;
  prompts the generator did not report (a generator without ``on_complete``, another rank's share
  under DDP) are scored from the returned outputs. Per-problem scores are aggregated in problem
  order, so the metrics equal whole-list scoring (``Eval.score``) exactly.
- ``perplexity`` and ``lm_eval``: the family's ``run`` on the model (windowed NLL; lm-eval's task).
- ``classify`` has no record here yet: GLUE classification is its training task's ``evaluate``.

Generation settings, in increasing precedence:
1. ``GenerationSettings`` defaults (``loralab.tasks.generation``);
2. the evaluation's source protocol (e.g. GSM8K: 1,024 new tokens and CorDA's stop strings; code:
   512 tokens prompt included; commonsense: 4-beam search, 32 tokens);
3. the ``generation`` dict (``TrainingParameters.generation``, or the command line): every key
   whose value is not None wins, whatever its value (issue 12). None means "the source's". An
   explicit ``max_new_tokens`` also lifts a source's prompt-inclusive ``max_length`` (code: 512),
   so the explicit budget is the budget.

A result (``run_eval``'s metrics) holds numbers plus these non-numeric keys, which ``numeric``
drops (so a training record's flat ``eval`` holds only numbers):
- ``headline``: the name of the metric a table shows (``accuracy``, ``pass@1``, ``exact_match``,
  ``perplexity``); the report reads it instead of guessing;
- ``seconds``: wall-clock seconds of the evaluation, ``{"load", "generate", "score", "total"}`` for
  generate (``load``: problems and prompts; ``generate``: the generation call, scoring of reported
  prompts overlapping it; ``score``: from the end of generation until the metrics were ready),
  ``{"total"}`` for the others; kept out of the numbers because it is not a property of the model;
- ``generation``: the effective settings (``generation_record``), generate only;
- ``finish_reasons``: generate only, the rows per ``finish_reason`` (``{"stop", "length"[, "unknown"]}``,
  every sample counted): ``length`` is the number of rows cut off at the token budget;
- ``warnings``: a list of text, only when a scorer has something to say (code: most programs do
  not compile, with the likely cause: cut off at the token budget, or another harness's protocol).

Generation records (``{"task", "id", "completion", "prompt"}``, why the completion ended, ``finish``:
``finish_reason`` "stop"/"length", ``stop_reason``, ``new_tokens``, plus the scorer's verdict on that
completion, ``verdicts``: ``answer``/``reference``/``correct``, or code's ``passed``/``status``/``error``)
always hold the exact prompt the completion continues, so any harness can re-score them, and each
number can be checked row by row. ``rescore`` (``score_generations``, ``loralab eval --generations``)
hands a record's ``prompt`` to the scorer (code builds its program from it), takes records without
one under the evaluation's documented default protocol, and computes the verdicts again.

Options (``registry``): ``options`` maps option names to values (a name applies to every selected
evaluation that has it, e.g. ``{"prompt": "seed000"}``), or an evaluation name to that evaluation's
own options (``{"gsm8k": {"parser": "method_comparison"}}``); the latter wins.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

from loralab import distributed
from loralab.tasks.base import Eval
from loralab.tasks.finish import UNKNOWN, at_budget, finish_counts
from loralab.tasks.metrics import settle
from loralab.tasks.registry import (  # noqa: F401  (re-exported: the registry's home was this module)
    EVALS,
    FAMILIES,
    GROUPS,
    expand,
    resolve_options,
    validate_options,
)
from loralab.tasks.rescore import read_records, score_generations  # noqa: F401  (re-exported)
from loralab.tasks.scoring import ScoringPool, score, score_workers  # noqa: F401  (re-exported)
from loralab.tasks.verdicts import recording, verdicts


def generation_settings(name: str, generation: dict | None, options: dict):
    """The effective ``GenerationSettings`` (see the module docstring for the precedence)."""
    from loralab.tasks.generation import GenerationSettings

    settings = dict(EVALS[name].source_generation(name, options))
    explicit = {k: v for k, v in (generation or {}).items() if v is not None}
    if "max_new_tokens" in explicit:
        settings["max_length"] = None
    settings.update(explicit)
    return GenerationSettings(**settings)


def generation_record(settings, model=None) -> dict:
    """The settings as recorded in a result, with ``backend`` resolved for ``model`` (``auto`` -> what
    ran: the engine, or transformers for beam search and models the engine does not run)."""
    from dataclasses import asdict

    from loralab.tasks.generation import auto_reason, resolve_backend

    backend = resolve_backend(settings.backend, model, settings)
    # each backend's own knobs only: batch_size is the transformers backend's, slots/memory the engine's
    unused = {"engine": ("batch_size",), "transformers": ("slots", "memory_fraction"),
              "vllm": ("batch_size", "slots", "memory_fraction")}[backend]
    record = {k: v for k, v in asdict(settings).items() if k not in unused}
    record["backend"] = backend
    if settings.backend == "auto" and backend != "engine":
        record["backend_reason"] = auto_reason(model, settings)
    return record


def numeric(metrics: dict) -> dict[str, float]:
    """Only the numbers of a result (what a training run's flat metric dict holds)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


COUNTS = ("n", "programs", "failed", "timed_out", "reruns", "not_compiling", "rows", "windows", "windows_total", "tokens")
"""Metrics that count things (problems, programs, rows): whole numbers, whatever a record stored them as."""


def format_metric(key: str, value) -> str:
    """A metric for a summary line (``gsm8k/accuracy=0.1000 humaneval/programs=4``): a count (an int,
    or a metric named in ``COUNTS``, also as ``<evaluation>/<name>``, holding a whole number) as an
    integer, any other number to four decimals, anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (key.rpartition("/")[2] in COUNTS and float(value).is_integer()):
        return str(int(value))
    return f"{value:.4f}"


# ----------------------------------------------------------------------------- the loops


def run_eval(name, model, tokenizer, *, data_dir=None, generation=None, options=None, max_samples=None, out_dir=None):
    """Evaluate an in-memory model; returns (metrics, generation records ``{"task", "id", "completion", "prompt"}``
    with the scorer's verdict on each completion, ``verdicts``).

    ``metrics`` holds the numbers plus ``headline``, ``seconds`` and, for generate, ``generation``
    (see the module docstring). With ``out_dir``, the records are also written to
    ``out_dir/<name>.generations.jsonl``. Raises ``ConfigError`` listing every bad name or option."""
    problems = validate_options([name], options)
    if not problems and name not in EVALS:
        problems = [f"'{name}' is a group of evaluations ({', '.join(GROUPS[name])}); run_eval takes one evaluation"]
    if problems:
        from loralab.config import ConfigError

        raise ConfigError(problems, "evaluation options")
    ev, opts = EVALS[name], resolve_options(name, options)
    if ev.output_type not in LOOPS:
        raise ValueError(f"evaluation {name!r} has output type {ev.output_type!r}, which runs as its training task's evaluate")
    start = time.perf_counter()
    metrics, records, seconds = LOOPS[ev.output_type](ev, model, tokenizer, opts, data_dir=data_dir,
                                                     generation=generation, max_samples=max_samples)
    # one rule for degenerate scores (NaN, infinity: e.g. an lm-eval bridge's), loralab.tasks.metrics
    metrics = settle(metrics)
    metrics["headline"] = ev.headline
    metrics["seconds"] = {**seconds, "total": time.perf_counter() - start}
    _warn(metrics)
    if out_dir is not None and ev.output_type == "generate":
        write_records(Path(out_dir) / f"{name}.generations.jsonl", records)
    return metrics, records


def _generate_loop(ev: Eval, model, tokenizer, opts: dict, *, data_dir, generation, max_samples):
    from loralab.tasks import generation as gen  # the module, so a replaced ``generate`` is the one called

    t0 = time.perf_counter()
    items = ev.load(ev.name, data_dir, max_samples)
    settings = generation_settings(ev.name, generation, opts)
    prompts = [ev.build_prompt(ev.name, p, opts) for p in items]
    t1 = time.perf_counter()
    extra: dict[int, dict] = {}  # what the scorer learns once generation is done: each row's prompt, budget hits
    finish: list = []  # why each completion ended, [prompt][sample] (the generator fills it)
    recorded, outcomes = recording(ev, extra)
    with ScoringPool(recorded, items, opts) as pool:
        # a test may replace ``generate`` with one that has no on_complete
        params = inspect.signature(gen.generate).parameters
        engine_stats: dict = {}
        call = {"on_complete": pool.submit} if "on_complete" in params else {}
        call.update({"stats": engine_stats} if "stats" in params else {})
        call.update({"finish": finish} if "finish" in params else {})
        outputs = gen.generate(model, tokenizer, prompts, settings, progress=f"{ev.name} generation", **call)
        t2 = time.perf_counter()
        for i, outs in enumerate(outputs):  # no-op for what on_complete already handed over unchanged
            pool.submit(i, outs)
        if len(finish) != len(outputs):  # a generator that does not say (a test's stand-in)
            finish[:] = [[dict(UNKNOWN) for _ in outs] for outs in outputs]
        # code's "cut off at the budget" warning counts the rows that say "length"
        budget = [at_budget(f) for f in finish]
        extra.update({i: {"prompts": [prompt] * len(outs), **({"at_budget": budget[i]} if budget[i] is not None else {})}
                      for i, (prompt, outs) in enumerate(zip(prompts, outputs))})
        if ev.pool is not None:  # sandboxes / math-verify may still be running: say what the wait is
            gen.note(f"scoring {len(items)} problems ({ev.pool} pool of {pool.workers})", f"{ev.name} generation")
        metrics = pool.result()
        t3 = time.perf_counter()  # the pool's shutdown counts in total only
    records = [{"task": ev.name, "id": p["id"], "completion": c, "prompt": prompt, **ended, **verdict}
               for p, prompt, outs, ends, outcome in zip(items, prompts, outputs, finish, outcomes)
               for c, ended, verdict in zip(outs, ends, verdicts(ev, p, outs, outcome, opts))]
    metrics["generation"] = generation_record(settings, model)
    metrics["finish_reasons"] = finish_counts(records)
    counters = {k: v for k, v in engine_stats.items() if isinstance(v, (int, float, bool))}
    ranks = _every_rank(counters)
    if len(ranks) > 1 and any(ranks):  # data-parallel: each rank's counters, new tokens summed (nested: not a score)
        metrics["engine_ranks"] = {"world_size": len(ranks), "new_tokens": sum(r.get("new_tokens", 0) for r in ranks),
                                   "per_rank": ranks}
    elif counters:  # what the engine did: problems, new tokens, slots, steps, seconds
        metrics["engine"] = counters
    return metrics, records, {"load": t1 - t0, "generate": t2 - t1, "score": t3 - t2}


def _every_rank(counters: dict) -> list[dict]:
    """Every rank's ``counters`` in rank order when the ranks split the prompts (DDP: a collective,
    every rank calls it, with or without counters); ``[counters]`` otherwise (one process, FSDP)."""
    if not distributed.splits_work():
        return [counters]
    return distributed.gather_in_order(lambda mine: [counters for _ in mine], list(range(distributed.current().world_size)))


def _run_loop(ev: Eval, model, tokenizer, opts: dict, *, data_dir, generation, max_samples):
    """Perplexity (the family's windowed NLL) and the lm-eval bridge: the family's ``run``."""
    metrics = ev.run(ev.name, model, tokenizer, data_dir=data_dir, options=opts, generation=generation or {},
                     max_samples=max_samples)
    return dict(metrics), [], {}


LOOPS = {"generate": _generate_loop, "perplexity": _run_loop, "lm_eval": _run_loop}


def _warn(metrics: dict) -> None:
    for text in metrics.get("warnings", []):
        print(f"warning: {text}", file=sys.stderr)


def write_records(path, records) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")

