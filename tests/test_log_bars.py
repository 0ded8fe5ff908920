"""Progress bars in a log file (stderr not a terminal) update every 30 s, not ten times a second; a terminal keeps
tqdm's default and a TQDM_MININTERVAL the user set wins."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from loralab.cli import LOG_BAR_INTERVAL, quiet_bars_in_logs

BARS = "import time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(20)):\n    time.sleep(0.05)\n"


def _bar_updates(env: dict) -> int:
    """How many times a 1-second, 20-step bar drew itself into a log (stderr a pipe)."""
    code = "from loralab.cli import quiet_bars_in_logs\nquiet_bars_in_logs()\n" + BARS
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    return err.count("\r") + err.count("\n")
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_a_bar_in_a_log_draws_itself_a_few_times_not_every_tenth_of_a_second():
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    assert _bar_updates(env) <= 3  # the first draw, the last, the close
    assert _bar_updates({**env, "TQDM_MININTERVAL": "0"}) >= 15  # the user's setting wins: every step


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_tqdms_default(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    quiet_bars_in_logs(_Terminal())
    assert "TQDM_MININTERVAL" not in os.environ
    quiet_bars_in_logs(io.StringIO())
    assert os.environ["TQDM_MININTERVAL"] == LOG_BAR_INTERVAL
