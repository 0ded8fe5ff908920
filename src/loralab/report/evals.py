"""What a run's final evaluation covered: which evaluations it ran, how many examples each scored,
and whether ``max_eval_samples`` cut them to a subset.

An SFT run's record holds several evaluations in its flat ``eval`` (``boolq/accuracy``,
``boolq/n``, ``piqa/accuracy``, ...; ``meta_info.dataset.evaluations`` names them in order); a
generative evaluation records how many problems it scored as ``<evaluation>/n``. A GLUE record holds
its task's metrics (``accuracy``, ``f1``) and no count. ``training_parameters.max_eval_samples``
cuts every evaluation set to its first k examples: such a score is not the evaluation's full score,
so tables keep runs of different caps apart (``eval_cap``) and mark the cells scored on a subset.
"""

from __future__ import annotations


def is_count(metric: str) -> bool:
    """``n`` and ``<evaluation>/n``: how many examples were scored, not a score."""
    return metric == "n" or metric.endswith("/n")


def evaluations(run) -> list[str]:
    """The run's evaluations in recorded order: ``meta_info.dataset.evaluations`` (written since SFT
    runs record their settings), then the ``<evaluation>/`` prefixes of its metrics."""
    dataset = run.environment.get("dataset")
    recorded = dataset.get("evaluations") if isinstance(dataset, dict) else None
    names = list(recorded) if isinstance(recorded, dict) else []
    names += [k.rpartition("/")[0] for k in run.metrics if "/" in k]
    return list(dict.fromkeys(names))


def eval_count(run, metric: str) -> int | None:
    """How many examples ``metric`` was scored on (``<evaluation>/n``, or ``n`` for a flat metric), or
    None where the record holds no count (GLUE)."""
    prefix = metric.rpartition("/")[0]
    value = run.metrics.get(f"{prefix}/n" if prefix else "n")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def max_eval_samples(run) -> int | None:
    """The recorded ``max_eval_samples`` (None: no cap, or a value that is not a positive integer)."""
    value = (run.config.get("training_parameters") or {}).get("max_eval_samples")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def eval_cap(run) -> int | None:
    """The cap that made the run's scores subset scores: ``max_eval_samples``, unless every count the
    record holds is below it (each evaluation set was smaller than the cap: scored whole)."""
    cap = max_eval_samples(run)
    counts = [v for k, v in run.metrics.items() if is_count(k)]
    if cap is None or (counts and all(c < cap for c in counts)):
        return None
    return cap


def headline_evaluations(run, metric: str | None) -> list[str]:
    """The evaluations holding ``<evaluation>/<suffix of metric>``: more than one means the run's
    single headline column shows one evaluation of several (commonsense170k's eight)."""
    if not metric or "/" not in metric:
        return []
    name = metric.rpartition("/")[2]
    return [e for e in evaluations(run) if f"{e}/{name}" in run.metrics]


def eval_points(run, name: str | None, headline: str | None, task_label: str) -> list[tuple[str, str]]:
    """(evaluation, metric) cells one run fills in a table by evaluation. ``name``: ``--metric`` (``accuracy``: that
    metric of every evaluation; ``piqa/accuracy``: that one), else the metric of the run's ``headline`` in each of
    its evaluations. A run without evaluations (GLUE) fills one cell named ``task_label``."""
    name = name or (headline.rpartition("/")[2] if headline else None)
    if name is None:
        return []
    if "/" in name:
        return [(name.rpartition("/")[0], name)] if name in run.metrics else []
    points = [(e, f"{e}/{name}") for e in evaluations(run) if f"{e}/{name}" in run.metrics]
    return points or ([(task_label, name)] if name in run.metrics else [])
