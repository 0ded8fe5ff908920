"""An FP8 frozen linear layer: weights in float8_e4m3fn with one scale per output channel,
activations quantised per token at every forward, both GEMMs through ``torch._scaled_mm``.

The scaling rule (the "row-wise" recipe of torchao's float8 training and of DeepSeek-V3's
per-channel/per-token scales, written here from the rule, not copied):

- a matrix X (rows r) is stored as ``Xq = fp8(X / s)`` with ``s_r = max(amax_r, EPS) · (1/448)``
  per row (448 is float8_e4m3fn's largest finite value, so every row uses the full range; the scale
  is a float32 multiply by 1/448 rounded to float32, which rounds alike on every device, where a
  division by 448 does not: CUDA's kernels divide by a scalar through its reciprocal; the division
  X / s is in float32, the cast rounds to nearest even and saturates at ±448);
- the weight W (out N x in K) is quantised once, per output channel: ``W ≈ diag(s_w) · Wq``;
- forward, per token: ``x ≈ diag(s_x) · xq`` and
  ``y = x Wᵀ ≈ diag(s_x) · (xq · Wqᵀ) · diag(s_w)``: one ``_scaled_mm(xq, Wqᵀ, scale_a=s_x (M,1),
  scale_b=s_w (1,N))``, float32 accumulation (on Hopper with ``fast_accum`` the partial sums are not
  promoted to float32: ``use_fast_accum``, ``speed.fp8_fast_accum``), written in the activation dtype
  (bfloat16 on the speed path; the autocast dtype under autocast);
- input gradient: ``dx = dy · W = dy · diag(s_w) · Wq``. Here s_w lies along the *reduced*
  axis (N), so it cannot be an output scale; it is folded into the gradient before that is
  quantised per row: ``G = dy · diag(s_w) ≈ diag(s_g) · Gq``, then
  ``dx ≈ diag(s_g) · (Gq · Wq)``: ``_scaled_mm(Gq, Wq, scale_a=s_g (M,1), scale_b=1 (1,K))``.
  Wq is the second operand here in (N, K) orientation, which the CUDA kernel wants column-major
  (Hopper's FP8 tensor cores read both operands with the reduced axis contiguous): a transposed
  copy of the FP8 codes is made per backward (1 byte per weight read and written; at the 8B shape
  the kernels holding the copies of the MLP weights, fused with gradient quantisation, took ~4.4 ms of a
  ~106 ms step on an H200, an upper bound on what the copies cost, results/bench-fair/
  fp8prof.profile.txt), or, with ``cache_transposes``, kept once (1 more byte per cached weight).
- no weight gradient: the base is frozen (``Fp8Linear.weight`` never requires grad).

``_scaled_mm`` runs on CPU in torch 2.13 (a reference kernel, slower than bf16 there) and on CUDA
from compute capability 8.9 (Ada, Hopper: H100/H200); the CUDA kernel needs both dimensions of
the weight divisible by 16 (``fits``). torchao's float8 was not used: it is not installed and its
releases pin torch versions; ``_scaled_mm`` is in the torch in use, so nothing extra installs.

``Fp8Linear`` subclasses ``nn.Linear`` so peft's default dispatch wraps it in its plain LoRA/DoRA
``Linear`` (``isinstance(target, nn.Linear)``): the adapter is an ordinary peft adapter that
loads on the float or the FP8 base without registering anything (a custom module mapping is not
saved in adapter_config.json and would have to be registered before every load). What peft
reads from its base layer, it gets right: ``compute_dtype`` (the dtype the adapter is moved to,
as for bitsandbytes layers), and ``W_q`` + ``dequantize()``, which peft's
``dequantize_module_weight`` calls (the hook HQQ layers use), so peft's DoRA computes its weight
norm on the dequantised FP8 weight the layer computes with. The codes are stored as a uint8
Parameter (bytes of float8_e4m3fn) and the scales as int32 bits of float32, so ``model.to(dtype)``
or peft's dtype moves never re-round them (they cast floating tensors only). Merging an adapter
into this layer in place is not supported (peft would add a float delta to the codes): merge into
``dequantize()`` as ``loralab.merge`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.speed.fp8_kernels import can_run_on, quantize_rows_triton
from loralab.speed.streams import side_streams
from loralab.speed_settings import FP8_FAST_ACCUM, FP8_QUANTIZE_KERNELS

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
EPS = 1e-12
"""Floor of a row's amax, so an all-zero row gets a finite scale (and codes 0)."""
ALIGN = 16
"""``_scaled_mm``'s CUDA kernel needs the weight's in and out features divisible by this."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8 quantisation of ``x`` (M, K), any float dtype; rows along the last axis (a stack (L, M, K)
    quantises its L·M rows alike: ``weights_times``). Returns ``(codes, scales)``: codes (M, K) float8_e4m3fn = fp8(x / s) (round to nearest even,
    saturated at ±448) and scales (M, 1) float32, ``s = max(amax_row, EPS) · (1/448)``, so that
    ``x ≈ codes.float() * scales``."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) * (1.0 / FP8_MAX)
    codes = (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scales


def _quantize(x: torch.Tensor, col_scale: torch.Tensor | None, kernel: str):
    """``quantize_rows(x · diag(col_scale))`` by ``kernel`` (``FP8_QUANTIZE_KERNELS``): "torch", the
    ops above (under torch.compile inductor fuses them into neighbouring kernels), or "triton",
    ``speed/fp8_kernels.py`` (one opaque kernel; the eager torch ops' codes and scales bit for bit;
    inductor's compiled division on CUDA may round a quotient differently, moving a code by one)."""
    if kernel == "triton":
        return quantize_rows_triton(x, col_scale)
    return quantize_rows(x if col_scale is None else x.float() * col_scale.view(1, -1))


def fits(linear: nn.Linear) -> bool:
    """Whether ``linear``'s weight shape suits the FP8 kernel (both dimensions divisible by 16)."""
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


_KERNEL_CHECKED: set[str] = set()


def check_kernel(device: torch.device | str) -> None:
    """Run one 16 x 16 row-scaled ``_scaled_mm`` on ``device`` (once per device and process), so a
    torch or a GPU without the kernel FP8 layers need fails at build, naming what is missing,
    instead of deep inside the first forward. Row-wise scales need torch >= 2.13 on CPU (torch
    2.11's CPU kernel takes only per-tensor scales) and compute capability >= 8.9 on CUDA (Ada,
    Hopper). Raises RuntimeError naming ``quantization: "fp8"``, the device, torch's version and the
    kernel's own message."""
    device = torch.device(device)
    if str(device) in _KERNEL_CHECKED:
        return
    a = torch.ones(ALIGN, ALIGN, device=device).to(FP8)
    scale = torch.ones(ALIGN, 1, device=device)
    try:
        _scaled_mm(a, a.t(), scale, scale.view(1, -1), torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f'quantization: "fp8" needs torch._scaled_mm with row-wise scales on {device}, which torch '
            f"{torch.__version__} does not run there ({str(err).splitlines()[0]}); it needs torch >= 2.13 on CPU and "
            "a GPU of compute capability >= 8.9 (H100, H200, Ada) on CUDA; or use quantization \"nf4\" or none") from err
    _KERNEL_CHECKED.add(str(device))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def _kernel_dtype(device: torch.device, out_dtype: torch.dtype) -> torch.dtype:
    """What ``_scaled_mm``'s kernel writes on ``device`` for a wanted ``out_dtype``: CUDA's row-wise-scaled
    kernel writes bfloat16 only (torch raises for float32 or float16 output with (M,1)/(1,N) scales);
    the CPU reference kernel writes any float dtype."""
    return torch.bfloat16 if device.type == "cuda" else out_dtype


def _scaled_mm(a, b, scale_a, scale_b, out_dtype, out=None, fast_accum: bool = False):
    """``torch._scaled_mm`` written in ``out_dtype``: on CUDA taken in bfloat16 (``_kernel_dtype``) and
    cast, the same rounding a bf16 model's linear layers apply. ``out``: a tensor of the kernel's dtype
    the product is written into in place (no new tensor, no cast); returned. ``fast_accum``: torch's
    ``use_fast_accum`` (``Fp8Linear.fast_accum``)."""
    kernel_dtype = _kernel_dtype(a.device, out_dtype)
    if out is not None:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out.dtype, out=out,
                                use_fast_accum=fast_accum)
    y = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=kernel_dtype, use_fast_accum=fast_accum)
    return y if y.dtype == out_dtype else y.to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x Wᵀ with FP8 operands; backward gives dx only (module docstring: the formulas)."""

    @staticmethod
    def forward(ctx, x, codes, scales, codes_colmajor, kernel, fast_accum):
        out_dtype = _out_dtype(x)
        xq, sx = _quantize(x, None, kernel)
        y = _scaled_mm(xq, codes.t(), sx, scales.view(1, -1), out_dtype, fast_accum=fast_accum != "none")
        ctx.save_for_backward(codes, scales, codes_colmajor)  # codes_colmajor None: copied in the backward
        ctx.in_dtype, ctx.kernel, ctx.fast_accum = x.dtype, kernel, fast_accum == "all"
        return y

    @staticmethod
    def backward(ctx, grad):
        codes, scales, cached = ctx.saved_tensors
        gq, sg = _quantize(grad, scales, ctx.kernel)
        # (N, K) laid out column-major for the CUDA kernel: the cached copy, else one made now
        w_colmajor = cached if cached is not None else codes.t().contiguous().t()
        ones = torch.ones(1, codes.shape[1], device=codes.device, dtype=torch.float32)
        dx = _scaled_mm(gq, w_colmajor, sg, ones, ctx.in_dtype, fast_accum=ctx.fast_accum)
        return dx, None, None, None, None, None


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
               codes_colmajor: torch.Tensor | None = None, kernel: str = "torch", fast_accum: str = "none") -> torch.Tensor:
    """``x @ Wᵀ`` for ``W ≈ codes.float() * scales[:, None]``.

    ``x`` (..., K) any float dtype; ``codes`` (N, K) float8_e4m3fn; ``scales`` (N,) float32;
    ``codes_colmajor``: the same codes laid out column-major ((N, K) with strides (1, N)), used by
    the input gradient instead of a copy made per backward (None: made per backward; the result
    is the same bits either way); ``kernel``: what quantises x and the gradient per row, "torch" or
    "triton" (``speed.fp8_quantize_kernel``; the eager torch ops' bits, ``_quantize``); ``fast_accum``: which of
    the two GEMMs run with torch's ``use_fast_accum`` (``FP8_FAST_ACCUM``: "none", "forward" the output's, "all"
    both; ``Fp8Linear.fast_accum``). Returns (..., N) in the activation dtype (the autocast dtype
    under autocast). Differentiable in ``x`` only. Raises RuntimeError from ``_scaled_mm`` on a
    device without an FP8 kernel (CUDA below compute capability 8.9) or, on CUDA, for K or N not
    divisible by 16."""
    lead = x.shape[:-1]
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), codes, scales, codes_colmajor, kernel, fast_accum)
    return y.reshape(*lead, codes.shape[0])


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


def weights_times(codes: list[torch.Tensor], scales: list[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """``weight_times`` for L layers of one shape at once: ``codes`` L tensors (N, K) float8_e4m3fn,
    ``scales`` L tensors (N,) float32, ``a`` (L, r, K) (layer i's A is ``a[i]``). Returns (L, N, r)
    float32 (a transposed view of an (L, r, N) tensor), layer i's the values of
    ``weight_times(codes[i], scales[i], a[i])``. The split of A into two FP8 terms is row-wise, so it runs
    once over the whole stack; then one ``_scaled_mm`` per layer (on CUDA spread over side streams:
    speed/streams.py), the terms on the left, ``[hi; lo]·codesᵀ`` (2r, N), written in place into one
    (L, 2r, N) buffer of the kernel's dtype (bfloat16 on CUDA), and one
    reduction sums each layer's two terms in float32: one kernel a layer beside the split's and the sum's
    few, where a product per layer cast to float32 and stacked took two a layer and a copy. The 8B FP8 DoRA
    refresh, captured in a CUDA graph on two H100s: 8.89-8.91 ms cast and stacked, 7.88-7.89 ms in place
    with the codes on the left (N, 2r), 7.75 ms with the terms on the left (results/bench-refreshforms-h100);
    7.73 ms on one stream against 5.11 ms on 4 side streams, on another H100 (results/bench-streams-h100).
    Used by fast DoRA's once-a-step norm refresh (``speed/dora_refresh.refresh_dora_norms``). Raises
    ValueError when ``codes``, ``scales`` and ``a`` do not count the same L layers."""
    if not len(codes) == len(scales) == a.shape[0]:
        raise ValueError(f"weights_times: {len(codes)} codes, {len(scales)} scales and {a.shape[0]} A's; "
                         "one of each per layer is needed")
    r = a.shape[-2]
    terms, term_scales = split_rows(a)
    dtype = _kernel_dtype(a.device, torch.float32)
    y = torch.empty(len(codes), 2 * r, codes[0].shape[0], dtype=dtype, device=a.device)
    with side_streams(a.device, len(codes)) as stream_of:
        for i, (c, s) in enumerate(zip(codes, scales)):
            with stream_of(i):
                # terms[i] (2r, K) row-major first, c.t() (K, N) column-major second: the layouts the kernel wants
                _scaled_mm(terms[i], c.t(), term_scales[i], s.view(1, -1), dtype, out=y[i])
    return y.view(len(codes), 2, r, -1).sum(dim=1, dtype=torch.float32).transpose(-1, -2)


class Fp8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is FP8 with per-output-channel scales.

    Build it with ``Fp8Linear.from_linear(linear)``. ``weight``: (out, in) uint8 Parameter holding
    the float8_e4m3fn codes (never requires grad); ``weight_scale``: (out,) float32;
    ``bias``: the original bias (float, frozen). ``forward(x)`` = ``fp8_linear(x, ...) + bias``.
    ``dequantize()`` returns the float32 weight the layer computes with: ``codes * scale``.
    ``quantize_kernel``: what quantises its activations and gradients ("torch"; ``use_quantize_kernel``);
    ``fast_accum``: which of its GEMMs accumulate fast ("none"; ``use_fast_accum``)."""

    quantize_kernel = "torch"
    fast_accum = "none"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=torch.float32,
                 device=None):
        nn.Module.__init__(self)  # no float weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale_bits", torch.zeros(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """The FP8 layer of ``linear`` (any float dtype, any device; left unchanged)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=w.dtype,
                    device=w.device)
        codes, scales = quantize_rows(w)
        layer.weight.data = codes.view(torch.uint8)
        layer.scale_bits = scales.reshape(-1).contiguous().view(torch.int32)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def codes(self) -> torch.Tensor:
        """(out, in) float8_e4m3fn view of the stored weight."""
        return self.weight.view(FP8)

    @property
    def weight_scale(self) -> torch.Tensor:
        """(out,) float32 per-channel scales."""
        return self.scale_bits.view(torch.float32)

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802  the attribute peft's dequantize_module_weight looks for
        """The stored codes (peft reads this attribute's device, and then calls ``dequantize``)."""
        return self.weight

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight: codes · scale per output channel."""
        return self.codes.float() * self.weight_scale[:, None]

    @property
    def codes_colmajor(self) -> torch.Tensor | None:
        """The codes as (out, in) float8_e4m3fn laid out column-major, when cached
        (``cache_transpose``); None otherwise."""
        bits = getattr(self, "codes_t_bits", None)
        return None if bits is None else bits.view(FP8).t()

    @torch.no_grad()
    def cache_transpose(self) -> int:
        """Keep a column-major copy of the codes for the input gradient (a non-persistent buffer:
        not in the state dict, moved with the module). Returns the bytes it holds (0 if cached already)."""
        if getattr(self, "codes_t_bits", None) is not None:
            return 0
        self.register_buffer("codes_t_bits", self.weight.detach().t().contiguous(), persistent=False)
        return self.codes_t_bits.numel()

    def transpose_unit(self) -> tuple:
        """Layers ``cache_transposes`` caches with this one, whole or not at all: itself; a q/k/v trio (speed/fp8_qkv.py)."""
        return (self,)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` without the bias, as the layer computes it (its cached codes and quantisation kernel)."""
        return fp8_linear(x, self.codes, self.weight_scale, self.codes_colmajor, self.quantize_kernel, self.fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8_e4m3fn"


def fp8_layers(model: nn.Module) -> list[Fp8Linear]:
    """Every ``Fp8Linear`` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]


def cache_transposes(model: nn.Module, share: float, fill: bool = False) -> dict:
    """Cache the column-major codes (``Fp8Linear.cache_transpose``) of ``model``'s largest FP8
    layers, largest first, while the cached bytes stay within ``share`` (0..1) of all FP8 weight
    bytes (``speed.fp8_transpose_cache``). Layers of equal size are taken together or not at
    all, and the first group that does not fit ends the choice (``fill``: it is skipped and smaller
    groups are tried, as "auto" does to fill the memory a run leaves spare; a fused q/k/v trio, ``transpose_unit``, is
    one layer of their summed size here). Llama-3-8B's MLP projections are
    80.8 % of its linear weight bytes: 0.81 caches exactly those (at Llama-3.2-1B's 82.7 %, 0.81
    caches nothing: take 0.83); 1 caches every layer (1 byte more per weight). Returns {layers, bytes,
    total_bytes} (counts over all FP8 layers). Raises ValueError for a share outside [0, 1]."""
    if not 0 <= share <= 1:
        raise ValueError(f"share = {share!r}: a fraction in [0, 1] of the FP8 weight bytes")
    layers = fp8_layers(model)
    total = sum(m.weight.numel() for m in layers)
    units = {id(u[0]): u for u in (m.transpose_unit() for m in layers)}  # a fused q/k/v trio caches as one
    by_size: dict[int, list[tuple]] = {}
    for unit in units.values():
        by_size.setdefault(sum(m.weight.numel() for m in unit), []).append(unit)
    cached = count = 0
    for size in sorted(by_size, reverse=True):
        group = by_size[size]
        if cached + size * len(group) > share * total:
            if fill:
                continue
            break
        for unit in group:
            unit[0].cache_transpose()
        cached += size * len(group)
        count += sum(len(unit) for unit in group)
    return {"layers": count, "bytes": cached, "total_bytes": total}


def use_quantize_kernel(model: nn.Module, kernel: str) -> int:
    """Set what quantises the activations and gradients of every FP8 layer of ``model``
    (``speed.fp8_quantize_kernel``; ``_quantize`` says how their codes compare). Returns how many layers it set.
    Raises ValueError for a kernel outside ``FP8_QUANTIZE_KERNELS``, and RuntimeError, before
    setting any, where "triton" cannot run on the layers' device (``fp8_kernels.can_run_on``)."""
    if kernel not in FP8_QUANTIZE_KERNELS:
        raise ValueError(f"fp8 quantize kernel {kernel!r}: allowed: {', '.join(FP8_QUANTIZE_KERNELS)}")
    layers = fp8_layers(model)
    why = next((w for w in (can_run_on(m.weight.device) for m in layers) if w), None) if kernel == "triton" else None
    if why:
        raise RuntimeError(f"'speed.fp8_quantize_kernel' = 'triton': {why}")
    for m in layers:
        m.quantize_kernel = kernel
    return len(layers)


def use_fast_accum(model: nn.Module, mode: str) -> int:
    """Set which GEMMs of every FP8 layer of ``model`` run with ``torch._scaled_mm``'s ``use_fast_accum``
    (``speed.fp8_fast_accum``): "none", "forward" (the output's, y = x·Wᵀ) or "all" (also the input
    gradient's). On Hopper, FP8 tensor cores accumulate in a precision below float32 (about 14 bits,
    DeepSeek-V3 report, section 3.3.2); without fast accumulation cuBLAS/CUTLASS promote the partial sums
    to float32 every few K-blocks, which costs time; with it they do not. torchao's float8 training runs
    the output GEMM with fast accumulation and the gradients' without (``Float8LinearConfig``'s
    ``gemm_config_output`` / ``gemm_config_grad_input``), the "forward" mode here. CPU's reference
    kernel accumulates in float32 either way. Returns how many layers it set. Raises ValueError for a
    mode outside ``FP8_FAST_ACCUM``."""
    if mode not in FP8_FAST_ACCUM:
        raise ValueError(f"'speed.fp8_fast_accum' = {mode!r}: allowed: {', '.join(FP8_FAST_ACCUM)}")
    layers = fp8_layers(model)
    for m in layers:
        m.fast_accum = mode
    return len(layers)
