"""FP8 q/k/v as one GEMM (speed/fp8_qkv.py, ``speed.fp8_fused_qkv``): the trio's codes live once, its forward is the
separate layers' products, its input gradient is the FP8 rule applied to the joined gradient, transposes cache per
trio, compiled layers trace it without breaks or recompiles, and whatever cannot compute together computes alone."""

import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.methods.fp8base import quantize_linears
from loralab.speed import fp8_qkv
from loralab.speed.fp8 import Fp8Linear, cache_transposes, quantize_rows
from loralab.speed.fp8_qkv import FusedQkvFp8Linear, fp8_qkv_groups, fuse_fp8_qkv
from loralab.speed.shared_input import clear_input_groups

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _llama(layers=2, dora=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    quantize_linears(model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def _step(model):
    model.zero_grad()
    logits = model(input_ids=IDS).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_trio_holds_its_codes_once_and_keeps_names_values_and_state_dict():
    ref = _llama()
    fused = copy.deepcopy(ref)
    assert fuse_fp8_qkv(fused) == 2 and len(fp8_qkv_groups(fused)) == 2
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name
    attn = fused.base_model.model.model.layers[0].self_attn
    codes = getattr(attn, fp8_qkv._CODES)
    start = codes.data_ptr()
    for proj in ("q_proj", "k_proj", "v_proj"):
        base = getattr(attn, proj).base_layer
        assert type(base) is FusedQkvFp8Linear
        assert start <= base.weight.data_ptr() < start + codes.numel()  # a view: no second copy of the codes
    assert type(attn.o_proj.base_layer) is Fp8Linear  # o reads another input


def test_forward_is_the_separate_layers_and_the_input_gradient_is_the_rule_on_the_joined_gradient():
    """One attention block's trio, called as the model calls it: outputs equal the separate layers'; the input gradient
    is ``dx = diag(s_g)·(Gq·Wq_cat)`` with G the three output gradients side by side times the trio's channel scales,
    quantised per row as one (the separate layers quantise each third on its own)."""
    torch.manual_seed(0)
    layers = [Fp8Linear.from_linear(torch.nn.Linear(64, n, bias=False)) for n in (64, 32, 32)]
    parent = torch.nn.Module()
    for name, layer in zip(fp8_qkv.SIBLINGS, copy.deepcopy(layers)):
        parent.add_module(name, layer)
    assert fuse_fp8_qkv(parent) == 1
    x = torch.randn(10, 64, requires_grad=True)
    x_sep = x.detach().clone().requires_grad_(True)
    outs = [getattr(parent, n)(x) for n in fp8_qkv.SIBLINGS]
    want = [layer(x_sep) for layer in layers]
    for got, ref in zip(outs, want):
        assert torch.equal(got, ref)
    assert fp8_qkv_groups(parent)[0].x is None  # the last member cleared the cache
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    scales = torch.cat([layer.weight_scale for layer in layers])
    gq, sg = quantize_rows(torch.cat(grads, dim=1).float() * scales)
    codes = torch.cat([layer.codes for layer in layers])
    rule = (gq.float() @ codes.float()) * sg
    torch.testing.assert_close(x.grad, rule, rtol=1e-6, atol=1e-6)
    torch.autograd.backward(want, grads)
    torch.testing.assert_close(x.grad, x_sep.grad, rtol=0.1, atol=0.05 * float(x_sep.grad.abs().max()))


def test_a_peft_model_trains_as_the_separate_layers_to_fp8_rounding():
    ref = _llama()
    fused = copy.deepcopy(ref)
    fuse_fp8_qkv(fused)
    want_logits, want = _step(ref)
    got_logits, got = _step(fused)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=0.05, atol=0.05 * scale, msg=name)
    assert all(g.x is None for g in fp8_qkv_groups(fused))


def test_transposes_cache_per_trio_and_give_the_same_gradient():
    model = _llama()
    fuse_fp8_qkv(model)
    copied_logits, copied = _step(model)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, Fp8Linear))
    got = cache_transposes(model, 1.0)
    assert got == {"layers": 14, "bytes": total, "total_bytes": total}
    attn = model.base_model.model.model.layers[1].self_attn
    t_bits = getattr(attn, fp8_qkv._CODES_T)
    assert t_bits.shape == (64, 64 + 32 + 32) and t_bits.is_contiguous()
    for proj in ("q_proj", "k_proj", "v_proj"):
        bits = getattr(attn, proj).base_layer.codes_t_bits
        assert bits.data_ptr() >= t_bits.data_ptr() and not bits.is_contiguous()
    cached_logits, cached = _step(model)
    assert torch.equal(cached_logits, copied_logits)
    for name in copied:
        assert torch.equal(cached[name], copied[name]), name
    # q/k/v of one block are one unit of (64 + 32 + 32)·64 codes, the size of each MLP projection here: room for the
    # units of that size takes the trios whole (12 layers), room for less than a trio takes o's alone
    for room, layers, trios in ((8 * 8192, 12, True), (8192, 2, False)):
        model = _llama()
        fuse_fp8_qkv(model)
        assert cache_transposes(model, room / total, fill=True) == {"layers": layers, "bytes": room, "total_bytes": total}
        attn = model.base_model.model.model.layers[0].self_attn
        assert (getattr(attn, fp8_qkv._CODES_T, None) is not None) == trios
        assert (attn.o_proj.base_layer.codes_colmajor is not None) != trios
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_compiled_layers_fullgraph_without_recompiles():
    from torch._dynamo.utils import counters

    model = _llama()
    fuse_fp8_qkv(model)
    eager_logits, eager = _step(copy.deepcopy(model))
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    gemms = []

    def counting(gm, example_inputs):
        gemms.append(sum(n.op == "call_function" and n.target == torch.ops.aten._scaled_mm.default for n in gm.graph.nodes))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    counters.clear()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=aot_autograd(fw_compiler=counting, bw_compiler=counting), fullgraph=True)
    for step in range(2):
        logits, grads = _step(model)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs == 2 and not counters["graph_break"]
    # forward graphs: the trio, o, gate, up, down (7 unfused); backward: 5 input gradients, 4 in the first layer
    assert sorted(gemms) == [4, 5, 5, 5]
    assert all(g.x is None for g in fp8_qkv_groups(model))
    torch.testing.assert_close(logits, eager_logits, rtol=1e-6, atol=1e-6)
    for name in eager:  # the compiled backward adds x's four gradient terms (the trio's, three LoRA A's) in another
        # order than eager autograd; the next layer down's FP8 quantisation can move a code by one on that (1.7 % of the
        # largest gradient here), the last layer's gradients are bitwise eager's
        scale = float(eager[name].abs().max())
        torch.testing.assert_close(grads[name], eager[name], rtol=0.05, atol=(0.0 if ".layers.1." in name else 0.05) * scale)


