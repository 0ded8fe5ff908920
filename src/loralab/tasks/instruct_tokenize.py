"""Tokenisation of instruction fine-tuning rows, the three rules ``loralab.tasks.instruct``'s module
docstring describes (``masked``: Alpaca/MetaMath/CorDA, prompt masked; ``dora``: LLM-Adapters,
loss on everything; ``peft_mc``: peft method_comparison, no masking). Split out of
``loralab.tasks.instruct``, which re-exports these names. Only the rows a run selected reach
``tokenize_rows`` (``InstructTask.rows`` slices and holds out before tokenizing)."""

from __future__ import annotations

from typing import Callable

from loralab.data import IGNORE_INDEX


def _batches(items: list, size: int = 1000):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode_masked(tokenizer, sources: list[str], targets: list[str], max_length: int) -> list[dict]:
    """Alpaca/MetaMath/CorDA: labels keep only the positions after the tokenized source."""
    pad = tokenizer.pad_token_id
    full = tokenizer([s + t for s, t in zip(sources, targets)], truncation=True, max_length=max_length)["input_ids"]
    src = tokenizer(list(sources), truncation=True, max_length=max_length)["input_ids"]
    features = []
    for ids, source_ids in zip(full, src):
        n_source = sum(1 for t in source_ids if t != pad)
        labels = [IGNORE_INDEX] * min(n_source, len(ids)) + list(ids[n_source:])
        features.append({"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels})
    return features


def encode_dora(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """DoRA/LLM-Adapters ``tokenize``: truncate, add EOS if missing and there is room; loss on everything."""
    eos = tokenizer.eos_token_id
    features = []
    for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]:
        ids = list(ids)
        if ids[-1] != eos and len(ids) < max_length:
            ids.append(eos)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return features


def encode_peft_mc(tokenizer, sources: list[str], targets: list[str], max_length: int) -> list[dict]:
    """peft method_comparison: prompt + response, no masking; EOS appended where it fits."""
    eos = tokenizer.eos_token_id
    features = []
    for ids in tokenizer([s + t for s, t in zip(sources, targets)], truncation=True, max_length=max_length)["input_ids"]:
        ids = list(ids)
        if len(ids) < max_length:
            ids.append(eos)
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return features


def tokenize_rows(style: str, pair: Callable, rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Tokenized features and how many rows were dropped for having no supervised token."""
    from tqdm.auto import tqdm

    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; SFT targets end with it")
    features = []
    for chunk in tqdm(list(_batches(rows)), desc=f"tokenize ({style})", unit="k rows", leave=False):
        pairs = [pair(r) for r in chunk]
        sources = [p[0] for p in pairs]
        if style == "masked":
            targets = [p[1] + tokenizer.eos_token for p in pairs]
            features += encode_masked(tokenizer, sources, targets, max_length)
        elif style == "dora":
            features += encode_dora(tokenizer, sources, max_length)
        elif style == "peft_mc":
            features += encode_peft_mc(tokenizer, sources, [p[1] for p in pairs], max_length)
        else:
            raise ValueError(f"unknown tokenisation style {style!r}")
    kept = [f for f in features if any(label != IGNORE_INDEX for label in f["labels"])]
    return kept, len(features) - len(kept)
