"""What the ``loralab decompose`` tests share: the command line of a tiny calibration on a local model, and a
``load_model`` that fails the test (``no_weights``: a check must come before any weights load)."""

from __future__ import annotations

import pytest

from loralab.cli import main


def decompose_argv(model, data_dir, *extra) -> list[str]:
    """``loralab decompose`` on ``model`` with 2 calibration samples of 16 tokens, on the CPU, plus ``extra``."""
    return ["decompose", "--model", str(model), "--calib-size", "2", "--calib-seqlen", "16", "--batch-size", "2",
            "--data-dir", str(data_dir), "--device", "cpu", *extra]


def decompose(model, data_dir, *extra) -> int:
    """``decompose_argv``'s command run in this process; its exit code."""
    return main(decompose_argv(model, data_dir, *extra))


@pytest.fixture
def no_weights(monkeypatch):
    """``load_model`` fails the test: the command must stop before it."""
    import loralab.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the arguments were checked")

    monkeypatch.setattr(loralab.models, "load_model", load_model)
