"""The test corpora of the ``language_modeling`` evaluations (WikiText-2, PTB): where each lives
(``SOURCES``, declared once: the ``Eval`` records carry them and ``load_corpus`` opens them) and how its
text is read. Apart from ``tasks.perplexity`` (which scores the text and re-exports ``load_corpus``)
so that the registry reads these without importing torch.

Text: the non-empty lines joined by ``"\\n\\n"`` (PTB's stripped), as CorDA's ``evaluate_model``
joins its test text. Splits are CorDA's (``cordalib/evaluate_utils.py``, seed 001's study): WikiText-2 **test**,
PTB **validation** (``ptb_text_only`` validation; the Mikolov file ``ptb.valid.txt`` holds the same sentences).
PTB's test split, which GPTQ-style tables report, is not what the seed's Fig. 2 / Table 6 score.
"""

from __future__ import annotations

from loralab.tasks.base import Source

SOURCES = {
    "wikitext2": Source("wikitext-2/wiki.test.raw", "wikitext (wikitext-2-raw-v1, test)"),
    "ptb": Source("ptb/ptb.valid.txt", "ptb_text_only (penn_treebank, validation)"),
}
_HUB = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"), "ptb": ("ptb_text_only", "penn_treebank", "validation", "sentence")}
"""``load_dataset`` arguments (id, config, split) and the text column: what ``SOURCES``' hub names."""


def load_corpus(name: str, data_dir=None) -> str:
    """The scored text of ``wikitext2`` (test) or ``ptb`` (validation): the file ``SOURCES[name]`` names in ``data_dir`` if it is
    there, else the hub (``models.Unreachable``, a ValueError, at once when offline). Raises ValueError for
    an unknown ``name``."""
    if name not in SOURCES:
        raise ValueError(f"perplexity corpus {name!r} is unknown; known: {', '.join(SOURCES)}")
    if data_dir is not None and SOURCES[name].path(data_dir).exists():
        lines = SOURCES[name].path(data_dir).read_text(encoding="utf-8").splitlines()
        return "\n\n".join(line.strip() if name == "ptb" else line for line in lines if line.strip())
    from loralab.models import hub_dataset  # Unreachable (exit 2) at once when offline

    hub, config, split, field = _HUB[name]
    return "\n\n".join(hub_dataset(hub, config, split=split)[field])
