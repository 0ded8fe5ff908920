"""Shared-input LoRA (speed/shared_input.py, ``speed.lora_shared_input``): q/k/v and gate/up take their
``lora_A`` products from one GEMM; logits are peft's bits and gradients peft's to 1e-5 (fp32), compiled
layers make 3 forward and 6 backward matmuls fewer per layer with no graph breaks or recompiles, the
per-forward cache never outlives a forward, and every case it does not cover is peft's own forward."""

import contextlib
import copy
import pickle
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError, build_parameters
from loralab.run.step import make_step
from loralab.speed import fast_dora
from loralab.speed import shared_input as si
from loralab.speed.dora_refresh import refresh_dora_norms
from loralab.speed.fast_dora import FastDoraLinearVariant, disable_fast_dora, enable_fast_dora, reusing_dora_norms
from loralab.speed.fused_lora import enable_fused_lora
from loralab.speed.rank_scaling import RankScaledLoraLinear, enable_rank_scaling
from loralab.speed.shared_input import (
    SharedInputLoraLinear,
    clear_input_groups,
    disable_shared_input,
    enable_shared_input,
    input_groups,
    shared_input_summary,
)
from loralab.speed.step import prepare_model, rewrite_lines
from loralab.speed_settings import Speed

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
FEATURES = [{"input_ids": list(range(1, 1 + n))} for n in (5, 9, 3, 7)]  # make_step's samples


@pytest.fixture
def takes(monkeypatch):
    """Counts member calls that took a shared product ("shared") or computed alone ("alone")."""
    seen = Counter()
    original = si.InputGroup.take

    def counting(self, index, x):
        part = original(self, index, x)
        seen["shared" if part is not None else "alone"] += 1
        return part

    monkeypatch.setattr(si.InputGroup, "take", counting)
    return seen


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def _llama(alpha=8, **lora):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=alpha, target_modules="all-linear", **lora))
    _randomise_b(model)
    return model


def _pair(scale_at_rank=False, alpha=8, **lora):
    """peft's model and a copy with shared inputs (4 groups: 2 layers x (q/k/v, gate/up))."""
    ref = _llama(alpha, **lora)
    fast = copy.deepcopy(ref)
    assert enable_shared_input(fast, scale_at_rank) == 4
    return ref, fast


def _layers(model):
    return model.base_model.model.model.layers


