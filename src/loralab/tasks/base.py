"""The records of the task namespace: ``TaskData`` and ``Task`` (what a training task provides) and
``Eval`` (one evaluation: what a family file exports, one record per evaluation name).

An evaluation is one declarative unit, as an lm-eval task is: its name, its family (the file that
defines it), how its output is produced (``output_type``), where its data lives (``source``: the
file under the data folder its loader opens, and the hub copy used without one), its options, its
prompt and source generation protocol, its scorer and its headline metric.
``loralab.tasks.evaluate`` runs any record with the loop of its output type; nothing there asks a
module what it happens to define.

Scoring is split in two so that it can run beside generation (``loralab.tasks.evaluate``):
``score_problem(name, problem, completions, options)`` judges one problem from its completions
(a picklable outcome, computed in a worker as soon as that problem's completions exist), and
``aggregate(name, problems, outcomes, options)`` turns the outcomes, in problem order, into the
metrics. ``Eval.score`` composes the two serially: scoring in the pool and scoring here give the
same numbers by construction, and ``tests/test_scoring_pool.py`` checks it on real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

OUTPUT_TYPES = ("generate", "classify", "perplexity", "lm_eval")
"""``generate``: prompts -> completions -> per-problem scores (GSM8K, MATH, code, commonsense,
NQ-open). ``classify``: logits of a classification head over tokenized features (GLUE; run by the
training task itself, ``tasks.glue``, no ``Eval`` record yet). ``perplexity``: token NLL over a
corpus. ``lm_eval``: the lm-eval harness's own task on the in-memory model."""
POOLS = (None, "process", "thread")
"""Where ``score_problem`` runs while generation goes on: None = in this process after
generation (cheap scorers: regular expressions, under 0.1 s for a whole test set); ``process`` =
a spawn ``ProcessPoolExecutor`` (CPU-bound Python: math-verify and sympy, ~10 ms per problem);
``thread`` = threads that each wait on a subprocess (code: every program already runs in its own
sandbox process, so a process pool would only nest another interpreter around it)."""


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    """Tokenized training features."""
    eval: list[dict[str, Any]]
    """Evaluation records (tokenized features for classification; raw problems for generation)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Dataset ids/revisions or local file sha256s, for the result's meta_info. ``headline``
    (a string) names the metric of the task's ``evaluate`` output that the report shows."""


class Task(Protocol):
    name: str
    kind: str
    num_labels: int

    def check(self, params) -> list[str]: ...

    def load(self, params, tokenizer) -> TaskData: ...

    def evaluate(self, model, tokenizer, data: TaskData, params, out_dir) -> dict[str, float]: ...


def eval_count(task, data: TaskData, params) -> int:
    """How many examples or problems the run's final evaluation scores (for the opening line): the
    task's own ``eval_count(data, params)`` where it has one (SFT tasks, whose generative problems
    load at evaluation time, so ``data.eval`` is empty; ``eval_tasks: []`` gives 0), else
    ``len(data.eval)`` (classification: the tokenized evaluation features)."""
    count = getattr(task, "eval_count", None)
    return int(count(data, params)) if count is not None else len(data.eval)


@dataclass(frozen=True)
class Source:
    """Where an evaluation's data comes from, declared once in its family file: the loader opens
    ``path(data_dir)``; ``tasks.data_check`` names both places when loading fails, and
    ``decomposition.overlap`` matches calibration text against ``local``."""

    local: str
    """The file under the data folder that the loader opens (relative, ``/``-separated)."""
    hub: str
    """What stands in without a data folder (hub dataset, config, split), as messages name it."""

    def path(self, data_dir) -> Path:
        """``data_dir / local``: the one file the loader opens in the data folder ``data_dir``."""
        return Path(data_dir) / self.local


@dataclass(frozen=True)
class Eval:
    """One evaluation. Callables take the evaluation ``name`` first, so one family function can
    serve several records (``code.load`` serves humaneval, mbpp and mbpp_sanitized)."""

    name: str
    family: str
    """The family file that exports this record (``gsm8k``, ``code``, ...)."""
    output_type: str
    """One of ``OUTPUT_TYPES``."""
    headline: str
    """The metric a table shows for this evaluation (``accuracy``, ``pass@1``, ``perplexity``)."""
    options: dict = field(default_factory=dict)
    """Option name -> (default, allowed values or None for any)."""
    load: Callable | None = None
    """``(name, data_dir, max_samples) -> list[dict]``: problems, each with an ``id`` (the
    dataset's own id where it has one, else the 0-based row). Generate only."""
    build_prompt: Callable | None = None
    """``(name, problem, options) -> str``: the exact text the model continues."""
    source_generation: Callable | None = None
    """``(name, options) -> dict``: the source's decoding protocol (``GenerationSettings`` keys)."""
    score_problem: Callable | None = None
    """``(name, problem, completions: list[str], options) -> outcome``: one problem judged
    (completions may be empty: the problem counts as failed). A module-level function with
    picklable arguments and result, so a spawn process pool can run it."""
    aggregate: Callable | None = None
    """``(name, problems, outcomes, options) -> dict``: metrics from the outcomes in problem order."""
    pool: str | None = None
    """One of ``POOLS``: where ``score_problem`` runs during generation."""
    run: Callable | None = None
    """Perplexity / lm_eval: ``(name, model, tokenizer, *, data_dir, options, generation,
    max_samples) -> dict`` of metrics."""
    description: str = ""
    source: Source | None = None
    """Where ``load`` (generate) or ``run`` (perplexity) finds the data, the path it opens; None for
    an evaluation that fetches its own (lm_eval)."""

    def __post_init__(self):
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"evaluation {self.name!r}: output_type {self.output_type!r} is not one of {OUTPUT_TYPES}")
        if self.pool not in POOLS:
            raise ValueError(f"evaluation {self.name!r}: pool {self.pool!r} is not one of {POOLS}")
        needs = {"generate": ("load", "build_prompt", "source_generation", "score_problem", "aggregate"),
                 "perplexity": ("run",), "lm_eval": ("run",), "classify": ()}[self.output_type]
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ValueError(f"evaluation {self.name!r} ({self.output_type}) lacks {', '.join(missing)}")

    @property
    def scores_generations(self) -> bool:
        """Whether saved generations can be re-scored without a model."""
        return self.output_type == "generate"

    def score(self, problems: list[dict], completions: dict, options: dict) -> dict:
        """Serial whole-list scoring: ``completions`` maps problem id -> list of completions."""
        outcomes = [self.score_problem(self.name, p, completions.get(p["id"], []), options) for p in problems]
        return self.aggregate(self.name, problems, outcomes, options)


def fraction_correct(metric: str) -> Callable:
    """An ``aggregate`` for outcomes that are one bool per problem: ``{metric: correct / n, "n": n}``
    (0.0 for no problems)."""

    def aggregate(name: str, problems: list[dict], outcomes: list[bool], options: dict) -> dict:
        n = len(outcomes)
        return {metric: sum(bool(o) for o in outcomes) / n if n else 0.0, "n": n}

    aggregate.__name__ = f"fraction_correct_{metric}"
    return aggregate
