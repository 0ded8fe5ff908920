"""Data parallelism without DDP's hooks (``speed.grad_reduce: "after_backward"``): every rank starts
from rank 0's parameters, runs its shard of the optimizer batch (``distributed.shard``) into its
own gradients, and the gradients are summed over ranks once, after the last micro-batch's backward
and before the optimizer step.

Why our own: DDP all-reduces gradient buckets from hooks that fire inside the backward, and a CUDA
graph cannot capture those collectives, so under DDP loralab turns its step graphs off
(``speed/graphs.py``). Summing after the backward keeps the captured forward/backward and optimizer
graphs (the all-reduce runs between the two replays, outside both) at the cost of not overlapping
the communication with the backward: for LoRA the gradients are the adapters' (~84 M values at
Llama-3-8B r32 all-linear, 0.3 GB in fp32), one NVLink all-reduce of a few milliseconds against a
step of seconds. Issue 23 measures it against DDP on two H200s (``scripts/gpu_two_gpus.sh``).

The sum is the same quantity DDP's sum hook gives (``distributed._sum_hook``): each rank's
gradient is Σ_shard w·∇CE with the whole batch's weights, so the summed gradient is the one
process's. Upstream for the bucketing idea: torch.nn.parallel.DistributedDataParallel's
``bucket_cap_mb`` (25 MB there; one large bucket is enough when nothing overlaps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from loralab import distributed

BUCKET_BYTES = 256 * 2**20
"""Largest flat buffer one all-reduce sends (bytes); gradients are grouped by dtype up to it."""


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into every rank's ``model`` (in place), as DDP does
    when it wraps a model, so residual inits and random adapters start equal. Every rank must call;
    nothing happens in a single process."""
    if not distributed.current().distributed:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
            # a collective writes past autograd's version counter: bump it, so caches keyed on it (fast
            # DoRA's ||W||², speed/fast_dora) see rank 0's values instead of this rank's own init
            torch.autograd.graph.increment_version(tensor)


def all_reduce_grads(params: Sequence[torch.nn.Parameter], *, every_grad_present: bool = False,
                     bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum every rank's ``.grad`` of ``params`` in place; returns the number of values reduced.

    A parameter without a gradient on this rank takes part with zeros when another rank has one
    (so every rank sends the same buffers); one without a gradient on every rank keeps ``None``, as
    one process would leave it (AdamW then skips it, weight decay included). Finding that out is a
    small collective and a host sync; ``every_grad_present`` (the caller knows that every rank holds
    every gradient, e.g. CUDA graphs' fixed buffers; it must be the same on every rank) skips it.
    Gradients are packed into flat buffers of at most ``bucket_bytes`` per dtype (a larger tensor
    goes alone), one all-reduce each. Every rank must call with the same ``params`` in the same
    order; nothing happens in a single process. Raises ValueError for a non-positive
    ``bucket_bytes`` or, with ``every_grad_present``, a missing gradient.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes = {bucket_bytes!r}: must be positive")
    launch = distributed.current()
    if not launch.distributed or not params:
        return 0
    if every_grad_present:
        if any(p.grad is None for p in params):
            raise ValueError("all_reduce_grads(every_grad_present=True): a parameter has no gradient")
        present = [True] * len(params)
    else:
        device = torch.device("cuda", launch.local_rank) if launch.backend == "nccl" else torch.device("cpu")
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        present = [bool(x) for x in has.tolist()]
    reduced = []
    for p, flag in zip(params, present):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        reduced.append(p.grad)
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for grad in reduced:
        groups = buckets.setdefault(grad.dtype, [[]])
        size = sum(g.numel() for g in groups[-1]) * grad.element_size()
        if groups[-1] and size + grad.numel() * grad.element_size() > bucket_bytes:
            groups.append([])
        groups[-1].append(grad)
    for groups in buckets.values():
        for group in groups:
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            at = 0
            for g in group:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
    return sum(g.numel() for g in reduced)
