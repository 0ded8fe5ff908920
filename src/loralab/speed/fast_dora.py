"""Fast DoRA: peft's DoRA layer with a weight norm that never builds ``W + s·BA``.

Paper: DoRA, Liu et al. 2024 (arXiv:2402.09353). The update rule (peft's, §4.3 of the paper):

    out = (m / ||W + s·BA||_row) ⊙ (W x + s·B A x) + bias,   the norm detached from the graph.

peft computes the norm by materialising ``B A`` (through an identity matrix) and ``W + s·BA`` in the input dtype in
every forward: two weight-sized temporaries per layer, which halves speed and adds gigabytes at 8B scale. The row
norm expands into terms that need only r-sized products:

    ||W_i + s(BA)_i||² = ||W_i||² + 2s·Σ_j (W Aᵀ)_ij B_ij + s²·B_i (A Aᵀ) B_iᵀ

``||W_i||²`` is constant while W is frozen, so it is computed once and cached (a plain attribute, not a buffer, so the
state dict is unchanged); ``W Aᵀ`` is one (out × in) · (in × r) product and ``A Aᵀ`` an r × r Gram matrix. The output
combine is a small autograd function that keeps only the returned tensor for the magnitude's gradient (``∂L/∂m = Σ_t g
⊙ out / m``), so DoRA costs little more activation memory than LoRA, and the adapter's scaling is applied to its
r-wide intermediate (``_lora``), so the backward makes one activation-sized gradient per layer, not two.

On an FP8 base (``loralab.speed.fp8.Fp8Linear``, ``quantization: "fp8"``) the weight is ``W = diag(s_w)·Wq`` with
float8_e4m3fn codes ``Wq``: ``||W_i||²`` is taken once from the dequantised weight, and ``W Aᵀ = diag(s_w)·(Wq Aᵀ)``:
in a bf16 model from the codes read as FP8 by one ``_scaled_mm`` with A split into two FP8 terms
(``speed/fp8.weight_times``: as precise as a bf16 base's product, 1 byte read per weight instead of 5 for a bf16 copy
of the codes and its product), in an fp16 or float32 model (and for ranks the kernel cannot take) with the codes
converted to that dtype (exact for the codes). No float copy of the weight outlives the call. peft's DoRA on that base
multiplies the float32 dequantised weight and builds ``W + s·BA`` in float32 per forward. With dropout in training,
peft computes the base term ``W·dropout(x)`` with the dequantised weight; here it runs through the FP8 kernel as the
layer's own output does (the difference is the per-token activation rounding the FP8 forward adds). The packed NF4
base has no such product and stays refused (``methods.Method.conflicts``).

Once per optimizer step (``speed.dora_norm_per_step``, on by default) the step computes every layer's norm and m / n
in one refresh (``speed/dora_refresh.refresh_dora_norms``), and inside ``reusing_dora_norms()`` the forwards read
them; outside it every forward computes its own.

With ``speed.lora_shared_input`` a layer without dropout (in training) whose one active adapter is fast DoRA joins
its siblings' group (``speed/shared_input.py``): its ``lora_A(x)`` comes as a column slice of one GEMM over the
concatenated A's of q/k/v (or gate/up), passed to ``FastDoraLinearVariant.forward`` as ``lora_a_x``; nothing else of
this forward changes (norm, kept norms, combine, bias, FP8 base). peft's ``DoraLinearVariant`` never takes it.
``enable_fast_dora`` and ``disable_fast_dora`` regroup a model grouped before (``regroup_shared_input``).

What it shares with peft: everything but the forward. After ``get_peft_model(..., use_dora=True)`` (or
``PeftModel.from_pretrained``) ``enable_fast_dora(model)`` swaps each linear layer's ``DoraLinearVariant`` for
``FastDoraLinearVariant``; parameters, names, init, merge and the saved adapter are peft's own, so the adapter loads
with plain ``PeftModel.from_pretrained``."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from loralab.speed.fp8 import ALIGN, Fp8Linear, weight_times
from loralab.speed.shared_input import register_sharing_variant, regroup_shared_input

_EPS = 1e-12
_REUSE_NORMS = False
"""True inside ``reusing_dora_norms()``: forwards read the norms ``refresh_dora_norms`` stored (a module
global, so torch.compile guards one value for every layer instead of one per layer)."""


def _fp8_base(module) -> Fp8Linear | None:
    base = module.get_base_layer()
    return base if isinstance(base, Fp8Linear) else None


def _base_weight(module) -> torch.Tensor:
    """The frozen weight as (out, in), whatever the layer's storage convention (an FP8 base: the
    codes converted to its compute dtype; multiply row i by ``weight_scale[i]`` for W)."""
    fp8 = _fp8_base(module)
    if fp8 is not None:
        return fp8.codes.to(_product_dtype(fp8))
    weight = module.get_base_layer().weight
    return weight.T if getattr(module, "fan_in_fan_out", False) else weight


def _product_dtype(fp8: Fp8Linear) -> torch.dtype:
    """The dtype the FP8 codes are multiplied in: a 16-bit compute dtype (exact for the codes), else float32."""
    return fp8.compute_dtype if fp8.compute_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _cached_weight_sq(module, adapter: str) -> torch.Tensor:
    """``||W_i||²`` in fp32, recomputed only when W's storage or version changes (e.g. after a merge);
    on an FP8 base, of the dequantised weight (codes · scale) and keyed on codes and scales."""
    holder = module.lora_magnitude_vector[adapter]
    if torch.compiler.is_compiling() and getattr(holder, "_loralab_weight_sq", None) is not None:
        return holder._loralab_weight_sq  # compiled steps trust the cache (W is frozen while training)
    fp8 = _fp8_base(module)
    stored = [fp8.weight, fp8.scale_bits] if fp8 is not None else [_base_weight(module)]
    key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in stored)
    if getattr(holder, "_loralab_weight_sq_key", None) != key:
        with torch.no_grad():
            weight = fp8.dequantize() if fp8 is not None else stored[0]
            holder._loralab_weight_sq = weight.float().pow(2).sum(dim=1)
        holder._loralab_weight_sq_key = key
    return holder._loralab_weight_sq


def _weight_parts(module, adapter: str, lora_A: torch.Tensor) -> tuple:
    """How W·Aᵀ is taken for the layer, with no copy of its weight: (weight_sq, the stored weight (out, in),
    the dtype to convert it to first or None, row_scale, from_codes). On an FP8 base the stored weight is
    its codes: read as FP8 (``from_codes``) or converted to ``_product_dtype`` for the product."""
    fp8 = _fp8_base(module)
    weight_sq = _cached_weight_sq(module, adapter)
    if fp8 is not None and fp8.compute_dtype == torch.bfloat16 and (2 * lora_A.shape[0]) % ALIGN == 0:
        # a bf16 model: W·Aᵀ from the FP8 codes read once (speed/fp8.weight_times), as precise as bf16's
        # (an fp16 model keeps the fp16 product, which is ~8x more precise than the two-term split)
        return weight_sq, fp8.codes, None, fp8.weight_scale, True
    if fp8 is not None:
        return weight_sq, fp8.codes, _product_dtype(fp8), fp8.weight_scale, False
    return weight_sq, _base_weight(module), None, None, False


def _norm_inputs(module, adapter: str, lora_A: torch.Tensor) -> tuple:
    """The tensors ``_norm_of`` needs, read from the layer: (weight_sq, weight, row_scale, from_codes); an FP8
    base's codes converted for the product where it does not read them as FP8 (a copy, for this call only)."""
    weight_sq, weight, dtype, row_scale, from_codes = _weight_parts(module, adapter, lora_A)
    return weight_sq, weight if dtype is None else weight.to(dtype), row_scale, from_codes