def _step(model, seed=3, **kwargs):
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(input_ids=IDS, labels=IDS, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def _assert_grads_close(got, want, rel=1e-5):
    assert got.keys() == want.keys() and any("lora_A" in n for n in want)
    for name in want:
        err = (got[name] - want[name]).abs().max() / want[name].abs().max()
        assert err <= rel, (name, err.item())


def _cache_empty(model):
    groups = input_groups(model)
    return bool(groups) and all(g.x is None and g.parts is None and g.pending is None for g in groups)


@pytest.mark.parametrize("scale_at_rank", [False, True])
@pytest.mark.parametrize("alpha", [8, 16])  # s = 1 and 2
def test_logits_are_peft_bits_and_gradients_within_1e_5(scale_at_rank, alpha, takes):
    ref, fast = _pair(scale_at_rank, alpha)
    want_logits, want = _step(ref)
    got_logits, got = _step(fast)
    assert torch.equal(got_logits, want_logits)
    _assert_grads_close(got, want)
    assert takes == {"shared": 10}  # every q/k/v/gate/up call of both layers took its slice
    assert _cache_empty(fast)


def test_scale_at_rank_hands_lora_b_the_output_gradient():
    """With ``scale_at_rank`` the shared path puts s on the rank (rank_scaling.py); without, peft's order."""
    seen = {}
    for scale_at_rank in (True, False):
        _, fast = _pair(scale_at_rank, alpha=16)  # s = 2
        attn = _layers(fast)[0].self_attn
        attn.k_proj.lora_B["default"].register_full_backward_hook(lambda m, gi, go: seen.update(b=go[0]))
        x = torch.randn(3, 64)
        outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        outs[1].register_hook(lambda g: seen.update(y=g))
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        assert torch.equal(seen["b"], seen["y"] if scale_at_rank else 2 * seen["y"])


def test_two_groups_per_decoder_layer_and_the_summary():
    ref, fast = _pair()
    assert shared_input_summary(fast) == {"groups": 4, "layers": 10}
    assert Counter(type(m).__name__ for m in fast.modules() if isinstance(m, LoraLinear)) == {
        "SharedInputLoraLinear": 10, "Linear": 4}  # o_proj and down_proj read other inputs
    attn, mlp = _layers(fast)[1].self_attn, _layers(fast)[1].mlp
    assert input_groups(fast)[2].members == (attn.q_proj, attn.k_proj, attn.v_proj)
    assert input_groups(fast)[3].members == (mlp.gate_proj, mlp.up_proj)
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in ref.named_modules()]
    assert fast.state_dict().keys() == ref.state_dict().keys()
    assert enable_shared_input(fast, True) == 4 and shared_input_summary(fast) == {"groups": 4, "layers": 10}
    assert all(g.scale_at_rank for g in input_groups(fast))  # a second call regroups
    hooked = _llama()  # a layer with an instance forward (accelerate's hooks) is left as it is
    q = _layers(hooked)[0].self_attn.q_proj
    q.forward = q.forward
    assert enable_shared_input(hooked, False) == 4 and type(q) is LoraLinear
    assert shared_input_summary(hooked) == {"groups": 4, "layers": 9}


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _counting_backend(counts):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            counts[kind] += sum(n.op == "call_function" and n.target in MATMULS for n in gm.graph.nodes)
            return make_boxed_func(gm.forward)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def _compiled_matmuls(ref, fast) -> dict:
    """Each model's layers compiled fullgraph, three steps: two graphs (the first layer's input needs no gradient),
    no breaks, no recompiles, the shared cache empty after each step, and the shared model's logits and gradients
    its eager ones; returns the matmuls counted in the compiled forward and backward, {"alone": ..., "shared": ...}."""
    from torch._dynamo.utils import counters

    eager_logits, eager = _step(copy.deepcopy(fast))
    matmuls = {}
    for name, model in (("alone", ref), ("shared", fast)):
        torch._dynamo.reset()
        counters.clear()
        counts = matmuls[name] = Counter()
        for layer in _layers(model):
            layer.compile(backend=_counting_backend(counts), fullgraph=True)
        for step in range(3):
            logits, grads = _step(model)
            assert name == "alone" or _cache_empty(model)
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs == 2 and not counters["graph_break"]
    assert torch.equal(logits, eager_logits)
    _assert_grads_close(grads, eager, rel=1e-6)
    return matmuls
@pytest.mark.slow  # over 2 s on 2 cores: the full suite runs it (the fast subset's 2-minute budget)
def test_compiled_layers_fullgraph_fewer_matmuls_no_recompiles_and_eager_gradients():
    matmuls = _compiled_matmuls(*_pair(scale_at_rank=True, alpha=16))
    assert matmuls["alone"]["forward"] - matmuls["shared"]["forward"] == 3 * 2  # per layer: 5 A products -> 2
    # per layer: 5 dA and 5 dx products -> 2 and 2; the first layer's q/k/v need no input gradient (its
    # input comes from the frozen embedding), so there 3 dA -> 1 only
    assert matmuls["alone"]["backward"] - matmuls["shared"]["backward"] == 6 + 4


def test_gradient_checkpointing_recomputes_and_leaves_no_cache(takes):
    ref, fast = _pair()
    want_logits, want = _step(ref)
    fast.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    got_logits, got = _step(fast)
    assert torch.equal(got_logits, want_logits) and _cache_empty(fast)
    _assert_grads_close(got, want)
    assert takes == {"shared": 20}  # the forward and its recomputation


