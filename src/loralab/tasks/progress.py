"""Progress of generation: a bar that counts problems and shows new tokens/s, refreshed by a
ticker so it never sits silent, and one-line notes for steps without a bar (issue 24). Used by
``loralab.tasks.generation``'s backends and ``loralab.tasks.evaluate``'s loop."""

from __future__ import annotations

import threading
import time

from loralab import distributed


class Progress:
    """A generation bar that counts problems (prompts; all of a prompt's samples done = one) and
    shows the new tokens per second of the finished ones, refreshed every ``tick`` seconds by a
    daemon thread, so elapsed time and ``live()``'s text (e.g. the engine's decode step) move
    even while no problem finishes. ``desc`` None or ``enabled`` False: no bar, no thread.
    Thread-safe; use as a context manager (leaving it stops the thread and closes the bar)."""

    def __init__(self, total: int, desc: str | None, enabled: bool = True, live=None, tick: float = 1.0):
        from tqdm import tqdm

        self.enabled = desc is not None and enabled
        self.bar = tqdm(total=total, desc=desc or "generate", unit="problem", disable=not self.enabled)
        self.tokens = 0
        self.start = time.perf_counter()
        self.live = live
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, args=(tick,), daemon=True, name="generation-progress")
            self._thread.start()

    def _postfix(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        parts = [f"{self.tokens / elapsed:.1f} new tok/s" if self.tokens else "",
                 self.live() if self.live is not None else ""]
        self.bar.set_postfix_str(", ".join(p for p in parts if p), refresh=False)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self._postfix()
                self.bar.refresh()

    def done(self, problems: int = 1, new_tokens: int = 0) -> None:
        """``problems`` more finished, which generated ``new_tokens`` tokens in all."""
        with self._lock:
            self.tokens += new_tokens
            self._postfix()
            self.bar.update(problems)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._postfix()
            self.bar.close()


def note(text: str, progress: str | None) -> None:
    """One line on stderr for a step that takes a while without a bar (main rank, progress on)."""
    if progress is not None and distributed.is_main():
        import sys

        print(f"[loralab] {progress}: {text}", file=sys.stderr, flush=True)


def new_tokens(ids: list[int], eos: set[int]) -> int:
    """Tokens generated before the first end-of-sequence token (padding after it not counted)."""
    for k, t in enumerate(ids):
        if t in eos:
            return k
    return len(ids)
