"""Stopping a command on SIGINT / SIGTERM: one context manager for ``loralab eval`` and ``loralab
decompose`` (a run's own handling, phase-aware and deferred, is ``run.record``'s).

Inside ``stop_on_signals``, each signal asked for raises an exception in the main thread (so the
work inside stops where it is, and the command writes what finished); the signal received is
recorded; the handlers that were there before are put back on leaving. A signal that was ignored
on entry (SIGINT of a job a non-interactive shell put in the background, ``nohup``'s SIGHUP) stays
ignored, as whoever started the process asked. Off the main thread, where Python sets no handler,
nothing is changed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM),
                    raising: type[BaseException] = KeyboardInterrupt) -> Iterator[dict]:
    """While inside, each of ``signals`` (``signal.Signals``; default SIGINT and SIGTERM) raises
    ``raising(name)`` (e.g. ``KeyboardInterrupt("SIGTERM")``) in the main thread. Yields a dict whose
    ``"signal"`` is None, then the ``signal.Signals`` received (128 + its value is the shell's exit
    code: 130 for SIGINT, 143 for SIGTERM). A signal ignored (``SIG_IGN``) on entry is left alone;
    on leaving, every handler replaced is restored, also when the exception propagates."""
    got: dict = {"signal": None}

    def handle(signum, frame):
        got["signal"] = signal.Signals(signum)
        raise raising(got["signal"].name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handle)
    try:
        yield got
    finally:
        for sig, handler in previous.items():  # None: a handler not set from Python, as good as the default
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
