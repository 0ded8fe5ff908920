"""Perplexity on WikiText-2 and PTB, as CorDA's ``evaluate_model`` measures it.

The test text is joined by "\\n\\n" and tokenized once; by default it is cut into
``numel // seq_len`` non-overlapping windows of ``seq_len`` tokens (CorDA, GPTQ, ASVD:
seq_len 2048), each scored with the causal-LM loss on its shifted tokens, and
ppl = exp(sum of NLL / number of predicted tokens). With ``stride`` the windows slide by
``stride`` tokens and only the tokens new to each window are scored (the Hugging Face recipe),
which gives every scored token more context. ``max_windows`` scores only the first windows
(a cheaper estimate on CPU; say so when reporting it). The corpora themselves (files, hub copies,
``load_corpus``) are ``loralab.tasks.corpora``'s.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm.auto import tqdm

from loralab.tasks.corpora import load_corpus  # noqa: F401  (the corpora's files and hub copies live there)

LOG_FLOAT_MAX = math.log(sys.float_info.max)


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seq_len: int = 2048, stride: int | None = None, batch_size: int = 1,
    max_windows: int | None = None, progress: bool = False,
) -> float:
    """exp(mean token NLL) of ``model`` on ``text`` (a string, or its 1-D token ids tensor); ``inf``
    where that overflows a float, NaN for a NaN loss (``tasks.metrics.settle`` turns both into the
    degenerate convention before a record sees them). ``perplexity_counts`` also says what was scored."""
    return perplexity_counts(model, tokenizer, text, seq_len, stride, batch_size, max_windows, progress)[0]


@torch.no_grad()
def perplexity_counts(
    model, tokenizer, text: str, seq_len: int = 2048, stride: int | None = None, batch_size: int = 1,
    max_windows: int | None = None, progress: bool | str = False,
) -> tuple[float, int, int, int]:
    """``(perplexity, windows scored, windows in the text, tokens scored)``: ``perplexity``'s value and what it
    covers (``max_windows`` takes the text's first windows). ``progress``: a bar on stderr (a string: its label).
    Raises ValueError for a text shorter than one window."""
    ids = text if isinstance(text, torch.Tensor) else tokenizer(text, return_tensors="pt").input_ids[0]
    device = next(model.parameters()).device
    windows = []  # (start, end, number of leading tokens not scored)
    if stride is None:
        windows = [(i * seq_len, (i + 1) * seq_len, 0) for i in range(ids.numel() // seq_len)]
    else:
        prev_end = 0
        for begin in range(0, ids.numel(), stride):
            end = min(begin + seq_len, ids.numel())
            windows.append((begin, end, (end - begin) - (end - prev_end)))
            prev_end = end
            if end == ids.numel():
                break
    available = len(windows)
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    label = progress if isinstance(progress, str) else "perplexity"
    for b in tqdm(range(0, len(windows), batch_size), desc=label, unit="batch", disable=not progress):
        group = windows[b : b + batch_size]
        width = max(e - s for s, e, _ in group)
        x = torch.stack([torch.nn.functional.pad(ids[s:e], (0, width - (e - s))) for s, e, _ in group]).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        for row, (s, e, skip) in enumerate(group):
            n = e - s
            lp = torch.log_softmax(logits[row, : n - 1], dim=-1)
            tok_nll = -lp.gather(1, x[row, 1:n, None]).squeeze(1)
            scored = tok_nll[max(skip - 1, 0) :]
            nll += scored.double().sum().item()
            count += scored.numel()
    model.train(was_training)
    mean = nll / count
    value = math.inf if mean > LOG_FLOAT_MAX else math.exp(mean)  # math.exp raises OverflowError past it
    return value, len(windows), available, count
