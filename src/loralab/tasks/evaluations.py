"""Evaluations of causal LMs: one module per family, one line per evaluation in ``EVALS``.

A generative evaluation module provides (all take the evaluation ``name`` first, so one module can
serve several names):

- ``OPTIONS``: option name -> (default, allowed values or None);
- ``load(name, data_dir, max_samples) -> list[dict]``: problems, each with an ``id`` (the dataset's
  own id where it has one: HumanEval/MBPP ``task_id``, MATH ``unique_id``; else the 0-based row);
- ``build_prompt(name, problem, options) -> str`` and ``source_generation(name, options) -> dict``
  (the source's decoding protocol: ``max_new_tokens``, ``stop``, ``temperature``, ...);
- ``score(name, problems, completions, options) -> dict``, ``completions`` mapping id -> [str]; a
  problem may carry ``prompts`` (one per completion, None where unknown: the text that completion
  continues, from saved generation rows), which a scorer that rebuilds the model's input uses.

A module with ``run(name, model, tokenizer, ...)`` (perplexity, lm-eval) is called instead.

Generation settings, in increasing precedence:
1. ``GenerationSettings`` defaults (``loralab.tasks.generation``);
2. the evaluation's source protocol (e.g. GSM8K: 1,024 new tokens and CorDA's stop strings; code:
   512 tokens prompt included; commonsense: 4-beam search, 32 tokens);
3. the ``generation`` dict (``TrainingParameters.generation``, or the command line): every key
   whose value is not None wins, whatever its value (issue 12: an explicit ``max_new_tokens: 512``
   used to be ignored because 512 was also loralab's default). None means "the source's". An
   explicit ``max_new_tokens`` also lifts a source's prompt-inclusive ``max_length`` (code: 512),
   so the explicit budget is the budget.
The effective settings go into the result: ``run_eval``'s metrics hold them under ``generation``
(``generation_record``).

Generation records (``{"task", "id", "completion", "prompt"}``) always hold the exact prompt the
completion continues, so any harness can re-score them; ``score_generations`` hands a record's
``prompt`` to the scorer (code builds its program from it), and takes records without one under
the evaluation's documented default protocol.

Non-numeric parts of a result: ``generation`` (a dict) and ``warnings`` (a list of text, only when
a scorer has something to say, e.g. code: most programs do not compile, likely another harness's
protocol). ``numeric(metrics)`` keeps the numbers.

Options: ``options`` maps option names to values (a name applies to every selected evaluation that
has it, e.g. ``{"prompt": "seed000"}``), or an evaluation name to that evaluation's own options
(``{"gsm8k": {"parser": "method_comparison"}}``); the latter wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralab.tasks import code, commonsense, competition_math, gsm8k, language_modeling, nqopen

EVALS = {
    "gsm8k": gsm8k,
    "math": competition_math,
    "math500": competition_math,
    "humaneval": code,
    "mbpp": code,
    "mbpp_sanitized": code,
    "boolq": commonsense,
    "piqa": commonsense,
    "social_i_qa": commonsense,
    "hellaswag": commonsense,
    "winogrande": commonsense,
    "ARC-Easy": commonsense,
    "ARC-Challenge": commonsense,
    "openbookqa": commonsense,
    "nq_open": nqopen,
    "nq_open_lm_eval": nqopen,
    "triviaqa_lm_eval": nqopen,
    "wikitext2": language_modeling,
    "ptb": language_modeling,
}


def _suggest(name, known) -> str:
    from loralab.config import suggest

    return suggest(name, known)


def validate_options(names, options: dict | None) -> list[str]:
    """Every problem with evaluation names and options (unknown names get "did you mean")."""
    problems = [f"evaluation '{n}' is unknown{_suggest(n, EVALS)}; known: {', '.join(EVALS)}" for n in names if n not in EVALS]
    known = [n for n in names if n in EVALS]
    for key, value in (options or {}).items():
        if key in EVALS:
            if not isinstance(value, dict):
                problems.append(f"eval option '{key}' must be a dict of {key}'s options, got {value!r}")
                continue
            for sub, sub_value in value.items():
                problems += _check_option(key, sub, sub_value, f"{key}.{sub}")
        else:
            owners = [n for n in known if key in EVALS[n].OPTIONS]
            if not owners:
                all_keys = sorted({k for n in known for k in EVALS[n].OPTIONS})
                problems.append(f"eval option '{key}' is not an option of {', '.join(known) or 'any selected evaluation'}"
                                f"{_suggest(key, all_keys)}; valid: {', '.join(all_keys) or 'none'}")
            for n in owners:
                problems += _check_option(n, key, value, key)
    return problems


def _check_option(name: str, key: str, value, label: str) -> list[str]:
    spec = EVALS[name].OPTIONS
    if key not in spec:
        return [f"eval option '{label}' is unknown for {name}{_suggest(key, spec)}; valid: {', '.join(spec) or 'none'}"]
    allowed = spec[key][1]
    if allowed is not None and value not in allowed:
        return [f"eval option '{label}' = {value!r} is not allowed for {name}; allowed: {', '.join(map(repr, allowed))}"]
    return []


def resolve_options(name: str, options: dict | None) -> dict:
    """Defaults of ``name``'s module updated by the flat options, then by ``options[name]``."""
    spec = EVALS[name].OPTIONS
    resolved = {k: v[0] for k, v in spec.items()}
    options = options or {}
    resolved.update({k: v for k, v in options.items() if k in spec})
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


