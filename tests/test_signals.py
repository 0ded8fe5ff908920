"""``loralab.signals.stop_on_signals``: real signals sent to this process with ``os.kill``."""

import os
import signal
import threading
import time

import pytest

from loralab.signals import stop_on_signals


class Stopped(KeyboardInterrupt):
    pass


def wait_for_signal():
    """Let the pending signal's Python handler run (it runs between bytecodes of the main thread)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError("no signal arrived")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_raises_inside_and_the_handler_is_restored(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Stopped, match=sig.name):
        with stop_on_signals(raising=Stopped) as got:
            assert got["signal"] is None
            os.kill(os.getpid(), sig)
            wait_for_signal()
    assert got["signal"] is sig and 128 + got["signal"] == {"SIGINT": 130, "SIGTERM": 143}[sig.name]
    assert signal.getsignal(sig) is before


def test_only_the_signals_asked_for_are_handled_and_the_previous_handler_comes_back():
    seen, term = [], signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
            with stop_on_signals((signal.SIGUSR1,)):
                assert signal.getsignal(signal.SIGTERM) is term  # not asked for: untouched
                os.kill(os.getpid(), signal.SIGUSR1)
                wait_for_signal()
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler from before is back
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with stop_on_signals((signal.SIGUSR1, signal.SIGUSR2), raising=Stopped) as got:
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)  # ignored: nothing is raised
            assert got["signal"] is None
            with pytest.raises(Stopped, match="SIGUSR2"):  # the one not ignored still stops
                os.kill(os.getpid(), signal.SIGUSR2)
                wait_for_signal()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_off_the_main_thread_nothing_is_changed():
    result, before = {}, signal.getsignal(signal.SIGTERM)

    def work():
        with stop_on_signals(raising=Stopped) as got:
            result["inside"] = signal.getsignal(signal.SIGTERM)
            result["got"] = got

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result["inside"] is before and result["got"] == {"signal": None}
