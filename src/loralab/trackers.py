"""Optional TensorBoard and Weights & Biases logging for ``loralab run`` (the ``report_to`` key).

Why a module of our own: transformers' integrations (``TensorBoardCallback``, ``WandbCallback``,
``TrainingArguments.report_to``) are ``TrainerCallback``s driven by ``Trainer``'s events, and
loralab's loop (``loralab.run.loop``) is not a ``Trainer``; it calls ``Trackers`` itself. Off by
default: then nothing is imported and nothing is written. The result JSON stays the record of a
run; trackers mirror its curves for watching them live.

What goes out, against the optimizer step, from rank 0 only: ``train/loss`` (mean over the steps
since the last log), ``train/learning_rate``, ``train/tokens_per_second`` (steady throughput so
far, the figure the progress bar and the record show: warm-up steps excluded) and ``eval/<metric>``
for every evaluation, mid-training and final. The configuration (training parameters, adapter
config, then what the run resolved: method, speed settings, steps) goes to W&B's run config and
to TensorBoard as text.

Where: TensorBoard event files in ``logging_dir`` (default ``<run output dir>/tensorboard``). W&B
files in ``<run output dir>/wandb`` (online or offline as ``WANDB_MODE`` says), project
``wandb_project`` (default ``$WANDB_PROJECT``, else ``loralab``), named after the run's output
folder. ``--resume`` reuses the output folder, and with it both places. A run killed after
logging step 6 and resumed from its step-4 checkpoint logs steps 5 and 6 again (on CPU bitwise the
same values): TensorBoard drops the events after the checkpoint's step (``purge_step``); W&B
continues the run whose id is kept in ``<run output dir>/wandb_run_id`` (``resume="allow"``), and
online keeps the first values of steps it has seen (it ignores steps below the run's last).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import numbers
import os
import secrets
import warnings
from pathlib import Path

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The ``report_to`` names and the package each needs (``pip install <package>``)."""
WANDB_ID_FILE = "wandb_run_id"
EXIT_CODES = {"success": 0, "failed": 1, "diverged": 3, "cancelled": 130}
"""A run's ending as W&B's exit code: the codes ``loralab run`` exits with."""


def backends(report_to) -> list[str]:
    """``report_to`` (one name, a list, ``"none"`` or []) as a list of backends without repeats."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for i, n in enumerate(names) if n != "none" and n not in names[:i]]


def missing_packages(names) -> dict[str, str]:
    """backend -> package, for the requested backends whose package is not installed (not imported)."""
    return {n: BACKENDS[n] for n in backends(names) if importlib.util.find_spec(BACKENDS[n]) is None}


def report_to_problems(value) -> list[str]:
    """``report_to``'s problems (``config.check_parameters``), one line each: unknown backends (with
    "did you mean"), and backends whose package is not installed: a missing package stops the run
    here, before any model is loaded."""
    names = [value] if isinstance(value, str) else value
    allowed = f"a list of {', '.join(BACKENDS)} (or one of them), or \"none\" / [] for none"
    problems = []
    for name in names:
        if name not in (*BACKENDS, "none"):
            close = difflib.get_close_matches(name, list(BACKENDS), n=1) if isinstance(name, str) else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"'report_to' = {value!r}: {name!r} is not allowed{hint}; allowed: {allowed}")
    if problems:
        return problems
    if "none" in names and len(names) > 1:
        return [f"'report_to' = {value!r}: \"none\" turns reporting off and cannot be combined; allowed: {allowed}"]
    return [f"'report_to' = {value!r} asks for {name}, whose package is not installed: pip install {package}"
            for name, package in missing_packages(names).items()]


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of ``metrics``, nested dicts flattened with ``/``; other values are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Trackers:
    """The run's trackers. ``Trackers()`` has none (reporting off, or a rank other than 0): every
    method then does nothing."""

    def __init__(self, writer=None, run=None):
        self.writer = writer  # torch.utils.tensorboard.SummaryWriter
        self.run = run  # wandb.Run

    @classmethod
    def open(cls, params, out_dir: Path, config: dict, resume_step: int = 0) -> Trackers:
        """The trackers ``params.report_to`` asks for, writing beside the run in ``out_dir``;
        ``config`` is the run's configuration; ``resume_step``: the checkpoint's step on ``--resume``."""
        names = backends(params.report_to)
        if not names:
            return cls()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        trackers = cls()
        try:
            if "tensorboard" in names:
                from torch.utils.tensorboard import SummaryWriter

                trackers.writer = SummaryWriter(log_dir=str(params.logging_dir or out_dir / "tensorboard"),
                                                purge_step=resume_step + 1 if resume_step else None)
            if "wandb" in names:
                import wandb

                id_file = out_dir / WANDB_ID_FILE
                run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
                id_file.write_text(run_id)
                trackers.run = wandb.init(project=params.wandb_project or os.environ.get("WANDB_PROJECT") or "loralab",
                                          name=out_dir.name, id=run_id, resume="allow", config=config, dir=str(out_dir))
        except BaseException:
            trackers.close("failed")
            raise
        if trackers.writer is not None:
            _add_text(trackers.writer, config, resume_step)  # on resume: the configuration as of that step
        return trackers

    def log(self, metrics: dict, step: int) -> None:
        """Numbers of ``metrics`` (e.g. ``{"train/loss": 0.4}``) at optimizer step ``step``."""
        values = scalars(metrics)
        if not values:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def log_config(self, config: dict, step: int = 0) -> None:
        """More configuration (W&B: merged into the run's config; TensorBoard: text entries at ``step``)."""
        if self.writer is not None:
            _add_text(self.writer, config, step)
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)

    def close(self, status: str = "success") -> None:
        """Flush and close (idempotent); ``status`` is the run's ending. A tracker that fails to
        close only warns: the run's own record must still be written."""
        writer, run, self.writer, self.run = self.writer, self.run, None, None
        try:
            if writer is not None:
                writer.close()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"report_to: closing tensorboard failed: {type(exc).__name__}: {exc}", stacklevel=2)
        try:
            if run is not None:
                run.finish(exit_code=EXIT_CODES.get(status, 1))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"report_to: closing wandb failed: {type(exc).__name__}: {exc}", stacklevel=2)


def _add_text(writer, config: dict, step: int = 0) -> None:
    """One text entry per top-level key (``config/<key>``); TensorBoard renders markdown, so each
    is an indented (code) block of JSON."""
    for key, value in config.items():
        text = json.dumps(value, indent=2, sort_keys=True, default=str)
        writer.add_text(f"config/{key}", "    " + text.replace("\n", "\n    "), step)
