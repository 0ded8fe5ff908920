"""Fused LoRA linear equals peft's LoRA forward (outputs, gradients of A, B, the inputs and a
trained head), falls back to peft where it does not apply, and leaves the saved adapter as peft's."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from loralab.speed import fused_lora as fused_module
from loralab.speed.fused_lora import disable_fused_lora, enable_fused_lora, fused_lora_linear


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the layer calls that took the fused path."""
    calls = []
    original = fused_module.fused_lora_linear
    monkeypatch.setattr(fused_module, "fused_lora_linear", lambda *a: calls.append(1) or original(*a))
    return calls


def _pair(base, **lora_kwargs):
    """peft LoRA with random (non-zero) A and B, and a copy with the fused forward."""
    torch.manual_seed(1)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **lora_kwargs))
    fused = copy.deepcopy(ref)
    assert enable_fused_lora(fused) > 0
    return ref, fused


def _compare(ref, fused, make_input, run, atol=1e-5, rtol=1e-5):
    outs, grads, input_grads = [], [], []
    for model in (ref, fused):
        x = make_input()
        out = run(model, x)
        out.pow(2).mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        input_grads.append(x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None)
    torch.testing.assert_close(outs[1], outs[0], atol=atol, rtol=rtol)
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=atol, rtol=100 * rtol, msg=name)
    if input_grads[0] is not None:
        torch.testing.assert_close(input_grads[1], input_grads[0], atol=atol, rtol=rtol)


def test_fused_lora_matches_peft_on_minilm(minilm_path, fused_calls):
    base = AutoModel.from_pretrained(minilm_path, dtype=torch.float32)  # the GPU box carries fp16
    ref, fused = _pair(base, target_modules=["query", "key", "value", "dense"])
    ids = torch.randint(1000, 2000, (2, 16))
    embeds = lambda: base.embeddings.word_embeddings(ids).detach().requires_grad_(True)  # noqa: E731
    _compare(ref.eval(), fused.eval(), embeds, lambda m, x: m(inputs_embeds=x).last_hidden_state)
    assert len(fused_calls) == 6 * 6 + 1  # six layers x (query, key, value, three dense) + the pooler


def test_fused_lora_matches_peft_on_tiny_llama_with_trained_head(fused_calls):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    ref, fused = _pair(base, target_modules="all-linear", modules_to_save=["lm_head"])
    ids = torch.randint(0, 256, (2, 12))
    _compare(ref.train(), fused.train(), lambda: ids, lambda m, x: m(input_ids=x, labels=x).logits)
    assert len(fused_calls) == 2 * 7  # two layers x seven projections (the trained head is not LoRA)


def test_fused_lora_under_bf16_autocast_matches_peft(fused_calls):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    ref, fused = _pair(lin, target_modules=["0", "2"])
    x = torch.randn(4, 5, 32)

    def run(model, inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inp).float()
    _compare(ref, fused, lambda: x.clone().requires_grad_(True), run, atol=2e-2, rtol=2e-2)
    assert len(fused_calls) == 2


def test_fused_function_equals_formula_in_fp64():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: fused_lora_linear(x, w, bias, a, b, 0.5), (x, a, b))


def test_fallbacks_and_saved_adapter(tmp_path, fused_calls):
    """Dropout while training, a merged layer or disabled adapters take peft's own forward; the
    fused model saves a plain peft adapter."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref, fused = _pair(lin, target_modules=["0", "2"], lora_dropout=0.5)
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    out_ref = ref.train()(x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused.train()(x), out_ref)  # dropout: same random mask, peft's path
    assert fused_calls == []
    with fused.disable_adapter():
        torch.testing.assert_close(fused.eval()(x), lin(x))
    fused.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(lin), tmp_path).eval()
    torch.testing.assert_close(reloaded(x), fused.eval()(x), atol=1e-6, rtol=1e-6)
    fused.merge_adapter()
    torch.testing.assert_close(fused(x), reloaded(x), atol=1e-5, rtol=1e-5)
    assert disable_fused_lora(fused) == 2 and disable_fused_lora(fused) == 0
