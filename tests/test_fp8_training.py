"""Evidence that the FP8 base trains like bf16 (issue 22, point 4, CPU side): loss curves of the
same LoRA run on a bf16 base and on the FP8 base (the real ``torch._scaled_mm`` kernel, which runs
on CPU in torch 2.13; no emulation needed), same seed, same batches, same init.

- MiniLM-L6 + SST-2 (``packaged:minilm-l6``, all 6 layers, LoRA r 8 on every linear layer, 12
  steps over 4 batches of 16 real sentences): slow since 2026-12-06 (~9 s, the fast subset's largest
  test, where that subset ran 112-126 s against its 2-minute limit); CI's full suite runs it.
- SmolLM2-135M + GSM8K (``packaged:smollm2-135m`` cut to its first 6 of 30 decoder layers, the
  full model being ~5x slower on CPU; LoRA r 8 all-linear, 6 steps over 2 batches of 4 real
  problems, 160 tokens): slow, ~36 s. Cut to 6 layers the model's loss starts near 14 (above
  uniform's 10.8): the comparison is of the same computation, not of a good model.

The tolerances and the measured differences are in each test's docstring; the yardstick printed
beside them is the same run in float32 vs bf16 (the issue's GPU criterion compares FP8 - bf16 with
bf16 - fp32)."""

import copy

import pytest
import torch
from peft import LoraConfig

from loralab import methods
from loralab.config import build_parameters
from loralab.data import collate
from loralab.methods.common import resolve_config
from loralab.methods.context import MethodContext
from loralab.models import load_model, load_tokenizer
from loralab.run.build import seed_everything
from loralab.tasks import get_task


def _world(model_id, kind, task, data_dir, n, max_length, layers=None):
    tokenizer = load_tokenizer(model_id)
    params = build_parameters({"task": task, "data_dir": str(data_dir), "max_length": max_length,
                               "max_train_samples": n, "model_id": model_id})
    features = get_task(task).load(params, tokenizer).train
    seed_everything(0)
    model = load_model(model_id, kind, 2, "float32")
    if layers is not None:  # a decoder's layers act one after another: fewer keep the comparison
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model, tokenizer, features


def curve(world, kind, quantization, dtype, steps, batch_size, lr, batches):
    """Training losses of LoRA (r 8, all-linear, AdamW at ``lr``) on ``world``'s base in ``dtype``
    (``quantization`` None or "fp8", quantised from that dtype): ``steps`` steps cycling over the
    first ``batches`` batches of ``batch_size`` examples (a few epochs, so the loss visibly falls)."""
    float_model, tokenizer, features = world
    model = copy.deepcopy(float_model).to(getattr(torch, dtype))
    params = build_parameters({"learning_rate": lr, "weight_decay": 0.0, "quantization": quantization,
                               "dtype": dtype, "speed": {"fast_dora": False, "fused_lora": False}})
    cfg = resolve_config(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"), kind)
    method = methods.choose_method(cfg, params)
    assert method.check(model, cfg, params) == []
    seed_everything(0)
    model, _ = method.apply(model, cfg, params, MethodContext(params, features, tokenizer))
    assert method.base_fallback == {}
    opt = method.make_optimizer(model, cfg, params)
    model.train()
    losses = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for step in range(steps):
        i = step % batches
        batch = collate(features[i * batch_size:(i + 1) * batch_size], pad)
        out = model(**batch)
        # the loss in float32 for every arm (a bf16 classifier's own loss is rounded to bf16's 2⁻⁸)
        loss = out.loss if kind == "causal_lm" else torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _compare(world, kind, steps, batch_size, lr, batches):
    runs = {name: curve(world, kind, q, dtype, steps, batch_size, lr, batches)
            for name, q, dtype in (("fp32", None, "float32"), ("bf16", None, "bfloat16"), ("fp8", "fp8", "bfloat16"))}
    fp8_gap = max(abs(a - b) for a, b in zip(runs["fp8"], runs["bf16"]))
    bf16_gap = max(abs(a - b) for a, b in zip(runs["bf16"], runs["fp32"]))
    print({k: [round(v, 4) for v in c] for k, c in runs.items()}, f"max |fp8-bf16| {fp8_gap:.4f}, max |bf16-fp32| {bf16_gap:.4f}")
    return runs, fp8_gap, bf16_gap


@pytest.mark.slow
def test_minilm_sst2_fp8_loss_curve_follows_bf16(data_dir, minilm_path):
    """MiniLM-L6 + SST-2: max |loss_fp8 − loss_bf16| < 0.03 over the 12 steps (measured 0.0087,
    at step 11, losses 0.69 → 0.04; bf16 − fp32: 0.0021; torch 2.13 CPU, 2026-12-05), and every curve goes down."""
    world = _world("packaged:minilm-l6", "seq_cls", "glue/sst2", data_dir, 64, 64)
    runs, fp8_gap, _ = _compare(world, "seq_cls", steps=12, batch_size=16, lr=2e-3, batches=4)
    assert fp8_gap < 0.03
    for losses in runs.values():
        assert max(losses[-4:]) < min(losses[:4])


@pytest.mark.slow
def test_smollm2_gsm8k_fp8_loss_curve_follows_bf16(data_dir, smollm2_path):
    """SmolLM2-135M (first 6 of 30 layers) + GSM8K SFT: max |loss_fp8 − loss_bf16| < 0.15 over
    the 6 steps (measured 0.055 on losses 13.9 → 11.9, 0.5 %; bf16 − fp32: 0.139; torch 2.13 CPU, 2026-12-05), and every
    curve goes down."""
    world = _world("packaged:smollm2-135m", "causal_lm", "gsm8k", data_dir, 8, 160, layers=6)
    runs, fp8_gap, _ = _compare(world, "causal_lm", steps=6, batch_size=4, lr=1e-3, batches=2)
    assert fp8_gap < 0.15
    for losses in runs.values():
        assert min(losses[-3:]) < losses[0]