def _fallback(case):
    """peft's model and a shared copy set up for ``case``, and the forward's extra keyword arguments."""
    lora = {"use_dora": True} if case == "dora" else {"lora_dropout": 0.1} if case == "dropout" else {}
    ref, fast = _llama(**lora), None
    if case == "lora_A bias":  # not something peft makes; a lora_A that is not bias-free must not be shared
        for layer in [m for m in ref.modules() if isinstance(m, LoraLinear)]:
            weight = layer.lora_A["default"].weight
            layer.lora_A["default"] = nn.Linear(weight.shape[1], weight.shape[0])
            layer.lora_A["default"].weight.data = weight.data
    if case in ("two active", "mixed batch"):
        ref.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        _randomise_b(ref, seed=5)
    fast = copy.deepcopy(ref)
    # a layer that never could share joins no group, so the record counts none (DoRA's rows once recorded 64 groups
    # that took nothing); the states set below (several active, merged, disabled) come after grouping
    never = case in ("dora", "lora_A bias", "dropout")
    assert enable_shared_input(fast, scale_at_rank=True) == (0 if never else 4)
    assert shared_input_summary(fast) == ({"groups": 0, "layers": 0} if never else {"groups": 4, "layers": 10})
    for model in (ref, fast):
        if case == "two active":
            model.base_model.set_adapter(["default", "other"])
        elif case == "mixed batch":
            model.eval()  # peft takes adapter_names in eval mode only
        elif case == "merged":
            model.merge_adapter()
    return ref, fast, {"adapter_names": ["default", "other"]} if case == "mixed batch" else {}


