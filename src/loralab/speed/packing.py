"""No padding waste: packed causal-LM rows and length-grouped classification batches.

Causal LMs: several samples are concatenated into one row, with ``position_ids`` restarting at 0
for each sample and no ``attention_mask``. transformers (5.x) reads the restarts as sample
boundaries (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal
mask for sdpa / eager / flex attention, so no token attends across samples and each sample gets
its own rotary positions. The first label of every sample is set to -100: after the usual shift
it would otherwise be predicted from the previous sample's last token. Every other label (and the
-100s of prompt masking) is kept, so the summed loss over a packed row equals the sum of the
samples' unpacked losses. ``pack_groups`` decides which samples share a row; ``loralab.run.step.Step``
builds the rows (``Step._packed``).

Classification: batches of samples of similar length (sorted inside shuffled mega-batches, as
transformers' length-grouped sampler does), padded only to the longest sample of the batch.
"""

from __future__ import annotations

import random


def pack_groups(lengths: list[int], max_tokens: int, *, seed: int | None = 0) -> list[list[int]]:
    """Indices grouped so each group's total length is at most ``max_tokens`` (longer samples are
    alone in their group; ``loralab.run.step.Step`` truncates them to ``max_tokens``).

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
