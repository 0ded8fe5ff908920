"""The ``loralab`` command: each subcommand is one module in ``loralab.commands`` with
``add_arguments(parser)`` and ``run(args) -> int``. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A new subcommand is one module plus one line here.
COMMANDS = {
    "run": ("loralab.commands.run", "train, evaluate and save one or more experiment folders"),
    "methods": ("loralab.commands.methods", "list the adaptation methods, one line each"),
    "tasks": ("loralab.commands.tasks", "list the training tasks and evaluations"),
    "report": ("loralab.commands.report", "a method x task table from result files"),
    "bench": ("loralab.commands.bench", "training throughput: transformers + peft vs loralab, side by side"),
    "decompose": ("loralab.commands.decompose", "CorDA KPA/IPA adapters and the full-decompose perplexity study"),
    "merge": ("loralab.commands.merge", "merge an adapter into its base, or convert PiSSA/CorDA to plain LoRA"),
    "eval": ("loralab.commands.eval", "score a model on evaluations, or re-score saved generations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
