"""One rule for degenerate metrics (issue 21, point 3): no NaN or infinity ever leaves a scorer.

A metric is **degenerate** when its definition gives no number for these predictions:

- a correlation of a constant (Pearson, Spearman, Matthews) — either side has zero variance, so
  the formula divides 0 by 0 (scipy returns NaN for Pearson/Spearman, scikit-learn 0 for MCC);
- F1 with no positive prediction — precision is 0/0 (scikit-learn scores it 0);
- any value that comes out NaN or infinite (non-finite predictions of a diverged model, a
  perplexity whose exp overflows, an empty evaluation).

The convention: a degenerate metric is recorded as ``CONVENTION[name]`` — **0 for every
higher-is-better metric** (a correlation of a constant is "no association", MCC's own convention;
F1 and accuracy their floor), and **the largest finite float** for a lower-is-better one
(perplexity, loss: worse than any real score) — and its name is listed under the sibling key
``"degenerate"`` of the same metrics dict::

    {"pearson": 0.0, "spearmanr": 0.0, "degenerate": ["pearson", "spearmanr"]}

Every other key stays a number, so a flat numeric dict is ``numbers(metrics)``; the key is absent
when nothing is degenerate. The report marks such cells and its paired comparison counts a
degenerate score as a loss against a non-degenerate one (``report/stats.py``).
"""

from __future__ import annotations

import math
import sys

import numpy as np

DEGENERATE = "degenerate"
WORST_LOWER_IS_BETTER = sys.float_info.max


def lower_is_better(name: str) -> bool:
    return any(s in name.lower() for s in ("loss", "perplexity", "ppl", "error"))


def convention(name: str) -> float:
    """The value a degenerate ``name`` is recorded as."""
    return WORST_LOWER_IS_BETTER if lower_is_better(name) else 0.0


def settle(values: dict, degenerate=()) -> dict:
    """``values`` (name -> number) under the rule: every name in ``degenerate`` and every
    non-finite or missing-number value becomes ``convention(name)`` and is listed under
    ``"degenerate"`` (in ``values`` order). Non-numeric entries (``headline``, ``seconds``, ...)
    pass through unchanged; an existing ``"degenerate"`` list is kept and extended."""
    out, flagged = {}, list(values.get(DEGENERATE, []))
    for name, value in values.items():
        if name == DEGENERATE:
            continue
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
        if number and (name in degenerate or not math.isfinite(float(value))):
            out[name] = convention(name)
            flagged.append(name)
        else:
            out[name] = int(value) if isinstance(value, (int, np.integer)) else float(value) if number else value
    if flagged:
        out[DEGENERATE] = list(dict.fromkeys(flagged))
    return out


def numbers(metrics: dict) -> dict:
    """The metric numbers alone (the flat dict), without ``"degenerate"`` or other annotations."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flagged(metrics: dict) -> set[str]:
    """The names ``metrics`` marks degenerate."""
    value = metrics.get(DEGENERATE) or []
    return {v for v in value if isinstance(v, str)} if isinstance(value, (list, tuple)) else set()


def constant(x) -> bool:
    """Zero variance, fewer than two values, or a non-finite value: a correlation with it has no number."""
    x = np.asarray(x, dtype=float)
    return x.size < 2 or not np.isfinite(x).all() or bool(np.ptp(x) == 0)


# ---- the scorers ---------------------------------------------------------------------------------
def score(name: str, preds, refs) -> tuple[float, bool]:
    """(value, degenerate) of one classification/regression metric, never NaN or infinite."""
    import warnings

    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    preds, refs = np.asarray(preds), np.asarray(refs)
    if preds.size == 0:
        return convention(name), True
    if name == "accuracy":
        value, degenerate = float((preds == refs).mean()), False
    elif name == "f1":
        degenerate = not (preds == 1).any()  # precision 0/0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's UndefinedMetricWarning: the flag says it
            value = float(f1_score(refs, preds, zero_division=0.0))
    elif name in ("matthews_correlation", "pearson", "spearmanr"):
        degenerate = constant(preds) or constant(refs)
        if degenerate:
            value = 0.0
        elif name == "matthews_correlation":
            value = float(matthews_corrcoef(refs, preds))
        else:
            value = float((pearsonr if name == "pearson" else spearmanr)(preds, refs)[0])
    else:
        raise ValueError(f"unknown metric {name!r}")
    if not math.isfinite(value):
        return convention(name), True
    return value, degenerate


def score_all(names, preds, refs) -> dict:
    """``{name: value, ..., "degenerate": [...]}`` for ``names``, under the rule."""
    values, degenerate = {}, []
    for name in names:
        values[name], bad = score(name, preds, refs)
        if bad:
            degenerate.append(name)
    return settle(values, degenerate)
