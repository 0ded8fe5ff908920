"""Re-scoring saved generations without a model (``loralab eval --generations FILE``), as bigcode's
``--load_generations_path`` does.

Files read (``read_generations``):
- JSON Lines, one row per completion: ``{"task", "id", "completion"}`` and optionally ``"prompt"`` (the
  exact text the completion continues; code builds its program from it). Other keys (a live run's
  verdicts, ``verdicts.VERDICT_KEYS``) are ignored: the verdicts are computed again. Why a completion
  ended (``finish.FINISH_KEYS``: ``finish_reason``, ``stop_reason``, ``new_tokens``) is kept as the
  generating run wrote it; a row without it (a file written before it existed, bigcode's) says
  ``finish_reason`` "unknown". The result's ``finish_reasons`` counts the rows per reason, and code's
  "cut off at the budget" warning counts the rows that say "length".
- bigcode-evaluation-harness's ``generations.json``: a JSON list with one list of strings per problem,
  in the dataset's order from its first problem, each string the whole program (bigcode saves prompt
  + completion). It names no task, so it is read for one code evaluation (``humaneval``, ``mbpp``,
  ``mbpp_sanitized``); a string that begins with that evaluation's prompt is split into prompt and
  completion, any other is a completion of the empty prompt (the program is the string, as bigcode's).

Bad input is a ``ConfigError`` listing every problem, one line each naming the file, the line (or
bigcode's problem), the key or value and what is allowed (``loralab eval``: exit 2), never a traceback.

Coverage (``prepare``): each task is scored on exactly the problems that have rows, in dataset order;
with ``max_samples`` on the first N problems only (rows past them are left out, with a note). The result
says how many were scored: ``n`` and ``coverage`` ``{"scored", "problems"[, "max_samples"]}`` (a dict, so
not among a result's numbers); fewer rows than problems asked for (the whole test set, or the first N)
is a warning on stderr, since the metrics are then over a subset. An asked task without a row is an error.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from loralab.config import ConfigError
from loralab.tasks.finish import REASONS, at_budget, finish_counts, row_finish
from loralab.tasks.registry import EVALS, GROUPS, resolve_options, validate_options
from loralab.tasks.scoring import ScoringPool
from loralab.tasks.verdicts import recording, verdicts

SHOWN = 20
"""At most this many problems are listed (then how many more)."""
CODE_FAMILY = "code"


def _fail(problems: list[str], source: str):
    if len(problems) > SHOWN:
        problems = problems[:SHOWN] + [f"... and {len(problems) - SHOWN} more problem(s)"]
    raise ConfigError(problems, source)


def read_records(path) -> list[dict]:
    """The rows of a JSON Lines generations file, as written (``ConfigError`` naming a line that is not JSON)."""
    return read_generations(path)[0]


def read_generations(path, names=None, *, data_dir=None, options=None) -> tuple[list[dict], list[str]]:
    """(rows, where each came from: ``"FILE line 3"``) of a generations file in either format (module
    docstring); ``names``: the evaluations asked for (bigcode's format needs one code evaluation)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        _fail([f"{path}: cannot be read ({type(exc).__name__}: {exc})"], "generations file")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail([f"{path}: starts with '[' but is not JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                   "allowed: JSON Lines of rows, or bigcode's generations.json (a list of lists of strings)"],
                  f"generations file {path}")
        return _bigcode(path, data, list(names or []), data_dir, options)
    rows, where, problems = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            where.append(f"{path} line {number}")
            problems += _row_problems(rows[-1], where[-1])
        except json.JSONDecodeError as exc:
            problems.append(f"{path} line {number}: not JSON ({exc.msg} at column {exc.colno}); allowed: one JSON "
                            "object a line, {\"task\", \"id\", \"completion\"[, \"prompt\"]}")
    if problems:
        _fail(problems, f"generations file {path}")
    return rows, where


def _bigcode(path, data, names: list[str], data_dir, options) -> tuple[list[dict], list[str]]:
    """Rows from bigcode's generations.json (module docstring) for the one code evaluation in ``names``."""
    code_evals = [n for n, e in EVALS.items() if e.family == CODE_FAMILY]
    asked = [n for n in names if n in GROUPS or n in EVALS]
    if len(asked) != 1 or asked[0] not in code_evals:
        _fail([f"{path} is a JSON list (bigcode's generations.json: one list of completions per problem, no task "
               f"names), so it is read for one code evaluation: give --tasks one of {', '.join(code_evals)}, "
               f"not {','.join(names) or 'nothing'}"], f"generations file {path}")
    task = asked[0]
    problems = [f"{path} problem {i + 1}: {gens!r:.60} must be a list of strings (one problem's programs)"
                for i, gens in enumerate(data if isinstance(data, list) else [])
                if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens)]
    if not isinstance(data, list):
        problems.append(f"{path}: must be a list of lists of strings")
    ev = EVALS[task]
    items = ev.load(task, data_dir, None)
    if isinstance(data, list) and len(data) > len(items):
        problems.append(f"{path}: {len(data)} problems, but {task} has {len(items)}")
    if problems:
        _fail(problems, f"generations file {path}")
    opts = resolve_options(task, options)
    rows, where = [], []
    for i, (problem, gens) in enumerate(zip(items, data)):
        prompt = ev.build_prompt(task, problem, opts)
        for text in gens:
            rest = text[len(prompt):] if text.startswith(prompt) else None
            rows.append({"task": task, "id": problem["id"], "completion": text if rest is None else rest,
                         "prompt": "" if rest is None else prompt})
            where.append(f"{path} problem {i + 1}")
    return rows, where


