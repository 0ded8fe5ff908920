"""``speed.cudnn_attention``: cuDNN's SDPA kernel first for causal batches without a mask (speed/attention.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError, Speed, build_parameters
from loralab.speed.attention import CAUSAL_SDPA, cudnn_attention_pays
from loralab.speed.step import PLAIN, causal_lm_loss, cudnn_keyed_backend, prepare_model


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


def test_cudnn_goes_first_only_for_batches_without_a_mask_and_the_order_is_restored(smollm2):
    """With the setting on, an unmasked causal batch's attention runs with cuDNN's kernel first; a masked batch
    (padding) keeps torch's order, as does a model with the setting off; after each call torch's order is back."""
    model = smollm2
    ids = torch.tensor([[1, 504, 1115, 314, 253, 1437, 30, 198, 504, 1115], [1, 2066, 314, 253, 1437, 30, 198, 504, 1115, 314]])
    plain_batch = {"input_ids": ids, "labels": ids}
    masked_batch = {**plain_batch, "attention_mask": torch.ones_like(ids)}
    before = _cur_sdpa_kernel_backends(with_priority=True)
    assert before[0] != SDPBackend.CUDNN_ATTENTION  # torch's own order on CPU
    try:
        model._loralab_speed = dataclasses.replace(PLAIN, cudnn_attention=True)
        first, implementation, plain_loss = _first_backend_seen(model, plain_batch)
        assert (first, implementation) == (SDPBackend.CUDNN_ATTENTION, CAUSAL_SDPA)
        assert _cur_sdpa_kernel_backends(with_priority=True) == before
        first, implementation, masked_loss = _first_backend_seen(model, masked_batch)
        assert (first, implementation) == (before[0], "sdpa")
        model._loralab_speed = PLAIN
        first, _, off_loss = _first_backend_seen(model, plain_batch)
        assert first == before[0]
    finally:
        del model._loralab_speed
    assert plain_loss == pytest.approx(masked_loss, rel=1e-5) and plain_loss == pytest.approx(off_loss, rel=1e-6)


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


def test_compiled_layers_with_cudnn_first_get_their_own_backend_identity(monkeypatch):
    """Layers compiled with cuDNN's attention first compile with another backend object than layers without it, the
    same one for every such model in the process: torch.compile keys compiled code by its backend, not by SDPA's
    kernel order, so neither model reuses code traced under the other's order."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    backends = []
    monkeypatch.setattr(torch, "compile", lambda fn, *args, backend=None, **kwargs: backends.append(backend) or fn)
    for cudnn in (False, True, True):
        prepare_model(LlamaForCausalLM(config), dataclasses.replace(PLAIN, compile=True, cudnn_attention=cudnn,
                                                                    compile_backend="eager"))
    assert backends[:2] == ["eager", "eager"] and len(backends) == 6
    assert backends[2] is backends[4] is cudnn_keyed_backend("eager") and backends[2].__name__ == "eager@cudnn_attention"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's attention kernel needs a GPU")
def test_compiled_layers_run_cudnn_attention_and_match_flash():
    """On CUDA, compiled Llama layers traced with cuDNN first run cuDNN's attention kernels (the profiler's names),
    and the loss and the adapters' gradients match the flash kernel's run within bf16 rounding."""
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
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
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
