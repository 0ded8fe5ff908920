"""Tasks: what a model trains on and how it is scored, one file per family.

Training tasks, one line each in ``TASKS``: ``glue`` (GLUE classification/regression) and
``instruct`` (SFT of causal LMs, templates in ``instruct_templates``). Evaluations of causal LMs,
one line each in ``evaluations.EVALS``: ``gsm8k``, ``competition_math`` (MATH, MATH-500), ``code``
(HumanEval, MBPP), ``commonsense``, ``nqopen``, ``language_modeling`` + ``perplexity`` (corpora).
What they share sits beside them: ``numeric`` (one reader of numeric answers), ``generation``
(batched generation, two backends) and ``sandbox`` (running generated programs). Nothing here
imports ``loralab.train``; a training task's ``evaluate`` runs the evaluations by name.

A training task turns raw data into tokenized training features and scores a model on its
evaluation split. The runner knows nothing else about it. The contract (a Protocol, no base class):

- ``name``: the registry key, e.g. ``glue/rte``.
- ``kind``: ``"seq_cls"`` (AutoModelForSequenceClassification; ``num_labels`` 1 = regression) or
  ``"causal_lm"`` (AutoModelForCausalLM; features carry ``labels`` with -100 on masked tokens).
- ``check(params) -> list[str]``: problems found without loading anything heavy (missing files).
- ``load(params, tokenizer) -> TaskData``: tokenized train features (each a dict of python lists:
  ``input_ids``, ``attention_mask``, ``labels``), evaluation records, and provenance.
- ``evaluate(model, tokenizer, data, params, out_dir) -> dict[str, float]``: the task's metrics,
  a flat name -> number dict. ``out_dir`` (may be None) receives e.g. generations.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from loralab.tasks import glue, instruct

TASKS: dict[str, Any] = {
    **glue.TASKS,
    **instruct.TASKS,
}


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    """Tokenized training features."""
    eval: list[dict[str, Any]]
    """Evaluation records (tokenized features for classification; raw problems for generation)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Dataset ids/revisions or local file sha256s, for the result's meta_info."""


class Task(Protocol):
    name: str
    kind: str
    num_labels: int

    def check(self, params) -> list[str]: ...

    def load(self, params, tokenizer) -> TaskData: ...

    def evaluate(self, model, tokenizer, data: TaskData, params, out_dir) -> dict[str, float]: ...


def get_task(name: str):
    from loralab.config import ConfigError, suggest

    if name not in TASKS:
        raise ConfigError([f"'task' = {name!r} is unknown{suggest(name, TASKS)}; known: {', '.join(sorted(TASKS))}"])
    return TASKS[name]
