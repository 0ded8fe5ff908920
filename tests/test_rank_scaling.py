"""LoRA's scaling at the rank (speed/rank_scaling.py, ``speed.lora_scale_at_rank``): bit for bit
peft's outputs and gradients where it applies (power-of-two scalings: fp32, and bf16 under autocast,
with dropout), peft's own forward elsewhere; the backward makes one (tokens × out) tensor fewer."""

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.speed.rank_scaling import (
    RankScaledLoraLinear,
    disable_rank_scaling,
    enable_rank_scaling,
    is_power_of_two,
    takes_rank_scaling,
)


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def _pair(dtype, **lora):
    config = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, **lora)
    ref = get_peft_model(_llama(dtype), config)
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    fast = copy.deepcopy(ref)
    return ref, fast


def _step(model, ids, autocast: bool):
    torch.manual_seed(3)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, autocast, dropout", [(torch.float32, False, 0.0), (torch.float32, False, 0.3),
                                                       (torch.bfloat16, True, 0.0)])
def test_power_of_two_scalings_give_peft_bit_for_bit(dtype, autocast, dropout):
    ref, fast = _pair(dtype, lora_alpha=16, lora_dropout=dropout)  # s = 2
    assert enable_rank_scaling(fast) == 14 and enable_rank_scaling(fast) == 0  # 2 layers x 7 projections, once
    ids = torch.randint(0, 96, (2, 12))
    want_loss, want = _step(ref, ids, autocast)
    got_loss, got = _step(fast, ids, autocast)
    assert torch.equal(got_loss, want_loss) and set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert disable_rank_scaling(fast) == 14 and "forward" not in fast.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_the_backward_hands_lora_b_the_output_gradient_itself():
    """peft's order builds s·grad for lora_B; here lora_B's output gradient is the layer's own."""
    _, fast = _pair(torch.float32, lora_alpha=16)
    layer = fast.base_model.model.model.layers[0].mlp.up_proj
    enable_rank_scaling(fast)
    seen = {}
    x = torch.randn(3, 64)

    def keep(name, grad):
        seen[name] = grad

    layer.lora_B["default"].register_full_backward_hook(lambda m, gin, gout: keep("b_out", gout[0]))
    y = layer(x)
    y.register_hook(lambda g: keep("y", g))
    y.backward(torch.randn_like(y))
    assert torch.equal(seen["b_out"], seen["y"])
    disable_rank_scaling(fast)  # peft's order: lora_B's output gradient is s·grad
    layer(x).backward(seen["y"])
    assert torch.equal(seen["b_out"], 2 * seen["y"])


def test_other_scalings_and_layers_take_peft_forward():
    assert is_power_of_two(2.0) and is_power_of_two(0.125) and not is_power_of_two(16 / 8 ** 0.5)
    assert not is_power_of_two(0.0) and not is_power_of_two(float("inf"))
    _, fast = _pair(torch.float32, lora_alpha=16, use_rslora=True)  # s = 16/sqrt(8): not a power of two
    enable_rank_scaling(fast)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    peft_linear = type(layer).__mro__[1]  # peft's lora.Linear, whose forward the rewrite falls back to
    original = peft_linear.forward
    peft_linear.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        out = layer(torch.randn(2, 64))
    finally:
        peft_linear.forward = original
    assert calls == [1] and out.shape == (2, 64)  # peft's own
    _, dora = _pair(torch.float32, lora_alpha=16, use_dora=True)
    enable_rank_scaling(dora)
    assert type(dora.base_model.model.model.layers[0].self_attn.q_proj) is RankScaledLoraLinear
    ids = torch.randint(0, 96, (1, 8))
    dora(input_ids=ids)  # DoRA layers hold a variant: peft's forward (and its variant) runs


def test_prepare_model_sets_it_from_the_speed_setting():
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    _, fast = _pair(torch.float32, lora_alpha=16)
    prepare_model(fast, dataclasses.replace(PLAIN, lora_scale_at_rank=True))
    q = fast.base_model.model.model.layers[1].self_attn.q_proj
    assert type(q) is RankScaledLoraLinear and "forward" not in q.__dict__
    _, plain = _pair(torch.float32, lora_alpha=16)
    prepare_model(plain, PLAIN)
    assert type(plain.base_model.model.model.layers[1].self_attn.q_proj) is type(q).__mro__[1]


def _layer_pair(**lora):
    """One peft LoRA Linear (64 -> 48) and its twin with the rank-scaled forward."""
    torch.manual_seed(4)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 48)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                         init_lora_weights=False, **lora))
    twin = copy.deepcopy(model)
    assert enable_rank_scaling(twin) == 1
    return model, twin


def _same(ref, fast, x, **kwargs):
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = m(xi, **kwargs)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad))
    return torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("case", ["merged", "disabled", "two adapters", "mixed batch", "lora_B bias", "float16"])
