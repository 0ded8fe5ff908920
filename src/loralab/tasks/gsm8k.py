"""GSM8K (Cobbe et al. 2021), 1,319 test problems, scored as CorDA and seed 000 score it.

Source: iboing/CorDA ``inference/gsm8k_inference.py`` (seed 000 copies it into
``eval/math/GSM8K/eval.py``), vLLM greedy (temperature 0, top_p 1), ``max_tokens=1024``,
stop strings ``["Instruction:", "Instruction", "Response:", "Response"]``.

Prompts (option ``prompt``):
- ``corda`` (default, CorDA official, no trailing space):
  ``PROMPT_CORDA`` below.
- ``seed000``: seed 000 added an answer-format sentence and a trailing space (``PROMPT_SEED000``).
- ``method_comparison``: peft method_comparison's ``query_template`` ``"Question: {query} Think step
  by step.\\nAnswer:"``, 300 new tokens, no stop strings (its v1 ``generation_kwargs``).

Gold: the text after ``"#### "`` with commas removed (CorDA: ``int(answer.split('#### ')[1].replace(',', ''))``).

Answer extraction (option ``parser``):
- ``corda`` (default): split on ``'The answer is: '``, none -> invalid; take the last part,
  ``strip()``, the first number as read by ``loralab.tasks.numeric`` (thousands separators plain and
  LaTeX, currency, units, ``\\boxed``, ``\\frac``, negatives, decimals; a fraction ``a/b`` becomes
  a/b, ``a/0`` is no number). Correct iff equal to the gold. Three CorDA behaviours that give wrong results are options, off by default:
  ``round_predictions`` (CorDA rounds every prediction to an int, so 17.6 counts as 18),
  ``percent_equivalence`` (CorDA's ``math_equal`` also accepts gold/100 and gold*100, so 1800 counts
  for 18), ``corda_number_regex`` (CorDA's ``[\\-+]?\\d*[\\.,/]?\\d+`` on the raw text, which reads
  "1,450,000" as 1450 and ``$57{,}500$`` as 57, and ``a/0`` as a; 3 test and 48 train golds need
  whole thousands-separated numbers).
- ``method_comparison``: peft ``method_comparison/MetaMathQA/utils.py`` ``parse_answer``: strip, drop
  trailing ``.!?``, the first delimiter present in the list order ``["The answer is: ", "The answer is ",
  "The final answer is: ", "The final answer is ", "#### "]``, the text after its LAST occurrence, first
  line, stripped of `` .!?$%``; then, unlike peft (which compares ``Decimal``s, so ``1,000`` or
  ``$57{,}500$`` never equal 1000 / 57500), both sides are read by ``loralab.tasks.numeric`` and compared
  as numbers when both are one number, else as strings. The gold is parsed from the full GSM8K answer
  with the same function.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction

from loralab.models import hub_dataset
from loralab.tasks.base import Eval, Source, fraction_correct
from loralab.tasks.numeric import first_number, numbers_equal

PROMPT_CORDA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)
PROMPT_SEED000 = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\nAfter providing your solution, write 'The answer is: ' followed by the final answer.\n\n"
    "### Response: Let's think step by step. "
)
PROMPT_METHOD_COMPARISON = "Question: {instruction} Think step by step.\nAnswer:"
PROMPTS = {"corda": PROMPT_CORDA, "seed000": PROMPT_SEED000, "method_comparison": PROMPT_METHOD_COMPARISON}
STOP = ["Instruction:", "Instruction", "Response:", "Response"]

OPTIONS = {
    "prompt": ("corda", tuple(PROMPTS)),
    "parser": ("corda", ("corda", "method_comparison")),
    "round_predictions": (False, (False, True)),
    "percent_equivalence": (False, (False, True)),
    "corda_number_regex": (False, (False, True)),
}

SOURCE = Source("gsm8k/test.jsonl", "openai/gsm8k (main, test)")

CORDA_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
MC_DELIMITERS = ["The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### "]


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    """Test problems with ``id`` = 0-based row of ``SOURCE`` (``gsm8k/test.jsonl``; hub: openai/gsm8k main test)."""
    if data_dir is not None:
        with open(SOURCE.path(data_dir), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        rows = list(hub_dataset("openai/gsm8k", "main", split="test", what="evaluation data"))
    rows = rows[:max_samples] if max_samples else rows
    return [{"id": i, "question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows)]


def build_prompt(name: str, problem: dict, options: dict) -> str:
    return PROMPTS[options["prompt"]].format(instruction=problem["question"])


def source_generation(name: str, options: dict) -> dict:
    if options["prompt"] == "method_comparison":
        return {"max_new_tokens": 300, "temperature": 0.0, "stop": []}
    return {"max_new_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "stop": list(STOP)}


def _number(match: str, options: dict) -> float | None:
    match = match.replace(",", "")
    if "/" in match:
        num, den = match.split("/", 1)
        try:
            value = float(num) if float(den) == 0 else float(Fraction(match))
        except (ValueError, ZeroDivisionError):
            return None
    else:
        try:
            value = float(match)
        except ValueError:
            return None
    if value in (float("inf"), float("-inf")):
        return None
    return float(round(value)) if options["round_predictions"] else value


def extract_corda(completion: str, options: dict) -> float | None:
    """The number after the last ``'The answer is: '`` (None: invalid)."""
    parts = completion.split("The answer is: ")
    if len(parts) < 2:
        return None
    text = parts[-1].strip()
    if options["corda_number_regex"]:
        for match in CORDA_NUMBER.finditer(text):
            return _number(match.group(), options)
        return None
    value = first_number(text)
    if value is None:
        return None
    return float(round(value)) if options["round_predictions"] else float(value)


def gold_value(answer: str) -> float:
    return float(answer.split("#### ")[1].replace(",", ""))


def parse_method_comparison(text: str) -> str | None:
    text = text.strip().rstrip(".!?")
    for delimiter in MC_DELIMITERS:
        if delimiter in text:
            return text.rpartition(delimiter)[-1].strip().split("\n", 1)[0].strip(" .!?$%")
    return None


def is_correct(completion: str, answer: str, options: dict) -> bool:
    if options["parser"] == "method_comparison":
        pred, gold = parse_method_comparison(completion), parse_method_comparison(answer)
        if gold is None:
            raise ValueError(f"gold answer has no delimiter: {answer!r}")
        if pred is None:
            return False
        same = numbers_equal(pred, gold)
        return pred == gold if same is None else same
    pred = extract_corda(completion, options)
    if pred is None:
        return False
    gold = gold_value(answer)
    if options["percent_equivalence"]:
        return any(abs(pred - g) <= 1e-4 * max(abs(pred), abs(g)) for g in (gold / 100, gold, gold * 100))
    return pred == gold


def score_problem(name: str, problem: dict, completions: list[str], options: dict) -> bool:
    """Whether the first completion is correct (no completion: wrong)."""
    return bool(completions) and is_correct(completions[0], problem["answer"], options)


aggregate = fraction_correct("accuracy")


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict[str, float]:
    """Accuracy over problems (first completion of each; a missing one counts as wrong)."""
    return EVALS[0].score(problems, completions, options)


# Scoring is a regular expression per problem (~20 us; 27 ms for the 1,319 test problems), so it
# runs after generation in this process: a worker pool would cost more than it saves.
EVALS = (
    Eval("gsm8k", family="gsm8k", output_type="generate", headline="accuracy", options=OPTIONS, load=load,
         build_prompt=build_prompt, source_generation=source_generation, score_problem=score_problem,
         aggregate=aggregate, pool=None, description="GSM8K test (1,319), CorDA's prompt and answer extraction",
         source=SOURCE),
)
