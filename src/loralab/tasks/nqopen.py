"""World knowledge for CorDA's forgetting study: NQ-open (Lee et al. 2019) and TriviaQA.

CorDA (README) runs ``lm_eval --model hf --tasks nq_open`` (and ``triviaqa``), 0-shot, exact match.
- ``nq_open``: our own scorer of lm-eval 0.4's ``tasks/nq_open/nq_open.yaml`` on the local dev set
  (``data_dir/nq_open/NQ-open.dev.jsonl``, 3,610 questions; hub: google-research-datasets/nq_open
  validation); id = 0-based row. Prompt = description ``"Answer these questions:\\n\\n"`` +
  ``"Q: {question}?\\nA:"``; greedy; lm-eval's default ``max_gen_toks`` 256; ``until`` = ``["\\n", ".", ","]``;
  filter ``remove_whitespace`` (strip) then ``take_first``; ``exact_match`` with
  ``regexes_to_ignore=["\\b(?:The |the |An |A |The |a |an )"]``, ``ignore_case``, ``ignore_punctuation``,
  correct iff it matches any of the gold answers.
- ``nq_open_lm_eval`` / ``triviaqa_lm_eval``: lm-eval itself (optional dependency ``lm-eval``;
  data from the hub), on the in-memory model through ``lm_eval.models.huggingface.HFLM``.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

DESCRIPTION = "Answer these questions:\n\n"
TEMPLATE = "Q: {question}?\nA:"
UNTIL = ["\n", ".", ","]
IGNORE = r"\b(?:The |the |An |A |The |a |an )"
OPTIONS: dict = {}
LM_EVAL_TASKS = {"nq_open_lm_eval": "nq_open", "triviaqa_lm_eval": "triviaqa"}


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    if data_dir is not None:
        with open(Path(data_dir) / "nq_open" / "NQ-open.dev.jsonl", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        import datasets

        rows = list(datasets.load_dataset("google-research-datasets/nq_open", split="validation"))
    rows = rows[:max_samples] if max_samples else rows
    return [{"id": i, "question": r["question"], "answer": list(r["answer"])} for i, r in enumerate(rows)]


def build_prompt(name: str, problem: dict, options: dict) -> str:
    return DESCRIPTION + TEMPLATE.format(question=problem["question"])


def source_generation(name: str, options: dict) -> dict:
    return {"max_new_tokens": 256, "temperature": 0.0, "stop": list(UNTIL)}


def normalize(text: str) -> str:
    text = re.sub(IGNORE, "", text).lower()
    return text.translate(str.maketrans("", "", string.punctuation))


def is_correct(completion: str, answers: list[str]) -> bool:
    pred = normalize(completion.strip())
    return any(pred == normalize(a) for a in answers)


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict[str, float]:
    correct = [bool(completions.get(p["id"])) and is_correct(completions[p["id"]][0], p["answer"]) for p in problems]
    return {"exact_match": sum(correct) / len(correct) if correct else 0.0, "n": len(correct)}


def run_lm_eval(name: str, model, tokenizer, *, generation: dict, max_samples: int | None) -> tuple[dict, list]:
    """lm-eval's own task on the in-memory model (no generations are returned)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(f"'{name}' needs the optional dependency lm-eval (pip install lm-eval)") from exc
    task = LM_EVAL_TASKS[name]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(generation.get("batch_size", 8)))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=max_samples)
    metrics = out["results"][task]
    return {"exact_match": float(metrics["exact_match,remove_whitespace"])}, []
