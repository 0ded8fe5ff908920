"""MATH (Hendrycks et al. 2021; 5,000 test problems) and MATH-500 (PRM800K's 500-problem subset).

Source: iboing/CorDA ``inference/MATH_inference.py`` + ``inference/util.py`` + ``inference/grader.py``
(seed 000: ``eval/math/MATH/eval.py``, ``eval/math/util``). vLLM greedy, ``max_tokens=2048``, the same
stop strings and prompts as GSM8K (option ``prompt``: ``corda`` | ``seed000``), the problem text as
``{instruction}``.

Gold: ``remove_boxed(last_boxed_only_string(solution))``: the last ``\\boxed{...}`` (else ``\\fbox``) of the
reference solution, brace-matched, without the ``\\boxed{`` and ``}``.

Prediction (``process_results``): the text after the last ``'The answer is: '`` (none: wrong), cut at
the first ``'.\\n'``, stripped, one trailing ``.`` dropped, stripped.

Equivalence (option ``equivalence``):
- ``math_verify`` (default): when both sides are one number each, ``loralab.tasks.numeric`` (the
  reader GSM8K uses) decides a match first (math-verify reads neither ``\\$1,000`` nor ``−3``, and
  reads ``50\\%`` as 0.5); otherwise Hugging Face ``math-verify`` parses both sides (LaTeX or plain
  expressions) and compares them symbolically and numerically.
- ``corda``: CorDA's ``is_equiv``: ``strip_string`` normalisation of both sides (below), then
  ``math_equal`` (numeric with rel_tol 1e-4 incl. x100 and /100, bracket-insensitive string match,
  tuple element-wise, sympy ``simplify(a-b)==0`` / ``N`` within rel_tol 1e-3) or string equality.
  CorDA's ``is_equiv`` returns ``math_equal(str1, str1)`` - effectively True - when normalisation
  raises (e.g. ``\\text{ `` occurring twice); that bug is option ``corda_exception_is_correct``
  (default False: an exception is scored by comparing the un-normalised strings).
"""

from __future__ import annotations

import json
from math import isclose

from loralab.models import hub_dataset
from loralab.tasks.base import Eval, Source, fraction_correct
from loralab.tasks.gsm8k import PROMPTS, STOP
from loralab.tasks.numeric import numbers_equal

