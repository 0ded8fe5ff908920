"""QLoRA (Dettmers et al., NeurIPS 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314): the frozen base's linear layers are stored in 4-bit NormalFloat (NF4, one
absmax per block of 64 weights) and dequantised on the fly in every forward; the adapter (LoRA,
rsLoRA or DoRA, with its own init and optimizer) stays in float32 on top. It changes no part of the
method, only the base under it, so it is selected by training_parameters ``quantization: "nf4"``
and recorded as ``parts["base"] = "nf4"``.

Library: **bitsandbytes** (``bnb.nn.Linear4bit``, ``quant_type="nf4"``), because it is the
quantiser peft dispatches its own 4-bit LoRA/DoRA layers to (``peft.tuners.lora.bnb``), so the
adapter is a plain peft adapter and merging is peft's. bitsandbytes 0.50 installs from PyPI and
quantises, dequantises and runs NF4 matmuls on CPU (a pure-torch path; slow, fine for MiniLM
tests) as on CUDA; torchao's NF4 tensor would need our own peft layer dispatch. Every linear layer
outside the head is quantised (as QLoRA's ``bnb_4bit`` loading does), before the adapter is built.

LoftQ (``loftq.py``) is the init made for this base. Refused with NF4: the residual inits (PiSSA,
OLoRA, CorDA, MiLoRA, LoRA-GA, corrected SVD LoRA-FA) and seed 003's as-written SVD init. Their base is W − s·B₀A₀, which has to be quantised *after*
the init (QPiSSA's recipe); the adapter then belongs to that quantised residual, which plain
``PeftModel.from_pretrained`` on the quantised original cannot reproduce. Not built here.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = (None, "nf4")
RESIDUAL_REASON = (
    "the residual base W − s·B₀A₀ would have to be quantised after the init (QPiSSA), and plain "
    "PeftModel.from_pretrained on the NF4 original could not reproduce it"
)


def quantization(params) -> str | None:
    """training_parameters ``quantization`` (read with default None until config.py declares it)."""
    return getattr(params, "quantization", None)


def check(params, init) -> list[str]:
    """Problems of the ``quantization`` value and its combination with the init."""
    value = quantization(params)
    if value not in QUANTIZATIONS:
        return [f"'quantization' = {value!r} is not allowed; allowed: null, nf4"]
    key = None
    if init is not None:
        key = f"'init' = {params.init!r}" if init.key == "init" else f"adapter_config.json 'init_lora_weights' (init {init.name!r})"
    if value == "nf4" and init is not None and init.base == "float":
        return [f"'quantization' = 'nf4' with {key} does not compose: {RESIDUAL_REASON}"]
    if value != "nf4" and init is not None and init.base == "nf4":
        return [f"{key} needs 'quantization' = 'nf4' (got {value!r}): its factors fit the NF4 quantisation error"]
    if value == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return ["'quantization' = 'nf4' needs the PyPI package 'bitsandbytes' (pip install bitsandbytes)"]
    return []


@torch.no_grad()
def quantize_linears(model: nn.Module, names: list[str], compute_dtype=torch.float32) -> nn.Module:
    """Replace the nn.Linear modules ``names`` of ``model`` (in place) by bitsandbytes NF4
    ``Linear4bit`` layers holding the same weights quantised (blocks of 64, no double
    quantisation), on the weights' device; biases stay in float. Returns ``model``."""
    import bitsandbytes as bnb

    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu", torch.float32).clone(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        # bitsandbytes' CPU path repacks the weight for AVX512-BF16 kernels at the first eval-mode
        # forward, one way: training after an evaluation then fails. Keep the trainable layout.
        q.support_avx512bf16_for_cpu = False
        q = q.to(lin.weight.device)  # Params4bit quantises on its first move
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, q)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose NF4 ``Linear4bit`` layers are plain nn.Linear with the
    dequantised weights (what the quantised base computes, for merge and reference checks)."""
    import copy

    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight.data = dequantize_bnb_weight(module.weight, module.weight.quant_state).float()
            if module.bias is not None:
                lin.bias.data = module.bias.data.float().clone()
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, lin)
    return out