def _row_problems(row, where: str) -> list[str]:
    """What is wrong with one row's shape (its task and id are checked against the data later)."""
    shape = "a row is {\"task\": str, \"id\": str or whole number, \"completion\": str[, \"prompt\": str]}"
    if not isinstance(row, dict):
        return [f"{where}: {row!r:.60} is not an object; {shape}"]
    out = [f"{where}: no '{key}'; {shape}" for key in ("task", "id", "completion") if key not in row]
    for key, ok in (("task", lambda v: isinstance(v, str)), ("completion", lambda v: isinstance(v, str)),
                    ("id", lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))),
                    ("prompt", lambda v: v is None or isinstance(v, str))):
        if key in row and not ok(row[key]):
            out.append(f"{where}: '{key}' = {row[key]!r:.60} is not allowed; {shape}")
    for key, ok, allowed in (("finish_reason", lambda v: v in REASONS, f"one of {', '.join(REASONS)}"),
                             ("stop_reason", lambda v: v is None or isinstance(v, str), "a string or null"),
                             ("new_tokens", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                                   and v >= 0), "a whole number >= 0 or null")):
        if key in row and not ok(row[key]):
            out.append(f"{where}: '{key}' = {row[key]!r:.60} is not allowed; allowed: {allowed}")
    return out


@dataclass
class Job:
    """One task's re-scoring, checked and ready: the problems with rows (dataset order, each with the
    rows' ``prompts`` where given) and their completions by id, with why each ended (``finish.row_finish``)."""

    task: str
    problems: list[dict]
    completions: dict
    finishes: dict
    total: int
    """The task's problems (the whole test set)."""
    max_samples: int | None
    load_s: float


