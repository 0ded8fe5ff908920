"""Tasks: what a model trains on and how it is scored, one file per family.

Training tasks, one line each in ``TASKS``: ``glue`` (GLUE classification/regression) and
``instruct`` (SFT of causal LMs, templates in ``instruct_templates``). Evaluations of causal LMs,
one ``base.Eval`` record each, exported by their family file (``EVALS``) and gathered with one loop
per output type in ``evaluate``: ``gsm8k``, ``competition_math`` (MATH, MATH-500), ``code``
(HumanEval, MBPP), ``commonsense``, ``nqopen``, ``language_modeling`` (its corpora's files in
``corpora``, the scoring in ``perplexity``).
What they share sits beside them: ``base`` (the records), ``numeric`` (one reader of numeric
answers), ``generation`` (batched generation) and ``sandbox`` (running generated programs).
Nothing here imports a floor above (run, train, bench, report, commands); a training task's
``evaluate`` runs the evaluations by name.

A training task turns raw data into tokenized training features and scores a model on its
evaluation split. The runner knows nothing else about it. The contract (a Protocol, no base class):

- ``name``: the registry key, e.g. ``glue/rte``.
- ``kind``: ``"seq_cls"`` (AutoModelForSequenceClassification; ``num_labels`` 1 = regression) or
  ``"causal_lm"`` (AutoModelForCausalLM; features carry ``labels`` with -100 on masked tokens).
- ``check(params) -> list[str]``: problems found without loading anything heavy (missing files).
- ``load(params, tokenizer) -> TaskData``: tokenized train features (each a dict of python lists:
  ``input_ids``, ``attention_mask``, ``labels``), evaluation records, and provenance (whose
  ``headline`` names the metric of ``evaluate``'s output that a report table shows).
- ``evaluate(model, tokenizer, data, params, out_dir) -> dict[str, float]``: the task's metrics,
  a flat name -> number dict. ``out_dir`` (may be None) receives e.g. generations.jsonl.
"""

from __future__ import annotations

import functools
from typing import Any

from loralab.tasks.base import Task, TaskData  # noqa: F401  (the records live in base; imported here by name)


@functools.cache
def _training_tasks() -> dict[str, Any]:
    """name -> training task (``TASKS``). Built on first use, not at import: a scoring worker process
    that imports one evaluation family then pays no torch import (glue's)."""
    from loralab.tasks import glue, instruct

    return {**glue.TASKS, **instruct.TASKS}


def __getattr__(name: str):
    if name == "TASKS":
        return _training_tasks()
    raise AttributeError(f"module 'loralab.tasks' has no attribute {name!r}")


def get_task(name: str):
    from loralab.config import ConfigError, suggest

    tasks = _training_tasks()
    if name not in tasks:
        raise ConfigError([f"'task' = {name!r} is unknown{suggest(name, tasks)}; known: {', '.join(sorted(tasks))}"])
    return tasks[name]
