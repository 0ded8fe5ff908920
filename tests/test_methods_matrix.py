"""The invariant matrix over every (layer, init, optimizer) combination the registry says composes,
and the refusal of every one it says does not (ARCHITECTURE.md point 1, issue 12 item 5).

Per combination, on the real MiniLM-L6 classifier and real RTE rows (two encoder layers adapted
to stay fast): a fresh adapter leaves the logits unchanged where the init claims so; the
trainable-parameter count matches the closed form; one optimizer step moves exactly the
trainable parameters (A stays where the init or optimizer freezes it); the saved adapter reloads
with plain ``PeftModel.from_pretrained`` on the untouched base with equal logits; merging gives
the logits of the unmerged model.
"""

import copy
import itertools

import pytest
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

TARGETS = ["query", "value", "intermediate.dense"]
SQUARE = ["query", "value"]
LAYERS = [0, 1]
R = 2

LAYER_SETTINGS = {  # layer -> (adapter kwargs, training parameters)
    "lora": ({}, {}),
    "rslora": ({"use_rslora": True}, {}),
    "dora": ({"use_dora": True}, {}),
    "dora_magnitude_only": ({"use_dora": True, "target_modules": SQUARE}, {"magnitude_only_modules": ["attention.output.dense"]}),
}
INIT_EXTRA = {  # init -> what it needs beyond selecting it (peft's per-init config blocks, square layers)
    "corda": ({"corda_config": {"corda_method": "ipm"}}, {}),
    "eva": ({"eva_config": {"rho": 2.0}}, {}),
    "lora_ga": ({"lora_ga_config": {}}, {}),
    "svd_lorafa": ({"target_modules": SQUARE, "lora_alpha": 1}, {}),
    "loftq": ({"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, {}),
}


def init_settings(name: str) -> tuple[dict, dict]:
    """(adapter kwargs, training parameters) selecting a registered init: its registry key and first
    value (``init_lora_weights`` in the adapter config, or ``init`` in the training parameters),
    plus ``INIT_EXTRA``. A new init registered in ``loralab.methods.INITS`` joins the matrix without
    an edit here unless it needs a config block of its own."""
    part = methods.INITS[name]
    adapter, params = ({"init_lora_weights": part.values[0]}, {}) if part.key == "init_lora_weights" else ({}, {"init": name})
    extra_adapter, extra_params = INIT_EXTRA.get(name, ({}, {}))
    return {**adapter, **extra_adapter}, {**params, **extra_params}


def test_every_registered_part_has_settings():
    assert set(LAYER_SETTINGS) == set(methods.LAYERS)
    assert set(INIT_EXTRA) <= set(methods.INITS)
    for name, part in methods.INITS.items():  # the derived settings select the part they were derived from
        adapter, params = init_settings(name)
        value = adapter.get("init_lora_weights", True) if part.key == "init_lora_weights" else params.get("init")
        assert part.matches(value), (name, value)


def settings(layer, init, optimizer):
    adapter = {"r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0, "target_modules": TARGETS, "layers_to_transform": LAYERS}
    params = {"task": "glue/rte", "max_length": 32, "learning_rate": 1e-2, "weight_decay": 0.0,
              "calibration": {"num_samples": 8, "batch_size": 8}, "optimizer": optimizer}
    for a, p in (init_settings(init), LAYER_SETTINGS[layer]):
        adapter.update(a)
        params.update(p)
    return adapter, params


@pytest.fixture(scope="module")
def world(minilm_path, data_dir):
    seed_everything(0)
    base = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    tokenizer = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 32, "max_train_samples": 16})
    data = get_task("glue/rte").load(params, tokenizer)
    return base, tokenizer, data.train


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def closed_form(base, model, cfg, method) -> int:
    """Head (classifier + pooler, trained fully) + per adapted layer r·out (B) + r·in (A unless
    frozen) + out (DoRA magnitude); magnitude-only modules add out only."""
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith(("classifier.", "bert.pooler.")))
    frozen_a = method.init.freezes_a or method.optimizer.freezes_a
    total = head
    mag_only = getattr(method, "_mag_only", set())
    for name, layer in lora_modules(model):
        base_layer = layer.get_base_layer()
        out_f, in_f = base_layer.out_features, base_layer.in_features
        if any(name.endswith(m) for m in mag_only):
            total += out_f
            continue
        r = layer.r["default"]
        total += r * out_f + (0 if frozen_a else r * in_f) + (out_f if method.layer.name.startswith("dora") else 0)
    return total


