"""Independent small GEMMs side by side on CUDA streams: fast DoRA's once-a-step norm refresh.

The refresh (``speed/fast_dora.refresh_dora_norms``) takes ``W·Aᵀ`` for every adapted layer: a product with
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
"""How many CUDA streams ``side_streams`` spreads calls over (1: the current stream only)."""
_STREAMS: dict = {}


@contextlib.contextmanager
def side_streams(device: torch.device, calls: int):
    """Yields ``stream_of(i)``, the context to run call ``i`` (0 <= i < ``calls``) in: on CUDA, with
    ``PRODUCT_STREAMS`` > 1 and more than one call, round-robin over min(``PRODUCT_STREAMS``, ``calls``) side
    streams, each waiting for the current stream's work before its first call, all waited for by the current
    stream on exit (capturable: the fork and the join of a graph's branches); else a context that changes
    nothing. The streams are made on the first use of a (device, count) pair: make that use outside any graph
    capture (the refresh's first call is eager). Tensors the calls use must be allocated by the caller before
    the block and kept past it, so the caching allocator never gives their memory to other work early."""
    count = min(PRODUCT_STREAMS, calls)
    if device.type != "cuda" or count < 2:
        yield lambda i: contextlib.nullcontext()
        return
    with _forked(device, count, "products") as streams:
        yield lambda i: torch.cuda.stream(streams[i % count])


@contextlib.contextmanager
def aside(device: torch.device):
    """Yields ``run_aside()``, the context to run work beside what the block runs on the current stream: on
    CUDA with ``PRODUCT_STREAMS`` > 1, a stream of its own forked from the current stream on entry and joined on
    exit (so work launched after ``run_aside()``'s block, inside this one, overlaps it); else no change. The
    same rules as ``side_streams`` for its first use and the tensors it touches."""
    if device.type != "cuda" or PRODUCT_STREAMS < 2:
        yield contextlib.nullcontext
        return
    with _forked(device, 1, "aside") as streams:
        yield lambda: torch.cuda.stream(streams[0])


@contextlib.contextmanager
def _forked(device: torch.device, count: int, name: str):
    """``count`` streams kept for (``device``, ``name``), each waiting for the current stream on entry, all
    waited for by it on exit."""
    key = (device, name, count)
    if key not in _STREAMS:
        _STREAMS[key] = [torch.cuda.Stream(device) for _ in range(count)]
    streams, current = _STREAMS[key], torch.cuda.current_stream(device)
    for stream in streams:
        stream.wait_stream(current)
    try:
        yield streams
    finally:
        for stream in streams:
            current.wait_stream(stream)
