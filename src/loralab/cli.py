"""The ``loralab`` command: each subcommand is one module in ``loralab.commands`` with
``add_arguments(parser)`` and ``run(args) -> int``. No logic lives here; the user-facing text is
``DESCRIPTION`` and ``EPILOG`` below (``loralab --help``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help). A new subcommand is one module plus one line here.
COMMANDS = {
    "run": ("loralab.commands.run", "train, evaluate and save one or more experiment folders"),
    "report": ("loralab.commands.report", "tables over seeds, curves, Pareto plots and an HTML page from result files"),
    "methods": ("loralab.commands.methods", "list the adaptation methods, one line each"),
    "tasks": ("loralab.commands.tasks", "list the training tasks and evaluations"),
    "eval": ("loralab.commands.eval", "score a model on evaluations, or re-score saved generations"),
    "merge": ("loralab.commands.merge", "merge an adapter into its base, or convert PiSSA/CorDA to plain LoRA"),
    "decompose": ("loralab.commands.decompose", "CorDA KPA/IPA adapters and the full-decompose perplexity study"),
    "bench": ("loralab.commands.bench", "training throughput: transformers + peft vs loralab, side by side"),
}

DESCRIPTION = """\
Train, evaluate and compare low-rank adaptation methods on one protocol: LoRA, rsLoRA, DoRA, PiSSA,
OLoRA, CorDA, MiLoRA, EVA, LoRA-GA, LoftQ, LoRA-FA (SVD-initialised too), LoRA+, on a float, NF4
(QLoRA) or FP8 base; 'loralab methods' lists every part and how they compose. An experiment is a folder holding an
adapter_config.json (any peft LoRA config; absent = full fine-tuning) and a
training_parameters.json (only what differs from the defaults). Each run writes a result JSON
file (results/, temporary_results/ or cancelled_results/) and a plain peft adapter (outputs/)."""

EPILOG = """\
examples:
  loralab run -v experiments/quickstart/lora-minilm-sst2     # one run (set LORALAB_DATA_DIR for local data)
  loralab run experiments/glue-minilm/*/rte                  # a whole column of a table
  loralab report results/glue-minilm                         # method x task table, mean ± sd over seeds
  loralab report results/glue-minilm --out report/           # + report.html (plots, runs, configs)

'loralab COMMAND --help' describes a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().replace("``", ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(_module=module)
        mod.add_arguments(p)
    return parser


class _KnownNoise(logging.Filter):
    """Drops bitsandbytes' start-up warning that its optional CPU 4-bit kernel (the `kernels`
    package) is missing: it prints on every import of peft on CPUs with AVX512-BF16, and
    bitsandbytes then uses its own CPU code, which is what loralab's CPU QLoRA runs. Said once in
    the README (the nf4 row of the methods table), not on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


LOG_BAR_INTERVAL = "30"
"""Seconds between a progress bar's updates where stderr is not a terminal (a log file, a job's output): tqdm's
0.1 s default rewrote every bar ten times a second into such logs (a newcomer's 1-minute CorDA run left
thousands of bar lines). tqdm reads ``TQDM_MININTERVAL``, so every bar (loralab's, transformers', peft's) follows;
a ``TQDM_MININTERVAL`` the user set wins."""


def quiet_bars_in_logs(stream=None) -> None:
    """Set ``TQDM_MININTERVAL`` to ``LOG_BAR_INTERVAL`` where ``stream`` (stderr) is not a terminal and the user did
    not set it."""
    stream = sys.stderr if stream is None else stream
    if not getattr(stream, "isatty", lambda: False)():
        os.environ.setdefault("TQDM_MININTERVAL", LOG_BAR_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KnownNoise())
    quiet_bars_in_logs()
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