def test_where_the_rewrite_does_not_apply_the_result_is_peft_own(case):
    """Each case would differ from peft if the rewrite ran there (a merged or disabled adapter added
    again, a second adapter dropped, per-sample adapters ignored, an unscaled bias, float16 rounding)."""
    ref, fast = _layer_pair(lora_bias=case == "lora_B bias")
    x = torch.randn(4, 64)
    kwargs = {}
    for m in (ref, fast):
        layer = m.base_model.model[0]
        if case == "merged":
            m.merge_adapter()
        elif case == "disabled":
            layer.enable_adapters(False)  # what peft's disable_adapter() context does
        elif case in ("two adapters", "mixed batch"):
            torch.manual_seed(8)
            m.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
            if case == "two adapters":
                m.base_model.set_adapter(["default", "other"])
            else:
                m.eval()  # peft takes adapter_names in eval mode only
        elif case == "float16":
            m.half()
    if case == "mixed batch":
        kwargs["adapter_names"] = ["default", "other", "default", "__base__"]
    if case == "float16":
        x = x.half()
    fast_layer = fast.base_model.model[0]
    assert not takes_rank_scaling(fast_layer, x) or case == "mixed batch"  # adapter_names: a keyword argument
    assert _same(ref, fast, x, **kwargs)


def test_the_production_path_fp8_base_and_compile_agree_with_peft():
    """What loralab runs: bf16 autocast with the adapters' input casts off (prepare_model), on a
    float and on an FP8 base, eager, and compiled (aot_eager, one graph) against peft compiled alike:
    peft's bits."""
    import dataclasses

    from loralab.methods.fp8base import quantize_linears
    from loralab.speed.step import PLAIN, prepare_model

    for fp8 in (False, True):
        torch.manual_seed(5)
        base = nn.Sequential(nn.Linear(64, 48, bias=False))
        if fp8:
            quantize_linears(base, ["0"])
        ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
        fast = copy.deepcopy(ref)
        options = dataclasses.replace(PLAIN, autocast="bfloat16")
        prepare_model(ref, options)
        prepare_model(fast, dataclasses.replace(options, lora_scale_at_rank=True))
        assert takes_rank_scaling(fast.base_model.model[0])
        x = torch.randn(3, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _same(ref, fast, x), fp8
            compiled = [torch.compile(m, backend="aot_eager", fullgraph=True) for m in (ref, fast)]
            assert _same(*compiled, x), fp8


def test_fused_lora_and_rank_scaling_together_are_refused():
    """At the edge (a config error, before any model loads: exit 2) and in prepare_model, naming both keys and
    what to set; an explicit fused_lora alone turns the scaling's "auto" off instead."""
    import dataclasses

    from loralab.config import ConfigError, build_parameters
    from loralab.speed.step import PLAIN, prepare_model

    said = "'speed.lora_scale_at_rank' = true with 'speed.fused_lora' = true: both rewrite LoRA's forward; " \
           "set lora_scale_at_rank to \"auto\" or false, or fused_lora to false"
    with pytest.raises(ConfigError) as err:
        build_parameters({"speed": {"fused_lora": True, "lora_scale_at_rank": True}})
    assert said in str(err.value)
    build_parameters({"speed": {"fused_lora": True}})  # auto: no conflict
    _, fast = _pair(torch.float32, lora_alpha=16)
    with pytest.raises(ValueError) as err:
        prepare_model(fast, dataclasses.replace(PLAIN, fused_lora=True, lora_scale_at_rank=True))
    assert said in str(err.value)


@pytest.mark.parametrize("rewrite", ["rank_scaling", "fused_lora"])
def test_a_prepared_model_pickles_and_deep_copies(rewrite):
    """Every class install_lora_class gives (the rank-scaled one, fused_lora's) survives pickle
    (torch.save of a whole model) and deepcopy; the loaded model computes what the prepared one does,
    and the rewrite comes off it again."""
    import io

    from peft.tuners.lora.layer import Linear as LoraLinear

    from loralab.speed.fused_lora import FusedLoraLinear, disable_fused_lora, enable_fused_lora

    enable, disable, cls = {"rank_scaling": (enable_rank_scaling, disable_rank_scaling, RankScaledLoraLinear),
                            "fused_lora": (enable_fused_lora, disable_fused_lora, FusedLoraLinear)}[rewrite]
    _, fast = _pair(torch.float32, lora_alpha=16)
    fast.eval()  # fused_lora's path needs no dropout in training; eval takes it
    assert enable(fast) == 14
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    ids = torch.tensor([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]])
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(fast)):
        layer = twin.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer) is cls and "forward" not in layer.__dict__
        assert torch.equal(twin(input_ids=ids).logits, fast(input_ids=ids).logits)
        assert disable(twin) == 14 and type(layer) is LoraLinear


