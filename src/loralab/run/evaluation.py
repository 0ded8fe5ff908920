"""The run's final evaluation, one evaluation at a time, so that a stop loses none that finished.

The evaluations (``names``): an SFT task's ``eval_names`` (``gsm8k``; the eight commonsense ones),
each run as the task's own ``evaluate`` with ``eval_tasks`` narrowed to it; a task without named
evaluations (GLUE: its dev or holdout split) is one evaluation, named after the task.

After each evaluation rank 0 writes ``<run>/checkpoints/evaluated/<name>.json``: its metrics, the
sha256 of the adapter files it scored, its seconds and the run's parts so far
(``run.record.Record.parts``); and rebuilds the run folder's ``generations.jsonl`` and
``evaluations.json`` (every finished evaluation's, in evaluation order; the task writes them into
``checkpoints/evaluating/`` first). A signal stops after the current evaluation; ``--resume``
takes the metrics (and the generations) of every evaluation that scored the same adapter bytes
and runs only the others (``reusable``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from loralab import checkpoint, distributed, results
from loralab.tasks.base import eval_count

DONE = "evaluated"
"""``checkpoints/evaluated/<name>.json``: one finished evaluation."""
RUNNING = "evaluating"
"""``checkpoints/evaluating/``: where the task writes the running evaluation's files."""
GENERATIONS, FULL = "generations.jsonl", "evaluations.json"


def names(task, params) -> list[str]:
    """The final evaluation's names: the task's ``eval_names`` (groups expanded), else the task's own name."""
    eval_names = getattr(task, "eval_names", None)
    return list(eval_names(params)) if eval_names is not None else [params.task]


def narrowed(task, params, name: str):
    """``params`` for the evaluation ``name`` alone (``eval_tasks`` [name]); a task without named evaluations: as given."""
    return dataclasses.replace(params, eval_tasks=[name]) if hasattr(task, "eval_names") else params


def counts(task, data, params, evals: list[str]) -> dict[str, int]:
    """How many examples or problems each evaluation scores (``tasks.base.eval_count``)."""
    return {name: eval_count(task, data, narrowed(task, params, name)) for name in evals}


def describe(counted: dict[str, int]) -> str:
    """``gsm8k (4 examples), math (4 examples)``; an evaluation that scores token windows or a harness's own
    documents (perplexity, lm-eval) counts none here: its name alone."""
    return ", ".join(f"{name} ({n} examples)" if n else name for name, n in counted.items())


def adapter_sha256(folder: Path) -> str:
    """sha256 over the saved weight files' names and sha256s (in name order): which adapter an evaluation scored."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{path.name}\0{results.sha256_file(path)}\0".encode())
    return digest.hexdigest()


def _done_path(root: Path, name: str) -> Path:
    return root / DONE / (name.replace("/", "--") + ".json")


def reusable(root: Path, evals: list[str], adapter_sha: str, say: Callable[[str], None]) -> dict[str, dict]:
    """name -> its ``evaluated/<name>.json`` for every evaluation of ``evals`` that finished on the adapter
    ``adapter_sha``; one that scored other adapter bytes is named on stderr and runs again."""
    found = {}
    for name in evals:
        path = _done_path(root, name)
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("adapter_sha256") == adapter_sha:
                found[name] = done
            else:
                say(f"--resume: {name}'s earlier evaluation scored another adapter (sha256 {done.get('adapter_sha256')}, "
                    f"now {adapter_sha}): evaluated again")
    return found


def _merge(metrics: dict, got: dict) -> None:
    for key, value in got.items():
        metrics[key] = [*metrics.get(key, []), *value] if key == "degenerate" else value


class Files:
    """The run folder's ``generations.jsonl`` and ``evaluations.json``, rebuilt from each finished
    evaluation's share (rank 0; ``out_dir`` None: nothing written)."""

    def __init__(self, out_dir: Path | None, reused: dict[str, dict]):
        self.out_dir, self.lines, self.full = out_dir, {}, {}
        if out_dir is None:
            return
        old_lines = (out_dir / GENERATIONS).read_text().splitlines(keepends=True) if (out_dir / GENERATIONS).exists() else []
        old_full = json.loads((out_dir / FULL).read_text()) if (out_dir / FULL).exists() else {}
        for name, done in reused.items():  # the shares of the evaluations --resume reuses
            tasks = set(done.get("tasks", []))
            self.lines[name] = [line for line in old_lines if json.loads(line).get("task") in tasks]
            self.full.update({k: v for k, v in old_full.items() if k in done.get("results", [])})

    def add(self, name: str, folder: Path) -> dict:
        """Take the evaluation ``name``'s files from ``folder`` (then removed); returns which of their entries are
        its own (``tasks``: its records' ``task``; ``results``: its keys of ``evaluations.json``), for a resume."""
        gen, full = folder / GENERATIONS, folder / FULL
        self.lines[name] = gen.read_text().splitlines(keepends=True) if gen.exists() else []
        own = json.loads(full.read_text()) if full.exists() else {}
        self.full.update(own)
        shutil.rmtree(folder, ignore_errors=True)
        return {"tasks": sorted({json.loads(line).get("task") for line in self.lines[name]} - {None}), "results": list(own)}

    def write(self, order: list[str]) -> None:
        lines = [line for name in order for line in self.lines.get(name, [])]
        if lines:
            checkpoint.write_text(self.out_dir / GENERATIONS, "".join(lines))
        if self.full:
            checkpoint.write_text(self.out_dir / FULL, json.dumps(self.full, indent=2, default=str) + "\n")