@torch.no_grad()
def _norm_of(weight_sq, weight, row_scale, from_codes: bool, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """One layer's row norm from tensors only (``_norm_inputs``): the per-forward norm, inside the layer's own
    compiled graph where layers compile (the refresh stacks layers instead: ``refresh_dora_norms``)."""
    if from_codes:
        return _norm_from_products(weight_sq, weight_times(weight, row_scale, lora_A), lora_A, lora_B, scaling)
    return dora_weight_norm(weight_sq, weight, lora_A, lora_B, scaling, row_scale=row_scale)


def _norm(module, adapter: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    return _norm_of(*_norm_inputs(module, adapter, lora_A), lora_A, lora_B, scaling)


@torch.no_grad()
def dora_weight_norm(weight_sq: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Row norm of ``W + scaling·B A`` (out,) fp32, detached, from r-sized products only.

    ``weight_sq`` (out,) fp32 = ``||W_i||²``; ``weight`` (out, in) in its own dtype; ``lora_A``
    (r, in), ``lora_B`` (out, r). The W·Aᵀ product runs in the weight's dtype (bf16 tensor cores
    for a bf16 base) and everything after it in fp32. ``row_scale`` (out,) fp32: W is
    ``diag(row_scale)·weight`` (an FP8 base's codes and per-channel scales); None: W is ``weight``.
    """
    a = lora_A.to(weight.dtype)
    wa = (weight @ a.T).float()  # (out, r)
    if row_scale is not None:
        wa = wa * row_scale[:, None]
    return _norm_from_products(weight_sq, wa, lora_A, lora_B, scaling)


def _norm_from_products(weight_sq: torch.Tensor, wa: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scaling: float, gram: torch.Tensor | None = None) -> torch.Tensor:
    """``||W_i + s(BA)_i||`` from ``||W_i||²`` and ``W·Aᵀ`` (the module docstring's expansion): one layer,
    ``weight_sq`` (out,), ``wa`` (out, r) fp32, ``lora_A`` (r, in), ``lora_B`` (out, r) -> (out,) fp32; or L
    layers of one shape stacked on a leading axis ((L, out), (L, out, r), (L, r, in), (L, out, r) -> (L, out)).
    ``gram``: ``_gram(lora_A.float())``, (r, r) or (L, r, r) float32, where the caller took it already (the
    refresh, beside the products)."""
    b = lora_B.float()
    gram = _gram(lora_A.float()) if gram is None else gram  # (r, r)
    cross = (wa * b).sum(dim=-1)
    ba_sq = ((b @ gram) * b).sum(dim=-1)
    return (weight_sq + 2.0 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``A·Aᵀ`` (..., r, r) of ``a`` (..., r, K): a module global, so a diagnostic can time another summation
    (scripts/dora_refresh_forms.py, "gram-split")."""
    return a @ a.transpose(-1, -2)


class _DoraCombine(torch.autograd.Function):
    """``out = (m / n) ⊙ (base + lora)`` with n constant (``lora`` already scaled: ``_lora``); saves only ``out``
    (and m, m / n). Both inputs get the same gradient tensor. ``ratio``: m / n (out,) fp32 as the refresh kept it,
    or None: divided here. Kept, the forward does not divide; its casts to the activations' dtype fuse into the
    combine's elementwise kernels under torch.compile (eager, each is a small kernel, as the division was)."""

    @staticmethod
    def forward(ctx, base, lora, magnitude, norm, ratio=None):
        ratio = magnitude / norm if ratio is None else ratio
        out = (base + lora.to(base.dtype)) * ratio.to(base.dtype)
        ctx.save_for_backward(out, magnitude, ratio)
        ctx.lora_dtype = lora.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        out, magnitude, ratio = ctx.saved_tensors
        grad_h = grad * ratio.to(grad.dtype)
        grad_base = grad_h if ctx.needs_input_grad[0] else None
        grad_lora = grad_h.to(ctx.lora_dtype) if ctx.needs_input_grad[1] else None  # no copy when the dtypes agree
        grad_mag = None
        if ctx.needs_input_grad[2]:
            # h / n = out / m; a zero magnitude row gets zero gradient instead of a division by zero.
            dot = (grad * out).reshape(-1, out.shape[-1]).sum(dim=0, dtype=torch.float32)
            safe = torch.where(magnitude.abs() > _EPS, magnitude, torch.ones_like(magnitude))
            grad_mag = torch.where(magnitude.abs() > _EPS, dot / safe, torch.zeros_like(dot)).to(magnitude.dtype)
        return grad_base, grad_lora, grad_mag, None, None


def _lora(lora_A, lora_B, x, scaling, a_x=None):
    """``s·B(A x)`` computed as ``B(s·(A x))`` (``a_x``: ``A x`` (..., r) where the caller has it already, else
    computed here): the scaling multiplies the r-wide intermediate, so the backward
    hands ``lora_B`` the combine's gradient as it is, where ``B(A x)·s`` would make one more (tokens × out) tensor,
    ``s·grad``, per layer in every backward (at Llama-3-8B's shapes, 2,048 tokens, 176 MB per decoder layer of 7
    adapted projections). The same values as the output-side scaling in float32 and bfloat16 where s is a power of
    two (e.g. 16/8; ``speed/rank_scaling.py`` says why); otherwise, and in float16, the one rounding of s·(...)
    falls on the intermediate instead of the output."""
    return lora_B((lora_A(x) if a_x is None else a_x) * scaling)


class FastDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA linear variant with the fast norm; init, merge and unmerge are inherited. ``forward``: peft's
    arguments (``x`` as peft casts it for ``lora_A``, ``result`` the base layer's output) and ``lora_a_x``, the
    (..., r) product ``lora_A(x)`` where the layer's ``shared_input.InputGroup`` computed it, or None: computed here.
    Raises ValueError for ``lora_a_x`` where dropout applies (the product is of x, not of dropout(x))."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                lora_a_x: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        holder = module.lora_magnitude_vector[active_adapter]
        magnitude, bias = holder.weight, module.get_base_layer().bias
        stored = getattr(holder, "_loralab_norm", None) if _REUSE_NORMS else None
        norm = stored if stored is not None else _norm(module, active_adapter, lora_A.weight, lora_B.weight, scaling)
        ratio = getattr(holder, "_loralab_ratio", None) if stored is not None else None
        if isinstance(dropout, nn.Identity) or not module.training:
            base = result if bias is None else result - bias
            out = _DoraCombine.apply(base, _lora(lora_A, lora_B, x, scaling, lora_a_x), magnitude, norm, ratio)
            return out if bias is None else out + bias
        if lora_a_x is not None:
            raise ValueError("fast DoRA: a shared lora_A product (lora_a_x) was passed to a layer whose dropout "
                             "applies (training); such layers compute lora_A(dropout(x)) themselves")
        # With dropout peft rescales W·dropout(x), not the layer's own output: same here.
        x = dropout(x)
        fp8 = _fp8_base(module)
        if fp8 is not None:  # as the FP8 layer computes W·x (module docstring)
            base = fp8.product(x).to(result.dtype)
        else:
            weight = _base_weight(module)
            base = F.linear(x.to(weight.dtype), weight).to(result.dtype)
        out = _DoraCombine.apply(base, _lora(lora_A, lora_B, x, scaling), magnitude, norm, ratio)
        return result + out - base


register_sharing_variant(FastDoraLinearVariant)  # its layers may join speed.lora_shared_input's groups


def _fast_dora_adapters(model: nn.Module):
    """(module, adapter name) of every fast DoRA variant in ``model`` whose factors exist."""
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if isinstance(variants, dict):
            for name, variant in variants.items():
                if type(variant) is FastDoraLinearVariant and name in module.lora_A and name in module.lora_B:
                    yield module, name


def fast_dora_layers(model: nn.Module) -> int:
    """How many layer-adapters of ``model`` run the fast DoRA forward."""
    return sum(1 for _ in _fast_dora_adapters(model))


@contextlib.contextmanager
def reusing_dora_norms():
    """Inside: fast DoRA forwards read the norms ``refresh_dora_norms`` stored (a layer it has not
    computed computes its own). The caller guarantees A, B and the magnitudes have not changed since that refresh:
    the training step holds it over its micro-batches, between the refresh and the optimizer step."""
    global _REUSE_NORMS
    before, _REUSE_NORMS = _REUSE_NORMS, True
    try:
        yield
    finally:
        _REUSE_NORMS = before


def enable_fast_dora(model: nn.Module) -> int:
    """Swap every linear DoRA variant in ``model`` for the fast one; returns how many were swapped. Where
    ``shared_input.enable_shared_input`` grouped ``model`` (or a module in it) before, it groups it again, so the
    fast DoRA layers join (``regroup_shared_input``).

    Raises ValueError, before swapping any, when a DoRA layer's base weight is neither a float
    tensor nor an FP8 layer (e.g. bitsandbytes' packed NF4): the norm needs W's values."""
    swapped = 0
    dora = [m for m in model.modules() if isinstance(getattr(m, "lora_variant", None), dict)
            and any(type(v) is DoraLinearVariant for v in m.lora_variant.values())]
    for module in dora:
        if _fp8_base(module) is None and not module.get_base_layer().weight.is_floating_point():
            base = module.get_base_layer()
            raise ValueError(f"fast DoRA needs a float or FP8 base weight; {type(base).__name__} stores "
                             f"{base.weight.dtype} ({type(base.weight).__name__}): set 'speed.fast_dora': false")
    for module in dora:
        for name, variant in list(module.lora_variant.items()):
            if type(variant) is DoraLinearVariant:
                module.lora_variant[name] = FastDoraLinearVariant()
                _cached_weight_sq(module, name)
                swapped += 1
    if swapped:
        regroup_shared_input(model)
    return swapped


def disable_fast_dora(model: nn.Module) -> int:
    """Undo ``enable_fast_dora`` (peft's own DoRA forward again, its layers out of any shared-input group:
    ``regroup_shared_input``); returns how many were swapped."""
    swapped = list(_fast_dora_adapters(model))
    for module, name in swapped:
        module.lora_variant[name] = DoraLinearVariant()
    if swapped:
        regroup_shared_input(model)
    return len(swapped)
