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
def scale_rows_kernel(a_table, hi_ptr, lo_ptr, scale_ptr, R, K, A_TOP: tl.constexpr, LO: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Row ``rank`` of layer ``layer``'s A (program axes 0 and 1; K float32 in the layer's own (R, K) tensor, whose
    address ``a_table`` holds) divided by the power of two ``scale`` that puts its largest magnitude in
    [2^A_TOP, 2^(A_TOP + 1)), from the float's exponent bits (exact: a power of two, applied as a multiplication by its
    exact inverse; at least 2^-126, so a row below 2^-112 keeps its smaller quotient); writes the quotient rounded to
    float16 (``hi``, round to nearest even), with ``LO`` also what that rounding dropped, rounded to float16 (``lo``),
    and ``scale`` (float32). A NaN or infinite entry stays one in ``hi`` (whatever the scale), so the products it
    enters are not finite. Reads the row twice (the second time from L2 at these widths)."""
    layer, rank = tl.program_id(0), tl.program_id(1)
    row = tl.load(a_table + layer).to(tl.pointer_type(tl.float32)) + rank.to(tl.int64) * K
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.abs(tl.load(row + cols, mask=cols < K, other=0.0)))
    bits = tl.maximum(tl.max(top, axis=0).to(tl.int32, bitcast=True), 0x00800000)  # at least 2^-126's bits
    e = tl.minimum(tl.maximum((bits >> 23) - 127 - A_TOP, -126), 126)  # the scale's exponent: normal, inverse too
    scale, inverse = ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)
    out = (layer.to(tl.int64) * R + rank) * K
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        scaled = tl.load(row + cols, mask=cols < K, other=0.0) * inverse
        hi = scaled.to(tl.float16)
        tl.store(hi_ptr + out + cols, hi, mask=cols < K)
        if LO:
            tl.store(lo_ptr + out + cols, (scaled - hi.to(tl.float32)).to(tl.float16), mask=cols < K)
    tl.store(scale_ptr + layer.to(tl.int64) * R + rank, scale)


@triton.jit
def weights_times_kernel(codes_table, scales_table, a_ptr, a_lo_ptr, a_scale_ptr, out_ptr, gram_ptr, N, K, R,
                         n_blocks, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GRAM: tl.constexpr):
    """``out[l] = diag(scales[l]) · codes[l] · (a[l] · diag(a_scale[l]))ᵀ`` ((N, R) float32) for the layer ``l`` of
    program axis 1 and the ``BLOCK_N`` weight rows of axis 0 (``_product_block``). With ``GRAM`` (a compile-time
    choice: without it the kernel is the product alone, as measured in results/bench-tritonproduct-h100) the program
    after the ``n_blocks`` row blocks of a layer takes its Gram matrix instead (``_gram_block``)."""
    block, layer = tl.program_id(0), tl.program_id(1)
    if GRAM:
        if block == n_blocks:
            _gram_block(a_ptr, a_lo_ptr, a_scale_ptr, gram_ptr, layer, K, R, R_PAD, BLOCK_K)
        else:
            _product_block(codes_table, scales_table, a_ptr, a_scale_ptr, out_ptr, block, layer, N, K, R, R_PAD,
                           BLOCK_N, BLOCK_K)
    else:
        _product_block(codes_table, scales_table, a_ptr, a_scale_ptr, out_ptr, block, layer, N, K, R, R_PAD, BLOCK_N,
                       BLOCK_K)


@triton.jit
def _product_block(codes_table, scales_table, a_ptr, a_scale_ptr, out_ptr, block, layer, N, K, R, R_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``weights_times_kernel``'s product for one block of ``BLOCK_N`` weight rows: ``codes_table``/``scales_table``
    hold each layer's data pointers (int64: the layers' own tensors, never stacked; 16-byte aligned, which the wrapper
    checks, so the codes load in vectors and pipeline), ``a`` is (L, R, K) float16 (each row of A divided by a power
    of two, ``a_scale`` (L, R) float32, to sit high in float16's range). The codes are read once, as bytes, and
    widened to float16 in registers (exact: every e4m3 value is a float16); float16 tensor cores, float32
    accumulation."""
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


@triton.jit
def _gram_block(a_ptr, a_lo_ptr, a_scale_ptr, gram_ptr, layer, K, R, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """``gram[l] = A·Aᵀ`` (R, R) float32 of one layer from ``a`` and ``a_lo`` (L, R, K) float16, the remainder of the
    scaled A after ``a`` (so hi + lo holds ~22 of its bits): hi·hiᵀ + (hi·loᵀ + lo·hiᵀ), each product of two float16
    exact in float32, lo·loᵀ (2^-22 of the whole) left out; each tile's products summed from zero and added in
    float32 (a tensor core's accumulation inside one MMA need not round to nearest, so the running sums stay out of
    it), the small cross terms apart."""
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    a_layer, lo_layer = a_ptr + layer.to(tl.int64) * R * K, a_lo_ptr + layer.to(tl.int64) * R * K
    gram = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    cross = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        offsets, ok = ranks[:, None] * K + cols[None, :], rank_ok[:, None] & (cols < K)[None, :]
        hi = tl.load(a_layer + offsets, mask=ok, other=0.0)
        lo = tl.load(lo_layer + offsets, mask=ok, other=0.0)
        gram += tl.dot(hi, tl.trans(hi))
        cross += tl.dot(hi, tl.trans(lo)) + tl.dot(lo, tl.trans(hi))
    gram += cross
    a_scale = tl.load(a_scale_ptr + layer.to(tl.int64) * R + ranks, mask=rank_ok, other=0.0)
    out = gram_ptr + layer.to(tl.int64) * R * R + ranks[:, None] * R + ranks[None, :]
    tl.store(out, gram * a_scale[:, None] * a_scale[None, :], mask=rank_ok[:, None] & rank_ok[None, :])