@pytest.mark.parametrize("case", ["dora", "dropout", "lora_A bias", "two active", "mixed batch", "disabled", "merged"])
def test_where_it_does_not_apply_each_member_computes_alone_as_peft(case, takes):
    """Each would differ from peft if a member took a shared product (a DoRA norm or a second adapter
    dropped, one dropout mask for three layers, per-sample adapters ignored, a merged or disabled adapter
    added again)."""
    ref, fast, kwargs = _fallback(case)
    if case == "disabled":
        with ref.disable_adapter(), fast.disable_adapter(), torch.no_grad():
            want, got = ref(input_ids=IDS).logits, fast(input_ids=IDS).logits
        assert torch.equal(got, want)
    elif case in ("merged", "mixed batch"):
        with torch.no_grad():
            assert torch.equal(fast(input_ids=IDS, **kwargs).logits, ref(input_ids=IDS, **kwargs).logits)
    else:
        want_logits, want = _step(ref)
        got_logits, got = _step(fast)
        assert torch.equal(got_logits, want_logits) and got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), case
    assert takes["shared"] == 0 and not any(g.x is not None for g in input_groups(fast))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_mode_and_float16_share_and_give_peft_bits(dtype, takes):
    """Inference tensors have no version counter; float16 keeps peft's order of the scaling even with
    ``scale_at_rank`` (rank_scaling.py: not exact there)."""
    ref = _llama(alpha=16).to(dtype).eval()
    fast = copy.deepcopy(ref)
    enable_shared_input(fast, scale_at_rank=True)
    with torch.inference_mode():
        assert torch.equal(fast(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert takes == {"shared": 10} and _cache_empty(fast)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # the base layers have no bias: no merging
def test_a_lora_b_bias_is_shared_in_peft_order(takes):
    ref, fast = _pair(scale_at_rank=True, alpha=16, lora_bias=True)
    _randomise_b(ref), _randomise_b(fast)  # the biases too
    want_logits, want = _step(ref)
    got_logits, got = _step(fast)
    assert torch.equal(got_logits, want_logits) and takes == {"shared": 10}
    _assert_grads_close(got, want)


class _Attention(nn.Module):
    """q/k/v siblings called in a given order on given inputs (cross-attention: q(x), k(y), v(y))."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 12), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, inputs, order):
        return torch.cat([getattr(self, name)(inputs[i]) for name, i in order], dim=-1)


def _attention_pair():
    torch.manual_seed(6)
    ref = get_peft_model(_Attention(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    _randomise_b(ref)
    fast = copy.deepcopy(ref)
    assert enable_shared_input(fast, scale_at_rank=False) == 1
    return ref, fast


@pytest.mark.parametrize("order", [
    (("q_proj", 0), ("k_proj", 1), ("v_proj", 1)),  # cross-attention
    (("q_proj", 0), ("k_proj", 1), ("v_proj", 0)),
    (("k_proj", 0), ("q_proj", 0), ("v_proj", 0)),  # not the siblings' order
    (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("q_proj", 1), ("v_proj", 1), ("k_proj", 1)),
])
def test_siblings_called_with_other_inputs_or_orders_give_peft_outputs_and_no_cache(order):
    ref, fast = _attention_pair()
    inputs = [torch.randn(5, 16), torch.randn(5, 16)]
    outs = []
    for model in (ref, fast):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = model(leaves, order)
        out.pow(2).sum().backward()
        outs.append((out, [x.grad for x in leaves]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=0)
    for got, want in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert _cache_empty(fast)


def test_a_forward_that_raised_midway_or_an_input_changed_in_place_never_takes_a_stale_product():
    ref, fast = _attention_pair()
    attn, want_attn = fast.base_model.model, ref.base_model.model
    with torch.no_grad():
        for order in ((("k_proj", 0), ("v_proj", 0), ("q_proj", 0)), (("q_proj", 0), ("k_proj", 0), ("v_proj", 0))):
            x = torch.randn(5, 16)
            attn.q_proj(x)  # the forward died here: the k and v products of x stay cached
            assert input_groups(fast)[0].x is x
            for model in (attn, want_attn):  # an optimizer step in between
                model.k_proj.lora_A["default"].weight.mul_(2)
            y = torch.randn(5, 16)
            assert torch.equal(fast([y], order), ref([y], order))
        assert _cache_empty(fast)  # the siblings' order leaves nothing behind
        attn.q_proj(x)
        x.mul_(3)  # the same tensor, new values: keyed by its version too
        assert torch.equal(attn.k_proj(x), want_attn.k_proj(x))


def test_a_member_whose_adapter_computes_in_another_dtype_computes_alone(takes):
    ref, fast = _attention_pair()
    for model in (ref, fast):  # peft casts v's input to float64 for its adapter
        model.base_model.model.v_proj.lora_A.double(), model.base_model.model.v_proj.lora_B.double()
    order, x = (("q_proj", 0), ("k_proj", 0), ("v_proj", 0)), [torch.randn(5, 16)]
    assert torch.equal(fast(x, order), ref(x, order))
    assert takes == {"shared": 2, "alone": 1} and _cache_empty(fast)


def test_a_copy_or_pickle_has_no_groups_computes_as_peft_and_groups_again(takes):
    """A deep copy of one member (the generation engine merges one of each projection) must not copy its siblings
    through the group, base weights and all; a copied or unpickled model computes as peft and can be grouped again."""
    ref, fast = _pair()
    q = _layers(fast)[0].self_attn.q_proj
    input_groups(fast)[0].x = torch.zeros(1)
    alone = copy.deepcopy(q)
    assert sum(p.numel() for p in alone.parameters()) == sum(p.numel() for p in q.parameters())
    assert alone.__dict__[si._GROUP] is None and not any(isinstance(v, torch.Tensor) and v.numel() == 1 and v.sum() == 0
                                                       for v in vars(alone).values())
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert shared_input_summary(copied) == {"groups": 0, "layers": 0}
        takes.clear()
        with torch.no_grad():
            assert torch.equal(copied(input_ids=IDS).logits, ref(input_ids=IDS).logits)
        assert takes == {}
        assert enable_shared_input(copied, scale_at_rank=False) == 4
        attn = _layers(copied)[0].self_attn
        assert input_groups(copied)[0].members == (attn.q_proj, attn.k_proj, attn.v_proj)
        with torch.no_grad():
            assert torch.equal(copied(input_ids=IDS).logits, ref(input_ids=IDS).logits)
        assert takes == {"shared": 10} and _cache_empty(copied)


def test_groups_make_no_reference_cycle():
    """``del model`` frees the base weights at once, without the cyclic garbage collector: the group holds its
    members weakly (with strong references each grouped layer was a cycle, base weights pinned until a collection)."""
    import gc
    import weakref

    _, fast = _pair()
    probe = weakref.ref(_layers(fast)[0].self_attn.q_proj.base_layer.weight)
    gc.collect()
    gc.disable()
    try:
        del fast
        assert probe() is None
    finally:
        gc.enable()


def test_clear_input_groups_releases_the_input_of_a_forward_that_raised():
    """A forward that raised between a group's first and last member (an out-of-memory in gate_proj's base, say)
    leaves the group holding its input and with it the autograd graph of every layer before; the run's retry and
    the probe clear it."""
    _, fast = _pair()
    gate = _layers(fast)[0].mlp.gate_proj  # it takes its slice, leaving up_proj's pending, then its base raises

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (test)")

    gate.base_layer.forward = boom
    with pytest.raises(torch.OutOfMemoryError):
        fast(input_ids=IDS, labels=IDS, use_cache=False)
    held = [g for g in input_groups(fast) if g.x is not None]
    assert held and held[0].x.grad_fn is not None
    clear_input_groups(fast)
    assert _cache_empty(fast)


def test_an_encoder_decoder_model_is_left_alone():
    """Bart's cross-attention feeds k/v the encoder's output and q the decoder's: no groups."""
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
    model = get_peft_model(BartForConditionalGeneration(cfg), LoraConfig(r=4, target_modules=["q_proj", "k_proj",
                                                                                               "v_proj"]))
    assert enable_shared_input(model, scale_at_rank=True) == 0
    assert shared_input_summary(model) == {"groups": 0, "layers": 0}
    assert not any(isinstance(m, SharedInputLoraLinear) for m in model.modules())


def test_disable_restores_the_previous_classes_and_peft_gradients():
    ref, fast = _llama(), _llama()
    assert enable_rank_scaling(fast) == 14 and enable_shared_input(fast, scale_at_rank=True) == 4
    assert disable_shared_input(fast) == 10 and shared_input_summary(fast) == {"groups": 0, "layers": 0}
    assert all(type(m) is RankScaledLoraLinear for m in fast.modules() if isinstance(m, LoraLinear))
    assert not any(k.startswith("_loralab_input") for m in fast.modules() for k in m.__dict__)
    plain = copy.deepcopy(ref)
    enable_shared_input(plain, scale_at_rank=False)
    assert disable_shared_input(plain) == 10
    assert all(type(m) is LoraLinear for m in plain.modules() if isinstance(m, LoraLinear))
    want_logits, want = _step(ref)
    for model in (fast, plain):  # alpha/r = 1: the rank-scaled forward is peft's bits too
        got_logits, got = _step(model)
        assert torch.equal(got_logits, want_logits) and all(torch.equal(got[n], want[n]) for n in want)


def test_beside_fused_lora_it_is_refused_naming_both_keys():
    model = _llama()
    enable_fused_lora(model)
    with pytest.raises(ValueError, match=r"speed\.lora_shared_input.*speed\.fused_lora"):
        enable_shared_input(model, scale_at_rank=False)
    assert shared_input_summary(model) == {"groups": 0, "layers": 0}


# ---- the speed key: resolution, checks and the run path (speed/step.prepare_model, run/step.make_step) ----------

@pytest.mark.parametrize(("device", "kind", "fused", "want"), [
    ("cuda", "causal_lm", False, True), ("cpu", "causal_lm", False, False),
    ("cuda", "seq_cls", False, False), ("cuda", "causal_lm", True, False)])
def test_auto_is_on_for_cuda_causal_lms_unless_fused_lora(device, kind, fused, want):
    assert Speed(fused_lora=fused).resolve(device_type=device, kind=kind, base_dtype="bfloat16").lora_shared_input is want
    assert Speed(lora_shared_input=False).resolve(device_type="cuda", kind="causal_lm",
                                                  base_dtype="bfloat16").lora_shared_input is False  # explicit wins


def test_true_beside_fused_lora_is_a_config_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"'speed\.lora_shared_input' = true with 'speed\.fused_lora' = true"):
        build_parameters({"speed": {"fused_lora": True, "lora_shared_input": True}})
    with pytest.raises(ConfigError, match=r"lora_shared_input.*must be true, false or \"auto\""):
        build_parameters({"speed": {"lora_shared_input": "yes"}})


