"""Evaluations of causal LMs: the registry (name -> ``Eval``, built from the family files' exports)
and one loop per output type.

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
- ``warnings``: a list of text, only when a scorer has something to say (code: most programs do
  not compile, likely another harness's protocol).

Generation records (``{"task", "id", "completion", "prompt"}``) always hold the exact prompt the
completion continues, so any harness can re-score them; ``score_generations`` hands a record's
``prompt`` to the scorer (code builds its program from it), and takes records without one under
the evaluation's documented default protocol.

Options: ``options`` maps option names to values (a name applies to every selected evaluation that
has it, e.g. ``{"prompt": "seed000"}``), or an evaluation name to that evaluation's own options
(``{"gsm8k": {"parser": "method_comparison"}}``); the latter wins.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

from loralab import distributed
from loralab.tasks import code, commonsense, competition_math, gsm8k, language_modeling, nqopen
from loralab.tasks.base import Eval
from loralab.tasks.metrics import settle
from loralab.tasks.scoring import ScoringPool, score, score_workers  # noqa: F401  (re-exported)

FAMILIES = (gsm8k, competition_math, code, commonsense, nqopen, language_modeling)


def _registry(families) -> dict[str, Eval]:
    out: dict[str, Eval] = {}
    for family in families:
        for ev in family.EVALS:
            if ev.name in out:
                raise ValueError(f"evaluation {ev.name!r} is exported by both {out[ev.name].family} and {ev.family}")
            out[ev.name] = ev
    return out


EVALS: dict[str, Eval] = _registry(FAMILIES)
GROUPS: dict[str, tuple[str, ...]] = {**commonsense.GROUPS}


def expand(names) -> list[str]:
    """Evaluation names with each group replaced by its members; order kept, repeats dropped."""
    out: list[str] = []
    for n in names:
        for member in GROUPS.get(n, (n,)):
            if member not in out:
                out.append(member)
    return out


def _suggest(name, known) -> str:
    from loralab.config import suggest  # config is the floor below tasks

    return suggest(name, known)


def validate_options(names, options: dict | None) -> list[str]:
    """Every problem with evaluation names (groups allowed) and options ("did you mean" for unknown names)."""
    known_names = [*EVALS, *GROUPS]
    problems = [f"evaluation '{n}' is unknown{_suggest(n, known_names)}; known: {', '.join(known_names)}"
                for n in names if n not in EVALS and n not in GROUPS]
    known = expand(n for n in names if n in EVALS or n in GROUPS)
    for key, value in (options or {}).items():
        if key in GROUPS:  # a group's options apply to each of its members
            if not isinstance(value, dict):
                problems.append(f"eval option '{key}' must be a dict of options for {key}'s evaluations, got {value!r}")
                continue
            for member in GROUPS[key]:
                for sub, sub_value in value.items():
                    problems += _check_option(member, sub, sub_value, f"{key}.{sub}")
        elif key in EVALS:
            if not isinstance(value, dict):
                problems.append(f"eval option '{key}' must be a dict of {key}'s options, got {value!r}")
                continue
            for sub, sub_value in value.items():
                problems += _check_option(key, sub, sub_value, f"{key}.{sub}")
        else:
            owners = [n for n in known if key in EVALS[n].options]
            if not owners:
                all_keys = sorted({k for n in known for k in EVALS[n].options})
                problems.append(f"eval option '{key}' is not an option of {', '.join(known) or 'any selected evaluation'}"
                                f"{_suggest(key, all_keys)}; valid: {', '.join(all_keys) or 'none'}")
            for n in owners:
                problems += _check_option(n, key, value, key)
    return problems


def _check_option(name: str, key: str, value, label: str) -> list[str]:
    spec = EVALS[name].options
    if key not in spec:
        return [f"eval option '{label}' is unknown for {name}{_suggest(key, spec)}; valid: {', '.join(spec) or 'none'}"]
    allowed = spec[key][1]
    if allowed is not None and value not in allowed:
        return [f"eval option '{label}' = {value!r} is not allowed for {name}; allowed: {', '.join(map(repr, allowed))}"]
    return []


def resolve_options(name: str, options: dict | None) -> dict:
    """Defaults of ``name``'s options updated by the flat options, then by the options of a group
    holding ``name`` (e.g. ``{"commonsense": {"num_beams": 1}}``), then by ``options[name]``."""
    spec = EVALS[name].options
    resolved = {k: v[0] for k, v in spec.items()}
    options = options or {}
    resolved.update({k: v for k, v in options.items() if k in spec})
    for group, members in GROUPS.items():
        if name in members and isinstance(options.get(group), dict):
            resolved.update(options[group])
    resolved.update((options.get(name) or {}) if isinstance(options.get(name), dict) else {})
    return resolved


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


# ----------------------------------------------------------------------------- the loops


def run_eval(name, model, tokenizer, *, data_dir=None, generation=None, options=None, max_samples=None, out_dir=None):
    """Evaluate an in-memory model; returns (metrics, generation records ``{"task", "id", "completion", "prompt"}``).

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
    with ScoringPool(ev, items, opts) as pool:
        # a test may replace ``generate`` with one that has no on_complete
        params = inspect.signature(gen.generate).parameters
        engine_stats: dict = {}
        extra = {"on_complete": pool.submit} if "on_complete" in params else {}
        extra.update({"stats": engine_stats} if "stats" in params else {})
        outputs = gen.generate(model, tokenizer, prompts, settings, progress=f"{ev.name} generation", **extra)
        t2 = time.perf_counter()
        for i, outs in enumerate(outputs):  # no-op for what on_complete already handed over unchanged
            pool.submit(i, outs)
        if ev.pool is not None:  # sandboxes / math-verify may still be running: say what the wait is
            gen.note(f"scoring {len(items)} problems ({ev.pool} pool of {pool.workers})", f"{ev.name} generation")
        metrics = pool.result()
        t3 = time.perf_counter()  # the pool's shutdown counts in total only
    records = [{"task": ev.name, "id": p["id"], "completion": c, "prompt": prompt}
               for p, prompt, outs in zip(items, prompts, outputs) for c in outs]
    metrics["generation"] = generation_record(settings, model)
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


