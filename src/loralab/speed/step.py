"""The step's kernels: what ``loralab.run.step`` applies to a model and calls for its losses.

- ``prepare_model(model, speed)``: fast DoRA swap, the FP8 base's q/k/v as one GEMM (``speed.fp8_fused_qkv``),
  its cached transposed codes
  (``speed.fp8_transpose_cache``), quantisation kernel (``speed.fp8_quantize_kernel``), fast
  accumulation (``speed.fp8_fast_accum``) and fast DoRA's refresh kernel (``speed.fp8_refresh_kernel``), fused LoRA forward, LoRA's scaling at the rank
  (``speed.lora_scale_at_rank``), one A product for the LoRA layers reading one input
  (``speed.lora_shared_input``), fp32 adapter weights,
  input casts off under autocast (so adapters read the bf16 activations instead of keeping fp32
  copies of them), and regional ``torch.compile`` of the decoder layers (off by default; parameter
  names unchanged).
- ``causal_lm_loss(model, batch)``: mean (or, with ``loss_weights``, weighted-sum) next-token loss
  over labelled tokens and their count, with the LM head fused into a chunked cross-entropy
  (``losses.py``) so no full logits are built.
- ``seq_cls_loss(model, batch)``: the classification loss under the same autocast.
Packing and micro-batching live in ``loralab.run.step.Step``; settings in ``loralab.speed_settings.Speed``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from loralab.speed.attention import plain_causal_attention
from loralab.speed.dora_refresh import use_refresh_kernel
from loralab.speed.fast_dora import enable_fast_dora, fast_dora_layers
from loralab.speed.fp8 import cache_transposes, fp8_layers, use_fast_accum, use_quantize_kernel
from loralab.speed.fp8_qkv import fp8_qkv_groups, fuse_fp8_qkv
from loralab.speed.fused_lora import enable_fused_lora
from loralab.speed.losses import IGNORE_INDEX, chunked_linear_cross_entropy, compiled_chunk_loss
from loralab.speed.rank_scaling import enable_rank_scaling, rank_scaling_summary
from loralab.speed.shared_input import enable_shared_input, shared_input_summary
from loralab.speed_settings import FUSED_AND, LOSS_CHUNK, Speed


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PLAIN = Speed(autocast=None, compile=False, lora_scale_at_rank=False, lora_shared_input=False, activation_memory_budget=1.0,
              fp8_transpose_cache=0.0, fp8_fast_accum="none", fp8_fused_qkv=False, fp8_refresh_kernel="cublas")
"""What a model not prepared by ``prepare_model`` computes with: no autocast, chunked loss."""


def prepare_model(model, options: Speed):
    """Apply resolved speed settings (``Speed.resolve``: no "auto" in autocast, compile, lora_scale_at_rank,
    lora_shared_input, nor in activation_memory_budget where layers compile) to a (peft-wrapped) model in place and return
    it. Raises ValueError for unresolved settings and for ``fused_lora`` with ``lora_scale_at_rank`` or
    ``lora_shared_input``."""
    unresolved = [k for k in ("autocast", "compile", "lora_scale_at_rank", "lora_shared_input", "activation_memory_budget")
                  if getattr(options, k) == "auto" and (k != "activation_memory_budget" or options.compile)]
    if unresolved:
        raise ValueError(f"prepare_model needs resolved speed settings; {', '.join(unresolved)} still 'auto' "
                         "(Speed.resolve)")
    if options.fast_dora:
        enable_fast_dora(model)
    if options.fp8_fused_qkv and fp8_layers(model):  # before any transpose is cached: a trio caches them as one
        fuse_fp8_qkv(model)
        trios = len(fp8_qkv_groups(model))  # a model fused before counts too
        options.fp8_qkv_trios = {"trios": trios, "layers": 3 * trios}
    if options.fp8_transpose_cache not in (0, "auto"):  # what it cached goes into the record (0 layers: the share fits
        # no group); "auto" is settled after the micro-batch is (loralab.run.micro_batch.settle_micro_batch)
        options.fp8_transposes_cached = cache_transposes(model, options.fp8_transpose_cache)
    if options.fp8_quantize_kernel != "torch":
        use_quantize_kernel(model, options.fp8_quantize_kernel)
    use_fast_accum(model, options.fp8_fast_accum)
    if fast_dora_layers(model):  # "auto": from the FP8 layers; refused where an explicit kernel cannot run
        options.fp8_refresh_kernel = use_refresh_kernel(model, options.fp8_refresh_kernel)
    elif options.fp8_refresh_kernel == "auto":  # no fast DoRA layer: nothing refreshes (an explicit value is kept)
        options.fp8_refresh_kernel = "cublas"
    for key in ("lora_scale_at_rank", "lora_shared_input"):
        if options.fused_lora and getattr(options, key):
            raise ValueError(FUSED_AND.format(key=key))
    if options.fused_lora:
        enable_fused_lora(model)
    if options.lora_scale_at_rank:  # where it applies goes into the record (0 layers: rsLoRA, DoRA, ...)
        enable_rank_scaling(model)
        options.lora_scaled_at_rank = dict(zip(("layers", "lora_layers"), rank_scaling_summary(model)))
    if options.lora_shared_input:  # after rank scaling, whose order its groups keep where it applies
        enable_shared_input(model, scale_at_rank=bool(options.lora_scale_at_rank))
        options.lora_shared_inputs = shared_input_summary(model)
    for module in model.modules():
        if hasattr(module, "lora_A"):
            # Keep activations in the autocast dtype; fp32 copies per adapter cost memory and time.
            module.cast_input_dtype_enabled = options.autocast is None
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16) and "lora_" in name:
            param.data = param.data.float()
    if options.compile:
        compile_layers(model, options)
    model._loralab_speed = options
    return model


def rewrite_lines(resolved: Speed, settings: Speed) -> list[str]:
    """The run log's lines on where ``prepare_model``'s LoRA rewrites took (``resolved``: what it applied, with
    its records; ``settings``: the experiment's, so a rewrite asked for explicitly that took nowhere says NOTHING)."""
    lines = []
    if (scaled := resolved.lora_scaled_at_rank) is not None:
        line = (f"speed.lora_scale_at_rank: LoRA's scaling alpha/r applied to the rank-r product, B(s·Ax) for "
                f"peft's B(Ax)·s (the same numbers, one gradient tensor fewer a layer), in {scaled['layers']} of "
                f"{scaled['lora_layers']} LoRA layer(s)")
        if scaled["layers"] == 0:  # NOTHING only where the experiment asked for it; "auto" just says why not
            line += "; NOTHING: " if settings.lora_scale_at_rank is True else "; not applicable: "
            line += ("no scaling alpha/r is a power of two, or the layers hold variants (DoRA's fast combine scales "
                     "at the rank itself) or biases")
        lines.append(line)
    if (resolved.fp8_qkv_trios or {}).get("trios"):
        lines.append(f"speed.fp8_fused_qkv: {resolved.fp8_qkv_trios['trios']} q/k/v trio(s) of FP8 layers compute as one GEMM")
    if (shared := resolved.lora_shared_inputs) is not None:
        line = (f"speed.lora_shared_input: {shared['groups']} group(s) of LoRA layers reading one input "
                f"({shared['layers']} layers) compute their A's as one GEMM")
        if shared["groups"] == 0:
            line += ("; NOTHING: " if settings.lora_shared_input is True else "; not applicable: ") + (
                "no q/k/v or gate/up siblings hold plain LoRA or fast DoRA layers without dropout (peft's own DoRA, "
                "another rewrite), or the model is an encoder-decoder")
        lines.append(line)
    return lines


def compile_layers(model, options: Speed) -> None:
    """Regional ``torch.compile`` of ``model``'s decoder layers (the whole model where none are found) with
    ``options.compile_backend`` at ``options.activation_memory_budget`` (``budgeted_backend``). Called again
    with another budget (``run/spare_memory.spend_spare_on_activations``) it replaces each layer's compiled
    call: the layers compile anew at their next forward."""
    layers = _decoder_layers(model)
    backend = budgeted_backend(options.compile_backend, options.activation_memory_budget)
    for layer in layers if layers is not None else [model]:
        layer.compile(backend=backend)


@functools.cache  # one wrapper per (backend, budget) for the process: see the docstring
def budgeted_backend(name, budget: float):
    """The ``torch.compile`` backend ``name`` (e.g. "inductor", or a backend callable) with torch's
    memory-budget partitioner set to ``budget`` while it compiles
    (``torch._functorch.config.activation_memory_budget``: where the saved activations lie between
    saving only the graph's inputs, 0, and what the default min-cut partition saves, 1; below 1 torch
    first tries more aggressive min-cut settings, then chooses ops to recompute in the backward by
    their estimated runtime, pointwise first). 1.0 (torch's default) returns ``name`` unchanged.
    Scoped to our layers' compiles, not set for the process. Why: a Llama layer's compiled backward
    saves ~20 hidden sizes of activations per token (the MLP's gate, up and their product among
    them); at 0.8, ~14 (tests/test_speed_memory_budget.py). Only backends that partition with min-cut
    (inductor, aot_eager_decomp_partition) act on it. One wrapper per (name, budget) for the process:
    torch keys compiled code by the backend's identity, so a new wrapper per model would compile
    every layer's code again and, past torch's recompile limit (8), leave layers uncompiled when
    one process trains several experiments.
    Where the budgeted partition fails (torch 2.11's flop count of a grouped-query SDPA asserts at
    0.6 on the 8B shape), that graph compiles at torch's default instead, with a warning naming
    the error: the run keeps its memory as without a budget rather than stopping (an error of the
    compile itself raises from the second try)."""
    if budget >= 1:
        return name
    import warnings

    import torch._functorch.config as functorch_config
    from torch._dynamo import lookup_backend

    compile_fn = lookup_backend(name)

    def backend(gm, example_inputs):
        try:
            with functorch_config.patch(activation_memory_budget=budget):
                compiled = compile_fn(gm, example_inputs)
            _PARTITIONS.append(None)
            return compiled
        except Exception as exc:  # noqa: BLE001 - torch's partitioner or its cost model; the default still compiles
            error = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            warnings.warn(f"loralab speed.activation_memory_budget {budget}: torch's memory-budget partition failed "
                          f"({error}); this graph compiles at torch's default (budget 1.0), keeping the activations "
                          "it saves", RuntimeWarning, stacklevel=1)
            _PARTITIONS.append(error)
            return compile_fn(gm, example_inputs)

    backend.__name__ = f"{getattr(name, '__name__', name)}@activation_memory_budget={budget}"
    return backend


_PARTITIONS: list[str | None] = []
"""Every ``budgeted_backend`` compile in this process, in order: None where the graph was partitioned within
its budget, the error's message where that partition failed and the graph compiled at torch's default."""


def budget_partitions() -> int:
    """A mark in this process's budgeted compiles (how many so far), for ``partitions_since``."""
    return len(_PARTITIONS)


def partitions_since(mark: int) -> dict:
    """The budgeted compiles since ``mark`` (``budget_partitions()``): {"within_budget": graphs partitioned
    within ``speed.activation_memory_budget``, "fell_back": graphs compiled at torch's default after that
    partition failed, "error": the first such failure's message or None}. A run takes the mark before it
    builds its step (the micro-batch probe compiles too) and this after training; a run that reuses graphs
    an earlier experiment of the process compiled counts none."""
    errors = [e for e in _PARTITIONS[mark:] if e is not None]
    return {"within_budget": len(_PARTITIONS) - mark - len(errors), "fell_back": len(errors),
            "error": errors[0] if errors else None}


def _decoder_layers(model):
    hf = _hf_model(model)
    inner = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    for holder in (inner, getattr(inner, "encoder", None)):
        layers = getattr(holder, "layers", None) if holder is not None else None
        layers = layers if layers is not None else getattr(holder, "layer", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return None


def _options(model) -> Speed:
    return getattr(model, "_loralab_speed", None) or PLAIN


def autocast_context(model, device_type: str):
    dtype = _options(model).autocast
    if dtype is None:
        return contextlib.nullcontext()
    # The same context in warm-up and in CUDA graph capture (the weight cache lives and dies inside
    # the captured step): a different autocast state would make torch.compile recompile mid-capture.
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def uses_fused_loss(model) -> bool:
    """Whether ``causal_lm_loss`` takes the fused LM-head loss on ``model`` (``chunked_loss`` on and a
    plain linear head, or one plain LoRA adapter over it as seed 000's ``lm_head``; another adapted
    head, e.g. DoRA's, takes the full logits), the only place ``loss_chunk_size`` acts."""
    return _options(model).chunked_loss and _decoder_and_head(model) is not None


def _lora_head_adapter(head) -> str | None:
    """The adapter of a LoRA head the fused loss computes itself: peft's ``lora.Linear`` (or loralab's
    rewrite of it) over a plain ``nn.Linear``, not merged, adapters on, one active adapter of plain
    LoRA (no DoRA or other variant, no ``lora_bias``); None otherwise."""
    base = getattr(head, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(head, "lora_A") or getattr(head, "merged", True) \
            or getattr(head, "disable_adapters", True):
        return None
    active = list(getattr(head, "active_adapters", ()))
    if len(active) != 1 or active[0] not in head.lora_A:
        return None
    a = active[0]
    plain = type(head.lora_A[a]) is torch.nn.Linear and type(head.lora_B[a]) is torch.nn.Linear \
        and head.lora_B[a].bias is None and not getattr(head, "use_dora", {}).get(a, False) \
        and a not in getattr(head, "lora_variant", {})
    return a if plain else None


def _head_terms(head, hidden: torch.Tensor):
    """(the base linear, ``low_rank`` for ``chunked_linear_cross_entropy`` or None) of a head
    ``_decoder_and_head`` accepted, for ``hidden`` (B, L, d): u = lora_A(dropout(x)) (B, L - 1, r)
    through autograd, x cast as peft's layer casts it (``_cast_input_dtype``: to the adapter's dtype
    without autocast), dropout drawn over all L positions as peft's head draws it (same masks, same
    random stream), the last position's row dropped as the loss drops its logits."""
    if type(head) is torch.nn.Linear:
        return head, None
    a = _lora_head_adapter(head)
    x = head._cast_input_dtype(hidden, head.lora_A[a].weight.dtype) if hasattr(head, "_cast_input_dtype") else hidden
    u = head.lora_A[a](head.lora_dropout[a](x))[:, :-1]
    return head.base_layer, (u, head.lora_B[a].weight, head.scaling[a])


def _decoder_and_head(model):
    """(decoder, lm_head) when the head is a plain linear layer the fused loss can replace, or one
    plain LoRA adapter over one (``_lora_head_adapter``)."""
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    decoder = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    config = getattr(hf, "config", None)
    plain_head = type(head) is torch.nn.Linear or (head is not None and _lora_head_adapter(head) is not None)
    no_logit_tricks = config is not None and not getattr(config, "final_logit_softcapping", None) \
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
    if decoder is None or decoder is hf or not plain_head or not no_logit_tricks:
        return None
    return decoder, head


def causal_lm_loss(model, batch: dict, *, chunked: bool | None = None):
    """Next-token cross-entropy over labelled tokens, and their number (a tensor).

    ``batch`` holds ``input_ids`` (B, L), ``labels`` (B, L) and either ``attention_mask`` (padded)
    or ``position_ids`` (packed, see ``loralab.run.step.Step``). Without ``loss_weights`` the loss is the
    mean over labelled tokens; with ``loss_weights`` (B, L float, aligned with ``labels``) it is the
    weighted sum ``Σ_t w_t · CE_t`` (``loralab.run.step`` sets w so that micro-batches add up to the
    optimizer batch's exact loss). ``chunked`` None follows the model's options.
    """
    options = _options(model)
    chunked = options.chunked_loss if chunked is None else chunked
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    target = labels[:, 1:]
    weights = batch.get("loss_weights")
    weights = weights[:, 1:] if weights is not None else None
    n_tokens = (target != IGNORE_INDEX).sum()
    parts = _decoder_and_head(model) if chunked else None
    plain = "attention_mask" not in inputs and "position_ids" not in inputs
    attention = plain_causal_attention(_hf_model(model)) if plain else contextlib.nullcontext()
    with autocast_context(model, labels.device.type), attention:
        if parts is not None:
            decoder, head = parts
            full = decoder(**inputs, use_cache=False).last_hidden_state
            hidden = full[:, :-1]
            chunk = LOSS_CHUNK if options.loss_chunk_size == "auto" else options.loss_chunk_size
            linear, low_rank = _head_terms(head, full)
            # compiled layers on CUDA: the chunk's loss and gradient compile too (losses.chunk_loss_and_grad)
            fn = compiled_chunk_loss(options.compile_backend) if options.compile and hidden.is_cuda else None
            loss_sum = chunked_linear_cross_entropy(hidden, linear.weight, target, linear.bias, chunk, low_rank=low_rank,
                                                    token_weights=weights, chunk_fn=fn)
        else:
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="none")
            loss_sum = (per_token * weights.reshape(-1).float()).sum() if weights is not None else per_token.sum()
    if weights is not None:
        return loss_sum, n_tokens
    return loss_sum / n_tokens.clamp_min(1), n_tokens


def seq_cls_loss(model, batch: dict):
    """Classification loss under the model's autocast, and the batch size.

    Without ``loss_weights`` it is the model's own mean loss; with ``loss_weights`` (B,) the
    weighted sum of per-sample losses, computed as transformers' sequence-classification heads
    define them (one label: mean squared error, regression; otherwise cross-entropy).
    """
    weights = batch.get("loss_weights")
    inputs = {k: v for k, v in batch.items() if k != "loss_weights"}
    with autocast_context(model, batch["input_ids"].device.type):
        if weights is None:
            return model(**inputs).loss.float(), batch["input_ids"].shape[0]
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.float()
    if logits.shape[-1] == 1:  # regression head (num_labels=1), as transformers' problem_type inference
        per_sample = (logits.squeeze(-1) - labels.float()) ** 2
    else:
        per_sample = F.cross_entropy(logits, labels, reduction="none")
    return (per_sample * weights.float()).sum(), batch["input_ids"].shape[0]