def test_make_step_groups_records_and_logs_and_the_step_trains_as_peft():
    """An explicit true on CPU: the run path groups the siblings, records and logs how many, and one
    SGD step moves every LoRA weight as the same step on peft's forward does (to float32 rounding)."""
    def run(shared):
        model = _llama()
        # SGD: the update is the gradient's multiple (AdamW's first step divides by |g|, so float32 rounding of a
        # near-zero gradient can move an element by up to the learning rate)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        lines = []
        step, speed = make_step(model, optimizer, speed={"lora_shared_input": shared}, kind="causal_lm", dtype="float32",
                                device=torch.device("cpu"), features=FEATURES, batch_size=2, limit=4, max_length=16,
                                pad_id=0, log=lines.append)
        step(FEATURES)
        return model, speed, lines

    initial = {n: p.detach().clone() for n, p in _llama().named_parameters() if "lora_" in n}
    fast, speed, lines = run(True)
    ref, ref_speed, ref_lines = run(False)
    assert speed.record()["lora_shared_inputs"] == {"groups": 4, "layers": 10}
    assert "lora_shared_inputs" not in ref_speed.record()
    assert any(line.startswith("speed.lora_shared_input: 4 group(s)") for line in lines)
    assert not any("lora_shared_input" in line for line in ref_lines)
    assert _cache_empty(fast) and all(g.scale_at_rank for g in input_groups(fast))  # lora_scale_at_rank's "auto": on
    want = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    for name, p in fast.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, initial[name]) and torch.allclose(p, want[name], rtol=1e-5, atol=1e-6), name