def count_and_step(base, model, cfg, method, params, overrides, batch) -> set[str]:
    """The trainable-parameter count equals the closed form, and one optimizer step (the method's
    own optimizer) moves only trainable parameters, some B or magnitude among them. Returns the
    names of the trainable parameters. Shared by the float, NF4 and FP8 matrices."""
    method._mag_only = set(overrides.get("magnitude_only_modules", []))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == closed_form(base, model, cfg, method)
    optimizer = method.make_optimizer(model, cfg, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)[:3]}"
    assert any("lora_B" in n or "magnitude" in n for n in moved)
    return trainable


@pytest.mark.slow
@pytest.mark.parametrize("combo", methods.combinations(), ids=lambda c: "+".join(c))
def test_combination_invariants(combo, world, tmp_path):
    layer, init, optimizer = combo
    base, tokenizer, features = world
    adapter, overrides = settings(layer, init, optimizer)
    params = build_parameters({**overrides, "data_dir": None})
    raw = LoraConfig(**adapter)
    model = copy.deepcopy(base)
    cfg = resolve_config(model, raw, "seq_cls")
    method = methods.choose_method(cfg, params)
    assert (method.layer.name, method.init.name, method.optimizer.name) == combo
    assert method.check(model, cfg, params) == []
    batch = collate(features[:8], tokenizer.pad_token_id)
    ref = logits(base, batch)

    seed_everything(0)
    model, saver = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    assert method.init_cost["seconds"] >= 0
    fresh = logits(model, batch)
    if method.init.preserves_output:
        torch.testing.assert_close(fresh, ref, atol=1e-4, rtol=1e-4)
    else:
        assert (fresh - ref).abs().max() > 1e-4

    trainable = count_and_step(base, model, cfg, method, params, overrides, batch)
    if method.init.freezes_a or method.optimizer.freezes_a:
        assert not any("lora_A" in n for n in trainable)

    trained = logits(model, batch)
    out_dir = tmp_path / "adapter"
    (saver.save if saver is not None else lambda m, d: m.save_pretrained(d))(model, out_dir)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out_dir)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(model.merge_and_unload(), batch), trained, atol=1e-4, rtol=1e-4)


REFUSED = [c for c in itertools.product(methods.LAYERS, methods.INITS, methods.OPTIMIZERS) if methods.refusal(*c)]


@pytest.mark.parametrize("combo", REFUSED, ids=lambda c: "+".join(c))
def test_refused_combination_names_both_keys(combo):
    """No model needed: the refusal is a config error that names the two parts' keys."""
    layer, init, optimizer = combo
    adapter, overrides = settings(layer, init, optimizer)
    params = build_parameters(overrides)
    cfg = LoraConfig(**adapter)
    method = methods.choose_method(cfg, params)
    problems = method.conflicts(cfg, params)
    assert len(problems) >= 1
    text = " ".join(problems)
    assert "does not compose" in text
    keys = {
        "layer": {"dora": "use_dora", "dora_magnitude_only": "magnitude_only_modules", "rslora": "use_rslora"},
        "init": {n: ("'init'" if p.key == "init" else "'init_lora_weights'") for n, p in methods.INITS.items()},
        "optimizer": {n: "'optimizer'" for n in methods.OPTIMIZERS},
    }
    named = [keys["layer"].get(layer), keys["init"][init] if init != "kaiming" else None,
             keys["optimizer"][optimizer] if optimizer != "adamw" else None]
    named = [k for k in named if k]
    assert len(named) >= 2 and sum(k in text for k in named) >= 2, text
