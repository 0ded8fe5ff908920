"""``speed.cudnn_attention``: cuDNN's SDPA kernel first for causal batches without a mask (speed/attention.py)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError, build_parameters
from loralab.speed.attention import CAUSAL_SDPA, CAUSAL_SDPA_CUDNN, cudnn_attention_pays
from loralab.speed.step import PLAIN, causal_lm_loss
from loralab.speed_settings import Speed


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _first_backend_seen(model, batch):
    """(the SDPA kernel order's first entry inside layer 0's attention, the attention implementation there, loss)."""
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda module, args, out: seen.append(
        (_cur_sdpa_kernel_backends(with_priority=True)[0], module.config._attn_implementation)))
    try:
        with torch.no_grad():
            loss, _ = causal_lm_loss(model, batch)
    finally:
        hook.remove()
    return seen[0][0], seen[0][1], loss.item()


def test_cudnn_goes_first_only_for_unmasked_batches_of_lengths_divisible_by_128_and_the_order_is_restored(smollm2):
    """With the setting on, an unmasked causal batch 128 tokens wide runs attention under its own implementation name
    with cuDNN's kernel first; a batch 130 wide, a masked batch (padding), a model with the setting off and a process
    that switched cuDNN's SDPA off keep torch's order; after each call torch's order is back; the losses agree."""
    model = smollm2
    ids = torch.arange(1, 1 + 2 * 130).reshape(2, 130) % 1000 + 200
    wide, aligned = {"input_ids": ids, "labels": ids}, {"input_ids": ids[:, :128], "labels": ids[:, :128]}
    before = _cur_sdpa_kernel_backends(with_priority=True)
    assert before[0] != SDPBackend.CUDNN_ATTENTION  # torch's own order on CPU
    try:
        model._loralab_speed = dataclasses.replace(PLAIN, cudnn_attention=True)
        first, implementation, on_loss = _first_backend_seen(model, aligned)
        assert (first, implementation) == (SDPBackend.CUDNN_ATTENTION, CAUSAL_SDPA_CUDNN)
        assert _cur_sdpa_kernel_backends(with_priority=True) == before
        assert _first_backend_seen(model, wide)[:2] == (before[0], CAUSAL_SDPA)  # 130: not a multiple of 128
        first, implementation, masked_loss = _first_backend_seen(model, {**aligned, "attention_mask": torch.ones_like(ids[:, :128])})
        assert (first, implementation) == (before[0], "sdpa")
        with torch.nn.attention.sdpa_kernel([b for b in before if b != SDPBackend.CUDNN_ATTENTION]):  # switched off
            assert _first_backend_seen(model, aligned)[:2] == (before[0], CAUSAL_SDPA)
        model._loralab_speed = PLAIN
        first, implementation, off_loss = _first_backend_seen(model, aligned)
        assert (first, implementation) == (before[0], CAUSAL_SDPA)
    finally:
        del model._loralab_speed
    assert on_loss == pytest.approx(masked_loss, rel=1e-5) and on_loss == pytest.approx(off_loss, rel=1e-6)


def test_auto_takes_cudnn_on_compute_capability_9_0_only(monkeypatch):
    """"auto" resolves on only for a CUDA device of compute capability 9.0 with cuDNN's SDPA on, and not where
    TORCH_CUDNN_SDPA_DEPRIORITIZED is set."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)
    for capability, expected in (((9, 0), True), ((8, 0), False), ((10, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert cudnn_attention_pays(cuda) is expected, capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert cudnn_attention_pays(cuda) is False
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED")
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    assert cudnn_attention_pays(cuda) is False
    assert cudnn_attention_pays(torch.device("cpu")) is False


def test_the_setting_resolves_per_device_and_task_and_bad_values_are_named():
    """auto: on for causal LMs on CUDA where the device's check says cuDNN's attention pays (Hopper, cuDNN >= 9.15.1),
    off elsewhere; an explicit false always wins; an explicit true holds on CUDA for causal LMs; a bad value is
    refused naming the key and what is allowed."""
    def resolved(value, device="cuda", kind="causal_lm", pays=True):
        speed = Speed(cudnn_attention=value)
        return speed.resolve(device_type=device, kind=kind, base_dtype="bfloat16", cudnn_pays=pays).cudnn_attention

    assert resolved("auto") is True and resolved("auto", pays=False) is False
    assert resolved(True, pays=False) is True and resolved(False) is False
    assert resolved("auto", device="cpu") is False and resolved(True, device="cpu") is False  # nothing to choose on CPU
    assert resolved(True, kind="seq_cls") is False  # classification batches carry masks
    assert cudnn_attention_pays(torch.device("cpu")) is False
    with pytest.raises(ConfigError, match=r"'speed.cudnn_attention' = 'yes' must be true, false or \"auto\""):
        build_parameters({"speed": {"cudnn_attention": "yes"}})


def test_compiled_layers_trace_again_for_batches_that_take_cudnn():
    """Compiled layers keep apart the code traced with cuDNN's kernel first and the code traced without: a batch that
    takes it after one that did not (the same shape) makes the layers trace again, and code traced with it is reused
    by the next such batch. torch.compile does not guard on SDPA's kernel order; it does on the implementation name."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (1, 128))
    torch._dynamo.reset()
    try:
        model.model.layers[0].compile(backend=counting)
        counts = []
        for cudnn in (False, True, True, False):
            model._loralab_speed = dataclasses.replace(PLAIN, cudnn_attention=cudnn)
            with torch.no_grad():
                causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert counts == [1, 2, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's attention kernel needs a GPU")
def test_compiled_layers_run_cudnn_attention_and_match_flash():
    """On CUDA, compiled Llama layers traced with cuDNN first run cuDNN's attention kernels (the profiler's names),
    and the loss and a projection's weight gradient match a run with cuDNN switched off (flash) within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile

    from loralab.speed.step import compile_layers

    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 256), device="cuda")
    results = []
    for cudnn in (True, False):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config).cuda().bfloat16()
        options = dataclasses.replace(PLAIN, compile=True, autocast="bfloat16", cudnn_attention=cudnn)
        model._loralab_speed = options
        compile_layers(model, options)
        no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # newer torch puts it first
        with profile(activities=[ProfilerActivity.CUDA]) as prof, \
                torch.nn.attention.sdpa_kernel(no_cudnn) if not cudnn else contextlib.nullcontext():
            loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            loss.backward()
            torch.cuda.synchronize()
        names = " ".join(e.key.lower() for e in prof.key_averages())
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.float()
        results.append((loss.float().item(), grad, "cudnn" in names, "flash" in names))
    (loss_c, grad_c, cudnn_ran, _), (loss_f, grad_f, cudnn_off, flash_ran) = results
    assert cudnn_ran and not cudnn_off and flash_ran
    assert loss_c == pytest.approx(loss_f, rel=2e-3)
    assert (grad_c - grad_f).norm() / grad_f.norm() < 2e-2