def generation_record(settings) -> dict:
    """The settings as recorded in a result, with ``backend`` resolved (``auto`` -> what ran)."""
    from dataclasses import asdict

    from loralab.tasks.generation import resolve_backend

    return {**asdict(settings), "backend": resolve_backend(settings.backend)}


def numeric(metrics: dict) -> dict[str, float]:
    """Only the numbers of a result (what a training run's flat metric dict holds)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_eval(name, model, tokenizer, *, data_dir=None, generation=None, options=None, max_samples=None, out_dir=None):
    """Evaluate an in-memory model; returns (metrics, generation records ``{"task", "id", "completion", "prompt"}``).

    Generative evaluations add the effective settings (``metrics["generation"]``, see
    ``generation_record``). With ``out_dir``, the records are also written to
    ``out_dir/<name>.generations.jsonl``."""
    problems = validate_options([name], options)
    if problems:
        from loralab.config import ConfigError

        raise ConfigError(problems, "evaluation options")
    module, opts = EVALS[name], resolve_options(name, options)
    if name in getattr(module, "LM_EVAL_TASKS", {}):
        return module.run_lm_eval(name, model, tokenizer, generation=generation or {}, max_samples=max_samples)
    if hasattr(module, "run"):
        return module.run(name, model, tokenizer, data_dir=data_dir, options=opts, generation=generation, max_samples=max_samples)
    from loralab.tasks.generation import generate

    items = module.load(name, data_dir, max_samples)
    settings = generation_settings(name, generation, opts)
    prompts = [module.build_prompt(name, p, opts) for p in items]
    outputs = generate(model, tokenizer, prompts, settings, progress=f"{name} generation")
    completions = {p["id"]: outs for p, outs in zip(items, outputs)}
    records = [{"task": name, "id": p["id"], "completion": c, "prompt": prompt}
               for p, prompt, outs in zip(items, prompts, outputs) for c in outs]
    metrics = module.score(name, items, completions, opts)
    metrics["generation"] = generation_record(settings)
    _warn(metrics)
    if out_dir is not None:
        write_records(Path(out_dir) / f"{name}.generations.jsonl", records)
    return metrics, records


def _warn(metrics: dict) -> None:
    import sys

    for text in metrics.get("warnings", []):
        print(f"warning: {text}", file=sys.stderr)


def score_generations(records, *, data_dir=None, options=None) -> dict[str, dict]:
    """Re-score saved generations without a model (bigcode's ``--load_generations_path``).

    Each task is scored on exactly the problems that have records, so re-scoring a run made with
    ``max_samples`` gives the live numbers. A record's ``prompt`` (the exact text its completion
    continues) is handed to the scorer; records without one follow the evaluation's default."""
    by_task: dict[str, dict] = {}
    prompts: dict[str, dict] = {}
    for r in records:
        by_task.setdefault(r["task"], {}).setdefault(str(r["id"]), []).append(r["completion"])
        prompts.setdefault(r["task"], {}).setdefault(str(r["id"]), []).append(r.get("prompt"))
    problems = validate_options(list(by_task), options)
    problems += [f"evaluation '{t}' has no saved generations to score (it runs on a model)"
                 for t in by_task if t in EVALS and not hasattr(EVALS[t], "score")]
    if problems:
        from loralab.config import ConfigError

        raise ConfigError(problems, "generations file")
    results = {}
    for task, completions in by_task.items():
        module, opts = EVALS[task], resolve_options(task, options)
        items = {str(p["id"]): p for p in module.load(task, data_dir, None)}
        missing = sorted(set(completions) - set(items))
        if missing:
            raise ValueError(f"{task}: {len(missing)} generation id(s) not in the dataset, e.g. {missing[:3]}")
        chosen = []
        for i in items:
            if i in completions:
                given = prompts[task][i]
                chosen.append({**items[i], "prompts": given} if any(g is not None for g in given) else items[i])
        results[task] = module.score(task, chosen, {p["id"]: completions[str(p["id"])] for p in chosen}, opts)
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