def test_what_cannot_compute_together_computes_alone():
    """Another input for one member recomputes the trio (right values); a copy or pickle has no group; a forward that
    raised midway leaves a cache that ``clear_input_groups`` empties; layers with a cached transpose or of other kinds are
    not fused; DoRA on the FP8 base takes the trio's products."""
    torch.manual_seed(0)
    layers = [Fp8Linear.from_linear(torch.nn.Linear(64, n, bias=True)) for n in (64, 32, 32)]
    parent = torch.nn.Module()
    for name, layer in zip(fp8_qkv.SIBLINGS, copy.deepcopy(layers)):
        parent.add_module(name, layer)
    fuse_fp8_qkv(parent)
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.equal(parent.q_proj(x), layers[0](x))
    assert torch.equal(parent.k_proj(y), layers[1](y))  # cross-input: its own product of y, with its bias
    assert fp8_qkv_groups(parent)[0].x is y
    clear_input_groups(parent)
    assert fp8_qkv_groups(parent)[0].x is None
    clone = pickle.loads(pickle.dumps(parent.v_proj))
    assert clone.__dict__[fp8_qkv._GROUP] is None and torch.equal(clone(x), layers[2](x))
    assert torch.equal(copy.deepcopy(parent).q_proj(x), layers[0](x))
    cached = torch.nn.Module()
    for name, layer in zip(fp8_qkv.SIBLINGS, copy.deepcopy(layers)):
        layer.cache_transpose()
        cached.add_module(name, layer)
    assert fuse_fp8_qkv(cached) == 0
    dora_ref = _llama(layers=2, dora=True)
    dora = copy.deepcopy(dora_ref)
    assert fuse_fp8_qkv(dora) == 2
    want_logits, want = _step(dora_ref)
    took = []
    original = fp8_qkv.QkvGroup.take
    fp8_qkv.QkvGroup.take = lambda self, i, x: took.append(i) or original(self, i, x)
    try:
        got_logits, got = _step(dora)
    finally:
        fp8_qkv.QkvGroup.take = original
    assert took == [0, 1, 2, 0, 1, 2]  # DoRA's base output comes from the trio in both layers
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name in want:  # the second layer's trio backward reaches the first layer's gradients
        torch.testing.assert_close(got[name], want[name], rtol=0.05, atol=0.05 * float(want[name].abs().max()), msg=name)


