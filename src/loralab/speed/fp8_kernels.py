"""Row-wise FP8 quantisation as one Triton kernel (``speed.fp8_quantize_kernel: "triton"``); and ``weights_times_triton``,
fast DoRA's refresh product from an FP8 base's codes in one Triton kernel per group of layers (its docstring says why).

Why our own kernel: the FP8 base quantises every activation it multiplies (``speed/fp8.py``,
``quantize_rows``: a row amax, a division, a saturating cast). Written as torch ops, inductor
fuses them into the neighbouring pointwise work, and on an H200 at the Llama-3-8B shape those
fused kernels took 37.0 of the FP8 step's 212.2 ms of CUDA time over two steps, 52 % of what the
FP8 GEMMs saved (``results/bench-fair/fp8prof.profile.txt``). The two largest are row reductions
(``abs``, ``amax`` in their truncated names), one per layer per step each, at 222 and 167 µs per
layer; the bf16 step's MLP pointwise kernels (``silu`` and its backward, 99 and 113 µs per layer)
are missing from the FP8 step's list, so those reductions likely carry that work too. Here the
quantisation is an opaque op (``torch.library.custom_op`` with its shapes registered, which
torch.compile calls as it is and CUDA graphs capture): inductor writes the bf16 tensor the adapter
reads anyway, and this kernel reads it once (one row per program, held in registers up to
``ONE_PASS_MAX`` columns), writing 1 byte per element and one float32 scale per row. Whether it pays
is measured, not assumed, and it does not pay: FP8-base LoRA at the Llama-3-8B shape ran 0.969x the
fused torch ops on an H100, at micro-batch 4 (results/bench-fp8kernel-h100/; an H200 has not run it).
So the option stays off by default.

The codes are bitwise those of ``speed.fp8.quantize_rows`` run eagerly (on CPU or CUDA): the same
scale (amax times float32(1/448)), the same float32 division (IEEE, ``div_rn``), NaN carried as
torch carries it, and the float32 → float8_e4m3fn rounding (to nearest, ties to even, saturated at ±448)
written out in integer arithmetic rather than taken from the hardware conversion. That costs a few
integer instructions per element in a kernel bound by memory, and it makes the kernel's result the
same under Triton's CPU interpreter (``TRITON_INTERPRET=1``, whose float8 cast does not round to
nearest even), so CI checks the kernel GPUs run, bit for bit (tests/test_fp8_kernels.py; on a GPU
the same tests run the compiled kernel). The torch ops compiled by inductor for CUDA divide with
Triton's default (approximate) division, so that path may move a code by one against both.

Triton is imported only when the kernel is first used: the CPU build of torch does not bring it,
and a run that does not ask for this kernel never needs it.
"""

from __future__ import annotations

import functools
import os

import torch

ONE_PASS_MAX = 16384
"""Widest row one program holds in registers (Llama-3-8B's widest input, 14,336, fits); wider rows
take two passes over global memory (the amax, then the codes)."""
_LOOP_BLOCK = 4096


def triton_available() -> str | None:
    """None when the Triton kernel can run on ``cuda`` here; else why not (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not importable (it comes with torch's CUDA builds; pip install triton)"
    return None


def can_run_on(device: torch.device) -> str | None:
    """None when the kernel can run on tensors of ``device``; else why not (one line): CUDA with
    Triton, or any device under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    missing = triton_available()
    if missing:
        return missing
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernel runs on CUDA (here {device.type}; TRITON_INTERPRET=1 runs it on CPU, slowly)"


@functools.cache
def _kernel():
    import triton

    from loralab.speed._fp8_triton import quantize_rows_kernel, weights_times_kernel

    return triton, quantize_rows_kernel, weights_times_kernel


