"""Old name of the evaluations, which now live in ``loralab.tasks`` (one task namespace, issue 12).

Kept only so that importers outside the scoring files keep working until they switch:
``loralab.evals`` is ``loralab.tasks.evaluations``, and ``loralab.evals.<module>`` is
``loralab.tasks.<module>`` (the same module objects, so patches and registries are shared).
Import from ``loralab.tasks`` in new code; this package goes once nothing imports it.
"""

from __future__ import annotations

import sys

from loralab.tasks import (
    code,
    commonsense,
    competition_math,
    gsm8k,
    language_modeling,
    nqopen,
    numeric,
    perplexity,
)
from loralab.tasks.evaluations import *  # this package is an alias of that module
from loralab.tasks.evaluations import EVALS, read_records, run_eval, score_generations, validate_options  # noqa: F401

for _module in (code, commonsense, competition_math, gsm8k, language_modeling, nqopen, numeric, perplexity):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[-1]}"] = _module
del _module