def test_prepare_model_refuses_it_beside_fused_lora():
    with pytest.raises(ValueError, match="'speed.lora_shared_input' = true with 'speed.fused_lora' = true"):
        prepare_model(_llama(), Speed(autocast=None, compile=False, fused_lora=True, lora_scale_at_rank=False,
                                      lora_shared_input=True, activation_memory_budget=1.0))


def test_the_out_of_memory_retry_clears_the_groups_before_its_smaller_micro_batch(monkeypatch):
    """``Step`` catches an out-of-memory raised mid-group, halves the micro-batch and retries: by the retry the
    groups hold nothing of the failed forward (``clear_input_groups``), and the step completes."""
    import loralab.run.step as run_step

    model = _llama()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step, _ = make_step(model, optimizer, speed={"lora_shared_input": True, "micro_batch": 2}, kind="causal_lm",
                        dtype="float32", device=torch.device("cpu"), features=FEATURES, batch_size=4, limit=4,
                        max_length=16, pad_id=0, log=lambda s: None)
    gate = _layers(model)[1].mlp.gate_proj.base_layer
    calls, held = [], []
    real = gate.forward

    def once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise torch.OutOfMemoryError("out of memory (test)")
        return real(*args, **kwargs)

    def spy(m):
        held.append(any(g.x is not None for g in input_groups(m)))
        clear_input_groups(m)

    monkeypatch.setattr(gate, "forward", once)
    monkeypatch.setattr(run_step, "clear_input_groups", spy)
    stats = step(FEATURES)
    assert held == [True] and step.micro_batch == 1 and torch.isfinite(stats.loss) and _cache_empty(model)


@pytest.mark.parametrize(("asked", "word"), [(True, "NOTHING"), ("auto", "not applicable")])
def test_the_log_says_when_no_group_was_made_and_whether_it_was_asked_for(asked, word):
    """A model with no layer that can share (peft's DoRA, fast DoRA off, say): the log line says 0 groups, and NOTHING
    only where the experiment set the key true ("auto" on CUDA just says why not)."""
    resolved = Speed(lora_shared_input=True, lora_shared_inputs={"groups": 0, "layers": 0})
    (line,) = [x for x in rewrite_lines(resolved, Speed(lora_shared_input=asked)) if "lora_shared_input" in x]
    assert line.startswith("speed.lora_shared_input: 0 group(s)") and f"; {word}: " in line and "DoRA" in line
    assert not [x for x in rewrite_lines(Speed(lora_shared_input=False), Speed()) if "lora_shared_input" in x]



# ---- fast DoRA (speed/fast_dora.py) takes the shared product too -------------------------------------------------