@torch.library.custom_op("loralab::fp8_quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor, col_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    triton, kernel, _ = _kernel()
    if x.stride(-1) != 1:  # the kernel reads unit column strides (rows may be strided)
        x = x.contiguous()
    rows, cols = x.shape
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    one_pass = cols <= ONE_PASS_MAX
    block = triton.next_power_of_2(cols) if one_pass else _LOOP_BLOCK
    if rows:
        kernel[(rows,)](
            x, col_scale if col_scale is not None else x, codes, scales, cols, x.stride(0),
            HAS_COL=col_scale is not None, ONE_PASS=one_pass, BLOCK=block,
            num_warps=max(4, min(16, block // 1024)))
    return codes, scales


@_quantize_rows_op.register_fake
def _(x, col_scale):
    return (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((x.shape[0], 1), dtype=torch.float32))


def quantize_rows_triton(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``speed.fp8.quantize_rows(x * col_scale)`` by the Triton kernel: the eager torch ops' codes
    and scales, bit for bit (NaN codes aside, whose sign bit differs between devices).

    ``x`` (M, K) float32, bfloat16 or float16 (rows may be strided; a copy is made unless its
    columns are contiguous); ``col_scale`` (K,) float32 or None, multiplied into each row in float32
    before the amax (the input gradient's per-channel weight scales, ``speed/fp8.py``). Returns
    ``(codes, scales)``: (M, K) float8_e4m3fn and (M, 1) float32. Raises RuntimeError where it
    cannot run (``can_run_on``'s reason)."""
    why = None if torch.compiler.is_compiling() else can_run_on(x.device)  # compiled steps: checked when set
    if why:
        raise RuntimeError(f"FP8 quantisation kernel: {why}")
    col = None if col_scale is None else col_scale.to(torch.float32).contiguous()
    codes, scales = _quantize_rows_op(x, col)
    return codes.view(torch.float8_e4m3fn), scales


_TABLES: dict = {}
WA_BLOCK_N, WA_BLOCK_K, WA_WARPS, WA_STAGES = 128, 128, 8, 3
"""``weights_times_triton``'s tile and launch: 128 weight rows by 128 columns of K a step, 8 warps, 3 stages (chosen by
reading the sm90 build's registers, spills and instructions a loop; timed since among 54 launches on an H100,
scripts/refresh_product_sweep.py: 3.298 ms for the 8B groups, the fastest 3.236 ms at 64 x 256, 4 warps, 3 stages,
five others within 2 % of it; results/bench-tritonproduct-h100, call 2)."""
A_TOP = 14
"""Each row of A is divided by the power of two that puts its largest entry in [2^14, 2^15) before it is rounded to
float16 (whose largest finite value is 65,504): any magnitude fits, and the division is exact."""


def weights_times_triton(codes: list[torch.Tensor], scales: list[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """``speed.fp8.weights_times``'s product, ``W·Aᵀ`` of L layers of one shape with ``W = diag(scales)·codes``, in
    one Triton kernel: ``codes`` L tensors (N, K) float8_e4m3fn, ``scales`` L tensors (N,) float32, ``a`` (L, r, K)
    any float dtype. Returns (L, N, r) float32.

    Why: the refresh's cuBLAS products have 2r = 64 rows, so their 128-row output tiles are half empty and there
    are N/128 of them a layer (8 thread blocks for Llama-3-8B's k and v), one launch per layer; graphed on 4 side
    streams, the 8B groups read their 7.0 GB of codes in 4,426 us on an H100 (1.6 TB/s; results/bench-fair-h100-1207c,
    ksplit), where reading them takes ~2.1 ms at 3.35 TB/s. Here one launch covers a group: N/128 x L programs (512
    for k and v), each reading its rows' codes once, in vectors (the layers' tensors are 16-byte aligned, checked
    here), and widening them to float16 in registers (exact). Precision: each row of A scaled by a power of two
    (``A_TOP``) and rounded to float16 (11 significant bits: half an ulp is 2^-11 of an entry, finer than
    ``split_rows``' two FP8 terms, whose error is up to 2^-9.6 of the row's largest entry), float32 accumulation,
    no bf16 rounding of the output as ``_scaled_mm``'s row-wise kernel has. Measured on an H100
    (results/bench-tritonproduct-h100): the four 8B groups in 3.30 ms alone, A's torch preparation included
    (2.1 TB/s), the whole refresh graphed in 4.045 ms against cuBLAS's 5.143, FP8 DoRA's step 1.009x-1.014x; the
    refresh's default on CUDA (``speed.fp8_refresh_kernel``, speed/dora_refresh.use_refresh_kernel). Raises ValueError
    for layers that do not match (count, shapes, dtypes, devices, 16-byte alignment), RuntimeError where the kernel
    cannot run (``can_run_on``'s reason) or a CUDA graph capture meets tensors it has no pointer table for."""
    if not len(codes) == len(scales) == a.shape[0]:
        raise ValueError(f"weights_times_triton: {len(codes)} codes, {len(scales)} scales and {a.shape[0]} A's; "
                         "one of each per layer is needed")
    layers, r, k = a.shape
    n = codes[0].shape[0]
    bad = [i for i, (c, s) in enumerate(zip(codes, scales)) if c.shape != (n, k) or c.dtype != torch.float8_e4m3fn
           or not c.is_contiguous() or c.data_ptr() % 16 or s.shape != (n,) or s.dtype != torch.float32
           or not s.is_contiguous() or c.device != a.device or s.device != a.device]
    if bad:
        raise ValueError(f"weights_times_triton: layer {bad[0]}'s codes must be contiguous, 16-byte aligned "
                         f"float8_e4m3fn ({n}, {k}) and its scales contiguous float32 ({n},), on {a.device}")
    why = can_run_on(a.device)
    if why:
        raise RuntimeError(f"FP8 refresh product kernel: {why}")
    triton, _, kernel = _kernel()
    table = _pointer_table(codes, scales, a.device)
    amax = a.detach().abs().amax(dim=-1).float().clamp_min(torch.finfo(torch.float32).tiny)  # (L, r)
    a_scale = torch.exp2(torch.floor(torch.log2(amax)) - A_TOP)
    a16 = (a.detach().float() / a_scale[..., None]).to(torch.float16).contiguous()
    out = torch.empty(layers, n, r, dtype=torch.float32, device=a.device)
    kernel[(triton.cdiv(n, WA_BLOCK_N), layers)](
        table[0], table[1], a16, a_scale, out, n, k, r, R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_N=WA_BLOCK_N,
        BLOCK_K=WA_BLOCK_K, num_warps=WA_WARPS, num_stages=WA_STAGES)
    return out


def _pointer_table(codes: list[torch.Tensor], scales: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(2, L) int64 on ``device``: the layers' codes and scales data pointers, made once per set of tensors and kept
    (a host-to-device copy cannot run inside a CUDA graph capture: the refresh's first call, eager, makes it; a
    capture that meets tensors without a table raises RuntimeError). The kept table holds no reference to the
    tensors; a layer freed and another allocated at its address reads the new one, as any kept pointer would."""
    key = (device, tuple(c.data_ptr() for c in codes), tuple(s.data_ptr() for s in scales))
    if key not in _TABLES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("weights_times_triton: first called inside a CUDA graph capture for these layers; "
                               "call it once eagerly first (the step's first refresh is eager)")
        _TABLES[key] = torch.tensor([list(key[1]), list(key[2])], dtype=torch.int64).to(device)
    return _TABLES[key]
