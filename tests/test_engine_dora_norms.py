"""The generation engine with fast DoRA layers it calls as modules (an FP8 base, which its merged copies do not
take, or ``merge=False``): their weight norms are computed once per call (``speed/dora_refresh.refresh_dora_norms``)
and read by every forward, where each forward, every decode step, computed them again; the tokens are the same."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.engine import engine as engine_mod
from loralab.engine.engine import Engine
from loralab.methods.common import linear_names
from loralab.methods.fp8base import quantize_linears
from loralab.speed import fast_dora


def _dora_llama(fp8: bool):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    if fp8:
        quantize_linears(llama, linear_names(llama))
    model = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False,
                                             target_modules="all-linear"))
    fast_dora.enable_fast_dora(model)
    return model


@pytest.mark.parametrize(("fp8", "merge"), [(True, True), (False, False)])
def test_dora_norms_once_per_call_give_the_same_tokens_without_a_norm_per_forward(monkeypatch, fp8, merge):
    model = _dora_llama(fp8)
    prompts = [[1 + (7 * i + j) % 250 for j in range(5 + 3 * i)] for i in range(5)]
    calls = []
    norm = fast_dora._norm
    monkeypatch.setattr(fast_dora, "_norm", lambda *a: calls.append(1) or norm(*a))
    once = Engine(model, max_slots=3, merge=merge)
    got = once.generate(prompts, [6] * len(prompts))
    assert once.stats["dora_norms_once"] == 14 and calls == []  # 2 layers x 7 projections, no forward's own norm
    monkeypatch.setattr(engine_mod, "refresh_dora_norms", lambda model: 0)  # as before: a norm in every forward
    each = Engine(model, max_slots=3, merge=merge)
    assert each.generate(prompts, [6] * len(prompts)) == got and each.stats["dora_norms_once"] == 0
    assert len(calls) >= 14 * each.stats["decode_steps"]
    assert not fast_dora._REUSE_NORMS  # the context ended with the call
