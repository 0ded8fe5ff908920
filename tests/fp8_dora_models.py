"""A small bf16 Llama with fast DoRA on an FP8 base, and the exact norms its refresh stands for: the model the
refresh-kernel and refresh-form tests (tests/test_refresh_kernel.py, tests/test_dora_diagnostics.py) build."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.methods.common import linear_names
from loralab.methods.fp8base import quantize_linears
from loralab.speed import fast_dora


def fp8_dora_llama(layers: int = 2):
    """Llama (hidden 64, 4 heads, 2 KV heads, intermediate 160, ``layers`` decoder layers; seed 0) in bfloat16 with
    every linear layer on an FP8 base and a DoRA adapter (r 8, alpha 16, B not zero) through fast DoRA."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    llama = llama.to(torch.bfloat16)
    quantize_linears(llama, linear_names(llama))
    model = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                             target_modules="all-linear"))
    fast_dora.enable_fast_dora(model)
    return model


def exact_dora_norms(model) -> list[torch.Tensor]:
    """Each fast DoRA layer-adapter's float64 row norm of W + s·BA (W dequantised from its FP8 codes), in the order of
    ``fast_dora._fast_dora_adapters``."""
    return [(m.get_base_layer().dequantize().double() + m.scaling[n] * m.lora_B[n].weight.double()
             @ m.lora_A[n].weight.double()).norm(dim=1) for m, n in fast_dora._fast_dora_adapters(model)]
