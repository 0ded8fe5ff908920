"""Independent small GEMMs side by side on CUDA streams: fast DoRA's once-a-step norm refresh.

The refresh (``speed/dora_refresh.refresh_dora_norms``) takes ``W·Aᵀ`` for every adapted layer: a product with
r (bf16 base) or 2r (FP8 base, ``speed/fp8.weights_times``) rows or columns, so one row of output tiles, N/128
thread blocks: 32 for a 4096-wide Llama-3-8B layer, 8 for its k and v, on a GPU of 132 multiprocessors (H100).
One product at a time leaves most of them idle while it reads its weight; products of different layers, and
the Gram matrix ``A·Aᵀ`` that needs no weight, are independent, so they can run at once on different streams
(in a captured CUDA graph: parallel branches of the graph). Each kernel and its output are the same whatever
its stream, so the values are too (tests/test_fp8.py, on a GPU).
"""

from __future__ import annotations

import contextlib

import torch

PRODUCT_STREAMS = 4
"""How many CUDA streams ``side_streams`` spreads calls over; below 2, none (``aside`` too): the current stream
runs everything."""
_STREAMS: dict = {}


@contextlib.contextmanager
def side_streams(device: torch.device, calls: int):
    """Yields ``stream_of(i)``, the context to run call ``i`` (0 <= i < ``calls``) in: on CUDA, with
    ``PRODUCT_STREAMS`` > 1 and more than one call, round-robin over min(``PRODUCT_STREAMS``, ``calls``) side
    streams; else a context that changes nothing.

    Ordering, the rule every use here keeps: each side stream waits for the current stream's work on entry and
    the current stream waits for all of them on exit (capturable: the fork and the join of a CUDA graph's
    branches). So tensors made before the block may be used inside it; tensors made inside may be read after
    it; and a block freed back to a side stream's pool is reused only by later work on that stream, which the
    next fork orders after everything the current stream had been given, its reads of that block included.
    Streams are made once per device (``_streams``), the first time they are needed: make that first call
    outside any graph capture (the step's first refresh is eager), or its cuBLAS workspaces land in the graph's
    memory pool."""
    count = min(PRODUCT_STREAMS, calls)
    if device.type != "cuda" or count < 2:
        yield lambda i: contextlib.nullcontext()
        return
    with _forked(device, "products", count) as streams:
        yield lambda i: torch.cuda.stream(streams[i % count])


@contextlib.contextmanager
def aside(device: torch.device):
    """Yields ``run_aside()``, the context to run work beside what the block runs on the current stream: on
    CUDA with ``PRODUCT_STREAMS`` > 1, a stream of its own forked from the current stream on entry and joined on
    exit (so work launched after ``run_aside()``'s block, inside this one, overlaps it); else no change. The
    ordering rule of ``side_streams``."""
    if device.type != "cuda" or PRODUCT_STREAMS < 2:
        yield contextlib.nullcontext
        return
    with _forked(device, "aside", 1) as streams:
        yield lambda: torch.cuda.stream(streams[0])


def _streams(device: torch.device, name: str, count: int) -> list:
    """The first ``count`` of the side streams kept for (``device``, ``name``), made as needed: one list per name,
    whatever the counts asked (each stream holds a cuBLAS workspace, ~32 MiB on Hopper, for the process's life)."""
    kept = _STREAMS.setdefault((device, name), [])
    while len(kept) < count:
        kept.append(torch.cuda.Stream(device))
    return kept[:count]


@contextlib.contextmanager
def _forked(device: torch.device, name: str, count: int):
    """``count`` streams of (``device``, ``name``), each waiting for the current stream on entry, all waited for by
    it on exit."""
    streams, current = _streams(device, name, count), torch.cuda.current_stream(device)
    for stream in streams:
        stream.wait_stream(current)
    try:
        yield streams
    finally:
        for stream in streams:
            current.wait_stream(stream)
