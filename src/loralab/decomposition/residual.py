"""The mark of a residual model that ``loralab decompose --save-path`` wrote (``build.build_adapter``). Apart from
``build`` so that the readers of the mark (``merge``, ``init_adapter``) need not import ``build``, which imports
``checks`` (and through it ``methods.common``, which reaches ``merge``): an import circle otherwise."""

RESIDUAL_MARKER = "decompose.json"
"""Written into ``--save-path`` beside the residual model: what was decomposed, how, and from what."""
