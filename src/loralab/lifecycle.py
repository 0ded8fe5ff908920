"""A run's lifecycle: its phases, loralab's own SIGINT/SIGTERM handlers, and how each ending is named.

Endings (``train_info.status`` of the record): ``success``; ``failed`` (an exception: its type,
message, traceback tail and the phase it came from: build, calibrate, train, save, evaluate);
``cancelled`` (SIGINT or SIGTERM); ``diverged`` (a non-finite loss or weight).

Signals: loralab installs its own handlers whatever the inherited disposition (a job started in
the background, under nohup or by a scheduler may inherit SIGINT as *ignored*, and Python then
installs no KeyboardInterrupt handler at all). During training the first signal asks the loop to
stop after the current optimizer step, write a checkpoint and a ``cancelled`` record; a second one,
or a signal in any other phase, interrupts at once (``Cancelled``, a KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback

PHASES = ("build", "calibrate", "train", "save", "evaluate")


class Cancelled(KeyboardInterrupt):
    """SIGINT or SIGTERM received."""


class Diverged(RuntimeError):
    """A non-finite loss or trainable weight; ``step`` is the first step seen non-finite."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"{what} at step {step}")


class Lifecycle:
    """Tracks the phase and the stop request; use as a context manager around a run."""

    def __init__(self, log=print):
        self.phase = "build"
        self.stop_requested: str | None = None
        self.log = log
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == "train" and self.stop_requested is None:
            self.stop_requested = name
            self.log(f"{name}: stopping after this step (checkpoint, then a cancelled record); again to stop at once")
            return
        raise Cancelled(name)

    @contextlib.contextmanager
    def enter(self, phase: str):
        """Mark the phase a failure would be attributed to."""
        assert phase in PHASES, phase
        previous, self.phase = self.phase, phase
        yield  # an exception leaves self.phase at the failing phase, for the record
        self.phase = previous


def error_info(exc: BaseException, phase: str, lines: int = 25) -> dict:
    """The ``train_info.error`` entry of a failed record."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tail).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "phase": phase,
            "traceback": "\n".join(text[-lines:])}
