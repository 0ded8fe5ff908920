"""Issue 15's methods against their definitions, on the real MiniLM-L6 and real RTE rows: MiLoRA's
formula, EVA's components against an exact PCA of the layer inputs, LoRA-GA's A against the SVD of
the full fine-tuning gradient, LoRA+'s learning-rate groups; a short real run per new method
lowers the loss; the held-out split of the GLUE train set."""

import copy
import json

import pytest
import torch
from peft import LoraConfig

from loralab import methods
from loralab.config import build_parameters
from loralab.methods.common import resolve_config
from loralab.methods.context import MethodContext
from loralab.models import load_model, load_tokenizer
from loralab.run.build import seed_everything
from loralab.tasks import get_task
from loralab.tasks.glue import check_holdout, holdout_split

QUERY0 = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def world(minilm_path, data_dir):
    seed_everything(0)
    base = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    for m in base.modules():  # no dropout: the references below recompute the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 64, "max_train_samples": 32})
    return base, tok, get_task("glue/rte").load(params, tok).train


def built(world, adapter, overrides):
    base, tok, features = world
    params = build_parameters({"max_length": 64, "calibration": {"num_samples": 32, "batch_size": 16}, **overrides})
    model = copy.deepcopy(base)
    cfg = resolve_config(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], **adapter), "seq_cls")
    method = methods.choose_method(cfg, params)
    assert method.check(model, cfg, params) == []
    ctx = MethodContext(params, features, tok)
    peft_model, saver = method.apply(model, cfg, params, ctx)
    layer = dict(peft_model.named_modules())[f"base_model.model.{QUERY0}"]
    return peft_model, layer, dict(base.named_modules())[QUERY0].weight, ctx


