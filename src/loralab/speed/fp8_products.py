"""Products of an FP8 base's codes with a LoRA A: ``W·Aᵀ`` for fast DoRA's weight norm (issue 22).

``W = diag(scales)·codes`` (``speed/fp8.Fp8Linear``). Fast DoRA's norm needs ``W·Aᵀ`` (``speed/fast_dora.py``): per
forward (``weight_times``) or for every layer once per optimizer step (``weights_times``, from
``speed/dora_refresh.refresh_dora_norms``). A is split into two row-scaled FP8 terms (``split_rows``), so the codes
are read once, as FP8, by ``torch._scaled_mm``; no wider copy of them is made.

Why the K split (``k_split``): the product has 2r rows (64 at r 32) against N weight rows, so ``_scaled_mm``'s
128 x 128 output tiles are half empty and there are only N/128 of them: 8 thread blocks for Llama-3-8B's k and v, 32
for q, o and down, on an H100's 132 multiprocessors, each block streaming a whole row of K. Seen as
``(N·S, K/S)`` (a free view of the row-major codes), the same codes give S times the tiles, and A's terms cut the
same way and stacked, ``(S·2r, K/S)``, fill the tile's rows: the kernel computes every chunk against every chunk,
and the S diagonal blocks (chunk s of A against chunk s of W) summed are the product. At S = 128 / 2r the
tile's arithmetic is what it was (its empty half now holds the other chunk); more parallel blocks read the same
bytes. The sum of the S partial products is taken in float32 from the kernel's output (bfloat16 on CUDA), so each
partial is rounded once where the whole product was: the difference is within that rounding (tests/test_fp8.py).
"""

from __future__ import annotations

import torch

from loralab.speed.fp8 import ALIGN, FP8, _kernel_dtype, _scaled_mm, quantize_rows
from loralab.speed.streams import side_streams

TILE_ROWS = 128
"""The output tile's rows ``k_split`` fills: cuBLAS's FP8 kernels on Hopper tile 128 x 128 (results/bench-fair-h100-1207's
profile: ``nvjet_sm90_qqtst_128x128``) and the refresh's product has 2r = 64 rows at r 32."""


def k_split(rows: int, k: int) -> int:
    """How many chunks of K ``weights_times`` cuts each product into: the largest power of two S with
    ``rows·S <= TILE_ROWS`` and K divisible by ``S·ALIGN`` (each chunk a valid ``_scaled_mm`` operand); 1 where
    none (``rows`` above 64, or K not a multiple of 32). ``rows``: A's split terms, 2r. The same rule on every
    device, so CPU tests run the path CUDA runs."""
    split = 1
    while rows * split * 2 <= TILE_ROWS and k % (split * 2 * ALIGN) == 0:
        split *= 2
    return split


