"""The generation bench's rows (``loralab bench --eval``): loralab's engine, transformers
``generate`` (batched) and ``generate_batch``, each on the same ``Workload``.

New tokens are counted per request from the token ids each row returns: up to and including the
token that ends it (EOS, the token that completes a stop string in the generated text, or the
budget), so tokens a batched ``generate`` keeps producing for finished rows do not count.
Seconds are wall time of the whole call (CUDA synchronised), setup inside it (graph capture,
compilation, cache allocation) included; one untimed forward pass warms the device first. Peak
memory is ``torch.cuda.max_memory_allocated`` (reset before each row). ``peer_prompts`` runs the
peer rows on the first N prompts only (their full-task seconds are then extrapolated by prompt
count and marked so); the engine always runs every prompt.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field


@dataclass
class Workload:
    """The prompts every row gets: their text and token ids, the new-token budget per request and
    what ends a request early (stop strings, end-of-sequence ids; both empty: run to the budget)."""

    prompts: list[str]
    ids: list[list[int]]
    budget: int
    stop: list[str] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    """Token ids that end a request (empty: EOS off)."""

    @property
    def name(self) -> str:
        return "source" if self.stop or self.eos else "budget"


# ---------------------------------------------------------------- counting


def tokens_to_end(ids, tokenizer, work: Workload) -> int:
    """New tokens of one request up to and including the one that ends it: the first EOS, the
    token completing the first stop string in the generated text, or the budget."""
    ids = [int(t) for t in ids][: work.budget]
    for i, t in enumerate(ids):
        if t in work.eos:
            ids = ids[: i + 1]
            break
    if not work.stop or not _has_stop(tokenizer.decode(ids, skip_special_tokens=True), work.stop):
        return len(ids)
    lo, hi = 1, len(ids)  # smallest prefix whose text holds a stop string (text grows with the prefix)
    while lo < hi:
        mid = (lo + hi) // 2
        if _has_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), work.stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _has_stop(text: str, stop: list[str]) -> bool:
    return any(s in text for s in stop)


# ---------------------------------------------------------------- rows


class RowSkipped(Exception):
    """A row that cannot run here (the reason is its message)."""


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def clean(device: str) -> None:
    """Garbage collected, CUDA caches emptied and peak memory reset before a row."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak CUDA memory allocated since the last reset, in GiB (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class _TokenTap:
    """A tokenizer that remembers the ids of its latest ``decode`` calls, so the token ids behind
    each completion the public ``generate`` hands to ``on_complete`` can be counted exactly (the
    call returns text, and text does not re-tokenize to the same ids: random-weight models emit
    ids past the tokenizer's vocabulary, which decode to nothing). Everything else is the
    wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer, self.recent = tokenizer, []

    def decode(self, ids, *args, **kwargs):
        text = self._tokenizer.decode(ids, *args, **kwargs)
        self.recent = (self.recent + [([int(t) for t in ids], text)])[-4:]
        return text

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def engine_row(model, tokenizer, work: Workload, device: str, slots: int) -> dict:
    """loralab's engine through the public ``generate`` call (every prompt), ``slots`` slots.

    Tokens per request come from the ids behind the completion ``on_complete`` receives (checked:
    they decode to it); the engine drops the EOS token it stops at, so a request that ended before
    its budget without a stop string gets that token back. A request whose ids cannot be matched
    is counted by re-tokenizing its text (``retokenized`` says how many)."""
    from loralab.tasks.generation import GenerationSettings, generate, truncate_at_stop

    tap = _TokenTap(tokenizer)
    counts, retokenized = {}, []

    def complete(i, completions):
        match = next((ids for ids, text in reversed(tap.recent) if truncate_at_stop(text, work.stop) == completions[0]), None)
        if match is None:
            retokenized.append(i)
            counts[i] = len(tokenizer(completions[0], add_special_tokens=False)["input_ids"])
            return
        n = tokens_to_end(match, tokenizer, work)
        ended_by_stop = bool(work.stop) and _has_stop(tokenizer.decode(match, skip_special_tokens=True), work.stop)
        counts[i] = n + (1 if n < work.budget and not ended_by_stop else 0)

    settings = GenerationSettings(max_new_tokens=work.budget, stop=list(work.stop), temperature=0.0,
                                  backend="engine", slots=slots)
    with _eos(model, work):
        start = time.perf_counter()
        generate(model, tap, work.prompts, settings, on_complete=complete)
        _sync(device)
        seconds = time.perf_counter() - start
    return {"prompts": len(work.prompts), "new_tokens": sum(counts.values()), "seconds": seconds, "slots": slots,
            "token_count": "returned token ids", "retokenized": len(retokenized)}


@contextlib.contextmanager
def _eos(model, work: Workload):
    """The model's generation config names ``work.eos`` as its end-of-sequence ids for the call
    (an empty list: none, so a budget workload runs every request to its budget)."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = list(work.eos)
    try:
        yield
    finally:
        config.eos_token_id = saved


