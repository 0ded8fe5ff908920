"""The registry of evaluations: name -> ``base.Eval`` (built from the family files' exports), the groups
(``commonsense`` = its eight tasks), and the checks and resolution of evaluation options. Split out of
``loralab.tasks.evaluate`` (which re-exports every name here) so that what sits beside the loops
(``rescore``, ``data_check``) reads the registry without importing the loops.

Options: ``options`` maps option names to values (a name applies to every selected evaluation that
has it, e.g. ``{"prompt": "seed000"}``), or an evaluation or group name to its own options
(``{"gsm8k": {"parser": "method_comparison"}}``); the latter wins. A value must be one the option
lists, or pass its rule (``option_rules``).
"""

from __future__ import annotations

from loralab.tasks import code, commonsense, competition_math, gsm8k, language_modeling, nqopen
from loralab.tasks.base import Eval

FAMILIES = (gsm8k, competition_math, code, commonsense, nqopen, language_modeling)


def _registry(families) -> dict[str, Eval]:
    out: dict[str, Eval] = {}
    for family in families:
        for ev in family.EVALS:
            if ev.name in out:
                raise ValueError(f"evaluation {ev.name!r} is exported by both {out[ev.name].family} and {ev.family}")
            out[ev.name] = ev
    return out


EVALS: dict[str, Eval] = _registry(FAMILIES)
GROUPS: dict[str, tuple[str, ...]] = {**commonsense.GROUPS}


def expand(names) -> list[str]:
    """Evaluation names with each group replaced by its members; order kept, repeats dropped."""
    out: list[str] = []
    for n in names:
        for member in GROUPS.get(n, (n,)):
            if member not in out:
                out.append(member)
    return out


def _suggest(name, known) -> str:
    from loralab.config import suggest  # config is the floor below tasks

    return suggest(name, known)


def validate_options(names, options: dict | None) -> list[str]:
    """Every problem with evaluation names (groups allowed) and options, one line each: unknown names
    ("did you mean"), and values that are not allowed (a listed value, or the rule of
    ``option_rules``: ``{"num_beams": "four"}`` is refused here, not after the model loads)."""
    known_names = [*EVALS, *GROUPS]
    problems = [f"evaluation '{n}' is unknown{_suggest(n, known_names)}; known: {', '.join(known_names)}"
                for n in names if n not in EVALS and n not in GROUPS]
    known = expand(n for n in names if n in EVALS or n in GROUPS)
    for key, value in (options or {}).items():
        if key in GROUPS or key in EVALS:  # a group's options apply to each of its members
            if not isinstance(value, dict):
                problems.append(f"eval option '{key}' must be a dict of options for {key}'s evaluations, got {value!r}")
                continue
            shown = f"{key}'s evaluations" if key in GROUPS else key
            for member in GROUPS.get(key, (key,)):
                problems += [p for sub, sub_value in value.items()
                             for p in _check_option(member, sub, sub_value, f"{key}.{sub}", shown) if p not in problems]
        else:
            owners = [n for n in known if key in EVALS[n].options]
            if not owners:
                all_keys = sorted({k for n in known for k in EVALS[n].options})
                problems.append(f"eval option '{key}' is not an option of {', '.join(known) or 'any selected evaluation'}"
                                f"{_suggest(key, all_keys)}; valid: {', '.join(all_keys) or 'none'}")
            for n in owners:
                problems += _check_option(n, key, value, key, n)
    return problems


def _check_option(name: str, key: str, value, label: str, shown: str) -> list[str]:
    """The problem with option ``key`` = ``value`` of evaluation ``name`` (``shown`` in the message)."""
    from loralab.tasks.option_rules import value_problem

    spec = EVALS[name].options
    if key not in spec:
        return [f"eval option '{label}' is unknown for {shown}{_suggest(key, spec)}; valid: {', '.join(spec) or 'none'}"]
    allowed = value_problem(key, value, spec[key][1])
    if allowed is not None:
        return [f"eval option '{label}' = {value!r} is not allowed for {shown}; allowed: {allowed}"]
    return []


def resolve_options(name: str, options: dict | None) -> dict:
    """Defaults of ``name``'s options updated by the flat options, then by the options of a group
    holding ``name`` (e.g. ``{"commonsense": {"num_beams": 1}}``), then by ``options[name]``."""
    spec = EVALS[name].options
    resolved = {k: v[0] for k, v in spec.items()}
    options = options or {}
    resolved.update({k: v for k, v in options.items() if k in spec})
    for group, members in GROUPS.items():
        if name in members and isinstance(options.get(group), dict):
            resolved.update(options[group])
    resolved.update((options.get(name) or {}) if isinstance(options.get(name), dict) else {})
    return resolved
