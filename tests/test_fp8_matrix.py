"""The FP8 base (``quantization: "fp8"``, methods/fp8base.py) in the invariant matrix: every
registered (layer, init, optimizer) either composes on it (``methods.fp8_combinations()``, run
here) or is refused at validation naming both keys (every init defined on another base: the
residual inits need the float W, LoftQ needs NF4).

Per combination, on the real MiniLM-L6 and real RTE rows (as tests/test_methods_matrix.py): the
base really is FP8; the fresh adapter leaves the FP8 model's logits unchanged; the trainable
count matches the closed form; one step moves exactly the trainable parameters; the saved adapter
reloads with plain ``PeftModel.from_pretrained`` on a freshly FP8-quantised original base with
equal logits (the quantisation is deterministic); merging into the dequantised base (codes ·
scale) in float32 equals the trained model with its FP8 layers dequantised (the weights it trained
with; the FP8 forward differs from that by its activation rounding, which a merged checkpoint does
not carry). Then ``loralab merge`` of an FP8 adapter: exact, and refused on another base."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from test_merge import CLS_TOL, _cli_merge, _save_like_train, _train_with_method, mini, run_quantized_sst2  # noqa: F401
from test_methods_matrix import count_and_step, logits, settings, world  # noqa: F401  (shared fixtures)
from transformers import AutoModelForSequenceClassification

from loralab import methods
from loralab.config import build_parameters
from loralab.data import collate
from loralab.methods.common import linear_names, resolve_config
from loralab.methods.context import MethodContext
from loralab.methods.fp8base import quantize_linears
from loralab.methods.qlora import dequantized_copy
from loralab.speed.fp8 import Fp8Linear

FP8_CASES = [c for c in methods.fp8_combinations()
             if c[2] == methods.DEFAULTS["optimizer"] or c[:2] == (methods.DEFAULTS["layer"], methods.DEFAULTS["init"])]
"""Every layer with every init that composes on FP8 (both touch the base layer: DoRA's norm and the
data-driven inits read it), each optimizer once on LoRA/kaiming: the FP8 base changes the frozen
layer only, and every optimizer's pairing with each layer and init is run on the float base
(tests/test_methods_matrix.py); ``test_every_fp8_part_is_run`` checks no part is left out."""
FAST = {("dora", "kaiming", "adamw")}  # the fast subset keeps the case that composes most (2026-12-06: it ran over 2 min)
ACTIVATION_TOL = 0.01
"""Max |logit| difference allowed between the FP8 forward and the same weights unquantised (merge test: measured 0.0003)."""


def fp8_params(overrides):
    return build_parameters({**overrides, "quantization": "fp8"})  # speed defaults: fast DoRA on


@pytest.fixture(scope="module")
def fp8_base(world):
    model = copy.deepcopy(world[0])
    quantize_linears(model, linear_names(model))
    return model


def test_every_fp8_part_is_run():
    composing = methods.fp8_combinations()
    for kind in range(3):
        assert {c[kind] for c in FP8_CASES} == {c[kind] for c in composing}


def _cases():
    return [pytest.param(c, id="+".join(c), marks=() if c in FAST else pytest.mark.slow) for c in FP8_CASES]


@pytest.mark.parametrize("combo", _cases())
def test_fp8_combination_invariants(combo, world, fp8_base, tmp_path):
    layer, init, optimizer = combo
    base, tokenizer, features = world
    adapter, overrides = settings(layer, init, optimizer)
    params = fp8_params(overrides)
    model = copy.deepcopy(base)
    cfg = resolve_config(model, LoraConfig(**adapter), "seq_cls")
    method = methods.choose_method(cfg, params)
    assert method.parts["base"] == "fp8" and method.NAME.startswith("fp8+")
    assert method.check(model, cfg, params) == []
    batch = collate(features[:8], tokenizer.pad_token_id)
    quantized = copy.deepcopy(fp8_base)
    ref = logits(quantized, batch)
    assert (ref - logits(base, batch)).abs().max() > 1e-3  # the base really is FP8

    model, saver = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    assert saver is None and method.base_fallback == {}
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == len(linear_names(base))
    torch.testing.assert_close(logits(model, batch), ref, atol=1e-5, rtol=1e-5)
    count_and_step(base, model, cfg, method, params, overrides, batch)

    trained = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(fp8_base), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-6, rtol=1e-6)
    weights_trained = logits(dequantized_copy(model), batch)  # the trained weights, activations unrounded
    floats = PeftModel.from_pretrained(dequantized_copy(quantized), tmp_path / "adapter")
    torch.testing.assert_close(logits(floats.merge_and_unload(), batch), weights_trained, atol=1e-4, rtol=1e-4)


REFUSED_INITS = [n for n, p in methods.INITS.items() if p.base != "any"]


@pytest.mark.parametrize("init", REFUSED_INITS)
def test_fp8_refuses_inits_defined_on_another_base_naming_both_keys(init):
    adapter, overrides = settings("lora", init, "adamw")
    params = fp8_params(overrides)
    cfg = LoraConfig(**adapter)
    problems = methods.choose_method(cfg, params).conflicts(cfg, params)
    key = "'init'" if methods.INITS[init].key == "init" else "init_lora_weights"
    assert any("'quantization'" in p and "'fp8'" in p and key in p for p in problems), problems


def test_every_combination_composes_on_fp8_or_is_refused():
    """The matrix is complete: each (layer, init, optimizer) the float base takes is either run on
    FP8 (``methods.fp8_combinations()``, whose covering set runs above) or refused with the
    quantization key named."""
    for combo in methods.combinations():
        if combo in methods.fp8_combinations():
            continue
        adapter, overrides = settings(*combo)
        params = fp8_params(overrides)
        cfg = LoraConfig(**adapter)
        problems = methods.choose_method(cfg, params).conflicts(cfg, params)
        assert any("'quantization' = 'fp8'" in p for p in problems), (combo, problems)


def test_fp8_refuses_the_fused_matmul_and_takes_fast_dora():
    """The fused LoRA matmul reads a float base weight: refused. Fast DoRA has an FP8 norm
    (codes times per-channel scales, tests/test_fast_dora.py): it composes; on NF4 it is refused."""
    adapter, overrides = settings("dora", "kaiming", "adamw")
    params = build_parameters({**overrides, "quantization": "fp8", "speed": {"fast_dora": True, "fused_lora": True}})
    cfg = LoraConfig(**adapter)
    text = " ".join(methods.choose_method(cfg, params).conflicts(cfg, params))
    assert "'speed.fused_lora': false" in text and "fast_dora" not in text
    nf4 = build_parameters({**overrides, "quantization": "nf4", "speed": {"fast_dora": True}})
    assert "'speed.fast_dora': false" in " ".join(methods.choose_method(cfg, nf4).conflicts(cfg, nf4))


def test_unknown_quantization_is_refused_with_the_allowed_values():
    adapter, overrides = settings("lora", "kaiming", "adamw")
    params = build_parameters({**overrides, "quantization": "fp4"})
    cfg = LoraConfig(**adapter)
    assert any("allowed: null, nf4, fp8" in p for p in methods.choose_method(cfg, params).conflicts(cfg, params))


# ---- loralab merge of an FP8 adapter ---------------------------------------------------------------
@pytest.fixture
def fp8_adapter(mini, tmp_path):
    """A LoRA adapter trained 2 steps on the 2-layer MiniLM's FP8 base, saved as loralab run saves it."""
    base_dir, float_base, tokenizer, features = mini
    adapter, overrides = settings("lora", "kaiming", "adamw")
    params = fp8_params(overrides)
    model = copy.deepcopy(float_base)
    cfg = resolve_config(model, LoraConfig(**adapter), "seq_cls")
    batch = collate(features[:8], tokenizer.pad_token_id)
    model, saver, method = _train_with_method(model, cfg, params, features, tokenizer, batch)
    _save_like_train(model, saver, tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", model, batch


def test_fp8_adapter_merges_into_the_dequantised_base(fp8_adapter, tmp_path):
    base_dir, adapter, model, batch = fp8_adapter
    record = json.loads((adapter / "loralab_base.json").read_text())
    assert record["base"] == "fp8" and record["quantization"]["format"] == "float8_e4m3fn"
    assert record["fallback"] == {} and "bert.encoder.layer.0.attention.self.query" in record["modules"]
    assert _cli_merge(base_dir, adapter, tmp_path / "merged") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = dequantized_copy(model).eval()(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, want, **CLS_TOL)
        gap = (model(**inputs).logits - want).abs().max()
        print(f"FP8 forward vs its dequantised weights: max logit difference {gap:.4f}")
        assert gap < ACTIVATION_TOL


def test_fp8_adapter_on_another_base_exits_2(fp8_adapter, mini, tmp_path, capsys):
    _, adapter, _, _ = fp8_adapter
    _, float_base, tokenizer, _ = mini
    other = copy.deepcopy(float_base)
    with torch.no_grad():
        other.bert.encoder.layer[1].output.dense.weight[3].mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    assert _cli_merge(tmp_path / "other", adapter, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "FP8 base" in err and "bert.encoder.layer.1.output.dense" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_loralab_run_with_an_fp8_base_records_it_and_merges(tmp_path, data_dir, monkeypatch, minilm_path):
    """``loralab run`` with quantization fp8 trains (method fp8+lora), saves loralab_base.json with
    base fp8, and ``loralab merge`` of that adapter gives what the adapter computes on the
    dequantised FP8 base."""
    from peft import PeftModel

    from loralab.models import load_model, load_tokenizer

    record, adapter = run_quantized_sst2(tmp_path, data_dir, monkeypatch, "fp8")
    assert record["run_info"]["method"] == "fp8+lora" and record["run_info"]["method_parts"]["base"] == "fp8"
    base_record = json.loads((Path(adapter) / "loralab_base.json").read_text())
    assert base_record["base"] == "fp8" and base_record["fallback"] == {}
    assert _cli_merge("packaged:minilm-l6", adapter, tmp_path / "merged") == 0

    tokenizer = load_tokenizer("packaged:minilm-l6")
    rows = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    model = load_model("packaged:minilm-l6", "seq_cls", 2)
    quantize_linears(model, linear_names(model))
    unmerged = PeftModel.from_pretrained(dequantized_copy(model), adapter).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**rows).logits, unmerged(**rows).logits, **CLS_TOL)
