"""Perplexity on WikiText-2 (test) and PTB (validation), CorDA's sanity check that a decomposition keeps the model
(``cordalib/evaluate_utils.py``: 2,048-token windows). The corpus loading and the sliding-window
computation live in ``loralab.tasks.corpora`` (where each corpus's file is declared) and
``loralab.tasks.perplexity``; this module only registers them as evaluations.
Options: ``seq_len`` (2048), ``stride`` (None: non-overlapping windows), ``batch_size`` (1). ``max_samples``
(``loralab eval --max-samples``, ``max_eval_samples``) scores the corpus's first N windows; the metrics say how many
windows of how many, and how many tokens, were scored.
"""

from __future__ import annotations

from loralab.tasks.base import Eval
from loralab.tasks.corpora import _HUB, SOURCES
from loralab.tasks.metrics import settle

OPTIONS = {"seq_len": (2048, None), "stride": (None, None), "batch_size": (1, None)}


def run(name: str, model, tokenizer, *, data_dir, options: dict, max_samples: int | None = None, **_) -> dict:
    """``{"perplexity": float, "windows": int, "windows_total": int, "tokens": int}`` of ``model`` on the corpus
    ``name`` (``wikitext2`` or ``ptb``), over its first ``max_samples`` windows (None: all), with a progress bar;
    an overflowing or NaN perplexity (a diverged model) is degenerate (``tasks.metrics``)."""
    from loralab import distributed
    from loralab.tasks.perplexity import load_corpus, perplexity_counts

    text = load_corpus(name, data_dir)
    ppl, windows, total, tokens = perplexity_counts(
        model, tokenizer, text, seq_len=int(options["seq_len"]), stride=options["stride"],
        batch_size=int(options["batch_size"]), max_windows=max_samples,
        progress=f"{name} perplexity" if distributed.is_main() else False)
    return {**settle({"perplexity": float(ppl)}), "windows": windows, "windows_total": total, "tokens": tokens}


EVALS = tuple(Eval(name, family="language_modeling", output_type="perplexity", headline="perplexity", options=OPTIONS,
                   run=run, description=f"{label} {_HUB[name][2]} perplexity (CorDA's split), 2,048-token windows",
                   source=SOURCES[name])  # the split load_corpus reads (corpora._HUB), so the line cannot drift from it
              for name, label in (("wikitext2", "WikiText-2"), ("ptb", "PTB")))