def transformers_row(model, tokenizer, work: Workload, device: str, batch_sizes, n_prompts: int) -> dict:
    """``model.generate`` batched with left padding, prompts sorted by length; each batch size of
    ``batch_sizes`` runs the same first ``n_prompts`` prompts, the fastest is the row."""
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(n_prompts), key=lambda i: len(work.ids[i]))
    kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
              "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": work.budget}
    if work.stop:
        kwargs.update(stop_strings=list(work.stop), tokenizer=tokenizer)
    if work.eos:
        kwargs["eos_token_id"] = list(work.eos)
    else:  # EOS off: its logit is masked until the budget, so every request runs to it
        kwargs["min_new_tokens"] = work.budget
    candidates = []
    for size in batch_sizes:
        clean(device)
        tokens = 0
        start = time.perf_counter()
        for b in range(0, len(order), size):
            batch = order[b:b + size]
            padded = tokenizer.pad({"input_ids": [work.ids[i] for i in batch]}, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**padded, **kwargs)
            new = out[:, padded["input_ids"].shape[1]:].tolist()
            tokens += sum(tokens_to_end(row, tokenizer, work) for row in new)
        _sync(device)
        seconds = time.perf_counter() - start
        candidates.append({"batch_size": size, "new_tokens": tokens, "seconds": seconds,
                           "tokens_per_s": tokens / seconds, "peak_gib": peak_gib(device)})
    best = max(candidates, key=lambda c: c["tokens_per_s"])
    return {"prompts": n_prompts, "new_tokens": best["new_tokens"], "seconds": best["seconds"],
            "peak_gib": best["peak_gib"], "batch_size": best["batch_size"], "candidates": candidates,
            "token_count": "returned token ids"}


def generate_batch_row(model, tokenizer, work: Workload, device: str, n_prompts: int) -> dict:
    """transformers' continuous batching, ``model.generate_batch`` with its default config (stop
    strings are not part of its API: requests run to EOS or the budget; counts stop at the string)."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        import transformers

        raise RowSkipped(f"transformers {transformers.__version__} has no generate_batch")
    config = GenerationConfig(max_new_tokens=work.budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=list(work.eos) if work.eos else -1)  # -1: EOS disabled (its API)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=[list(i) for i in work.ids[:n_prompts]], generation_config=config,
                                   progress_bar=False)
    _sync(device)
    seconds = time.perf_counter() - start
    failed = [o for o in outputs.values() if getattr(o, "error", None)]
    if len(outputs) != n_prompts or failed:
        raise RowSkipped(f"generate_batch returned {len(outputs)} of {n_prompts} requests, {len(failed)} failed"
                         + (f" (first error: {failed[0].error})" if failed else ""))
    tokens = sum(tokens_to_end(o.generated_tokens, tokenizer, work) for o in outputs.values())
    return {"prompts": n_prompts, "new_tokens": tokens, "seconds": seconds, "token_count": "returned token ids"}
