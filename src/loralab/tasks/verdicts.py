"""What the scorer decided about each completion, for the generation rows (``run_eval``'s records,
a run's ``generations.jsonl``, ``loralab eval --generations-out``), so a score can be checked row by
row instead of trusted as a total.

The verdict comes from the scoring itself, not from a second judge: ``recording`` gives an
evaluation whose ``aggregate`` keeps the per-problem outcomes it aggregates (the pool's, in problem
order), and ``verdicts`` turns one problem's outcome into one dict per completion:
- answer tasks (GSM8K, MATH, commonsense, NQ-open): ``answer`` (what the scorer read from the
  completion: None when it found nothing), ``reference`` (what it compared with) and ``correct``.
  Accuracy counts each problem's first completion (the outcome); a later sample's ``correct`` is that
  completion scored the same way.
- code: ``passed``, the sandbox's ``status`` (passed, failed, timeout) and, unless passed, ``error``
  (a short reason: the traceback's last line, the time limit, a signal), ``rerun`` after a timeout.

A row read for re-scoring may hold these keys: they are ignored there and computed again. Why the
completion ended (``finish_reason``, ``stop_reason``, ``new_tokens``: ``loralab.tasks.finish``) is no
verdict but a fact of the generation: a row keeps it, and the scorer's "cut off" warning reads it.
"""

from __future__ import annotations

from dataclasses import replace

from loralab.tasks import commonsense, competition_math, gsm8k
from loralab.tasks.base import Eval

VERDICT_KEYS = ("answer", "reference", "correct", "passed", "status", "error", "rerun")
"""The keys a verdict may add to a generation row (dropped from rows read for re-scoring)."""


def recording(ev: Eval, extra: dict[int, dict] | None = None) -> tuple[Eval, list]:
    """``ev`` with an ``aggregate`` that also keeps the outcomes it aggregates (the returned list,
    filled when the pool's ``result()`` runs); ``extra`` (problem index -> fields, read at that
    moment) is added to the problems the aggregate sees (a live run's ``prompts`` and ``at_budget``)."""
    kept: list = []

    def aggregate(name, problems, outcomes, options):
        kept[:] = outcomes
        if extra:
            problems = [{**p, **extra.get(i, {})} for i, p in enumerate(problems)]
        return ev.aggregate(name, problems, outcomes, options)

    return replace(ev, aggregate=aggregate), kept


def verdicts(ev: Eval, problem: dict, completions: list[str], outcome, options: dict) -> list[dict]:
    """One verdict dict per completion of ``problem`` (see the module docstring); ``{}`` each for an
    evaluation family without a reader here."""
    if ev.family == "code":  # outcome: (program, test, sandbox result) per completion
        return [_program(res) for _, _, res in outcome]
    reader = READERS.get(ev.family)
    if reader is None:
        return [{} for _ in completions]
    read, reference = reader(ev.name, problem, options)
    out = []
    for i, completion in enumerate(completions):
        correct = bool(outcome) if i == 0 else bool(ev.score_problem(ev.name, problem, [completion], options))
        out.append({"answer": read(completion), "reference": reference, "correct": correct})
    return out


def _program(res) -> dict:
    verdict = {"passed": bool(res.passed), "status": res.status}
    if not res.passed:
        verdict["error"] = res.reason()
    if res.rerun:
        verdict["rerun"] = True
    return verdict


def _gsm8k(name: str, problem: dict, options: dict):
    if options["parser"] == "method_comparison":
        return gsm8k.parse_method_comparison, gsm8k.parse_method_comparison(problem["answer"])
    return (lambda c: gsm8k.extract_corda(c, options)), gsm8k.gold_value(problem["answer"])


def _math(name: str, problem: dict, options: dict):
    return competition_math.extract_prediction, competition_math.gold_answer(problem["solution"])


def _commonsense(name: str, problem: dict, options: dict):
    return (lambda c: commonsense.extract_answer(name, c)), problem["answer"]


def _nq(name: str, problem: dict, options: dict):
    return (lambda c: c.strip()), list(problem["answer"])


READERS = {"gsm8k": _gsm8k, "competition_math": _math, "commonsense": _commonsense, "nqopen": _nq}
"""Family -> ``(name, problem, options) -> (read an answer from a completion, the reference)``; code's
verdict is its sandbox result (``_program``)."""