def test_the_speed_setting_fuses_records_and_logs_and_false_leaves_the_layers():
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model, rewrite_lines
    from loralab.speed_settings import Speed

    on = dataclasses.replace(PLAIN, fp8_fused_qkv=True)
    model = prepare_model(_llama(), on)
    assert on.record()["fp8_qkv_trios"] == {"trios": 2, "layers": 6}
    assert any("fp8_fused_qkv: 2 q/k/v trio(s)" in line for line in rewrite_lines(on, Speed()))
    assert len(fp8_qkv_groups(model)) == 2
    off = dataclasses.replace(PLAIN, fp8_fused_qkv=False)
    model = prepare_model(_llama(), off)
    assert not fp8_qkv_groups(model) and off.fp8_qkv_trios is None
    assert not any(isinstance(m, FusedQkvFp8Linear) for m in model.modules())
    assert Speed().fp8_fused_qkv is True


def test_a_trio_copied_apart_computes_alone_and_unfuse_or_dequantize_drops_its_buffers():
    """Weights assigned one by one (``load_state_dict(assign=True)``) part the views from the trio's buffer: the trio
    then computes from the layers' own codes (what the state dict holds); ``unfuse_fp8_qkv`` gives each layer its own
    storage back and drops the buffers, as ``dequantize_linears`` does first; an encoder-decoder model is not fused."""
    from transformers import BartConfig, BartForConditionalGeneration

    from loralab.methods.fp8base import dequantize_linears
    from loralab.speed.fp8_qkv import unfuse_fp8_qkv

    ref = _llama()
    fused = copy.deepcopy(ref)
    fuse_fp8_qkv(fused)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    q = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    state[q] = torch.zeros_like(state[q])
    ref.load_state_dict(state)
    fused.load_state_dict(state, assign=True)
    assert torch.equal(fused(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # the same kind of fault one layer at a time: a layer's codes replaced in place of its view
    fused = copy.deepcopy(_llama())
    fuse_fp8_qkv(fused)
    k = fused.base_model.model.model.layers[1].self_attn.k_proj.base_layer
    alone = Fp8Linear.from_linear(torch.nn.Linear(64, 32, bias=False))
    k.weight.data, k.scale_bits = alone.weight.data.clone(), alone.scale_bits.clone()
    x = torch.randn(3, 64)
    assert torch.equal(k(x), alone(x))
    model = _llama()
    fuse_fp8_qkv(model)
    want = model(input_ids=IDS).logits
    assert unfuse_fp8_qkv(model) == 6 and not fp8_qkv_groups(model)
    assert not any(n.startswith("loralab_qkv") for m in model.modules() for n in m._buffers)
    assert not any(isinstance(m, FusedQkvFp8Linear) for m in model.modules())
    assert torch.equal(model(input_ids=IDS).logits, want)
    fuse_fp8_qkv(model)
    dequantize_linears(model)
    assert not any(n.startswith("loralab_qkv") for m in model.modules() for n in m._buffers)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    quantize_linears(bart, [n for n, m in bart.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n])
    assert fuse_fp8_qkv(bart) == 0
