"""Issue 12 item 6: methods are composed, not matched by first ``applies()``. The three failing
configurations of the issue, through ``loralab.run.build.build`` as a run sees them, plus the config
values derived from the registry."""

import json

import pytest
import torch
from peft import LoraConfig

from loralab import methods
from loralab.config import ConfigError, build_parameters
from loralab.experiment import checked_parameters, read_experiment
from loralab.run.build import build, seed_everything


def experiment(tmp_path, data_dir, adapter, params):
    folder = tmp_path / "experiments" / "case"
    folder.mkdir(parents=True)
    LoraConfig(target_modules=["query", "value"], lora_dropout=0.0, **adapter).save_pretrained(folder)
    overrides = {"task": "glue/rte", "data_dir": str(data_dir), "max_train_samples": 8, "max_eval_samples": 8,
                 "max_length": 32, "calibration": {"num_samples": 8}, **params}
    (folder / "training_parameters.json").write_text(json.dumps(overrides))
    return read_experiment(folder)


def test_pissa_with_lorafa_runs_lorafa_on_pissa(tmp_path, data_dir):
    """Was: PiSSA with AdamW on A (the optimizer ignored). Now: PiSSA's A frozen, peft's LoRA-FA."""
    seed_everything(0)
    exp = experiment(tmp_path, data_dir, {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}, {"optimizer": "lorafa"})
    built = build(exp)
    model, method, cfg = built.model, built.method, built.cfg
    assert method.NAME == "pissa+lorafa"
    assert method.parts == {"layer": "lora", "init": "pissa", "optimizer": "lorafa", "base": "float"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    optimizer = method.make_optimizer(model, cfg, exp.params)
    assert type(optimizer).__name__ == "LoraFAOptimizer"
    assert built.saver is not None  # residual init: saved as a rank-2r LoRA
    layer = dict(model.named_modules())["base_model.model.bert.encoder.layer.0.attention.self.query"]
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = layer.get_base_layer().weight + s * b @ a  # the original weight (residual + adapter)
    _, sv, vh = torch.linalg.svd(W, full_matrices=False)
    expected = (sv[:4] / s).sqrt()[:, None] * vh[:4]  # PiSSA: A = √(S_r/s)·V_rᵀ (signs are the SVD's)
    signs = torch.sign((a * expected).sum(1, keepdim=True))
    torch.testing.assert_close(a, signs * expected, atol=1e-4, rtol=1e-3)
    assert method.init_cost["seconds"] > 0


@pytest.mark.parametrize(
    "adapter, params, keys",
    [
        # was: OLoRA ran, the init key ignored
        ({"init_lora_weights": "olora"}, {"init": "svd_lorafa_corrected"}, ("'init' = 'svd_lorafa_corrected'", "'init_lora_weights' = 'olora'")),
        # was: recorded as lorafa
        ({"use_dora": True}, {"optimizer": "lorafa"}, ("'optimizer' = 'lorafa'", "'use_dora'")),
        ({"init_lora_weights": "mica"}, {}, ("'init_lora_weights' = 'mica'", "supported")),
        ({}, {"magnitude_only_modules": ["attention.output.dense"]}, ("'magnitude_only_modules'", "use_dora")),
    ],
    ids=["olora+svd_lorafa_corrected", "dora+lorafa", "unknown-peft-init", "magnitude-only-without-dora"],
)
def test_conflicting_parts_are_config_errors_naming_both_keys(tmp_path, data_dir, adapter, params, keys):
    with pytest.raises(ConfigError) as err:  # at reading (experiment.py) or at build, before training
        build(experiment(tmp_path, data_dir, {"r": 4, "lora_alpha": 8, **adapter}, params))
    for key in keys:
        assert key in str(err.value)


def test_config_values_come_from_the_registry():
    """'init' and 'optimizer' are checked against the methods registry when an experiment is read
    (loralab.experiment: config, a floor below the methods, knows no registry)."""
    assert "milora" in methods.PARAM_INITS and "loraplus" in methods.PARAM_OPTIMIZERS
    with pytest.raises(ConfigError) as err:
        checked_parameters({"init": "milorra", "optimizer": "lora_plus"})
    text = str(err.value)
    assert "did you mean 'milora'" in text and "did you mean 'loraplus'" in text
    assert "allowed: " + ", ".join(str(v) for v in methods.PARAM_INITS) in text
    assert "allowed: " + ", ".join(methods.PARAM_OPTIMIZERS) in text
    assert tuple(methods.PARAM_OPTIMIZERS) == tuple(methods.OPTIMIZERS)


def test_recorded_name_is_the_composition():
    cases = {
        ("lora", "kaiming", "adamw"): "lora",
        ("dora", "pissa", "adamw"): "dora+pissa",
        ("lora", "kaiming", "lorafa"): "lorafa",
        ("rslora", "eva", "loraplus"): "rslora+eva+loraplus",
    }
    adapters = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init_lora_weights": "pissa"},
                "eva": {"init_lora_weights": "eva", "eva_config": {}}}
    for (layer, init, opt), name in cases.items():
        cfg = LoraConfig(r=4, **adapters.get(layer, {}), **adapters.get(init, {}))
        method = methods.choose_method(cfg, build_parameters({"optimizer": opt}))
        assert method.NAME == name and method.parts == {"layer": layer, "init": init, "optimizer": opt, "base": "float"}
    assert methods.choose_method(None, build_parameters({})).NAME == "full"
