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

from loralab.tasks.base import Eval, Source, fraction_correct

DESCRIPTION = "Answer these questions:\n\n"
TEMPLATE = "Q: {question}?\nA:"
UNTIL = ["\n", ".", ","]
IGNORE = r"\b(?:The |the |An |A |The |a |an )"
OPTIONS: dict = {}
LM_EVAL_TASKS = {"nq_open_lm_eval": "nq_open", "triviaqa_lm_eval": "triviaqa"}
SOURCE = Source("nq_open/NQ-open.dev.jsonl", "google-research-datasets/nq_open (validation)")


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    if data_dir is not None:
        with open(SOURCE.path(data_dir), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        from loralab.models import hub_dataset  # Unreachable (exit 2) at once when offline

        rows = list(hub_dataset("google-research-datasets/nq_open", split="validation"))
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


def score_problem(name: str, problem: dict, completions: list[str], options: dict) -> bool:
    """Whether the first completion matches any gold answer (none: wrong)."""
    return bool(completions) and is_correct(completions[0], problem["answer"])


aggregate = fraction_correct("exact_match")


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict[str, float]:
    return EVALS[0].score(problems, completions, options)


def run_lm_eval(name: str, model, tokenizer, *, generation: dict | None = None, max_samples: int | None = None,
                **_) -> dict:
    """lm-eval's own task on the in-memory model: ``{"exact_match": float}`` (no generations)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(f"'{name}' needs the optional dependency lm-eval (pip install lm-eval)") from exc
    task = LM_EVAL_TASKS[name]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int((generation or {}).get("batch_size") or 8))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=max_samples)
    return {"exact_match": float(out["results"][task]["exact_match,remove_whitespace"])}


EVALS = (
    Eval("nq_open", family="nqopen", output_type="generate", headline="exact_match", options=OPTIONS, load=load,
         build_prompt=build_prompt, source_generation=source_generation, score_problem=score_problem,
         aggregate=aggregate, pool=None, description="NQ-open dev (3,610), lm-eval 0.4's protocol, our scorer",
         source=SOURCE),
    *(Eval(name, family="nqopen", output_type="lm_eval", headline="exact_match", run=run_lm_eval,
           description=f"lm-eval's {task} task (optional dependency lm-eval)") for name, task in LM_EVAL_TASKS.items()),
)
