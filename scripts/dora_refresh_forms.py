"""Fast DoRA's once-a-step norm refresh on an FP8 base, timed as the step runs it, in other forms of its two
costly products (issue 22: "DoRA within 10 % of LoRA"; used by ``dora_ablation_bench.py --refresh-forms``).

The refresh (``speed/dora_refresh.refresh_dora_norms``) was 9.2 ms of an 8B FP8 DoRA step's 17.4 ms over LoRA's on
an H100 (results/bench-doraabl-h100). Its profile: ~20 us per layer for ``W·Aᵀ`` (``speed/fp8.weights_times``)
and ~210 us per group for the float32 Gram bmm ``A·Aᵀ`` ((L, r, K) x (L, K, r): L x r x r outputs, few thread
blocks over a long K). The forms:

  shipped      the code as it is (on CUDA since 2026-12-07 the Triton kernel below, as triton-product; before it and
               on CPU): ``W·Aᵀ`` as ``(terms · codesᵀ)ᵀ``, ``_scaled_mm(terms (2r, K), codesᵀ (K, N))`` per
               layer (since bbd7c40: "terms-left" measured faster at ac59585), in place into one buffer, terms summed
  cast-stack   ``W·Aᵀ`` as before 2b6954e: ``_scaled_mm(codes, termsᵀ)`` per layer, cast to float32, the L products
               stacked (a cast kernel per layer and a copy per group)
  codes-left   ``W·Aᵀ`` as from 2b6954e through 22cac1c: ``_scaled_mm(codes (N, K), termsᵀ (K, 2r))`` in place, an
               (N x 2r) output per layer
  gram-split   the shipped form with the Gram matrix summed over 8 chunks of K (8x the blocks)
  gram-split-32  the same over 32 chunks of K (128 columns each at K 4096, 448 at 14336), the chunks made
               contiguous first: the Gram's bmm was 4 kernels a step of ~0.5 ms each beside the products on side
               streams (results/bench-doraprof-h100), few thread blocks each over a long K
  per-group-gram  the refresh as at 10f2552 (``refresh_per_group``): each group's Gram beside that group's products
               only, the group's norms kept before the next group's products start (shipped since: every Gram first,
               beside all the products, the norms after them); cuBLAS's products, as then
  one-stream   the shipped form with every ``W·Aᵀ`` product and the Gram on the current stream
               (``speed.streams.PRODUCT_STREAMS`` 1, as before they were spread over side streams)
  streams-2, streams-8
               the shipped form with the products spread over 2 or 8 streams (shipped: ``PRODUCT_STREAMS``)
  triton-product  every group's ``W·Aᵀ`` in one Triton kernel (``speed.fp8_kernels.weights_times_triton``: N/128 x L
               programs reading the codes once, A scaled and rounded to float16, float32 accumulation), in place of one
               ``_scaled_mm`` a layer: the shipped products read the 7.0 GB of 8B codes at 1.6 TB/s on an H100
               (results/bench-fair-h100-1207c); triton-product-256x64: the same with 256-row tiles over 64 columns of K,
               8 warps, 4 stages (the kernel's default: 128 x 128, 8 warps, 3 stages)
  cublas-product  every ``W·Aᵀ`` by ``speed/fp8.weights_times`` (one ``_scaled_mm`` a layer), whatever kernel the layers
               were set to take (``speed.fp8_refresh_kernel``: "auto" takes the Triton kernel on CUDA since it was
               measured 1.27x the refresh, results/bench-tritonproduct-h100; "shipped" is then that kernel), every
               Gram by the float32 bmm beside them

With the Triton product (on CUDA by default since de89128) each group's W·Aᵀ is one launch on the current stream:
one-stream, streams-2 and streams-8 then move only the Gram's stream (and the products of layers the kernel does not
read), and gram-split, gram-split-32 the Gram beside it, as before.

At ac59585 (results/bench-refreshforms-h100) the shipped form was codes-left, and the forms measured were
named shipped (codes-left), cast-stack, terms-left (today's shipped), gram-split and both.

Each form is put in place by patching module globals (``speed.dora_refresh``'s ``weights_times``,
``KERNEL_OVERRIDE`` and
``refresh_dora_norms``, ``speed.fast_dora``'s ``_gram``, ``speed.streams``' ``PRODUCT_STREAMS``; the refresh's
compiled copies cleared) for the time of its measure, then put back.
``time_forms`` times ``refresh_dora_norms(model, backend)`` captured in one CUDA graph and replayed (median of
20 replays), as the step's graph runs it; on CPU by the host clock, eager, a check that the forms agree.
"""

