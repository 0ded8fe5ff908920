"""QLoRA: the invariant matrix on an NF4 base (bitsandbytes, CPU path) over every combination the
registry lets compose there, and the refusals. The NF4 kernels of bitsandbytes 0.50 run on CPU
(pure torch, slow), so all of this runs on CPU; CUDA only makes it faster.

Per combination, on the real MiniLM-L6 and real RTE rows: the fresh adapter leaves the quantised
model's logits unchanged; the trainable count matches the closed form; one step moves exactly the
trainable parameters; the saved adapter reloads with plain ``PeftModel.from_pretrained`` on a
freshly NF4-quantised original base with equal logits (NF4 quantisation is deterministic); and
merging into the dequantised base in float32 gives the trained logits.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

pytest.importorskip("bitsandbytes")

from test_methods_matrix import R, count_and_step, logits, settings, world  # noqa: E402,F401  (shared fixture)

from loralab import methods  # noqa: E402
from loralab.config import build_parameters  # noqa: E402
from loralab.data import collate  # noqa: E402
from loralab.methods.common import linear_names, resolve_config  # noqa: E402
from loralab.methods.context import MethodContext  # noqa: E402
from loralab.methods.qlora import dequantized_copy, quantize_linears  # noqa: E402


def pairwise_cover(combos):
    """A subset of ``combos`` holding every (layer, init), (layer, optimizer) and (init, optimizer)
    pair that ``combos`` holds (greedy, deterministic): each part meets each other part on NF4
    at least once, at a fraction of the cost of the full product (NF4 on CPU is slow)."""
    def pairs(c):
        return {(0, c[0], c[1]), (1, c[0], c[2]), (2, c[1], c[2])}

    needed = set().union(*(pairs(c) for c in combos))
    chosen = []
    while needed:
        best = max(combos, key=lambda c: len(pairs(c) & needed))
        chosen.append(best)
        needed -= pairs(best)
    return chosen


NF4_CASES = methods.nf4_combinations()  # all of them (~2 s each on an idle core); pairwise_cover(...) if that grows


@pytest.fixture(scope="module")
def quantized_base(world):
    base = world[0]
    return quantize_linears(copy.deepcopy(base), linear_names(base))


def nf4_params(overrides, layer):
    params = build_parameters({**overrides, "speed": {"fast_dora": False}})
    params.quantization = "nf4"  # the key config.py will declare; read with getattr until then
    return params


@pytest.mark.slow
@pytest.mark.parametrize("combo", NF4_CASES, ids=lambda c: "+".join(c))
def test_nf4_combination_invariants(combo, world, quantized_base, tmp_path):
    layer, init, optimizer = combo
    base, tokenizer, features = world
    adapter, overrides = settings(layer, init, optimizer)
    params = nf4_params(overrides, layer)
    model = copy.deepcopy(base)
    cfg = resolve_config(model, LoraConfig(**adapter), "seq_cls")
    method = methods.choose_method(cfg, params)
    assert method.parts["base"] == "nf4" and method.NAME.startswith(("qlora", "nf4+"))
    assert method.check(model, cfg, params) == []
    batch = collate(features[:8], tokenizer.pad_token_id)
    quantized = copy.deepcopy(quantized_base)
    ref = logits(quantized, batch)
    assert (ref - logits(base, batch)).abs().max() > 1e-3  # the base really is quantised
    if combo == NF4_CASES[0]:  # NF4 quantisation is deterministic: the shared base equals a fresh one
        torch.testing.assert_close(ref, logits(quantize_linears(copy.deepcopy(base), linear_names(base)), batch))

    model, saver = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    assert saver is None
    fresh = logits(model, batch)
    if method.init.preserves_output:
        torch.testing.assert_close(fresh, ref, atol=1e-4, rtol=1e-4)
    else:  # LoftQ: every adapted layer starts nearer its float weight than NF4 alone
        from peft.utils.integrations import dequantize_bnb_weight

        from loralab.methods.common import lora_modules

        float_weights = dict(base.named_modules())
        for name, layer in lora_modules(model):
            q = layer.get_base_layer().weight
            err = float_weights[name.removeprefix("base_model.model.")].weight - dequantize_bnb_weight(q, q.quant_state).float()
            delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            assert torch.linalg.matrix_norm(err - delta) < torch.linalg.matrix_norm(err), name
    count_and_step(base, model, cfg, method, params, overrides, batch)

    trained = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    fresh = copy.deepcopy(quantized_base)  # NF4 quantisation is deterministic: the same base as a fresh one
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter"), batch), trained, atol=1e-4, rtol=1e-4)
    floats = PeftModel.from_pretrained(dequantized_copy(quantized), tmp_path / "adapter")
    torch.testing.assert_close(logits(floats.merge_and_unload(), batch), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "milora", "svd_lorafa"])
def test_nf4_refuses_inits_that_change_the_base(init):
    adapter, overrides = settings("lora", init, "adamw")
    params = nf4_params(overrides, "lora")
    cfg = LoraConfig(**adapter)
    problems = methods.choose_method(cfg, params).conflicts(cfg, params)
    assert any("'quantization' = 'nf4'" in p and ("'init'" in p or "init_lora_weights" in p) for p in problems), problems


def test_loftq_adapter_is_the_rank_r_fit_of_the_quantisation_error(world):
    """LoftQ (T = 1): s·B·A = the top-r SVD part of W − NF4(W), and the base is NF4(W)."""
    from peft.utils.integrations import dequantize_bnb_weight

    base, tokenizer, features = world
    adapter, overrides = settings("lora", "loftq", "adamw")
    params = nf4_params(overrides, "lora")
    model = copy.deepcopy(base)
    cfg = resolve_config(model, LoraConfig(**adapter), "seq_cls")
    method = methods.choose_method(cfg, params)
    assert method.NAME == "nf4+loftq" and method.check(model, cfg, params) == []
    W = dict(base.named_modules())["bert.encoder.layer.0.attention.self.query"].weight.detach()
    model, _ = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    layer = dict(model.named_modules())["base_model.model.bert.encoder.layer.0.attention.self.query"]
    q = layer.get_base_layer().weight
    Q = dequantize_bnb_weight(q, q.quant_state).float()
    u, s, vh = torch.linalg.svd(W - Q, full_matrices=False)
    fit = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(delta, fit, atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_norm(W - Q - delta) < torch.linalg.matrix_norm(W - Q)


def test_loftq_needs_nf4_and_one_alternation():
    adapter, overrides = settings("lora", "loftq", "adamw")
    cfg = LoraConfig(**adapter)
    params = build_parameters(overrides)
    assert any("needs 'quantization' = 'nf4'" in p for p in methods.choose_method(cfg, params).conflicts(cfg, params))
    from loralab.methods.loftq import INIT

    cfg = LoraConfig(**{**adapter, "loftq_config": {"loftq_bits": 4, "loftq_iter": 3}})
    assert any("'loftq_config.loftq_iter' = 3" in p for p in INIT.check(None, cfg, None))


def test_nf4_dora_needs_the_plain_dora_forward():
    adapter, overrides = settings("dora", "kaiming", "adamw")
    params = build_parameters(overrides)  # speed.fast_dora on (the default)
    params.quantization = "nf4"
    cfg = LoraConfig(**adapter)
    problems = methods.choose_method(cfg, params).conflicts(cfg, params)
    assert any("'speed.fast_dora': false" in p for p in problems), problems
