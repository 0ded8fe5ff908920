"""Batching shared by training and evaluation (the bottom floor: no loralab imports)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position that takes no loss (torch's cross_entropy default)


def collate(features: list[dict], pad_id: int, pad_to: int | None = None, *, multiple_of: int = 1,
            cut: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad tokenized features into one batch: the one padding routine of training (``Step``),
    evaluation, calibration and the bench's peer.

    Width: ``pad_to`` when given (longer samples are cut there, or at ``cut`` where that is shorter: a
    batch padded past the samples' own limit), else the longest sample rounded up to ``multiple_of``. ``input_ids`` pad with ``pad_id``; ``attention_mask`` is 1 over each sample's
    tokens, or the sample's own ``attention_mask`` where it has one (a tokenizer that padded it already:
    ``pad_to_max_length``); ``token_type_ids`` (when the features have them) pad with 0; token labels (a list
    per sample) pad with -100; scalar labels stack (float32 for regression, int64 otherwise).
    Returns int64 tensors of shape (batch, width), scalar labels of shape (batch,)."""
    longest = max(len(f["input_ids"]) for f in features)
    width = pad_to if pad_to is not None else -(-longest // multiple_of) * multiple_of
    n, limit = len(features), width if cut is None else min(width, cut)
    batch = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long)}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.zeros((n, width), dtype=torch.long)
    labels = [f["labels"] for f in features] if "labels" in features[0] else None
    token_labels = labels is not None and isinstance(labels[0], (list, tuple))
    if token_labels:
        batch["labels"] = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        k = min(len(f["input_ids"]), limit)
        batch["input_ids"][row, :k] = torch.tensor(f["input_ids"][:k])
        mask = f.get("attention_mask")  # a tokenizer's own (padding="max_length": 0 over its pad tokens)
        batch["attention_mask"][row, :k] = 1 if mask is None else torch.tensor(mask[:k])
        if "token_type_ids" in batch:
            batch["token_type_ids"][row, :k] = torch.tensor(f["token_type_ids"][:k])
        if token_labels:
            batch["labels"][row, :k] = torch.tensor(labels[row][:k])
    if labels is not None and not token_labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def carries_padding(features: list[dict], width: int) -> bool:
    """Whether ``features`` batched ``width`` tokens wide have a padded position, so the batch carries an
    attention mask with zeros: a sample shorter than ``width``, or one whose own ``attention_mask`` has a 0
    (a tokenizer padded it: ``pad_to_max_length``)."""
    return any(len(f["input_ids"]) < width or 0 in f.get("attention_mask", ()) for f in features)
