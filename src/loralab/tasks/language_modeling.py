"""Perplexity on WikiText-2 (test) and PTB, CorDA's sanity check that a decomposition keeps the model
(``cordalib/evaluate_utils.py``: 2,048-token windows). The corpus loading and the sliding-window
computation live in ``loralab.tasks.perplexity``; this module only registers them as evaluations.
Options: ``seq_len`` (2048), ``stride`` (None: non-overlapping windows), ``batch_size`` (1).
"""

from __future__ import annotations

from loralab.tasks.base import Eval
from loralab.tasks.metrics import settle

OPTIONS = {"seq_len": (2048, None), "stride": (None, None), "batch_size": (1, None)}


def run(name: str, model, tokenizer, *, data_dir, options: dict, **_) -> dict:
    """``{"perplexity": float}`` of ``model`` on the corpus ``name`` (``wikitext2`` or ``ptb``); an
    overflowing or NaN perplexity (a diverged model) is degenerate (``tasks.metrics``)."""
    from loralab.tasks.perplexity import load_corpus, perplexity

    text = load_corpus(name, data_dir)
    ppl = perplexity(model, tokenizer, text, seq_len=int(options["seq_len"]), stride=options["stride"],
                     batch_size=int(options["batch_size"]))
    return settle({"perplexity": float(ppl)})


EVALS = tuple(Eval(name, family="language_modeling", output_type="perplexity", headline="perplexity", options=OPTIONS,
                   run=run, description=f"{label} test perplexity, CorDA's 2,048-token windows")
              for name, label in (("wikitext2", "WikiText-2"), ("ptb", "PTB")))
