"""A trained CorDA KPA adapter, saved by its method's saver, reloads with plain peft on the untouched
base and carries exactly the trained weights.

Per adapted layer the trained model computes with W_res + s·B·A, where W_res is peft's ``corda_init``
residual W − s·B₀·A₀ rounded once to float32; the reloaded one with W + s·[B | −B₀]·[A ; A₀]. Both
taken in float64 must agree to that one rounding (and the float32 product B₀·A₀ inside it), whatever
the thread count. Checked on the weights, not on logits: after two Adam steps at lr 1e-2 KPA's
A = √(S/s)·(C⁻¹·Vh)ᵀ (norm ~1e3 on 8 calibration rows) makes the trained MiniLM so ill-conditioned
that half an fp32 ulp on its base weights moves a logit by 1.3e-3, so a logit comparison there
measures rounding order (thread count), not the saved adapter.
"""

import copy

import torch
from peft import LoraConfig, PeftModel

from loralab import methods
from loralab.config import build_parameters
from loralab.data import collate
from loralab.methods.common import lora_modules, resolve_config
from loralab.methods.context import MethodContext
from loralab.models import load_model, load_tokenizer
from loralab.run.build import seed_everything
from loralab.tasks import get_task

U = 2.0**-24  # float32 unit roundoff


def effective_weights(peft_model) -> dict[str, torch.Tensor]:
    """W + s·B·A of every LoRA layer, in float64."""
    out = {}
    for name, layer in lora_modules(peft_model):
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        out[name] = layer.get_base_layer().weight.double() + layer.scaling["default"] * (B @ A)
    return out


def test_saved_kpa_adapter_reloads_the_trained_weights(minilm_path, data_dir, tmp_path):
    seed_everything(0)
    base = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    base.bert.encoder.layer = base.bert.encoder.layer[:1]  # only layer 0 is adapted: 1 of 6 keeps it fast
    base.config.num_hidden_layers = 1
    tokenizer = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 32, "max_train_samples": 16,
                               "learning_rate": 1e-2, "weight_decay": 0.0, "calibration": {"num_samples": 8}})
    features = get_task("glue/rte").load(params, tokenizer).train
    raw = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["query", "value", "intermediate.dense"],
                     layers_to_transform=[0], init_lora_weights="corda", corda_config={"corda_method": "kpm"})
    model = copy.deepcopy(base)
    cfg = resolve_config(model, raw, "seq_cls")
    method = methods.choose_method(cfg, params)
    model, saver = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    initial = {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(),
                      layer.scaling["default"]) for name, layer in lora_modules(model)}
    assert max(a.norm() for a, _, _ in initial.values()) > 100  # KPA's C⁻¹-scaled A: the regime of the failure

    optimizer = method.make_optimizer(model, cfg, params)
    batch = collate(features[:8], tokenizer.pad_token_id)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = effective_weights(model)
    saver.save(model, tmp_path / "adapter")
    reloaded = effective_weights(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter"))

    assert sorted(reloaded) == sorted(trained) and len(trained) == 3
    for name, w in trained.items():
        A0, B0, s = initial[name]
        untouched = base.get_submodule(name.removeprefix("base_model.model.")).weight.double()
        assert (w - untouched).abs().max() > 1e-3, name  # training really changed the layer
        # residual rounding: ½ ulp of W_res, plus the float32 product s·B₀·A₀ (4 terms, then × s)
        bound = U * dict(lora_modules(model))[name].get_base_layer().weight.double().abs() \
            + 6 * U * s * (B0.double().abs() @ A0.double().abs()) + 1e-12
        assert ((reloaded[name] - w).abs() <= bound).all(), (name, (reloaded[name] - w).abs().max().item())

