"""What a value of an evaluation option must be, for the options whose spec lists no allowed values
(``Eval.options``: name -> (default, allowed values or None)): commonsense's ``num_beams``, code's
``timeout``/``workers``/``ks``, the corpora's ``seq_len``/``stride``/``batch_size``.

Why: ``validate_options`` only checked names and listed values, so ``{"num_beams": "four"}`` passed the
configuration check and failed after the model had loaded (``int("four")``), blamed on the data. A
rule is checked at the edge, where every other bad value is (``loralab run`` exit 2, ``loralab eval``
exit 2). JSON types only: a string never stands for a number. ``tests/test_eval_trust.py`` checks that
every option without a list of allowed values has a rule here.
"""

from __future__ import annotations

import math


def _whole(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


RULES = {
    "num_beams": (lambda v: _whole(v, 1), "a whole number >= 1 (1: greedy)"),
    "timeout": (_positive_number, "a number of seconds > 0"),
    "workers": (lambda v: _whole(v, 1), "a whole number >= 1"),
    "ks": (lambda v: isinstance(v, list) and bool(v) and all(_whole(k, 1) for k in v),
           "a non-empty list of whole numbers >= 1, e.g. [1, 10, 100]"),
    "seq_len": (lambda v: _whole(v, 2), "a whole number of tokens >= 2"),
    "stride": (lambda v: v is None or _whole(v, 1), "null (windows that do not overlap) or a whole number of tokens >= 1"),
    "batch_size": (lambda v: _whole(v, 1), "a whole number >= 1"),
}
"""Option name -> (check, what is allowed, in words)."""


def value_problem(key: str, value, allowed) -> str | None:
    """What is allowed, when ``value`` is not an allowed value of option ``key`` (None: it is).
    ``allowed``: the spec's listed values (the value must equal one, of the same type: ``1`` is not
    ``True``), or None (the rule in ``RULES``; an option without one takes any value)."""
    if allowed is not None:
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return ", ".join(map(repr, allowed))
    check, words = RULES.get(key, (None, ""))
    if check is None or check(value):
        return None
    return words
