"""The Triton kernels of ``fp8_kernels.py`` (imported by it on first use: importing this module
imports triton, which the CPU build of torch does not bring). What they compute and why: there."""

import triton
import triton.language as tl

INV_FP8_MAX: tl.constexpr = tl.constexpr(1.0 / 448.0)
"""float32(1/448): the scale is amax times it, as in ``speed.fp8.quantize_rows``."""


@triton.jit
def encode_e4m3(y):
    """float32 ``y`` with |y| <= 448 or NaN → float8_e4m3fn bits (int32 0..255), round to nearest
    even; NaN → 0x7F with y's sign bit."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # the arithmetic shift keeps the sign: 0x80 or 0
    mag = bits & 0x7FFFFFFF
    nan = mag > 0x7F800000
    mag = tl.where(nan, 0, mag)  # NaN's bits would overflow the rounding below; its code is set at the end
    # normal e4m3 (|y| >= 2^-6): keep 3 of float32's 23 mantissa bits, ties to even; a carry
    # into the exponent is the right rounding (e.g. 15.5 -> 16)
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) & ~0xFFFFF
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)  # exponent bias 127 -> 7
    # subnormal e4m3 (|y| < 2^-6): multiples of 2^-9; adding 2^23 rounds |y|·512 to an integer,
    # ties to even (8 = 2^-6, the smallest normal, whose code is also 8); only values below 2^-6 go in
    small = tl.where(mag < 0x3C800000, mag, 0).to(tl.float32, bitcast=True)  # 0x3C800000: 2^-6
    sub = ((small * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(mag >= 0x3C800000, normal, sub)
    return sign | tl.where(nan, 0x7F, code)


@triton.jit
def clamp_448(y):
    """``y`` clamped to [-448, 448], NaN kept (as torch.clamp; tl.minimum/maximum would drop it)."""
    return tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (as torch.amax; tl.max's own combine drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_scale(amax):
    """The row's scale from its amax (NaN kept): max(amax, 1e-12) · float32(1/448)."""
    return max_nan(amax, 1e-12) * INV_FP8_MAX


@triton.jit
def load_block(x_row, col_ptr, offs, mask, HAS_COL: tl.constexpr):
    """One block of a row in float32, times its column scales when there are any."""
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL:
        x = x * tl.load(col_ptr + offs, mask=mask, other=0.0)
    return x


@triton.jit
def quantize_rows_kernel(x_ptr, col_ptr, codes_ptr, scales_ptr, n_cols, x_stride,
                         HAS_COL: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = codes_ptr + row * n_cols
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = load_block(x_row, col_ptr, offs, mask, HAS_COL)
        scale = row_scale(tl.reduce(tl.abs(x), 0, max_nan))
        y = clamp_448(tl.math.div_rn(x, scale))
        tl.store(out_row + offs, encode_e4m3(y).to(tl.uint8), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = load_block(x_row, col_ptr, offs, mask, HAS_COL)
            amax = max_nan(amax, tl.abs(x))
        scale = row_scale(tl.reduce(amax, 0, max_nan))
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = load_block(x_row, col_ptr, offs, mask, HAS_COL)
            y = clamp_448(tl.math.div_rn(x, scale))
            tl.store(out_row + offs, encode_e4m3(y).to(tl.uint8), mask=mask)
    tl.store(scales_ptr + row, scale)


@triton.jit
def weights_times_kernel(codes_table, scales_table, a_ptr, a_scale_ptr, out_ptr, N, K, R, R_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[l] = diag(scales[l]) · codes[l] · (a[l] · diag(a_scale[l]))ᵀ`` ((N, R) float32) for the layer ``l`` of
    program axis 1 and the ``BLOCK_N`` weight rows of axis 0: ``codes_table``/``scales_table`` hold each layer's data
    pointers (int64: the layers' own tensors, never stacked; 16-byte aligned, which the wrapper checks, so the codes
    load in vectors and pipeline), ``a`` is (L, R, K) float16 (each row of A divided by a power of two, ``a_scale``
    (L, R) float32, to sit high in float16's range). The codes are read once, as bytes, and widened to float16 in
    registers (exact: every e4m3 value is a float16); float16 tensor cores, float32 accumulation."""
    block, layer = tl.program_id(0), tl.program_id(1)
    codes = tl.multiple_of(tl.load(codes_table + layer).to(tl.pointer_type(tl.uint8)), 16)
    scales = tl.load(scales_table + layer).to(tl.pointer_type(tl.float32))
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    row_ok, rank_ok = rows < N, ranks < R
    a_layer = a_ptr + layer.to(tl.int64) * R * K
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        c = tl.load(codes + rows[:, None].to(tl.int64) * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0)
        w = c.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        a = tl.load(a_layer + ranks[None, :] * K + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(w, a, acc)
    s = tl.load(scales + rows, mask=row_ok, other=0.0)
    a_scale = tl.load(a_scale_ptr + layer.to(tl.int64) * R + ranks, mask=rank_ok, other=0.0)
    out = out_ptr + layer.to(tl.int64) * N * R + rows[:, None] * R + ranks[None, :]
    tl.store(out, acc * s[:, None] * a_scale[None, :], mask=row_ok[:, None] & rank_ok[None, :])
