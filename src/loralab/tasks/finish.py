"""Why each completion ended, for the generation rows: ``finish_reason``, ``stop_reason``, ``new_tokens``.

The vocabulary is vLLM's ``CompletionOutput`` (and the OpenAI API's): ``finish_reason`` is ``"stop"``
when the completion ended on a stop (``stop_reason`` says which: the stop string matched, or the
end-of-sequence token's text, e.g. ``"<|im_end|>"``) and ``"length"`` when its token budget ran out
(``max_new_tokens``, less the prompt under a prompt-inclusive ``max_length``; ``stop_reason`` None).
A row re-scored from a file written before these fields existed says ``"unknown"`` (``new_tokens``
None). ``new_tokens`` counts the tokens generated for that completion, the end-of-sequence token not
counted (as the engine's ``new_tokens`` counter), tokens generated past a stop string before it was
seen counted (the text is cut at the stop string, the tokens were spent).

One rule for every backend (``finish_fields``), applied to the completion's text before it is cut:
a stop string in the text wins (the earliest, as ``generation.truncate_at_stop`` cuts there; vLLM
also checks stop strings before the budget), then the end-of-sequence token that ended the
sequence, else the budget. A sequence ends early only on those two, so "neither" is "length".
"""

from __future__ import annotations

FINISH_KEYS = ("finish_reason", "stop_reason", "new_tokens")
"""The keys a generation row carries about how its completion ended (kept when a file is re-scored)."""
REASONS = ("stop", "length", "unknown")
UNKNOWN = {"finish_reason": "unknown", "stop_reason": None, "new_tokens": None}
"""What a row says when the generator did not (a file written before these fields, a stand-in generator)."""


def finish_fields(text: str, stops: list[str], eos_text: str | None, new_tokens: int) -> dict:
    """``{"finish_reason", "stop_reason", "new_tokens"}`` of one completion (module docstring).

    ``text``: the completion decoded, not yet cut at the stop strings; ``stops``: the evaluation's stop
    strings; ``eos_text``: the end-of-sequence token that ended the sequence as text (None: it did not
    end on one); ``new_tokens``: tokens generated, that token not counted."""
    cut, matched = len(text), None
    for s in stops:
        i = text.find(s)
        if i != -1 and i < cut:
            cut, matched = i, s
    if matched is not None:
        return {"finish_reason": "stop", "stop_reason": matched, "new_tokens": new_tokens}
    if eos_text is not None:
        return {"finish_reason": "stop", "stop_reason": eos_text, "new_tokens": new_tokens}
    return {"finish_reason": "length", "stop_reason": None, "new_tokens": new_tokens}


def row_finish(row: dict) -> dict:
    """The finish fields a saved row holds, ``UNKNOWN``'s where it holds none (an older file)."""
    if row.get("finish_reason") not in REASONS:
        return dict(UNKNOWN)
    return {k: row.get(k) for k in FINISH_KEYS}


def finish_counts(finishes) -> dict[str, int]:
    """Rows per ``finish_reason`` over ``finishes`` (each a dict with that key): ``{"stop", "length"}``
    always, ``"unknown"`` when some row does not say. ``length`` is the count of completions cut off at
    the budget, the one truncation count a result holds."""
    counts = {"stop": 0, "length": 0}
    for f in finishes:
        reason = f.get("finish_reason", "unknown")
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def at_budget(finishes: list[dict]) -> list[bool] | None:
    """Per completion whether it reached its budget (``finish_reason`` "length"), for a scorer's warning
    (code's ``at_budget``); None when none of them says (all "unknown")."""
    if all(f.get("finish_reason", "unknown") == "unknown" for f in finishes):
        return None
    return [f.get("finish_reason") == "length" for f in finishes]


# ----------------------------------------------------------------------------- what each backend knows


def row_ending(tokens: list[int], eos: set[int], stopped_at: int | None, pad: int | None) -> tuple[int, int | None]:
    """(new tokens, the EOS id that ended it or None) of one row of ``model.generate``'s new tokens (cut at
    its budget), as the engine counts them: up to its first EOS (not counted), or up to where its stop
    criterion first fired (``stopped_at``; what follows is padding), else all of them. ``pad``: beam
    search's rows, whose stops are not recorded: trailing padding (a pad id that is no EOS) is not counted."""
    first = next((k for k, t in enumerate(tokens) if t in eos), None)
    if stopped_at is not None and (first is None or stopped_at <= first):
        return min(stopped_at, len(tokens)), None
    if first is not None:
        return first, tokens[first]
    n = len(tokens)
    while pad is not None and pad not in eos and n and tokens[n - 1] == pad:
        n -= 1
    return n, None


def eos_text(tokenizer, token: int | None) -> str | None:
    """The end-of-sequence token ``token`` as text (``<|im_end|>``); None for None."""
    return None if token is None else tokenizer.decode([token])


def vllm_finish(output, eos: set[int], tokenizer) -> dict:
    """The finish fields of a vLLM ``CompletionOutput`` (its text is already cut at the stop string): its
    own ``finish_reason``; ``stop_reason`` the stop string, else the EOS (or stop token) as text."""
    ids = list(output.token_ids)
    ended_on_eos = bool(ids) and ids[-1] in eos
    reason = output.stop_reason
    if output.finish_reason == "stop" and not isinstance(reason, str):
        reason = eos_text(tokenizer, reason if reason is not None else (ids[-1] if ids else None))
    return {"finish_reason": output.finish_reason if output.finish_reason in ("stop", "length") else "unknown",
            "stop_reason": reason if output.finish_reason == "stop" else None,
            "new_tokens": len(ids) - ended_on_eos}
