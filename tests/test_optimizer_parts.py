"""Issue 21, point 2: every optimizer part honours every optimizer setting. Each part (adamw, LoRA+,
LoRA-FA, and full fine-tuning's AdamW) is built as a training run builds it (``train.make_optimizer``
on the composed method), on the real MiniLM-L6 with a LoRA adapter, and its parameter groups are
compared with the recipe: learning rate (LoRA+: λ·lr for B and 1-D parameters), weight decay,
betas, eps, the ``no_decay`` rule and which parameters it updates. Behaviour: one step with zero
gradients moves a decayed parameter by exactly ``-lr·wd·p`` and leaves an exempt one alone; one
real step (a real RTE batch) with weight decay 0.1 differs from weight decay 0 (the failing input:
LoRA+ ignored ``weight_decay``)."""

import copy

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

PARTS = ["adamw", "loraplus", "lorafa", "full"]
# full fine-tuning (the slowest case, 1-2.3 s each) runs in the full suite only
FAST_PARTS = [p if p != "full" else pytest.param(p, marks=pytest.mark.slow) for p in PARTS]
SETTINGS = {
    "defaults": {},
    "decay 0.1, betas, eps": {"learning_rate": 3e-3, "weight_decay": 0.1,
                              "optimizer_options": {"betas": [0.8, 0.95], "eps": 1e-6}},
    "no decay on biases and norms": {"learning_rate": 1e-3, "weight_decay": 0.1,
                                     "optimizer_options": {"no_decay": ["bias", "norm"]}},
    "no decay on biases only": {"weight_decay": 0.05, "optimizer_options": {"no_decay": ["bias"]}},
}


@pytest.fixture(scope="module")
def world(minilm_path, data_dir):
    seed_everything(0)
    base = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 64, "max_train_samples": 8})
    return base, tok, get_task("glue/rte").load(params, tok).train


def _built(world, part: str, overrides: dict):
    """(model, optimizer, params) as the run path builds them (``loralab.run.build``)."""
    base, tok, features = world
    params = build_parameters({"max_length": 64, "optimizer": "adamw" if part == "full" else part, **overrides})
    model = copy.deepcopy(base)
    cfg = None
    if part != "full":
        cfg = resolve_config(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]),
                             "seq_cls")
    method = methods.choose_method(cfg, params)
    assert method.check(model, cfg, params) == []
    model, _ = method.apply(model, cfg, params, MethodContext(params, features, tok))
    return model, method.make_optimizer(model, cfg, params), params


def _expected(part: str, name: str, p, params) -> dict:
    """What the recipe says this parameter gets, written out independently of the code."""
    options = params.optimizer_options
    no_decay = options.get("no_decay", [])
    exempt = ("bias" in no_decay and name.endswith(".bias")) or ("norm" in no_decay and "LayerNorm" in name)
    lr = params.learning_rate
    if part == "loraplus" and ("lora_B" in name or p.ndim == 1):
        lr *= options.get("loraplus_lr_ratio", 16.0)
    return {"lr": pytest.approx(lr), "weight_decay": 0.0 if exempt else params.weight_decay,
            "betas": tuple(options.get("betas", (0.9, 0.999))), "eps": options.get("eps", 1e-8)}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("part", PARTS)
def test_parameter_groups_follow_the_recipe(world, part, setting):
    model, opt, params = _built(world, part, SETTINGS[setting])
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert name not in seen, f"{name} is in two groups"
            seen[name] = p
            got = {"lr": group["lr"], "weight_decay": group["weight_decay"], "betas": tuple(group["betas"]),
                   "eps": group["eps"]}
            if part == "lorafa" and "lora_A" in name:
                continue  # frozen A rides along: LoRA-FA's update pairs it with its B
            assert got == _expected(part, name, p, params), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = trainable | ({n for n in names.values() if "lora_A" in n} if part == "lorafa" else set())
    assert set(seen) == expected
    if part == "lorafa":
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    if part == "full":
        assert any("LayerNorm" in n for n in trainable)  # the norm rule has something to act on


@pytest.mark.parametrize("part", FAST_PARTS)
def test_weight_decay_moves_a_zero_gradient_parameter_by_lr_times_decay(world, part):
    """Zero gradients: Adam's own step is 0, so decayed parameters become p·(1 − lr·wd) exactly
    and exempt ones (biases, norms under ``no_decay``) stay; at weight decay 0 nothing moves."""
    after = {}
    for wd in (0.0, 0.1):
        overrides = {"learning_rate": 1e-2, "weight_decay": wd, "optimizer_options": {"no_decay": ["bias", "norm"]}}
        model, opt, params = _built(world, part, overrides)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # B starts at 0, where decay is invisible
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        after[wd] = {}
        for n, p in model.named_parameters():
            after[wd][n] = p.detach().clone()
            if not p.requires_grad:
                torch.testing.assert_close(p, before[n], rtol=0, atol=0)
                continue
            exempt = n.endswith(".bias") or "LayerNorm" in n
            factor = 1.0 if exempt or wd == 0 else 1.0 - lr_of[id(p)] * wd
            torch.testing.assert_close(p, before[n] * factor, rtol=1e-6, atol=1e-7, msg=f"{part} {n} at wd {wd}")
    moved = [n for n in after[0.0] if not torch.equal(after[0.0][n], after[0.1][n])]
    assert moved, "weight decay 0.1 gave the same parameters as 0"


@pytest.mark.parametrize("part", FAST_PARTS)
def test_a_real_step_at_weight_decay_0_1_differs_from_0(world, part):
    """The failing input: LoRA+ at weight decay 0.1 was bitwise identical to 0 after training."""
    from loralab.data import collate, pad_id

    base, tok, features = world
    batch = collate(features[:8], pad_id(tok))
    out = {}
    for wd in (0.0, 0.1):
        model, opt, _ = _built(world, part, {"learning_rate": 1e-3, "weight_decay": wd})
        model.train()
        for _ in range(2):  # the second step decays a B the first step made non-zero
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        out[wd] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    differ = [n for n in out[0.0] if not torch.equal(out[0.0][n], out[0.1][n])]
    lora_b = [n for n in out[0.0] if "lora_B" in n]
    assert set(lora_b) <= set(differ), f"{part}: weight decay did not reach {sorted(set(lora_b) - set(differ))[:3]}"
    assert differ


@pytest.mark.parametrize("options, needle", [
    ({"loraplus_lr_raito": 8}, "did you mean 'loraplus_lr_ratio'"),
    ({"betas": [0.9]}, "'optimizer_options.betas' = [0.9] must be two numbers"),
    ({"eps": 0}, "'optimizer_options.eps' = 0 must be a number > 0"),
    ({"no_decay": ["biases"]}, "must be a list of bias, norm"),
])
def test_bad_optimizer_options_are_config_problems(options, needle):
    params = build_parameters({"optimizer": "loraplus", "optimizer_options": options})
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query"])
    problems = methods.choose_method(cfg, params).conflicts(cfg, params)
    assert any(needle in p for p in problems), problems


def test_an_option_of_another_part_is_refused():
    params = build_parameters({"optimizer": "adamw", "optimizer_options": {"loraplus_lr_ratio": 8}})
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query"])
    problems = methods.choose_method(cfg, params).conflicts(cfg, params)
    assert any("not an option of optimizer 'adamw'" in p for p in problems), problems
    assert any("not an option of optimizer 'adamw'" in p for p in methods.choose_method(None, params).conflicts(None, params))