def prepare(rows: list, where: list[str], names: list[str] | None, *, data_dir=None, options=None,
            max_samples: dict | int | None = None, source: str = "generations") -> list[Job]:
    """Check every row and group them by task: ``names`` (None: every task with rows) are the tasks to
    score, each must have rows; ids must be the task's (``ConfigError`` listing every problem, as
    ``source``'s)."""
    problems = [p for row, w in zip(rows, where) for p in _row_problems(row, w)]
    if problems:
        _fail(problems, source)
    held: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        held.setdefault(row["task"], []).append(i)
    names = list(held) if names is None else names
    problems = validate_options(names, options)
    problems += [f"evaluation '{t}' has no saved generations to score (it runs on a model)"
                 for t in names if t in EVALS and not EVALS[t].scores_generations]
    if problems:
        _fail(problems, source)
    holds = ", ".join(f"{t} ({len(i)} row(s))" for t, i in held.items()) or "no rows"
    problems = [f"{t}: the generations file has no row for it; it holds {holds}" for t in names if t not in held]
    limits = max_samples if isinstance(max_samples, dict) else {t: max_samples for t in names}
    jobs = []
    for task in (t for t in names if t in held):
        t0 = time.perf_counter()
        items = EVALS[task].load(task, data_dir, None)
        limit = limits.get(task)
        ids = {str(p["id"]) for p in items}
        kept = {str(p["id"]) for p in items[:limit]} if limit else ids
        completions: dict[str, list] = {}
        prompts: dict[str, list] = {}
        finishes: dict[str, list] = {}
        beyond = 0
        for i in held[task]:
            key, w = str(rows[i]["id"]), where[i]
            if key not in ids:
                span = f"{items[0]['id']!r} ... {items[-1]['id']!r}" if items else "none"
                problems.append(f"{w}: id {rows[i]['id']!r} is not a {task} problem (its {len(items)} ids: {span})")
            elif key not in kept:
                beyond += 1
            else:
                completions.setdefault(key, []).append(rows[i]["completion"])
                prompts.setdefault(key, []).append(rows[i].get("prompt"))
                finishes.setdefault(key, []).append(row_finish(rows[i]))
        if beyond:
            print(f"note: {task}: {beyond} row(s) past the first {limit} problems (max_samples) are not scored",
                  file=sys.stderr)
        chosen = []
        for p in (p for p in items if str(p["id"]) in completions):
            given, budget = prompts[str(p["id"])], at_budget(finishes[str(p["id"])])
            chosen.append({**p, **({"prompts": given} if any(g is not None for g in given) else {}),
                           **({"at_budget": budget} if budget is not None else {})})
        jobs.append(Job(task, chosen, {p["id"]: completions[str(p["id"])] for p in chosen},
                        {p["id"]: finishes[str(p["id"])] for p in chosen}, len(items), limit, time.perf_counter() - t0))
    if problems:
        _fail(problems, source)
    return jobs


def score_job(job: Job, options=None) -> tuple[dict, list[dict]]:
    """(metrics, the rows with their verdicts) of one prepared task; metrics as a live run's, with
    ``seconds`` {load, score, total} and ``coverage``; warns on stderr when problems are missing."""
    ev, opts = EVALS[job.task], resolve_options(job.task, options)
    t1 = time.perf_counter()
    recorded, outcomes = recording(ev)
    with ScoringPool(recorded, job.problems, opts) as pool:
        for i, p in enumerate(job.problems):
            pool.submit(i, job.completions[p["id"]])
        metrics = pool.result()
    t2 = time.perf_counter()
    metrics["headline"] = ev.headline
    metrics["seconds"] = {"load": job.load_s, "score": t2 - t1, "total": job.load_s + t2 - t1}
    metrics["coverage"] = {"scored": len(job.problems), "problems": job.total,
                           **({"max_samples": job.max_samples} if job.max_samples else {})}
    for text in metrics.get("warnings", []):
        print(f"warning: {text}", file=sys.stderr)
    asked = min(job.total, job.max_samples or job.total)
    if len(job.problems) < asked:
        which = f"the first {asked}, max_samples" if asked < job.total else "the whole test set"
        print(f"warning: {job.task}: only {len(job.problems)} of the {asked} problems asked for ({which}) have "
              f"generations; its metrics are over those {len(job.problems)}, the other {asked - len(job.problems)} are "
              "not counted", file=sys.stderr)
    rows = []
    for p, outcome in zip(job.problems, outcomes):
        given = p.get("prompts") or []
        outs, ends = job.completions[p["id"]], job.finishes[p["id"]]
        for j, (completion, ended, verdict) in enumerate(zip(outs, ends, verdicts(ev, p, outs, outcome, opts))):
            prompt = given[j] if j < len(given) else None
            rows.append({"task": job.task, "id": p["id"], "completion": completion,
                         **({"prompt": prompt} if prompt is not None else {}), **ended, **verdict})
    metrics["finish_reasons"] = finish_counts(rows)
    return metrics, rows


def score_generations(records, *, data_dir=None, options=None, max_samples=None) -> dict[str, dict]:
    """Re-score in-memory rows (every task they hold): task -> metrics (numbers, ``headline``,
    ``seconds``, ``coverage``, any ``warnings``). Bad rows: ``ConfigError`` naming ``record N``."""
    records = list(records)
    where = [f"record {i + 1}" for i in range(len(records))]
    jobs = prepare(records, where, None, data_dir=data_dir, options=options, max_samples=max_samples)
    return {job.task: score_job(job, options)[0] for job in jobs}
