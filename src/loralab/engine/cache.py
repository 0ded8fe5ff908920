"""The engine's KV cache: one preallocated tensor pair, a fixed number of slots, sized from a budget.

Layout: ``k`` and ``v`` are ``[layers, slots + 1, kv_heads, max_len, head_dim]`` in the model's
dtype. Slot ``s`` holds one sequence's keys/values at positions ``0 .. length-1``; the extra last
slot (``prefix_slot``) holds the shared prompt prefix, copied into a slot when a prompt is placed
there (``copy_prefix``), so a few-shot prefix or a template is prefilled once per call.

Why contiguous per-slot rows rather than pages: a decode step then reads keys as one strided view
``k[layer, :slots, :, :L]`` with ``L`` the longest live sequence rounded to a bucket, which a CUDA
graph can capture once per bucket; evaluation budgets are known up front (prompt + ``max_new_tokens``),
so a slot never needs to grow and paging would only buy back the unused tail of short answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CUDA_RESERVE_BYTES = 4 << 30
"""Kept free on a GPU beside the cache: activations of a prefill chunk (an 8B model's MLP at 8,192
tokens is ~0.7 GB), the decode logits (slots x vocabulary x 4 bytes, 0.26 GB at 512 x 128k) and the
graphs' pool."""
CPU_BUDGET_BYTES = 2 << 30
"""The cache's budget on a CPU (no free-memory query there that means the same thing)."""


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token occupies across all layers (e.g. Llama-3-8B bf16: 131,072)."""
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_budget(device: torch.device, fraction: float) -> int:
    """Bytes the cache may take: ``fraction`` of the GPU's free memory less ``CUDA_RESERVE_BYTES``,
    or ``CPU_BUDGET_BYTES`` x ``fraction`` / 0.9 on a CPU. Raises ValueError for a fraction outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction {fraction!r}: must be in (0, 1]")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * fraction) - CUDA_RESERVE_BYTES)
    return int(CPU_BUDGET_BYTES * fraction / 0.9)


def plan_slots(*, wanted: int, max_len: int, token_bytes: int, budget: int, max_slots: int) -> int:
    """How many slots to allocate: at most ``wanted`` sequences and ``max_slots``, and as many as
    ``budget`` bytes hold at ``max_len`` tokens each (one more slot is kept for the shared prefix).

    Raises MemoryError when not even one sequence of ``max_len`` tokens fits."""
    fit = budget // (max_len * token_bytes) - 1
    if fit < 1:
        raise MemoryError(f"the KV cache budget ({budget / 2**30:.2f} GiB) holds no sequence of {max_len} tokens "
                          f"({max_len * token_bytes / 2**30:.2f} GiB each with the prefix slot); lower max_new_tokens "
                          f"or raise the engine's memory fraction")
    return max(1, min(wanted, max_slots, fit))


@dataclass
class SlotCache:
    k: torch.Tensor
    """[layers, slots + 1, kv_heads, max_len, head_dim]"""
    v: torch.Tensor

    @classmethod
    def allocate(cls, *, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "SlotCache":
        shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        # zeros, not empty: a masked key still meets a 0 x value product, which NaN garbage would poison
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.k.shape[1] - 1

    @property
    def prefix_slot(self) -> int:
        return self.k.shape[1] - 1

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def copy_prefix(self, slots: torch.Tensor, length: int) -> None:
        """Positions ``0 .. length-1`` of the prefix slot copied into each of ``slots`` ([n] long)."""
        if length == 0 or len(slots) == 0:
            return
        for cache in (self.k, self.v):
            cache[:, slots, :, :length] = cache[:, self.prefix_slot:, :, :length]