def run(evals: list[str], counted: dict[str, int], evaluate_one: Callable[[str, Path | None], dict], *, root: Path,
        out_dir: Path, adapter_sha: str | None, life, record, trackers, say: Callable[[str], None]) -> dict:
    """Evaluate ``evals`` in order (``evaluate_one(name, folder)``: its flat metrics, its files written into
    ``folder``), reusing those that finished on this adapter; returns every evaluation's metrics, merged.

    ``record.final`` and ``record.evaluations`` (ran, reused, not_run) are kept up to date after each, so a
    stop or a failure records what finished; a signal stops after the current evaluation (``Cancelled``)."""
    main = distributed.is_main()
    reused = distributed.broadcast_object(reusable(root, evals, adapter_sha, say) if main else None)
    record.evaluations = {"ran": [], "reused": [n for n in evals if n in reused],
                          "not_run": [n for n in evals if n not in reused]}
    if reused:  # their time counts: the run's parts as the newest of them recorded them
        newest = max((d.get("parts", []) for d in reused.values()), key=lambda ps: sum(p["total_time"] for p in ps))
        if sum(p["total_time"] for p in newest) > sum(p["total_time"] for p in record.earlier):
            record.earlier = newest
    todo = record.evaluations["not_run"]
    say(f"evaluating {describe({n: counted[n] for n in todo}) or 'nothing more'}"
        + (f"; reused, finished on this adapter before the interruption: {', '.join(reused)}" if reused else ""))
    files = Files(out_dir if main else None, reused)
    running = root / RUNNING
    metrics: dict = {}
    for name in evals:
        if name in reused:
            _merge(metrics, reused[name]["metrics"])
            record.final = dict(metrics)
            continue
        if main:
            shutil.rmtree(running, ignore_errors=True)  # a killed evaluation's leftovers
        t0 = time.perf_counter()
        got = evaluate_one(name, running if main else None)
        seconds = time.perf_counter() - t0
        trackers.log({f"eval/{k}": v for k, v in got.items()}, record.step)
        _merge(metrics, got)
        record.final = dict(metrics)
        record.evaluations["ran"].append(name)
        record.evaluations["not_run"].remove(name)
        if main:
            own = files.add(name, running)
            files.write(evals)
            checkpoint.write_text(_done_path(root, name), json.dumps({
                "name": name, "adapter_sha256": adapter_sha, "metrics": got, "seconds": seconds, **own,
                "parts": record.parts(record.step, record.train_time)}, indent=1, default=str))
        life.stop_if_requested()
    return metrics