DORA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _dora_llama(dropout=0.0, fast=True):
    """A tiny Llama with DoRA r4 (s = 2) on q/k/v/gate/up/down, B random (so each norm differs from its magnitude),
    fast DoRA's forward unless ``fast`` is False (peft's own DoraLinearVariant)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, use_dora=True, lora_dropout=dropout,
                                                             target_modules=DORA_TARGETS))
    _randomise_b(model)
    if fast:
        assert enable_fast_dora(model) == 12
    return model


def _dora_pair(scale_at_rank=True):
    """A fast DoRA model and a copy with shared inputs, grouped in the run path's order (fast DoRA first)."""
    ref = _dora_llama()
    fast = copy.deepcopy(ref)
    assert enable_shared_input(fast, scale_at_rank) == 4
    return ref, fast


def _variants(model):
    return Counter(type(v).__name__ for m in model.modules() for v in getattr(m, "lora_variant", {}).values())


def test_fast_dora_layers_join_groups_whichever_is_enabled_first():
    """q/k/v and gate/up of each layer make 4 groups of 10 layers (down_proj reads another input), with
    ``enable_shared_input`` called after ``enable_fast_dora`` (the run path's order) or before it; peft's DoRA
    variant (fast DoRA swapped out again) leaves them; a copy keeps no settings to group by."""
    after = _dora_pair()[1]
    assert shared_input_summary(after) == {"groups": 4, "layers": 10}
    assert _variants(after) == {"FastDoraLinearVariant": 12}
    attn = _layers(after)[1].self_attn
    assert input_groups(after)[2].members == (attn.q_proj, attn.k_proj, attn.v_proj)
    before = _dora_llama(fast=False)
    assert enable_shared_input(before, scale_at_rank=True) == 0 and shared_input_summary(before)["groups"] == 0
    assert enable_fast_dora(before) == 12 and shared_input_summary(before) == {"groups": 4, "layers": 10}
    assert all(g.scale_at_rank for g in input_groups(before))  # regrouped with the settings it was called with
    assert [n for n, _ in before.named_modules()] == [n for n, _ in after.named_modules()]
    assert before.state_dict().keys() == _dora_llama().state_dict().keys()
    assert disable_fast_dora(before) == 12 and shared_input_summary(before) == {"groups": 0, "layers": 0}
    copied = copy.deepcopy(after)
    assert shared_input_summary(copied)["groups"] == 0
    assert disable_fast_dora(copied) == 12 and enable_fast_dora(copied) == 12
    assert shared_input_summary(copied)["groups"] == 0  # no settings in a copy: grouped only where asked again
    assert disable_shared_input(after) == 10 and disable_fast_dora(after) == 12 and enable_fast_dora(after) == 12
    assert shared_input_summary(after)["groups"] == 0  # disabled: the settings went with the groups


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_fast_dora_logits_are_the_unshared_bits_and_gradients_within_1e_5(train, reuse, takes, monkeypatch):
    """Every q/k/v/gate/up call takes its slice; outputs equal the same fast DoRA model without sharing bit for bit,
    in train (dropout 0) and eval mode, with each forward's own norm or (``reuse``) the norms ``refresh_dora_norms``
    kept; lora_A, lora_B and magnitude gradients within 1e-5."""
    ref, fast = _dora_pair()
    for model in (ref, fast):
        model.train(train)
        assert not reuse or refresh_dora_norms(model) == 12
    norms = Counter()
    per_forward = fast_dora._norm
    monkeypatch.setattr(fast_dora, "_norm", lambda *a: norms.update(n=1) or per_forward(*a))
    with reusing_dora_norms() if reuse else contextlib.nullcontext():
        want_logits, want = _step(ref)
        got_logits, got = _step(fast)
    assert torch.equal(got_logits, want_logits)
    _assert_grads_close(got, want)
    kinds = Counter(n.split(".")[-3] for n in want)  # ...q_proj.lora_A.default.weight
    assert {k: kinds[k] for k in ("lora_A", "lora_B", "lora_magnitude_vector")} == dict.fromkeys(
        ("lora_A", "lora_B", "lora_magnitude_vector"), 12)
    assert takes == {"shared": 10} and _cache_empty(fast)
    assert norms["n"] == (0 if reuse else 2 * 12)  # the kept norms read, or each forward's own computed