OPTIONS = {
    "prompt": ("corda", ("corda", "seed000")),
    "equivalence": ("math_verify", ("math_verify", "corda")),
    "corda_exception_is_correct": (False, (False, True)),
}
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra", "precalculus")
SOURCES = {"math": Source("math/MATH/test.jsonl", "EleutherAI/hendrycks_math (7 subjects, test)"),
           "math500": Source("math/MATH-500/test.jsonl", "HuggingFaceH4/MATH-500 (test)")}


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    """``math``: data_dir/math/MATH/test.jsonl (hub: EleutherAI/hendrycks_math, 7 subjects);
    ``math500``: data_dir/math/MATH-500/test.jsonl (hub: HuggingFaceH4/MATH-500) (``SOURCES``). id = ``unique_id``."""
    if data_dir is not None:
        with open(SOURCES[name].path(data_dir), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    else:
        if name == "math500":
            rows = list(hub_dataset("HuggingFaceH4/MATH-500", split="test", what="evaluation data"))
        else:  # hub copies lack the original file names: unique_id is test/<subject>/<row>.json
            rows = []
            for subject in SUBJECTS:
                for i, r in enumerate(hub_dataset("EleutherAI/hendrycks_math", subject, split="test", what="evaluation data")):
                    rows.append({**r, "unique_id": f"test/{subject}/{i}.json"})
    rows = rows[:max_samples] if max_samples else rows
    return [{"id": r["unique_id"], "problem": r["problem"], "solution": r["solution"]} for r in rows]


def build_prompt(name: str, problem: dict, options: dict) -> str:
    return PROMPTS[options["prompt"]].format(instruction=problem["problem"])


def source_generation(name: str, options: dict) -> dict:
    return {"max_new_tokens": 2048, "temperature": 0.0, "top_p": 1.0, "stop": list(STOP)}


# --- gold and prediction -------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (else ``\\fbox{...}``) with matched braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    left = "\\boxed{"
    if boxed is None or not boxed.startswith(left) or not boxed.endswith("}"):
        return None
    return boxed[len(left):-1]


def gold_answer(solution: str) -> str | None:
    return remove_boxed(last_boxed(solution))


def extract_prediction(completion: str) -> str | None:
    parts = completion.split("The answer is: ")
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


# --- CorDA's normalisation (util.strip_string and helpers, re-implemented) -----------------------
def _fix_fracs(s: str) -> str:
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece.startswith("{"):
            out += piece
            continue
        if len(piece) < 2:
            return s
        a, b, rest = piece[0], piece[1], piece[2:]
        out += "{" + a + "}" + ("{" + b + "}" if b != "{" else b) + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one '\\text{ ' in the answer")
        return parts[0]
    return s


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\sqrt" + (piece if piece.startswith("{") else "{" + piece[0] + "}" + piece[1:])
    return out


def strip_string(s: str) -> str:
    """CorDA/Hendrycks normalisation, in the source's order (raises where the source raises)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)  # an answer ending in "\sqrt" raises IndexError, as in the source
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _is_number(x) -> bool:
    try:
        float(str(x).replace(",", ""))
        return True
    except ValueError:
        return False


def _symbolic_equal(a: str, b: str) -> bool:
    from sympy import N, simplify
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        try:
            from sympy.parsing.latex import parse_latex

            return parse_latex(s)
        except Exception:  # noqa: BLE001 - the source falls through every parser failure
            pass
        try:
            return parse_expr(s)
        except Exception:  # noqa: BLE001
            return s

    x, y = parse(a), parse(b)
    try:
        if simplify(x - y) == 0:
            return True
    except Exception:  # noqa: BLE001
        pass
    try:
        return isclose(N(x), N(y), rel_tol=1e-3)
    except Exception:  # noqa: BLE001
        return False


def math_equal(pred, ref) -> bool:
    """CorDA's ``grader.math_equal`` (include_percentage=True, is_close=True), re-implemented."""
    if _is_number(pred) and _is_number(ref):
        p, r = float(str(pred).replace(",", "")), float(str(ref).replace(",", ""))
        return any(isclose(x, p, rel_tol=1e-4) for x in (r / 100, r, r * 100))
    if not pred and pred not in (0, False):
        return False
    ref, pred = str(ref).strip(), str(pred).strip()
    p2, r2 = pred, ref
    if (pred.startswith("[") and pred.endswith("]") and not ref.startswith("(")) or (
        pred.startswith("(") and pred.endswith(")") and not ref.startswith("[")
    ):
        p2, r2 = p2.strip("[]()"), r2.strip("[]()")
    for ch in "{}()":
        p2, r2 = p2.replace(ch, ""), r2.replace(ch, "")
    if p2 == r2:
        return True
    if (pred[:1] + pred[-1:] == "[]" and ref[:1] + ref[-1:] == "[]") or (pred[:1] + pred[-1:] == "()" and ref[:1] + ref[-1:] == "()"):
        ps, rs = pred[1:-1].split(","), ref[1:-1].split(",")
        if len(ps) == len(rs) and all(math_equal(a, b) for a, b in zip(ps, rs)):
            return True
    return _symbolic_equal(pred, ref)


def is_equiv_corda(pred: str | None, gold: str | None, exception_is_correct: bool = False) -> bool:
    if pred is None and gold is None:
        return True
    if pred is None or gold is None:
        return False
    try:
        a, b = strip_string(pred), strip_string(gold)
    except Exception:  # noqa: BLE001
        return True if exception_is_correct else pred == gold
    return math_equal(a, b) or a == b


def is_equiv_math_verify(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    if numbers_equal(pred, gold):
        return True
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=config)
    p = parse(f"${pred}$", extraction_config=config)
    if g and p and verify(g, p):
        return True
    return strip_string_safe(pred) == strip_string_safe(gold)


def strip_string_safe(s: str) -> str:
    try:
        return strip_string(s)
    except Exception:  # noqa: BLE001
        return s


def is_correct(completion: str, solution: str, options: dict) -> bool:
    pred, gold = extract_prediction(completion), gold_answer(solution)
    if pred is None:
        return False
    if options["equivalence"] == "corda":
        return is_equiv_corda(pred, gold, options["corda_exception_is_correct"])
    return is_equiv_math_verify(pred, gold)


def score_problem(name: str, problem: dict, completions: list[str], options: dict) -> bool:
    """Whether the first completion is correct (no completion: wrong)."""
    return bool(completions) and is_correct(completions[0], problem["solution"], options)


aggregate = fraction_correct("accuracy")


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict[str, float]:
    """Accuracy over problems (first completion of each; a missing one counts as wrong), serially."""
    return _BY_NAME[name].score(problems, completions, options)


def _eval(name: str, description: str) -> Eval:
    # math-verify and sympy take ~10 ms a problem (53 s for MATH's 5,000 wrong answers): a process pool
    return Eval(name, family="competition_math", output_type="generate", headline="accuracy", options=OPTIONS,
                load=load, build_prompt=build_prompt, source_generation=source_generation,
                score_problem=score_problem, aggregate=aggregate, pool="process", description=description,
                source=SOURCES[name])


EVALS = (_eval("math", "MATH test (5,000), CorDA's prompt, math-verify equivalence"),
         _eval("math500", "MATH-500 (PRM800K's 500-problem subset), as math"))
_BY_NAME = {e.name: e for e in EVALS}
