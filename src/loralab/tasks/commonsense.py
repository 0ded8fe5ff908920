"""The eight commonsense tasks of LLM-Adapters (Hu et al. 2023) and DoRA (Liu et al. 2024):
BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA, scored by exact-match accuracy.

Source: NVlabs/DoRA ``commonsense_reasoning/commonsense_evaluate.py`` (= LLM-Adapters', except that
DoRA keeps the text after the LAST ``"### Response:"``).
- Data: LLM-Adapters ``dataset/<name>/test.json`` (``instruction``, ``answer``), read from
  ``data_dir/llm-adapters/dataset``; id = 0-based row. HellaSwag's file (10,042 items) is not in the
  local data: without it, ``hellaswag`` is built from the hub's ``Rowan/hellaswag`` validation split
  in the LLM-Adapters instruction format (``HELLASWAG_INSTRUCTION``; a reconstruction, the only one
  of the eight not read from the original file).
- Prompt: the no-input template, verbatim (``PROMPT``; one trailing space after "request.", 16-space
  indents, empty blank lines). The source calls ``generate_prompt(instruction)`` without an input.
- Generation: ``GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4)`` with
  ``max_new_tokens=32``; ``do_sample`` is unset, so this is deterministic 4-beam search.
- Extraction: the completion after the last ``"### Response:"``, stripped; the first match of the
  task's pattern (``PATTERNS``), ``""`` if none; correct iff equal to ``answer``.
"""

from __future__ import annotations

import json
import re

from loralab.models import hub_dataset
from loralab.tasks.base import Eval, Source, fraction_correct

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Response:\n"
    "                "
)
COMMONSENSE = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")
"""The eight tasks, in the order of the experiment files (the one definition: the SFT task's default
evaluations, the ``commonsense`` group and the scripts read it)."""
PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
HELLASWAG_INSTRUCTION = (
    "Please choose the correct ending to complete the given sentence: {activity_label}: {ctx}\n\n"
    "Ending1: {e1} Ending2: {e2} Ending3: {e3} Ending4: {e4}\n\n"
    "Answer format: ending1/ending2/ending3/ending4"
)
OPTIONS = {"num_beams": (4, None)}
_HUB = {"hellaswag": "Rowan/hellaswag (validation, rebuilt in LLM-Adapters' format; also when a data folder lacks the file)"}
SOURCES = {name: Source(f"llm-adapters/dataset/{name}/test.json",
                        _HUB.get(name, "none: the hub has no copy in LLM-Adapters' format")) for name in COMMONSENSE}


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    path = SOURCES[name].path(data_dir) if data_dir is not None else None
    if path is not None and path.exists():
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
    elif name == "hellaswag":
        rows = _hellaswag_from_hub()
    else:
        where = f"at {path}" if path is not None else f"under data_dir/llm-adapters/dataset (data_dir={data_dir!r})"
        missing = FileNotFoundError(f"'{name}' needs LLM-Adapters' dataset/{name}/test.json {where}; "
                                    "the hub has no copy in that format")
        missing.filename = None if path is None else str(path)
        raise missing
    rows = rows[:max_samples] if max_samples else rows
    return [{"id": i, "instruction": r["instruction"], "answer": r["answer"]} for i, r in enumerate(rows)]


def _hellaswag_from_hub() -> list[dict]:
    rows = []
    for r in hub_dataset("Rowan/hellaswag", split="validation", what="evaluation data"):
        e = r["endings"]
        instruction = HELLASWAG_INSTRUCTION.format(activity_label=r["activity_label"], ctx=r["ctx"], e1=e[0], e2=e[1], e3=e[2], e4=e[3])
        rows.append({"instruction": instruction, "answer": f"ending{int(r['label']) + 1}"})
    return rows


def build_prompt(name: str, problem: dict, options: dict) -> str:
    return PROMPT.format(instruction=problem["instruction"])


def source_generation(name: str, options: dict) -> dict:
    return {"max_new_tokens": 32, "temperature": 0.0, "num_beams": int(options["num_beams"]), "stop": []}


def extract_answer(name: str, completion: str) -> str:
    text = completion.split("### Response:")[-1].strip()
    found = re.findall(PATTERNS[name], text)
    return found[0] if found else ""


def score_problem(name: str, problem: dict, completions: list[str], options: dict) -> bool:
    """Whether the answer extracted from the first completion is the gold one (none: wrong)."""
    return bool(completions) and extract_answer(name, completions[0]) == problem["answer"]


aggregate = fraction_correct("accuracy")


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict[str, float]:
    return _BY_NAME[name].score(problems, completions, options)


# Scoring is one regular expression per problem: after generation, in this process.
EVALS = tuple(
    Eval(name, family="commonsense", output_type="generate", headline="accuracy", options=OPTIONS, load=load,
         build_prompt=build_prompt, source_generation=source_generation, score_problem=score_problem,
         aggregate=aggregate, pool=None, description=f"LLM-Adapters/DoRA commonsense: {name}",
         source=SOURCES[name])
    for name in COMMONSENSE
)
GROUPS = {"commonsense": COMMONSENSE}
_BY_NAME = {e.name: e for e in EVALS}
