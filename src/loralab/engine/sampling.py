"""Choosing the next token: greedy, or sampling with a generator of each request's own.

Sampling follows transformers' logits warpers in order and meaning (temperature, then top-k, then
top-p keeping the smallest set of tokens whose probability reaches ``top_p``, at least one token),
but draws with ``torch.multinomial`` from a ``torch.Generator`` seeded per request and sample
(``request_seed``): a completion depends on its seed alone, not on which other requests shared
its batch, and the global random state is never read or advanced (so generating during training
leaves the training run's dropout masks as they would have been).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k filtering."""
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def request_seed(seed: int, request: int, sample: int) -> int:
    """The generator seed of sample ``sample`` of request ``request`` (its index in the whole call, so
    it is the same whichever process or batch generates it); 63 bits of SHA-256."""
    digest = hashlib.sha256(f"loralab-engine:{seed}:{request}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[N, vocab] fp32 logits -> probabilities after temperature, top-k and top-p."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the better tokens
        drop_sorted = before >= sampling.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row of ``logits`` [N, vocab] fp32 -> [N] long.

    Greedy is ``argmax`` (the first of equal maxima, as transformers' greedy search); sampling draws
    row ``i`` with ``generators[i]`` (rows whose generator is None, e.g. idle slots, get argmax)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = warp(logits, sampling)
    out = probs.argmax(dim=-1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out
