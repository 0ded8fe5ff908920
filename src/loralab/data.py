"""Batching shared by training and evaluation (the bottom floor: no loralab imports)."""

from __future__ import annotations

import torch


def collate(features: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized features; token labels pad with -100, scalar labels stack."""
    length = pad_to or max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [fill] * (length - len(f[key])) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            batch["labels"] = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
