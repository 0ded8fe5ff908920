"""Scoring beside generation: ``ScoringPool`` judges each problem as soon as its completions exist
(in a spawn process pool, threads, or this process, as the evaluation's ``Eval.pool`` says) and
aggregates the outcomes in problem order, so the metrics equal whole-list scoring (``Eval.score``).
Split out of ``loralab.tasks.evaluate``, which re-exports ``ScoringPool``, ``score`` and
``score_workers``."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import BrokenExecutor

from loralab.tasks.base import Eval


def score_workers(ev: Eval, options: dict) -> int:
    """Workers of ``ev``'s scoring pool: code's ``workers`` option (threads waiting on sandboxes);
    for a process pool the CPU cores this rank may use (cores / ranks on this host, one left for the
    process that drives the GPU), at most 8."""
    if "workers" in options:
        return max(1, int(options["workers"]))
    from loralab import distributed

    return max(1, min(8, (os.cpu_count() or 2) // max(1, distributed.current().world_size) - 1))


def _ignore_sigint() -> None:
    """A scoring worker's start: Ctrl-C in a terminal reaches the whole process group, and the run (or
    ``loralab eval``) decides what a signal stops; a worker that took it printed a KeyboardInterrupt traceback and
    broke the pool, whose problems were then scored again in the main process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ScoringPool:
    """Scores the problems of one evaluation as their completions arrive.

    ``submit(index, completions)`` (thread-safe; ``index`` into ``problems``) starts
    ``ev.score_problem`` in ``ev``'s pool (see ``base.POOLS``), or keeps the completions for the end
    when ``ev.pool`` is None; submitting an index again replaces its completions. ``result()``
    scores what was never submitted as having no completion, waits for every outcome and returns
    ``ev.aggregate`` over them in problem order. Use as a context manager: leaving it shuts the
    pool down (unstarted work cancelled). Process pools use spawn (a forked child would inherit CUDA
    state and the generating threads), so a script that calls ``run_eval`` must guard its top level
    with ``if __name__ == "__main__":`` (the ``loralab`` command does); if the workers die, the
    problems are scored in this process with a warning, giving the same metrics."""

    def __init__(self, ev: Eval, problems: list[dict], options: dict, workers: int | None = None):
        self.ev, self.problems, self.options = ev, problems, options
        self.workers = workers or score_workers(ev, options)
        self._submitted: dict[int, list[str]] = {}
        self._futures: dict = {}
        self._executor = None
        self._broken = False
        self._lock = threading.Lock()

    def _pool(self):
        if self._executor is None:
            from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

            if self.ev.pool == "process":
                import multiprocessing

                self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_ignore_sigint)
            else:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"score-{self.ev.name}")
        return self._executor

    def submit(self, index: int, completions: list[str]) -> None:
        completions = list(completions)
        with self._lock:
            if self._submitted.get(index) == completions:
                return
            self._submitted[index] = completions
            if self.ev.pool is None:
                return
            old = self._futures.pop(index, None)
            if old is not None:
                old.cancel()
            if self._broken:
                return
            try:
                self._futures[index] = self._pool().submit(self.ev.score_problem, self.ev.name, self.problems[index],
                                                           completions, self.options)
            except BrokenExecutor:
                self._give_up()

    def _give_up(self) -> None:
        """Workers died (a spawn child cannot start when the calling script lacks the
        ``if __name__ == "__main__":`` guard): say so once and score the rest in this process."""
        if not self._broken:
            self._broken = True
            print(f"warning: {self.ev.name}: scoring workers stopped; scoring in this process instead (a script that "
                  "runs evaluations must guard its top level with `if __name__ == \"__main__\":`, as spawn requires)",
                  file=sys.stderr)

    def _outcome(self, i: int):
        future = None if self._broken else self._futures.get(i)
        if future is not None:
            try:
                return future.result()
            except BrokenExecutor:
                self._give_up()
        return self.ev.score_problem(self.ev.name, self.problems[i], self._submitted.get(i, []), self.options)

    def result(self) -> dict:
        outcomes = [self._outcome(i) for i in range(len(self.problems))]
        return self.ev.aggregate(self.ev.name, self.problems, outcomes, self.options)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def score(ev: Eval, problems: list[dict], completions: dict, options: dict, workers: int | None = None) -> dict:
    """Whole-list scoring in ``ev``'s pool: ``completions`` maps problem id -> list of completions."""
    with ScoringPool(ev, problems, options, workers) as pool:
        for i, p in enumerate(problems):
            pool.submit(i, completions.get(p["id"], []))
        return pool.result()
