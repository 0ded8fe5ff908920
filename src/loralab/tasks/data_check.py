"""Whether every evaluation asked for can find its data, checked before a model is loaded.

Why: ``loralab eval --tasks commonsense --data-dir D`` scored boolq, piqa and social_i_qa, then stopped
at hellaswag (not in the local folder, the hub unreachable), having loaded the model and generated for
nothing. ``data_problems`` runs each evaluation's own loader (``Eval.load``; the corpora's
``corpora.load_corpus``) with the run's data folder and sample limit, so the check is the load
itself, and names every failure at once with where the data was looked for: the file under the data
folder and the hub dataset used without one (``SOURCES``: each record's ``Eval.source``, declared in
its family file and opened by its loader; tests check them against the loaders and the shared data).
The lm-eval bridges fetch their own data and are not checked here.
"""

from __future__ import annotations

from pathlib import Path

from loralab.tasks.corpora import load_corpus
from loralab.tasks.registry import EVALS

SOURCES: dict[str, tuple[str, str]] = {name: (ev.source.local, ev.source.hub)
                                       for name, ev in EVALS.items() if ev.source is not None}
"""Evaluation -> (file under the data folder, what is fetched from the hub without a data folder): the
``source`` each family file declares on its ``Eval`` records, the path its loader opens."""


def _load(name: str, data_dir, max_samples: int | None) -> None:
    ev = EVALS[name]
    if ev.load is not None:
        ev.load(name, data_dir, max_samples)
    elif ev.family == "language_modeling":
        load_corpus(name, data_dir)


def data_problems(names: list[str], data_dir, max_samples: dict | None = None) -> list[str]:
    """One line per evaluation in ``names`` whose data cannot be loaded: the file looked for under the
    data folder (or that none was given), the hub dataset that stands in without one, and the error."""
    problems, advice, last = [], "", None
    for name in names:
        try:
            _load(name, data_dir, (max_samples or {}).get(name))
        except (OSError, ValueError, KeyError, TypeError, ConnectionError) as exc:  # Unreachable is a ValueError
            problems.append(_problem(name, data_dir, exc))
            text = (getattr(exc, "problems", None) or [""])[0]
            if "Work offline" in text:  # models.Unreachable's advice: said once, on the last line it concerns
                advice, last = text[text.index("Work offline"):], len(problems) - 1
    if last is not None:
        problems[last] += f". {advice}"
    return problems


def _problem(name: str, data_dir, exc: BaseException) -> str:
    lines = getattr(exc, "problems", None) or str(exc).strip().splitlines() or [""]
    why = lines[0].split(". Work offline")[0]  # Unreachable: what and why; its advice is this line's
    why = f"{type(exc).__name__}: {why if len(why) <= 300 else why[:297] + '...'}"
    path, hub = SOURCES.get(name, ("?", "?"))
    if data_dir is None:
        return (f"{name}: no data folder was given (--data-dir, $LORALAB_DATA_DIR, data_dir), so it comes from the "
                f"hub: {hub}; that failed ({why}); in a data folder it is {path}")
    file = Path(data_dir) / path
    if file.exists():
        return f"{name}: {file} could not be read ({why})"
    fallback = "" if isinstance(exc, FileNotFoundError) else f"; the hub fallback failed ({why})"
    return f"{name}: {file} is not there{fallback}; without a data folder it comes from the hub: {hub}"
