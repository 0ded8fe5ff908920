"""Fast DoRA equals peft's DoRA (outputs and gradients of A, B and magnitude) and saves as peft DoRA."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from loralab.speed.fast_dora import FastDoraLinearVariant, dora_weight_norm, enable_fast_dora
from loralab.speed.fp8 import weight_times


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg)


def _pair(base, **lora_kwargs):
    """peft DoRA with random (non-zero) A and B, and a copy with the fast forward."""
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False, **lora_kwargs)
    ref = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # move the magnitude off its init so m/n != 1 matters
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    fast = copy.deepcopy(ref)
    assert enable_fast_dora(fast) > 0
    return ref, fast


def _compare(ref, fast, run, train: bool):
    ref.train(train)
    fast.train(train)
    torch.manual_seed(2)
    out_ref = run(ref)
    torch.manual_seed(2)
    out_fast = run(fast)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.pow(2).mean().backward()
    out_fast.pow(2).mean().backward()
    ref_params = dict(ref.named_parameters())
    checked = {"lora_A": 0, "lora_B": 0, "lora_magnitude_vector": 0}
    for name, p in fast.named_parameters():
        if not p.requires_grad:
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        for key in checked:
            checked[key] += key in name
    assert all(checked.values()), checked


@pytest.mark.parametrize("train", [False, True])
def test_fast_dora_matches_peft_on_minilm(minilm_path, train):
    base = AutoModel.from_pretrained(minilm_path, dtype=torch.float32)  # the GPU box carries fp16
    ref, fast = _pair(base, target_modules=["query", "value", "dense"], lora_dropout=0.1 if train else 0.0)
    ids = torch.randint(1000, 2000, (2, 16))
    _compare(ref, fast, lambda m: m(input_ids=ids).last_hidden_state, train)


@pytest.mark.parametrize("train", [False, True])
def test_fast_dora_matches_peft_on_tiny_llama(train):
    ref, fast = _pair(_tiny_llama(), target_modules="all-linear", lora_dropout=0.1 if train else 0.0)
    ids = torch.randint(0, 256, (2, 12))
    _compare(ref, fast, lambda m: m(input_ids=ids).logits, train)


def test_weight_norm_formula_matches_dense_norm():
    torch.manual_seed(0)
    w, a, b = torch.randn(48, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64), torch.randn(48, 4, dtype=torch.float64)
    got = dora_weight_norm(w.pow(2).sum(1), w, a, b, scaling=0.7)
    torch.testing.assert_close(got, torch.linalg.norm(w + 0.7 * b @ a, dim=1))


def test_fast_dora_in_bf16_base_stays_close_to_fp32_reference():
    ref, fast = _pair(_tiny_llama(), target_modules=["q_proj", "v_proj"])
    fast = fast.to(torch.bfloat16)
    for name, p in fast.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters over a bf16 base, as peft's autocast_adapter_dtype does
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits.float(), ref(input_ids=ids).logits, rtol=0.05, atol=0.05)


def test_fast_dora_saves_and_reloads_as_peft_dora(tmp_path):
    base = _tiny_llama()
    _, fast = _pair(base, target_modules="all-linear")
    fast.eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = fast(input_ids=ids).logits
    fast.save_pretrained(tmp_path)
    assert '"use_dora": true' in (tmp_path / "adapter_config.json").read_text()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # plain peft DoRA
    assert not any(isinstance(v, FastDoraLinearVariant) for m in reloaded.modules() for v in getattr(m, "lora_variant", {}).values())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        enable_fast_dora(reloaded)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert set(reloaded.state_dict()) == set(fast.state_dict())


def test_weight_norm_cache_follows_a_changed_base_weight():
    ref, fast = _pair(_tiny_llama(), target_modules=["q_proj"])
    ids = torch.randint(0, 256, (1, 6))
    for model in (ref, fast):
        with torch.no_grad():
            model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ---- the FP8 base (quantization "fp8"): the fast norm from codes and per-channel scales -------------

def _fp8_llama(dtype=torch.float32):
    from loralab.methods.common import linear_names
    from loralab.methods.fp8base import quantize_linears

    base = _tiny_llama().to(dtype)
    quantize_linears(base, linear_names(base))
    return base


def test_fast_dora_on_an_fp8_base_matches_peft_dora_on_it():
    """No dropout: peft's DoRA on the FP8 layers (its norm from the dequantised float32 weight, the
    base term from the FP8 layer's output) and the fast forward give the same outputs and grads."""
    from loralab.speed.fp8 import Fp8Linear

    base = _fp8_llama()
    ref, fast = _pair(base, target_modules="all-linear")
    assert any(isinstance(m, Fp8Linear) for m in fast.modules())
    ids = torch.randint(0, 256, (2, 12))
    _compare(ref, fast, lambda m: m(input_ids=ids).logits, train=True)


def test_fast_dora_fp8_norm_equals_the_dequantised_dense_norm():
    from loralab.speed.fast_dora import _norm

    _, fast = _pair(_fp8_llama(), target_modules=["down_proj"])
    layer = fast.get_base_model().model.layers[0].mlp.down_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    dense = layer.get_base_layer().dequantize()
    torch.testing.assert_close(_norm(layer, "default", a, b, s), torch.linalg.norm(dense + s * (b @ a), dim=1).detach(),
                               rtol=1e-5, atol=1e-6)