def test_milora_adapter_is_the_smallest_singular_triplets(world):
    _, layer, W, _ = built(world, {}, {"init": "milora"})
    s = layer.scaling["default"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, sv, vh = torch.linalg.svd(W, full_matrices=False)
    minor = u[:, -4:] @ torch.diag(sv[-4:]) @ vh[-4:]
    torch.testing.assert_close(s * B @ A, minor, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.get_base_layer().weight, W - minor, atol=1e-5, rtol=1e-4)
    # the split is PiSSA's: A = √(S/s)·Vᵀ, so its row norms are √(S_min/s)
    torch.testing.assert_close(A.norm(dim=1), (sv[-4:] / s).sqrt(), atol=1e-5, rtol=1e-4)


def _principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(a.T.double())
    qb, _ = torch.linalg.qr(b.T.double())
    return torch.linalg.svdvals(qa.T @ qb)


@pytest.mark.slow
def test_eva_components_are_the_top_principal_directions_of_the_layer_inputs(world):
    """rho = 1 (no redistribution): A = top-r principal components of the query inputs over the
    calibration tokens (pads excluded), here against an exact PCA of the very same inputs."""
    peft_model, layer, _, ctx = built(world, {"init_lora_weights": "eva", "eva_config": {"rho": 1.0, "tau": 0.999}}, {})
    base = world[0]
    seen = []
    handle = dict(base.named_modules())[QUERY0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for batch in ctx.calibration_batches():
            base(**{k: v for k, v in batch.items() if k != "labels"})
            seen[-1] = seen[-1][batch["attention_mask"].bool()]
    handle.remove()
    X = torch.cat(seen).double()
    _, _, vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    A = layer.lora_A["default"].weight
    assert torch.all(layer.lora_B["default"].weight == 0)
    # peft's incremental, randomized PCA stops once each component moves less than tau between
    # batches: the leading directions are exact, the r-th is approximate after two batches
    cosines = _principal_cosines(A, vh[:4])
    assert cosines[:2].min() > 0.99 and cosines.min() > 0.8, cosines


@pytest.mark.slow  # 1.5 s; the full suite runs it
def test_lora_ga_a_spans_the_top_right_singular_vectors_of_the_gradient(world):
    """A = V[:, :r]ᵀ of G = mean over calibration batches of dL/dW (peft's ArB2r); the base
    weight becomes W − s·B·A."""
    _, layer, W, ctx = built(world, {"init_lora_weights": "lora_ga", "lora_ga_config": {}}, {})
    model = copy.deepcopy(world[0])
    target = dict(model.named_modules())[QUERY0]
    grads = []
    for batch in ctx.calibration_batches(labels=True):
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append(target.weight.grad.clone())
    G = torch.stack(grads).mean(0)
    _, _, vh = torch.linalg.svd(G, full_matrices=False)
    A = layer.lora_A["default"].weight
    assert _principal_cosines(A, vh[:4]).min() > 0.99
    s = layer.scaling["default"]
    torch.testing.assert_close(layer.get_base_layer().weight + s * layer.lora_B["default"].weight @ A, W, atol=1e-5, rtol=1e-4)


def test_loraplus_gives_b_sixteen_times_the_learning_rate(world):
    peft_model, _, _, _ = built(world, {}, {"optimizer": "loraplus", "learning_rate": 1e-4})
    params = build_parameters({"optimizer": "loraplus", "learning_rate": 1e-4})
    opt = methods.choose_method(peft_model.peft_config["default"], params).make_optimizer(peft_model, None, params)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            if "lora_B" in names[id(p)]:
                assert group["lr"] == pytest.approx(16e-4)
            elif "lora_A" in names[id(p)]:
                assert group["lr"] == pytest.approx(1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["milora", "eva", "lora_ga", "loraplus"])
def test_short_real_run_lowers_the_loss(case, tmp_path, data_dir):
    from loralab.experiment import read_experiment
    from loralab.run import run_experiment

    adapter = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
    params = {"task": "glue/rte", "data_dir": str(data_dir), "max_train_samples": 16, "max_eval_samples": 8,
              "batch_size": 8, "max_length": 48, "learning_rate": 3e-3, "num_epochs": 6, "logging_steps": 2,
              "calibration": {"num_samples": 16}}
    adapter.update({"eva": {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
                    "lora_ga": {"init_lora_weights": "lora_ga", "lora_ga_config": {}}}.get(case, {}))
    params.update({"milora": {"init": "milora"}, "loraplus": {"optimizer": "loraplus", "learning_rate": 5e-4}}.get(case, {}))
    folder = tmp_path / "experiments" / case
    folder.mkdir(parents=True)
    LoraConfig(**adapter).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    record, _ = run_experiment(read_experiment(folder)).unwrap()
    losses = [m["train loss"] for m in record["train_info"]["metrics"] if "train loss" in m]
    assert record["run_info"]["method"] == {"milora": "milora", "eva": "eva", "lora_ga": "lora_ga", "loraplus": "loraplus"}[case]
    assert losses[-1] < 0.8 * losses[0], losses


def test_holdout_split_is_fixed_disjoint_and_leaves_dev_alone(data_dir, minilm_path):
    rows = [((f"s{i}",), i % 2) for i in range(100)]
    train, held = holdout_split(rows, 0.1, 0)
    assert len(held) == 10 and len(train) == 90 and not set(map(str, held)) & set(map(str, train))
    assert holdout_split(rows, 0.1, 0) == (train, held) and holdout_split(rows, 0.1, 1) != (train, held)

    tok = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 32})
    task = get_task("glue/rte")
    dev = task.load(params, tok)
    params.eval_split = "holdout"  # the keys config.py will declare; read with getattr until then
    held_out = task.load(params, tok)
    n = len(dev.train)
    assert len(held_out.eval) == round(0.1 * n) and len(held_out.train) == n - len(held_out.eval)
    assert held_out.provenance["eval"]["split"] == "holdout"
    assert {tuple(f["input_ids"]) for f in held_out.eval} <= {tuple(f["input_ids"]) for f in dev.train}
    assert check_holdout(params) == []
    params.eval_split, params.holdout_fraction = "test", 1.5
    problems = check_holdout(params)
    assert any("'eval_split' = 'test'" in p for p in problems) and any("'holdout_fraction' = 1.5" in p for p in problems)
