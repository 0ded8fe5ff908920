"""No padding waste: packed causal-LM rows and length-grouped classification batches.

Causal LMs: several samples are concatenated into one row, with ``position_ids`` restarting at 0
for each sample and no ``attention_mask``. transformers (5.x) reads the restarts as sample
boundaries (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal
mask for sdpa / eager / flex attention, so no token attends across samples and each sample gets
its own rotary positions. The first label of every sample is set to -100: after the usual shift
it would otherwise be predicted from the previous sample's last token. Every other label (and the
-100s of prompt masking) is kept, so the summed loss over a packed row equals the sum of the
samples' unpacked losses.

Classification: batches of samples of similar length (sorted inside shuffled mega-batches, as
transformers' length-grouped sampler does), padded only to the longest sample of the batch.
"""

from __future__ import annotations

import random
from typing import Any

from loralab.data import IGNORE_INDEX


def pack_groups(lengths: list[int], max_tokens: int, *, seed: int | None = 0) -> list[list[int]]:
    """Indices grouped so each group's total length is at most ``max_tokens`` (longer samples are
    alone in their group and get truncated by ``pack_features``).

    Order: shuffled (``seed``; None keeps the given order), then each sample goes to the first
    group with room (first fit, no sorting, so batches stay a random mix of lengths).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens!r}: must be a positive integer")
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    groups, room = [], []
    for i in order:  # first fit: the first open group with room, else a new group
        n = min(lengths[i], max_tokens)
        slot = next((g for g, free in enumerate(room) if free >= n), None)
        if slot is None:
            groups.append([])
            room.append(max_tokens)
            slot = len(groups) - 1
        groups[slot].append(i)
        room[slot] -= n
    return groups


def pack_features(features: list[dict[str, Any]], max_tokens: int | None = None, *,
                  pad_to: int | None = None, pad_token_id: int = 0) -> dict[str, Any]:
    """One packed row (batch size 1) from tokenized causal-LM features.

    Each feature has ``input_ids`` and optionally ``labels`` (default: the input ids). Returns
    torch tensors ``input_ids``, ``labels``, ``position_ids`` of shape (1, total) and the python
    list ``seq_lens``. Samples longer than ``max_tokens`` are truncated to it. ``pad_to`` appends a
    filler segment (its own positions, labels -100) so every row has the same length: fixed shapes
    suit torch.compile and CUDA graphs, and the filler attends only to itself.
    """
    import torch

    if not features:
        raise ValueError("pack_features needs at least one feature")
    ids, labels, positions, seq_lens = [], [], [], []
    for f in features:
        sample_ids = list(f["input_ids"])
        sample_labels = list(f.get("labels", sample_ids))
        if len(sample_labels) != len(sample_ids):
            raise ValueError(f"a feature has {len(sample_ids)} input_ids but {len(sample_labels)} labels")
        if max_tokens is not None:
            sample_ids, sample_labels = sample_ids[:max_tokens], sample_labels[:max_tokens]
        if not sample_ids:
            continue
        sample_labels[0] = IGNORE_INDEX
        ids += sample_ids
        labels += sample_labels
        positions += range(len(sample_ids))
        seq_lens.append(len(sample_ids))
    if pad_to is not None and len(ids) < pad_to:
        filler = pad_to - len(ids)
        ids += [pad_token_id] * filler
        labels += [IGNORE_INDEX] * filler
        positions += range(filler)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "seq_lens": seq_lens,
    }


def pack_rows(groups: list[list[dict[str, Any]]], row_tokens: int, pad_token_id: int = 0) -> dict[str, Any]:
    """Several packed rows of exactly ``row_tokens`` tokens, stacked into one (rows, row_tokens) batch."""
    import torch

    rows = [pack_features(g, row_tokens, pad_to=row_tokens, pad_token_id=pad_token_id) for g in groups]
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    batch["seq_lens"] = [r["seq_lens"] for r in rows]
    return batch


def length_grouped_batches(lengths: list[int], batch_size: int, *, seed: int = 0,
                           mega_batch: int = 50) -> list[list[int]]:
    """Batches of indices with similar lengths: shuffle, cut into mega-batches of
    ``batch_size × mega_batch`` samples, sort each by length, cut into batches, shuffle batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: must be a positive integer")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * mega_batch
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