def test_fast_dora_fp8_dropout_branch_uses_the_fp8_kernel():
    """With dropout the base term W·dropout(x) is the FP8 layer's product (not the dequantised weight's)."""
    from loralab.speed.fast_dora import _DoraCombine, _norm
    from loralab.speed.fp8 import fp8_linear

    _, fast = _pair(_fp8_llama(), target_modules=["q_proj"], lora_dropout=0.5)
    layer = fast.get_base_model().model.layers[0].self_attn.q_proj
    layer.train()
    x = torch.randn(3, 64)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xd = layer.lora_dropout["default"](x)
    fp8 = layer.get_base_layer()
    base = fp8_linear(xd, fp8.codes, fp8.weight_scale)
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    norm = _norm(layer, "default", a.weight, b.weight, s)
    want = fp8(x) + _DoraCombine.apply(base, b(a(xd)) * s, layer.lora_magnitude_vector["default"].weight, norm) - base
    torch.testing.assert_close(got, want)


def test_the_combine_hands_base_and_adapter_one_gradient_tensor():
    """The scaling rides on the r-wide intermediate (``_lora``), so the combine's backward gives the
    base and the adapter output the same (tokens × out) tensor instead of making a scaled copy; and
    the adapter's gradients still equal peft's ``B(A x)·s`` at a scaling that is not a power of two
    (to float32 rounding)."""
    from loralab.speed.fast_dora import _DoraCombine, _lora

    torch.manual_seed(6)
    a, b = nn.Linear(16, 4, bias=False), nn.Linear(4, 12, bias=False)
    x, base = torch.randn(5, 16), torch.randn(5, 12, requires_grad=True)
    magnitude, norm = (torch.rand(12) + 0.5).requires_grad_(), torch.rand(12) + 0.5
    seen = {}
    lora = _lora(a, b, x, 0.37)
    base.register_hook(lambda g: seen.setdefault("base", g))
    lora.register_hook(lambda g: seen.setdefault("lora", g))
    _DoraCombine.apply(base, lora, magnitude, norm).pow(2).sum().backward()
    assert seen["base"].data_ptr() == seen["lora"].data_ptr()
    grads = [p.grad.clone() for p in (a.weight, b.weight, magnitude)]
    b_out = {}  # and lora_B's own output gradient is that tensor: the scaling sits at the rank (a B(Ax)·s
    b.register_full_backward_hook(lambda m, gin, gout: b_out.update(g=gout[0]))  # would hand it s·grad)
    for p in (a.weight, b.weight, magnitude):
        p.grad = None
    _DoraCombine.apply(base, _lora(a, b, x, 0.37), magnitude, norm).pow(2).sum().backward()
    assert torch.equal(b_out["g"], seen["lora"])
    for p in (a.weight, b.weight, magnitude):
        p.grad = None
    _DoraCombine.apply(base, b(a(x)) * 0.37, magnitude, norm).pow(2).sum().backward()
    for got, p in zip(grads, (a.weight, b.weight, magnitude)):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


def test_fast_dora_refuses_a_packed_base_weight_before_swapping_any():
    from peft.tuners.lora.variants import DoraLinearVariant

    from loralab.speed.fast_dora import disable_fast_dora

    _, fast = _pair(_tiny_llama(), target_modules=["q_proj"])
    disable_fast_dora(fast)
    layers = [layer.self_attn.q_proj for layer in fast.get_base_model().model.layers]
    packed = layers[1].base_layer  # the second layer's weight stored as bytes, as a packed 4-bit layer stores it
    packed.weight = torch.nn.Parameter(torch.zeros_like(packed.weight, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="speed.fast_dora': false"):
        enable_fast_dora(fast)
    assert all(type(layer.lora_variant["default"]) is DoraLinearVariant for layer in layers)  # none swapped


def test_fast_dora_on_a_bf16_fp8_base_stays_close_to_peft_dora_on_it(monkeypatch):
    """The FP8 layers of a bf16 model take W·Aᵀ from their codes read as FP8 (speed/fp8.weight_times,
    A split in two FP8 terms): the fast norm matches the dense float32 norm of the dequantised weight
    to bf16 rounding, and the logits stay as close to peft's DoRA on the same layers as bf16 allows."""
    from loralab.speed import fast_dora
    from loralab.speed.fast_dora import _norm

    calls = []
    monkeypatch.setattr(fast_dora, "weight_times", lambda codes, *a: calls.append(codes.data_ptr()) or weight_times(codes, *a))

    ref, fast = _pair(_fp8_llama(torch.bfloat16), target_modules="all-linear")
    for model in (ref, fast):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    layer = fast.get_base_model().model.layers[0].mlp.down_proj
    assert layer.get_base_layer().compute_dtype == torch.bfloat16
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    dense = torch.linalg.norm(layer.get_base_layer().dequantize() + s * (b @ a), dim=1)
    torch.testing.assert_close(_norm(layer, "default", a, b, s), dense, rtol=2e-3, atol=1e-4)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float(),
                                   rtol=0.05, atol=0.05)
    from loralab.speed.fp8 import Fp8Linear

    layers = {m.codes.data_ptr() for m in fast.modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 14 and set(calls) == layers  # every adapted layer's norm came from its FP8 codes