@pytest.mark.parametrize("case", ["dropout", "peft dora"])
def test_dora_layers_that_cannot_share_join_no_group_and_compute_alone(case, takes):
    """DoRA with dropout (each layer draws its own mask) and peft's own DoRA (``speed.fast_dora: false``: its
    forward is peft's) join no group; their outputs and gradients are the ungrouped model's bits."""
    ref = _dora_llama(dropout=0.1) if case == "dropout" else _dora_llama(fast=False)
    fast = copy.deepcopy(ref)
    assert enable_shared_input(fast, scale_at_rank=True) == 0
    assert shared_input_summary(fast) == {"groups": 0, "layers": 0}
    assert _variants(fast) == {"FastDoraLinearVariant" if case == "dropout" else "DoraLinearVariant": 12}
    want_logits, want = _step(ref)
    got_logits, got = _step(fast)
    assert torch.equal(got_logits, want_logits) and all(torch.equal(got[n], want[n]) for n in want)
    assert not takes


@pytest.mark.parametrize("case", ["merged", "disabled", "two active"])
def test_grouped_fast_dora_layers_compute_alone_where_sharing_does_not_apply_now(case, takes):
    """States set after grouping: a merged adapter (added again), disabled adapters, a second active adapter (the
    DoRA norm and the other adapter dropped) would each differ if a member took a shared product."""
    ref = _dora_llama()
    if case == "two active":
        ref.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS))
        _randomise_b(ref, seed=5)
    fast = copy.deepcopy(ref)
    assert enable_shared_input(fast, scale_at_rank=True) == 4
    for model in (ref, fast):
        model.eval()
        if case == "merged":
            model.merge_adapter()
        elif case == "two active":
            model.base_model.set_adapter(["default", "other"])
    with torch.no_grad(), (ref.disable_adapter() if case == "disabled" else contextlib.nullcontext()), (
            fast.disable_adapter() if case == "disabled" else contextlib.nullcontext()):
        assert torch.equal(fast(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert takes["shared"] == 0 and not any(g.x is not None for g in input_groups(fast))


def test_a_shared_product_where_dropout_applies_is_refused():
    layer = _layers(_dora_llama(dropout=0.1))[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="lora_a_x"):
        FastDoraLinearVariant.forward(layer, active_adapter="default", x=x, result=layer.base_layer(x),
                                      lora_a_x=layer.lora_A["default"](x))


@pytest.mark.slow  # ~6 s: two models' layers compiled
def test_compiled_fast_dora_layers_fullgraph_fewer_matmuls_no_recompiles_and_eager_gradients():
    """As the LoRA test above: layers compile whole, once each kind (the first layer's input needs no gradient),
    with 3 forward and 6 backward matmuls fewer per layer than without sharing (4 in the first), and equal the
    eager forward."""
    matmuls = _compiled_matmuls(*_dora_pair())
    assert matmuls["alone"]["forward"] - matmuls["shared"]["forward"] == 3 * 2
    assert matmuls["alone"]["backward"] - matmuls["shared"]["backward"] == 6 + 4


def test_make_step_groups_fast_dora_and_the_step_trains_as_without_sharing():
    """The run path (speed/step.prepare_model: fast DoRA, then the groups; norms once per step by default): the record
    counts the DoRA layers in groups, and one SGD step moves every adapter weight as without sharing (float32)."""
    def run(shared):
        model = _dora_llama(fast=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        step, speed = make_step(model, optimizer, speed={"lora_shared_input": shared}, kind="causal_lm", dtype="float32",
                                device=torch.device("cpu"), features=FEATURES, batch_size=2, limit=4, max_length=16,
                                pad_id=0, log=lambda s: None)
        step(FEATURES)
        return model, speed

    fast, speed = run(True)
    ref, _ = run(False)
    assert speed.record()["lora_shared_inputs"] == {"groups": 4, "layers": 10}
    assert _variants(fast) == {"FastDoraLinearVariant": 12} and _cache_empty(fast)
    initial = dict(_dora_llama(fast=False).named_parameters())
    want = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, initial[name]) and torch.allclose(p, want[name], rtol=1e-5, atol=1e-6), name