def test_the_run_logs_and_records_where_the_rewrite_applies():
    """make_step says in how many layers the rewrite applies (and NOTHING where no scaling is a power of
    two), and the record's train_info.speed keeps the count."""
    from loralab.run.step import make_step
    from loralab.speed.rank_scaling import rank_scaling_summary

    for rslora, taken in ((False, 14), (True, 0)):
        _, model = _pair(torch.float32, lora_alpha=16, use_rslora=rslora)
        lines = []
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        _, resolved = make_step(model, optimizer, speed={"lora_scale_at_rank": True}, kind="causal_lm",
                                dtype="float32", device=torch.device("cpu"),
                                features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], batch_size=1, limit=1,
                                max_length=8, pad_id=0, log=lines.append)
        assert rank_scaling_summary(model) == (taken, 14)
        assert resolved.record()["lora_scaled_at_rank"] == {"layers": taken, "lora_layers": 14}  # train_info.speed
        said = [line for line in lines if line.startswith("speed.lora_scale_at_rank")]
        assert said and f"in {taken} of 14 LoRA layer(s)" in said[0] and ("NOTHING" in said[0]) is (taken == 0)
    _, model = _pair(torch.float32, lora_alpha=16, use_rslora=True)  # left at "auto": no alarm where it cannot apply
    lines = []
    make_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), speed={},
              kind="causal_lm", dtype="float32", device=torch.device("cpu"),
              features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], batch_size=1, limit=1, max_length=8,
              pad_id=0, log=lines.append)
    said = [line for line in lines if line.startswith("speed.lora_scale_at_rank")]
    assert said and "in 0 of 14" in said[0] and "NOTHING" not in said[0] and "not applicable" in said[0]


# the default rewrite on each method and base; fused_lora on LoRA (DoRA takes peft's forward there); no rewrite once
_GRAPH_CASES = [("rank_scaling", dora, base) for dora in (False, True) for base in ("float32", "fp8")] + \
    [("fused_lora", False, base) for base in ("float32", "fp8")] + [("none", False, "float32")] + \
    [("rank_scaling", False, "fp8-cache")] + \
    [("rank_scaling", True, "float32-step-norms")]  # per-layer state of another kind: the MLPs' cached transposes;
# DoRA's norms stored per layer and read inside the step (speed.dora_norm_per_step)


@pytest.mark.parametrize("rewrite, dora, base", [  # the default's case in the fast subset, the rest in the full suite
    case if case == ("rank_scaling", False, "float32") else pytest.param(*case, marks=pytest.mark.slow)
    for case in _GRAPH_CASES])
def test_compiled_decoder_layers_share_one_graph_with_a_rewrite(rewrite, dora, base):
    """prepare_model compiles each decoder layer: the layers must share their graphs whatever per-layer state
    it installs (a forward rewrite, fast DoRA's variants, FP8 cached transposes). Per-layer partials as instance forwards made each layer a new graph (torch
    guards a partial by identity; here 4 graphs for 4 layers), so past 8 layers the rest ran eagerly: FP8-base LoRA 0.39x on an H100
    at the Llama-3-8B shape, micro-batch 2 (results/bench-fair-h100/)."""
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = LlamaForCausalLM(cfg)
    if base.startswith("fp8"):  # quantization: "fp8" (fused_lora reads a float weight: it takes peft's forward there)
        from loralab.methods.common import linear_names
        from loralab.methods.fp8base import quantize_linears

        llama = llama.to(torch.bfloat16)
        quantize_linears(llama, linear_names(llama))
    model = get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=dora,
                                             init_lora_weights=False))
    options = dataclasses.replace(PLAIN, compile=True, compile_backend=counting_backend,
                                  lora_scale_at_rank=rewrite == "rank_scaling", fused_lora=rewrite == "fused_lora",
                                  fp8_transpose_cache=0.81 if base == "fp8-cache" else 0.0)
    prepare_model(model, options)
    # the cache holds the MLPs' 12 projections (2/3 of the bytes here), not the attention's 16: layers differ within
    assert base != "fp8-cache" or options.fp8_transposes_cached["layers"] == 12
    ids = torch.randint(0, 96, (2, 8))
    step_norms = contextlib.nullcontext()
    if base.endswith("step-norms"):
        from loralab.speed.dora_refresh import refresh_dora_norms
        from loralab.speed.fast_dora import reusing_dora_norms

        assert refresh_dora_norms(model) == 28
        step_norms = reusing_dora_norms()
    try:
        with step_norms:
            for _ in range(2):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        torch._dynamo.reset()
    # two: the first layer's input (the frozen embeddings') needs no gradient, the other three layers' do
    assert len(graphs) == 2, f"{len(graphs)} graphs for 4 decoder layers with {rewrite} ({base} base)"


def test_a_hook_added_after_the_rewrite_keeps_its_class():
    """accelerate's hooks (device maps, offload) keep the module's bound forward and call it: removing the
    rewrite under such a hook leaves the class it needs (and says so in its count) rather than breaking the
    hook's forward, whose fallback calls peft's through super()."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    _, fast = _pair(torch.float32, lora_alpha=16)
    assert enable_rank_scaling(fast) == 14
    q = fast.base_model.model.model.layers[0].self_attn.q_proj
    add_hook_to_module(q, ModelHook())
    assert disable_rank_scaling(fast) == 13 and type(q) is RankScaledLoraLinear
    x = torch.randn(2, 64)
    with fast.disable_adapter():  # the fallback branch: peft's own forward through super()
        assert torch.equal(q(x), q.get_base_layer()(x))
