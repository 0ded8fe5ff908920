"""Answer extraction and scoring on the real test files: gold answers score 100%, wrong ones 0%."""

import json

import pytest

from loralab.tasks import commonsense, competition_math, gsm8k, nqopen
from loralab.tasks import evaluate as evals


def _gsm8k_rows(data_dir, split):
    with open(data_dir / "gsm8k" / f"{split}.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_gold_answers_score_100_and_wrong_ones_0(data_dir, split):
    rows = _gsm8k_rows(data_dir, split)
    options = evals.resolve_options("gsm8k", {})
    golds = [r["answer"].split("#### ")[1] for r in rows]
    assert all(gsm8k.is_correct(f"Some reasoning.\nThe answer is: {g}", r["answer"], options) for g, r in zip(golds, rows))
    wrong = [str(int(g.replace(",", "")) + 1) for g in golds]
    assert not any(gsm8k.is_correct(f"The answer is: {w}", r["answer"], options) for w, r in zip(wrong, rows))
    assert not any(gsm8k.is_correct(f"The answer is {g}", r["answer"], options) for g, r in zip(golds[:50], rows))  # no colon: invalid


def test_gsm8k_method_comparison_parser(data_dir):
    rows = _gsm8k_rows(data_dir, "test")
    options = evals.resolve_options("gsm8k", {"parser": "method_comparison"})
    assert all(gsm8k.is_correct(f"The answer is {r['answer'].split('#### ')[1]}.", r["answer"], options) for r in rows)
    assert not gsm8k.is_correct("The answer is: 19", rows[0]["answer"], options)  # gold 18
    # the first delimiter in list order wins, and its LAST occurrence
    assert gsm8k.parse_method_comparison("#### 5\nThe answer is 7. The answer is: 9") == "9"
    assert gsm8k.is_correct("The answer is: 36/2", rows[0]["answer"], options)  # fractions as Decimal


def test_gsm8k_corda_quirks_are_opt_in(data_dir):
    answer = "... #### 18"
    default = evals.resolve_options("gsm8k", {})
    corda = evals.resolve_options("gsm8k", {"round_predictions": True, "percent_equivalence": True, "corda_number_regex": True})
    assert not gsm8k.is_correct("The answer is: 17.6", answer, default)
    assert gsm8k.is_correct("The answer is: 17.6", answer, corda)  # CorDA rounds predictions to int
    assert not gsm8k.is_correct("The answer is: 1800", answer, default)
    assert gsm8k.is_correct("The answer is: 1800", answer, corda)  # CorDA's math_equal accepts x100
    big = "#### 1,450,000"
    assert gsm8k.is_correct("The answer is: 1,450,000 dollars", big, default)
    assert not gsm8k.is_correct("The answer is: 1,450,000 dollars", big, corda)  # CorDA reads 1,450
    assert gsm8k.is_correct("The answer is: 36/2", answer, default)
    assert gsm8k.extract_corda("The answer is: 5/0", default) is None  # a/0 has no value
    assert gsm8k.extract_corda("The answer is: 5/0", corda) == 5.0  # CorDA's regex: a/0 -> a


@pytest.mark.parametrize("name", ["math", "math500"])
def test_math_gold_answers_score_100_with_corda_equivalence(data_dir, name):
    problems = competition_math.load(name, data_dir, None)
    assert len(problems) == (5000 if name == "math" else 500)
    options = evals.resolve_options(name, {"equivalence": "corda"})
    failed = [p["id"] for p in problems
              if not competition_math.is_correct(f"Step.\nThe answer is: {competition_math.gold_answer(p['solution'])}", p["solution"], options)]
    # One MATH gold ends in "." ("\\frac{7}{5} + \\frac{1}{5} i."): CorDA's rule drops a trailing "." from
    # every prediction, so under its string normalisation that gold can never be matched.
    assert failed == (["test/intermediate_algebra/1289.json"] if name == "math" else [])


def _numeric_golds(problems):
    out = []
    for p in problems:
        gold = competition_math.gold_answer(p["solution"])
        if gold is not None and gold.lstrip("-").isdigit():
            out.append((p, gold))
    return out


def test_math500_gold_100_and_wrong_0_with_math_verify(data_dir):
    problems = competition_math.load("math500", data_dir, None)
    options = evals.resolve_options("math500", {})
    assert options["equivalence"] == "math_verify"
    completions = {p["id"]: [f"The answer is: {competition_math.gold_answer(p['solution'])}."] for p in problems}
    assert competition_math.score("math500", problems, completions, options)["accuracy"] == 1.0
    numeric = _numeric_golds(problems)[:60]
    wrong = {p["id"]: [f"The answer is: {int(g) + 1}"] for p, g in numeric}
    assert competition_math.score("math500", [p for p, _ in numeric], wrong, options)["accuracy"] == 0.0


def test_math_wrong_answers_score_0_with_corda_equivalence(data_dir):
    numeric = _numeric_golds(competition_math.load("math", data_dir, None))
    options = evals.resolve_options("math", {"equivalence": "corda"})
    # CorDA's math_equal compares numbers with rel_tol 1e-4 (and accepts x100, /100), so off-by-one
    # answers to large integers count as correct there; 3g + 7 is never within that tolerance.
    wrong = {p["id"]: [f"The answer is: {3 * int(g) + 7}"] for p, g in numeric}
    assert len(numeric) > 2000
    assert competition_math.score("math", [p for p, _ in numeric], wrong, options)["accuracy"] == 0.0
    assert competition_math.is_equiv_corda("10456", "10455")  # the source's tolerance, kept under "corda"
    assert not competition_math.is_equiv_math_verify("10456", "10455")


def test_math_corda_exception_bug_is_opt_in():
    solution = "so \\boxed{5}"
    two_units = "The answer is: 3 \\text{ cm} and \\text{ m}"  # strip_string raises on two '\\text{ '
    assert not competition_math.is_correct(two_units, solution, {"equivalence": "corda", "corda_exception_is_correct": False})
    assert competition_math.is_correct(two_units, solution, {"equivalence": "corda", "corda_exception_is_correct": True})
    assert competition_math.strip_string("\\dfrac12") == "\\frac{1}{2}"
    assert competition_math.strip_string("x = 0.5") == "\\frac{1}{2}"
    assert competition_math.last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{{3}}") == "\\boxed{{3}}"


@pytest.mark.parametrize("name", [n for n in commonsense.COMMONSENSE if n != "hellaswag"])  # hellaswag: not in the local data
def test_commonsense_extraction_on_gold_answers(data_dir, name):
    problems = commonsense.load(name, data_dir, None)
    assert len(problems) == {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267,
                             "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500}[name]
    gold = {p["id"]: [f"the correct answer is {p['answer']}"] for p in problems}
    assert commonsense.score(name, problems, gold, {})["accuracy"] == 1.0
    labels = sorted({p["answer"] for p in problems})
    wrong = {p["id"]: [f"the correct answer is {next(x for x in labels if x != p['answer'])}"] for p in problems}
    assert commonsense.score(name, problems, wrong, {})["accuracy"] == 0.0
    # DoRA keeps only the text after the last "### Response:"
    assert commonsense.extract_answer(name, f"{labels[0]} ### Response: {labels[-1]}") == labels[-1]
    assert commonsense.extract_answer(name, "no idea") == ""


def test_commonsense_prompt_is_verbatim():
    prompt = commonsense.build_prompt("boolq", {"instruction": "Q?"}, {})
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes the request. "
                      "\n\n                ### Instruction:\n                Q?\n\n                ### Response:\n                ")


def test_nq_open_exact_match(data_dir):
    problems = nqopen.load("nq_open", data_dir, None)
    assert len(problems) == 3610
    gold = {p["id"]: [" " + p["answer"][-1]] for p in problems}
    assert nqopen.score("nq_open", problems, gold, {})["exact_match"] == 1.0
    assert nqopen.is_correct(" The Beatles", ["beatles"])  # articles, case and punctuation ignored
    assert not nqopen.is_correct("December", ["14 December 1972 UTC", "December 1972"])


def test_validate_options_names_every_problem():
    problems = evals.validate_options(["gsm8kk", "math"], {"equivalence": "cordaa", "nonsense": 1, "math": {"prompt": "x"}})
    text = "\n".join(problems)
    assert "'gsm8kk' is unknown (did you mean 'gsm8k'?)" in text
    assert "'equivalence' = 'cordaa' is not allowed" in text
    assert "'nonsense' is not an option" in text
    assert "'math.prompt' = 'x' is not allowed" in text
    assert evals.validate_options(["gsm8k", "humaneval"], {"prompt": "seed000", "sampling": "bigcode"}) == []


def test_generation_precedence():
    """None = the source's; any explicit value wins, even one equal to an old global default."""
    opts = evals.resolve_options("gsm8k", {})
    unset = {"max_new_tokens": None, "batch_size": 16, "temperature": None, "top_p": None, "n_samples": None, "backend": "auto"}
    assert evals.generation_settings("gsm8k", unset, opts).max_new_tokens == 1024  # the source's
    assert evals.generation_settings("gsm8k", {**unset, "max_new_tokens": 64}, opts).max_new_tokens == 64
    assert evals.generation_settings("gsm8k", {**unset, "max_new_tokens": 512}, opts).max_new_tokens == 512  # issue 12
    code_opts = evals.resolve_options("humaneval", {"sampling": "bigcode"})
    s = evals.generation_settings("humaneval", unset, code_opts)
    assert (s.temperature, s.top_p, s.max_length) == (0.2, 0.95, 512)