def score_generations(records, *, data_dir=None, options=None) -> dict[str, dict]:
    """Re-score saved generations without a model (bigcode's ``--load_generations_path``).

    Each task is scored on exactly the problems that have records, so re-scoring a run made with
    ``max_samples`` gives the live numbers. A record's ``prompt`` (the exact text its completion
    continues) is handed to the scorer; records without one follow the evaluation's default.
    Returns task -> metrics (numbers, ``headline``, ``seconds`` {load, score, total}, ``warnings``)."""
    by_task: dict[str, dict] = {}
    prompts: dict[str, dict] = {}
    for r in records:
        by_task.setdefault(r["task"], {}).setdefault(str(r["id"]), []).append(r["completion"])
        prompts.setdefault(r["task"], {}).setdefault(str(r["id"]), []).append(r.get("prompt"))
    problems = validate_options(list(by_task), options)
    problems += [f"evaluation '{t}' has no saved generations to score (it runs on a model)"
                 for t in by_task if t in EVALS and not EVALS[t].scores_generations]
    if problems:
        from loralab.config import ConfigError

        raise ConfigError(problems, "generations file")
    results = {}
    for task, completions in by_task.items():
        t0 = time.perf_counter()
        ev, opts = EVALS[task], resolve_options(task, options)
        items = {str(p["id"]): p for p in ev.load(task, data_dir, None)}
        missing = sorted(set(completions) - set(items))
        if missing:
            raise ValueError(f"{task}: {len(missing)} generation id(s) not in the dataset, e.g. {missing[:3]}")
        chosen = []
        for i in items:
            if i in completions:
                given = prompts[task][i]
                chosen.append({**items[i], "prompts": given} if any(g is not None for g in given) else items[i])
        t1 = time.perf_counter()
        results[task] = score(ev, chosen, {p["id"]: completions[str(p["id"])] for p in chosen}, opts)
        t2 = time.perf_counter()
        results[task]["headline"] = ev.headline
        results[task]["seconds"] = {"load": t1 - t0, "score": t2 - t1, "total": t2 - t0}
        _warn(results[task])
    return results


def read_records(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_records(path, records) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