from __future__ import annotations

import contextlib

import torch
from kernel_timing import median_ms

from loralab.speed import dora_refresh, fast_dora, fp8_kernels
from loralab.speed import fp8 as fp8_mod
from loralab.speed import streams as streams_mod

GRAM_CHUNKS = 8
FORMS = ("shipped", "cast-stack", "codes-left", "gram-split", "gram-split-32", "per-group-gram", "one-stream", "streams-2",
         "streams-8", "triton-product", "triton-product-256x64", "cublas-product")
KERNEL_OF = {"per-group-gram": "cublas", "codes-left": "cublas", "cast-stack": "cublas", "cublas-product": "cublas",
             "triton-product": "triton", "triton-product-256x64": "triton"}  # speed.dora_refresh.KERNEL_OVERRIDE per form
GRAM_CHUNKS_OF = {"gram-split": (GRAM_CHUNKS, False), "gram-split-32": (32, True)}  # (chunks, made contiguous)
STREAMS = {"one-stream": 1, "streams-2": 2, "streams-8": 8}


def weights_times_cast_stack(codes: list[torch.Tensor], scales: list[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """``speed.fp8.weights_times``'s values as a7d0194 computed them: per layer a product cast to float32 (on
    CUDA; the CPU kernel writes float32), the products stacked, then the two terms summed."""
    r = a.shape[-2]
    terms, term_scales = fp8_mod.split_rows(a)
    y = torch.stack([fp8_mod._scaled_mm(c, terms[i].t(), s.view(-1, 1), term_scales[i].view(1, -1), torch.float32)
                     for i, (c, s) in enumerate(zip(codes, scales, strict=True))])
    return y[..., :r] + y[..., r:]


def weights_times_codes_left(codes: list[torch.Tensor], scales: list[torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """``speed.fp8.weights_times``'s (L, N, r) float32 values, each layer's product taken with the codes on the
    left, (N, 2r), in place into one (L, N, 2r) buffer of the kernel's dtype, the two terms summed in float32."""
    r = a.shape[-2]
    terms, term_scales = fp8_mod.split_rows(a)
    dtype = fp8_mod._kernel_dtype(a.device, torch.float32)
    y = torch.empty(len(codes), codes[0].shape[0], 2 * r, dtype=dtype, device=a.device)
    for i, (c, s) in enumerate(zip(codes, scales, strict=True)):
        # terms[i] is (2r, K) row-major, so terms[i].t() is the column-major (K, 2r) operand the kernel wants
        fp8_mod._scaled_mm(c, terms[i].t(), s.view(-1, 1), term_scales[i].view(1, -1), dtype, out=y[i])
    return y.view(*y.shape[:-1], 2, r).sum(dim=-2, dtype=torch.float32)


def gram_split(a: torch.Tensor, chunks: int = GRAM_CHUNKS, contiguous: bool = False) -> torch.Tensor:
    """``fast_dora._gram`` (``A·Aᵀ`` of ``a`` (..., r, K)) summed over ``chunks`` chunks of K: more, smaller products
    (K not divisible by ``chunks``: the whole product)."""
    if a.shape[-1] % chunks:
        return a @ a.transpose(-1, -2)
    parts = a.unflatten(-1, (chunks, -1)).transpose(-2, -3)  # (..., chunks, r, K/chunks)
    parts = parts.contiguous() if contiguous else parts
    return (parts @ parts.transpose(-1, -2)).sum(dim=-3)


@torch.no_grad()
def refresh_per_group(model, compile_backend=None) -> int:
    """``dora_refresh.refresh_dora_norms`` as at 10f2552: group after group, the group's Gram on the aside stream beside
    that group's products only, its norms kept before the next group starts. The same values as the shipped form."""
    tail = dora_refresh._norms_tail(compile_backend)
    count = 0
    for (*_, scaling), members in dora_refresh._refresh_groups(model).items():
        a = torch.stack([module.lora_A[name].weight.detach() for module, name, _ in members])
        with streams_mod.aside(a.device) as run_aside:
            with run_aside():
                gram = fast_dora._gram(a.float())
            wa = dora_refresh._group_products(members, a)
        dora_refresh._keep_group(members, a, wa, gram, scaling, tail)
        count += len(members)
    return count


def current_launch() -> tuple[int, int, int, int]:
    """``fp8_kernels.weights_times_triton``'s tile and launch now: (BLOCK_N, BLOCK_K, warps, stages)."""
    return fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K, fp8_kernels.WA_WARPS, fp8_kernels.WA_STAGES


@contextlib.contextmanager
def launch(tile: tuple[int, int, int, int]):
    """``fp8_kernels.weights_times_triton`` at ``tile`` (BLOCK_N, BLOCK_K, warps, stages) inside the block; its
    tile and launch as they were after it (scripts/refresh_product_sweep.py, the form triton-product-256x64)."""
    saved = current_launch()
    fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K, fp8_kernels.WA_WARPS, fp8_kernels.WA_STAGES = tile
    try:
        yield
    finally:
        fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K, fp8_kernels.WA_WARPS, fp8_kernels.WA_STAGES = saved


@contextlib.contextmanager
def form(name: str):
    """``speed.fast_dora`` computing its refresh in form ``name`` (``FORMS``) inside the block; its functions
    and compiled copies as they were after it."""
    if name not in FORMS:
        raise ValueError(f"refresh form {name!r}: one of {', '.join(FORMS)}")
    saved = (dora_refresh.weights_times, fast_dora._gram, dict(dora_refresh._COMPILED_NORMS), streams_mod.PRODUCT_STREAMS,
             dora_refresh.refresh_dora_norms, dora_refresh.KERNEL_OVERRIDE)
    try:
        if name == "per-group-gram":
            dora_refresh.refresh_dora_norms = refresh_per_group
        products = {"codes-left": weights_times_codes_left, "cast-stack": weights_times_cast_stack}
        if name in products:  # in the cuBLAS path's place (the override below takes every group there)
            dora_refresh.weights_times = products[name]
        dora_refresh.KERNEL_OVERRIDE = KERNEL_OF.get(name)  # whichever kernel the layers were set to take
        if name in GRAM_CHUNKS_OF:  # looked up at each call (a test counts the calls)
            fast_dora._gram = lambda a, _how=GRAM_CHUNKS_OF[name]: gram_split(a, *_how)
        streams_mod.PRODUCT_STREAMS = STREAMS.get(name, saved[3])
        dora_refresh._COMPILED_NORMS.clear()
        # triton-product-256x64: the other tile the sm90 build held without spills (read, not timed)
        with launch((256, 64, 8, 4)) if name == "triton-product-256x64" else contextlib.nullcontext():
            yield
    finally:
        dora_refresh.weights_times, fast_dora._gram, streams_mod.PRODUCT_STREAMS = saved[0], saved[1], saved[3]
        dora_refresh.refresh_dora_norms, dora_refresh.KERNEL_OVERRIDE = saved[4], saved[5]
        dora_refresh._COMPILED_NORMS.clear()
        dora_refresh._COMPILED_NORMS.update(saved[2])


def _norms(model) -> list[torch.Tensor]:
    return [m.lora_magnitude_vector[n]._loralab_norm.clone() for m, n in fast_dora._fast_dora_adapters(model)]


def _refresh_ms(model, device: str, backend, repeats: int) -> float:
    def refresh():
        dora_refresh.refresh_dora_norms(model, backend)

    if device != "cuda":
        return median_ms(refresh, repeats, warmup=1, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, then a call that writes in place (what the graph records)
        for _ in range(2):
            refresh()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        refresh()
    ms = median_ms(graph.replay, repeats, warmup=2, device=device)
    del graph
    return ms


def time_forms(model, device: str, backend=None, forms=FORMS, repeats: int = 20) -> dict:
    """{form: {"ms": median ms of one refresh (graphed on CUDA), "max_rel_diff": the largest difference of its
    norms from the shipped form's, relative to that layer's largest norm, "calls": how many layer-adapters it
    computed}} for ``model``, a fast DoRA model (``backend``: ``refresh_dora_norms``' compile backend, as
    ``speed.dora_norms_backend``; None: eager). The shipped form runs first whether asked or not (the
    reference norms); the model's kept norms end as the shipped form computes them."""
    with torch.no_grad():
        dora_refresh.refresh_dora_norms(model, backend)
        reference = _norms(model)
        out = {}
        for name in forms:
            with form(name):
                calls = dora_refresh.refresh_dora_norms(model, backend)
                got = _norms(model)
                ms = _refresh_ms(model, device, backend, repeats)
            diff = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(got, reference))
            out[name] = {"ms": round(ms, 3), "max_rel_diff": diff, "calls": calls}
        dora_refresh.refresh_dora_norms(model, backend)
    return out
