"""Fast DoRA's weight norms once per optimizer step: ``refresh_dora_norms`` (``speed.dora_norm_per_step``, on by default).

The norm ``||W + s·BA||_row`` of a fast DoRA layer (``speed/fast_dora.py``) depends on W (frozen), A and B, and the
combine's scale m / n on the magnitude m too; A, B and m change only at the optimizer step, so a step of k
micro-batches (gradient accumulation) needs them once, not k times. ``refresh_dora_norms(model)`` computes every fast
DoRA layer's norm and m / n into tensors kept on the layer (the step calls it before its first micro-batch, from a CUDA
graph of its own when the step is graphed), and inside ``fast_dora.reusing_dora_norms()`` the forwards read them.
The W·Aᵀ product reads all of W (16 GB for Llama-3-8B in bf16: ~5 ms at an H100's 3.35 TB/s). Once a step made bf16
DoRA 1.119x (micro-batch 1) and FP8-base DoRA 1.035x (micro-batch 2) on an H100, one run each
(results/bench-dora-h100/); stacking the layers of one shape, 1.018x on both (old tree, new, old again on one
machine: results/bench-refresh-h100/); keeping m / n, so no forward divides m by n (in a compiled forward that made,
by our reading of the profile, a small kernel per layer, as m / n is also saved for the backward; the kept ratio's
casts fuse into the combine's kernels), 1.56 ms of an 8B FP8 DoRA step of 132.69 ms, one run each in one call
(results/bench-ratio-h100/). Outside that context (evaluation, generation, a user's own loop) every forward computes
its own, so a changed A, B or m is never read stale.

The same values as the per-forward norm up to the summation order of the batched matmuls (bitwise at small widths,
about 1e-7 in float32 at realistic ones), except under autocast: the refresh runs outside it, so its products (A Aᵀ
and B·(A Aᵀ) always, W·Aᵀ for a float32 weight) are taken in the tensors' own dtypes where an autocast forward takes
them in bf16: closer to the float32 norm, not the same training bit for bit. m / n is the forward's own division.

Functions of ``speed/fast_dora.py`` that a diagnostic may replace (``_gram``, ``_norm_from_products``) are looked up
on that module at each call (scripts/dora_refresh_forms.py, tests/test_dora_norm_per_step.py).
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.speed import fast_dora
from loralab.speed.fp8 import Fp8Linear, weights_times
from loralab.speed.fp8_kernels import can_run_on, weights_times_triton
from loralab.speed.streams import aside, side_streams
from loralab.speed_settings import FP8_REFRESH_KERNELS

_COMPILED_NORMS: dict = {}


def _norms_tail(backend):
    """``fast_dora._norm_from_products`` (``backend`` None), or that function compiled with ``backend``, one per
    backend (the refresh's stacked groups), called with plain tensors: dynamo keeps a Parameter's shape static, so
    mixed ranks (``rank_pattern``, Eva) would pass the recompile limit; plain tensors go dynamic after the second
    shape (at most 4 graphs for 12 layers of 12 ranks: tests/test_dora_norm_per_step.py)."""
    if backend is None:
        return fast_dora._norm_from_products
    if backend not in _COMPILED_NORMS:
        _COMPILED_NORMS[backend] = torch.compile(fast_dora._norm_from_products, backend=backend, fullgraph=True)
    return _COMPILED_NORMS[backend]


def use_refresh_kernel(model: nn.Module, kernel: str) -> str:
    """Set what takes the refresh's ``W·Aᵀ`` from the codes of every FP8 layer of ``model`` (``speed.fp8_refresh_kernel``;
    the layer's ``refresh_kernel``, read by ``_group_products``): "cublas", one ``_scaled_mm`` a layer with A as two FP8
    terms (``speed/fp8.weights_times``), or "triton", one kernel a group with A in float16
    (``speed/fp8_kernels.weights_times_triton``: the refreshed norms closer to the exact ones, ~1e-7 against ~1e-4 at
    the tests' width under Triton's interpreter, tests/test_refresh_kernel.py, and 1.28e-5 on an H100's GPU test; the
    whole refresh 4.045 ms against 5.143 at the 8B shape, FP8 DoRA's step 1.009x-1.014x, H100s,
    results/bench-tritonproduct-h100). "auto":
    "triton" where every FP8 layer is on CUDA, Triton runs there and each layer's codes are contiguous and 16-byte
    aligned (the kernel's vector loads), else "cublas". A forward outside the step's refresh (evaluation) takes its own
    norm by cuBLAS either way. Returns the kernel set ("auto" gives "cublas" where there is no FP8 layer). Raises ValueError for a
    kernel outside "auto" and ``FP8_REFRESH_KERNELS``, or for "triton" with a layer's codes it cannot read (the layer
    named); RuntimeError for "triton" where it cannot run (``fp8_kernels.can_run_on``'s reason)."""
    if kernel not in ("auto", *FP8_REFRESH_KERNELS):
        raise ValueError(f"'speed.fp8_refresh_kernel' = {kernel!r}: allowed: auto, {', '.join(FP8_REFRESH_KERNELS)}")
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    why = next((w for w in (can_run_on(m.weight.device) for _, m in named) if w), None)
    unaligned = next((name for name, m in named if not m.codes.is_contiguous() or m.codes.data_ptr() % 16), None)
    if kernel == "triton" and why:
        raise RuntimeError(f"'speed.fp8_refresh_kernel' = 'triton': {why}")
    if kernel == "triton" and unaligned:
        raise ValueError(f"'speed.fp8_refresh_kernel' = 'triton': layer {unaligned}'s codes are not contiguous and "
                         "16-byte aligned, as the kernel reads them; set it to \"cublas\" or \"auto\"")
    if kernel == "auto":
        on_cuda = bool(named) and all(m.weight.device.type == "cuda" for _, m in named)
        kernel = "triton" if on_cuda and why is None and unaligned is None else "cublas"
    for _, m in named:
        m.refresh_kernel = kernel
    return kernel


def _refresh_groups(model: nn.Module) -> dict:
    """The fast DoRA layer-adapters of ``model`` grouped so each group's norms stack into one computation:
    {(weight shape, stored and product dtypes, device, how W·Aᵀ is taken and by what kernel, A's shape and dtype,
    B's dtype, scaling): [(module, adapter, _weight_parts)]}. The groups hold the layers' own weights, never a converted
    copy (``_group_products`` converts one layer at a time). Llama-3-8B's 224 layer-adapters make 4 groups
    (q and o, k and v, gate and up, down)."""
    groups: dict = {}
    for module, name in fast_dora._fast_dora_adapters(model):
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        parts = fast_dora._weight_parts(module, name, a)
        _, weight, dtype, row_scale, from_codes = parts
        key = (tuple(weight.shape), weight.dtype, dtype, weight.device, row_scale is None, from_codes, _kernel_of(module),
               tuple(a.shape), a.dtype, b.dtype, float(module.scaling[name]))
        groups.setdefault(key, []).append((module, name, parts))
    return groups


KERNEL_OVERRIDE: str | None = None
"""A kernel every FP8 layer's refresh takes whatever its ``refresh_kernel`` (scripts/dora_refresh_forms.py sets it for
the time of a form's measure); None: each layer's own."""


def _kernel_of(module) -> str:
    """The layer's ``refresh_kernel`` (``use_refresh_kernel``; "cublas" for a base it never set), or
    ``KERNEL_OVERRIDE``."""
    return KERNEL_OVERRIDE or getattr(fast_dora._fp8_base(module), "refresh_kernel", "cublas")


def _group_products(members: list, a: torch.Tensor) -> torch.Tensor:
    """``W·Aᵀ`` (L, out, r) fp32 of one group's layers, each the value ``_norm_of`` takes for that layer (read from
    FP8 codes by the layers' ``refresh_kernel``: Triton's within A's float16 rounding of it), from their A's stacked
    (``a``, (L, r, in)): cast (or split into FP8 terms) once, one GEMM per layer or one Triton kernel a group (an FP8
    base's codes converted per layer where it does not read them as FP8: one copy alive at a time)."""
    _, weight, dtype, row_scale, from_codes = members[0][2]
    if from_codes:  # looked up at each call: scripts/dora_refresh_forms.py replaces weights_times
        product = weights_times_triton if _kernel_of(members[0][0]) == "triton" else weights_times
        return product([parts[1] for *_, parts in members], [parts[3] for *_, parts in members], a)
    a = a.to(dtype or weight.dtype)
    wa = torch.empty(len(members), weight.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
    # each product in place, beside the others on side streams (speed/streams.py) unless it converts the codes
    with side_streams(a.device, len(members) if dtype is None else 1) as stream_of:
        for i, (*_, parts) in enumerate(members):
            with stream_of(i):
                torch.matmul(parts[1] if dtype is None else parts[1].to(dtype), a[i].T, out=wa[i])
    wa = wa.float()
    if row_scale is not None:
        wa = wa * torch.stack([parts[3] for *_, parts in members])[..., None]
    return wa


@torch.no_grad()
def refresh_dora_norms(model: nn.Module, compile_backend=None) -> int:
    """Compute each fast DoRA layer's weight norm n = ``||W + s·BA||_row`` (out,) fp32 and m / n now, and keep them
    on the layer (``lora_magnitude_vector[adapter]._loralab_norm``, ``._loralab_ratio``: plain attributes, the state
    dict is unchanged) for the forwards inside ``reusing_dora_norms()``. Returns how many layer-adapters it computed
    (0: none). Later calls write into the same tensors, so a CUDA graph that captured this call, or a forward that
    read them, sees the new values. Call it whenever A, B or a magnitude may have changed (the step: before its
    first micro-batch). Not under FSDP: it needs every rank's whole W, A and B outside the forward.

    Layers of one shape are computed together (``_refresh_groups``): A's and B's stacked, the small products
    batched, one GEMM per layer for W·Aᵀ (on CUDA spread over side streams, every group's Gram A·Aᵀ taken first
    on one more stream beside all of them: speed/streams.py), or, where a group's ``refresh_kernel`` is "triton"
    (``use_refresh_kernel``: on CUDA by default), one Triton launch for the group's W·Aᵀ, one copy into the kept
    norms and ratios. Every
    group's W·Aᵀ (L, out, r) float32 is alive until the norms are taken (~176 MB at Llama-3-8B, r 32; the largest
    group's alone, ~117 MB, before every Gram went first: results/bench-gramfirst-h100, where the step's peak did
    not move). Layer by layer each norm was 16 eager aten ops (34 on an FP8 base), thousands a step at 8B;
    stacked, one op per layer (two where an FP8 base's codes are converted) plus about 21 per group (39 on an FP8
    base), counted on CPU by tests/test_dora_norm_per_step.py. The values are the layer-by-layer ones (``_norm_of``)
    up to the batched matmuls' summation order: on CPU bitwise at the tests' small widths, within 1.5e-7 relative
    at hidden size 1024, rank 16. ``compile_backend`` (e.g. "inductor"; None: eager): the stacked elementwise tail fused as in
    a compiled forward (``_norms_tail``); eager, the layer-by-layer refresh had cost more than
    the forward's norm it saved at micro-batch 2 of an 8B FP8 base (0.946x, results/bench-dora-h100/eager-dorab-*)."""
    from_products = _norms_tail(compile_backend)
    groups = [(scaling, members, torch.stack([module.lora_A[name].weight.detach() for module, name, _ in members]))
              for (*_, scaling), members in _refresh_groups(model).items()]
    if not groups:
        return 0
    with aside(groups[0][2].device) as run_aside:  # every Gram first, beside all the products (speed/streams.py)
        with run_aside():
            grams = [fast_dora._gram(a.float()) for *_, a in groups]
        products = [_group_products(members, a) for _, members, a in groups]
    for (scaling, members, a), gram, wa in zip(groups, grams, products, strict=True):
        _keep_group(members, a, wa, gram, scaling, from_products)
    return sum(len(members) for _, members, _ in groups)


def _keep_group(members: list, a: torch.Tensor, wa: torch.Tensor, gram: torch.Tensor, scaling: float,
                from_products) -> None:
    """One group's norms from its products (``a`` (L, r, in) stacked A's, ``wa`` (L, out, r), ``gram`` (L, r, r)),
    through ``from_products`` (``fast_dora._norm_from_products`` or its compiled copy), kept on its layers."""
    weight_sq = torch.stack([parts[0] for *_, parts in members])
    b = torch.stack([module.lora_B[name].weight.detach() for module, name, _ in members])
    _keep_norms(members, from_products(weight_sq, wa, a, b, scaling, gram))


def _keep_norms(members: list, norms: torch.Tensor) -> None:
    """Keep ``norms`` (L, out) and m / n on the group's L layers (``_loralab_norm``, ``_loralab_ratio``): in place
    where a layer has them."""
    ratios = torch.stack([module.lora_magnitude_vector[name].weight.detach() for module, name, _ in members]) / norms
    kept, fresh = [], []
    for (module, name, _), norm, ratio in zip(members, norms.unbind(0), ratios.unbind(0), strict=True):
        holder = module.lora_magnitude_vector[name]
        old = (getattr(holder, "_loralab_norm", None), getattr(holder, "_loralab_ratio", None))
        if old[0] is None or old[1] is None or old[0].shape != norm.shape or old[0].device != norm.device:
            holder._loralab_norm, holder._loralab_ratio = norm.clone(), ratio.clone()
        else:
            kept += old
            fresh += (norm, ratio)
    if kept:
        torch._foreach_copy_(kept, fresh)  # in place: one kernel for the group, not one per layer