def weight_times(codes: torch.Tensor, scales: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W·aᵀ`` for ``W = diag(scales)·codes``, reading the codes once as FP8 (no wider copy of them).

    ``codes`` (N, K) float8_e4m3fn; ``scales`` (N,) float32; ``a`` (r, K) any float dtype. Returns
    (N, r) float32. ``a`` is split into two row-scaled FP8 terms, ``a ≈ hi + lo`` with ``hi`` =
    ``quantize_rows(a)`` and ``lo`` = ``quantize_rows(a − hi)``. Each term's rounding error is at
    most 1/28 of its row's largest value (half a step at the top of e4m3's range), so every element
    of ``hi + lo`` is within amax/784 ≈ 2⁻⁹·⁶ of ``a``'s row maximum (EPS aside). For rows of
    similar magnitudes, as a LoRA A, that is as precise as a bf16 copy of ``a`` (measured against
    float32: 6.7e-4 vs the bf16 path's 2.8e-3 with float32 output); it is worse than bf16 for rows
    whose mass sits in a few entries (bf16 keeps 8 bits on every element). Both products come from one
    ``_scaled_mm`` of ``[hi; lo]`` (2r rows) by the codes (bf16 on CUDA), summed in float32: fast DoRA's norm on
    an FP8 base, where a bf16 copy of the codes would move 3 bytes per weight more in every forward.
    K is cut as ``weights_times`` cuts it (``k_split``), so the per-forward norm and the refresh's agree.
    Raises RuntimeError from ``_scaled_mm`` where the kernel refuses the shapes (CUDA: N, K and 2r
    divisible by 16)."""
    return weights_times([codes], [scales], a[None])[0]


def split_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (..., r, K), any float dtype, as two row-scaled FP8 terms stacked on the row axis (``weight_times``
    gives their precision): ``terms`` (..., 2r, K) float8_e4m3fn, rows ``[hi; lo]`` with ``hi, s_hi =
    quantize_rows(a)`` and ``lo, s_lo = quantize_rows(a − hi·s_hi)``, and ``scales`` (..., 2r, 1) float32
    ``[s_hi; s_lo]``, so that ``a ≈ (terms·scales)[..., :r, :] + (terms·scales)[..., r:, :]``."""
    hi, s_hi = quantize_rows(a)
    lo, s_lo = quantize_rows(a.float() - hi.float() * s_hi)
    terms = torch.cat([hi.view(torch.uint8), lo.view(torch.uint8)], dim=-2).view(FP8)
    return terms, torch.cat([s_hi, s_lo], dim=-2)


def weights_times(codes: list[torch.Tensor], scales: list[torch.Tensor], a: torch.Tensor,
                  split: int | None = None) -> torch.Tensor:
    """``weight_times`` for L layers of one shape at once: ``codes`` L tensors (N, K) float8_e4m3fn,
    ``scales`` L tensors (N,) float32, ``a`` (L, r, K) (layer i's A is ``a[i]``). Returns (L, N, r)
    float32 (a transposed view of an (L, r, N) tensor), layer i's the values of
    ``weight_times(codes[i], scales[i], a[i])`` up to the rounding of S partial products instead of one
    (``split``: S, the chunks of K each product is cut into, the module docstring's K split; None: ``k_split``'s
    choice; 1: no split). The split of A into two FP8 terms is row-wise, so it runs once over the whole stack;
    then one ``_scaled_mm`` per layer (on CUDA spread over side streams: speed/streams.py), the terms on the left,
    ``[hi; lo]·codesᵀ`` (S·2r, N·S), written in place into one (L, S·2r, N·S) buffer of the kernel's dtype
    (bfloat16 on CUDA), and one reduction sums each layer's two terms and S diagonal blocks in float32.
    The 8B FP8 DoRA refresh without the split, captured in a CUDA graph on two H100s: 8.89-8.91 ms with a
    product per layer cast and stacked, 7.75 ms in place with the terms on the left (results/bench-refreshforms-h100);
    7.73 ms on one stream against 5.11 ms on 4 side streams, on another H100 (results/bench-streams-h100).
    Used by fast DoRA's once-a-step norm refresh (``speed/dora_refresh.refresh_dora_norms``). Raises
    ValueError when ``codes``, ``scales`` and ``a`` do not count the same L layers, or for a ``split`` that
    does not cut K into chunks of a multiple of 16."""
    if not len(codes) == len(scales) == a.shape[0]:
        raise ValueError(f"weights_times: {len(codes)} codes, {len(scales)} scales and {a.shape[0]} A's; "
                         "one of each per layer is needed")
    layers, r, k = a.shape
    n = codes[0].shape[0]
    split = k_split(2 * r, k) if split is None else split
    if split < 1 or k % (split * ALIGN):
        raise ValueError(f"weights_times: split = {split!r} must be a positive number of chunks of K = {k}, "
                         f"each a multiple of {ALIGN}")
    terms, term_scales = split_rows(a)  # (L, 2r, K), (L, 2r, 1)
    if split > 1:  # row s·2r + j of a layer's stack: its term j's chunk s of K (module docstring)
        terms = terms.view(torch.uint8).view(layers, 2 * r, split, k // split).transpose(1, 2)
        terms = terms.reshape(layers, split * 2 * r, k // split).view(FP8)
        term_scales = term_scales.repeat(1, split, 1)
        scales = torch.stack(scales).repeat_interleave(split, dim=-1)  # (L, N·S): row n·S + t is weight row n's
    dtype = _kernel_dtype(a.device, torch.float32)
    y = torch.empty(layers, split * 2 * r, n * split, dtype=dtype, device=a.device)
    with side_streams(a.device, layers) as stream_of:
        for i, (c, s) in enumerate(zip(codes, scales)):
            with stream_of(i):
                # terms (S·2r, K/S) row-major first, codes (N·S, K/S)ᵀ column-major second: the kernel's layouts
                _scaled_mm(terms[i], c.view(n * split, k // split).t(), term_scales[i], s.view(1, -1), dtype,
                           out=y[i])
    # y[i] as (chunk of A s, term, j, weight row, chunk of W t): the blocks with s == t, both terms summed
    parts = y.view(layers, split, 2, r, n, split).diagonal(dim1=1, dim2=5)  # (L, 2, r, N, S)
    return parts.sum(dim=(1, -1), dtype=torch.float32).transpose(-1, -2)
