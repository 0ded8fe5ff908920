"""One invariant matrix over every method, on the real MiniLM-L6 encoder and real RTE data.

- a fresh adapter leaves the logits unchanged where the method claims so,
- after optimizer steps only the parameters the method trains have moved,
- trainable-parameter counts match the closed form,
- the saved adapter reloads with plain peft on the original base and gives the same logits.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel

from loralab.data import collate
from loralab.experiment import read_experiment
from loralab.methods.common import lora_modules
from loralab.models import load_model
from loralab.run.build import build, seed_everything

TARGETS = "all-linear"
ATTN = ["query", "key", "value", "attention.output.dense"]

# name -> (adapter_config kwargs or None, training_parameters overrides, output preserved at init?)
CASES = {
    "full": (None, {}, True),
    "lora": ({"r": 4, "lora_alpha": 8}, {}, True),
    "rslora": ({"r": 4, "lora_alpha": 8, "use_rslora": True}, {}, True),
    "dora": ({"r": 4, "lora_alpha": 8, "use_dora": True}, {}, True),
    "dora_magnitude_only": (
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["query", "key", "value"]},
        {"magnitude_only_modules": ["attention.output.dense", "intermediate.dense"]},
        True,
    ),
    "pissa": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}, {}, True),
    "pissa_niter": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_4"}, {}, True),
    "olora": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "olora"}, {}, True),
    "corda_ipa": ({"r": 4, "lora_alpha": 4, "init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}}, {}, True),
    # KPA's A is scaled by C^-1 (8 calibration rows here): at lr 1e-2 two Adam steps reach a state whose fp32 logits
    # differ from float64's by 1.3e-3, so no reload could meet 1e-4 (and the thread count changed the run itself);
    # at 1e-3 fp32 and float64 agree to 2.6e-6. The fragile setting's save is checked per layer in test_corda_reload.py.
    "corda_kpa": ({"r": 4, "lora_alpha": 4, "init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}},
                  {"learning_rate": 1e-3}, True),
    "lorafa": ({"r": 4, "lora_alpha": 8}, {"optimizer": "lorafa"}, True),
    "svd_lorafa": ({"r": 4, "lora_alpha": 1, "target_modules": ATTN}, {"init": "svd_lorafa"}, False),
    "svd_lorafa_corrected": ({"r": 4, "lora_alpha": 8}, {"init": "svd_lorafa_corrected"}, True),
    "lorafa_qr": ({"r": 4, "lora_alpha": 8, "target_modules": ATTN}, {"init": "lorafa_qr"}, True),
    "milora": ({"r": 4, "lora_alpha": 8}, {"init": "milora"}, True),
    "eva": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "eva", "eva_config": {"rho": 2.0}}, {}, True),
    "lora_ga": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "lora_ga", "lora_ga_config": {}}, {}, True),
    "loraplus": ({"r": 4, "lora_alpha": 8}, {"optimizer": "loraplus"}, True),
    "pissa_lorafa": ({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}, {"optimizer": "lorafa"}, True),
}


def make_experiment(root, name, adapter, overrides, data_dir):
    folder = root / "experiments" / name.split("_")[0] / name
    folder.mkdir(parents=True)
    if adapter is not None:
        kwargs = {"target_modules": TARGETS, "lora_dropout": 0.0, **adapter}
        LoraConfig(**kwargs).save_pretrained(folder)
    params = {
        "task": "glue/rte",
        "data_dir": str(data_dir),
        "max_train_samples": 16,
        "max_eval_samples": 16,
        "batch_size": 8,
        "max_length": 32,  # short rows keep the 17-case matrix fast on 2 CPU cores
        "learning_rate": 1e-2,
        "weight_decay": 0.0,
        "calibration": {"num_samples": 8},
        **overrides,
    }
    (folder / "training_parameters.json").write_text(json.dumps(params))
    return read_experiment(folder)


@pytest.fixture(scope="module")
def base_state(minilm_path):
    """The MiniLM sequence classifier with the head drawn from seed 0 (what build() draws too)."""
    seed_everything(0)
    return load_model("packaged:minilm-l6", "seq_cls", 2).state_dict()


def base_model(base_state):
    model = load_model("packaged:minilm-l6", "seq_cls", 2)
    model.load_state_dict(base_state)
    return model.eval()


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


A_FROZEN_INITS = ("svd_lorafa", "svd_lorafa_corrected", "lorafa_qr")


def a_frozen(overrides) -> bool:
    return overrides.get("optimizer") == "lorafa" or overrides.get("init") in A_FROZEN_INITS


def expected_trainable(model, name, adapter, overrides, ranks=None):
    """Closed form: LoRA r·(in+out) per adapted layer, DoRA + out, LoRA-FA only B (r·out);
    magnitude-only modules out; plus the fully trained head (classifier and pooler). ``ranks``:
    per-layer ranks where the init redistributes them (EVA), else r everywhere."""
    from loralab.methods.common import head_modules, linear_names

    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in head_modules(model) or ".pooler." in f".{n}")
    if adapter is None:
        return sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    targets = adapter.get("target_modules", TARGETS)
    names = linear_names(model) if targets == "all-linear" else [n for n in linear_names(model) if any(n.endswith(t) for t in targets)]
    total = head
    for n in names:
        lin = modules[n]
        r = ranks[n] if ranks is not None else adapter["r"]
        total += r * lin.out_features + (0 if a_frozen(overrides) else r * lin.in_features)
        if adapter.get("use_dora"):
            total += lin.out_features
    for n in linear_names(model):
        if any(n.endswith(t) for t in overrides.get("magnitude_only_modules", [])):
            total += modules[n].out_features
    return total


# the fast subset keeps one case per kind (plain, weight-decomposed, frozen-A); the rest run in the full suite
FAST_CASES = {"lora", "dora", "svd_lorafa"}


@pytest.mark.parametrize("name", [n if n in FAST_CASES else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_method_invariants(name, tmp_path, data_dir, base_state):
    adapter, overrides, preserves = CASES[name]
    exp = make_experiment(tmp_path, name, adapter, overrides, data_dir)
    base = base_model(base_state)
    seed_everything(0)
    built = build(exp)
    model, saver, method, cfg = built.model, built.saver, built.method, built.cfg
    batch = collate(built.data.train[:8], built.tokenizer.pad_token_id)

    # 1. a fresh adapter leaves the logits unchanged where the method claims so
    ref = logits(base, batch)
    out = logits(model, batch)
    if preserves:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:  # seed 003's SVD init as written adds (1/r)·B·A on top of W
        assert (out - ref).abs().max() > 1e-3

    # 2. trainable-parameter count matches the closed form
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = None
    if name == "eva":  # EVA redistributes the budget r·layers by explained variance
        ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in lora_modules(model)}
        assert sum(ranks.values()) == adapter["r"] * len(ranks) and len(set(ranks.values())) > 1
    assert trainable == expected_trainable(base, name, adapter, overrides, ranks)

    # 3. two optimizer steps move exactly the trainable parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = method.make_optimizer(model, cfg, exp.params)
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapter is None:
        assert len(moved) > 0.9 * len(trainable_names)
    else:
        assert moved <= trainable_names, f"frozen parameters moved: {sorted(moved - trainable_names)[:3]}"
        lora_b = {n for n in trainable_names if "lora_B" in n}
        assert lora_b <= moved or overrides.get("magnitude_only_modules"), "lora_B did not move"
        if a_frozen(overrides):
            assert not any("lora_A" in n for n in moved), "LoRA-FA must keep A fixed"
        if overrides.get("magnitude_only_modules"):
            mag_only = [n for n in moved if "attention.output.dense" in n or "intermediate.dense" in n]
            assert mag_only and all("lora_magnitude_vector" in n for n in mag_only)

    # 4. the saved adapter reloads with plain peft on the untouched base and gives the same logits
    trained = logits(model, batch)
    out_dir = tmp_path / "saved"
    if saver is not None:
        saver.save(model, out_dir)
    else:
        model.save_pretrained(out_dir)
    if adapter is None:
        reloaded = load_model(str(out_dir), "seq_cls", 2)
    else:
        reloaded = PeftModel.from_pretrained(base_model(base_state), out_dir)
        saved_cfg = json.loads((out_dir / "adapter_config.json").read_text())
        # plain LoRA weights; EVA keeps peft's own "eva" tag (loading never re-runs its init)
        assert saved_cfg["init_lora_weights"] in (True, "eva" if name == "eva" else True)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-4, rtol=1e-4)

    # 5. merging the trained adapter into the weights gives the same logits
    if adapter is not None:
        torch.testing.assert_close(logits(model.merge_and_unload(), batch), trained, atol=1e-4, rtol=1e-4)


def test_corda_kpa_and_ipa_pick_smallest_and_largest(tmp_path, data_dir, base_state):
    """KPA's adapter carries the smallest singular values of W·C, IPA's the largest."""
    norms = {}
    for name in ("corda_ipa", "corda_kpa"):
        adapter, overrides, _ = CASES[name]
        adapter = {**adapter, "target_modules": ["query"]}  # only layer 0's query is looked at
        exp = make_experiment(tmp_path / name, name, adapter, overrides, data_dir)
        seed_everything(0)
        model = build(exp).model
        layer = dict(model.named_modules())["base_model.model.bert.encoder.layer.0.attention.self.query"]
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        norms[name] = torch.linalg.matrix_norm(delta, ord=2).item()
    assert norms["corda_ipa"] > 10 * norms["corda_kpa"]


def built_layer_and_base_weight(tmp_path, data_dir, base_state, case, module):
    """The method's layer ``module`` after ``build`` and the untouched base model's weight there."""
    adapter, overrides, _ = CASES[case]
    seed_everything(0)
    model = build(make_experiment(tmp_path, case, adapter, overrides, data_dir)).model
    layer = dict(model.named_modules())[f"base_model.model.{module}"]
    return layer, dict(base_model(base_state).named_modules())[module].weight


def test_svd_lorafa_as_written_matches_seed_formula(tmp_path, data_dir, base_state):
    """A = (U_r S_r)ᵀ and B = first r columns of Vh, W unchanged: seed 003's code, transposes included."""
    layer, W = built_layer_and_base_weight(tmp_path, data_dir, base_state, "svd_lorafa", "bert.encoder.layer.1.attention.self.key")
    u, s, vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.lora_A["default"].weight, (u[:, :4] * s[:4]).T)
    torch.testing.assert_close(layer.lora_B["default"].weight, vh[:, :4])
    torch.testing.assert_close(layer.get_base_layer().weight, W)
    assert layer.scaling["default"] == pytest.approx(1 / 4)


def test_svd_lorafa_corrected_is_rank_r_part(tmp_path, data_dir, base_state):
    layer, W = built_layer_and_base_weight(tmp_path, data_dir, base_state, "svd_lorafa_corrected",
                                           "bert.encoder.layer.0.intermediate.dense")
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    rank_r = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(delta, rank_r, atol=1e-4, rtol=1e-4)
