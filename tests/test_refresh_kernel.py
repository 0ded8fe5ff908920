"""``speed.fp8_refresh_kernel``: what takes fast DoRA's refresh product ``W·Aᵀ`` from an FP8 base's codes
(speed/dora_refresh.use_refresh_kernel). On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py)."""

import os

import pytest
import torch
from fp8_dora_models import exact_dora_norms, fp8_dora_llama
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.methods.common import linear_names
from loralab.methods.fp8base import quantize_linears
from loralab.speed import dora_refresh, fast_dora
from loralab.speed.fp8 import fp8_layers
from loralab.speed.step import prepare_model
from loralab.speed_settings import Speed

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter (no CUDA)")


def _kept_and_exact(model):
    """Each layer-adapter's refreshed norm, and the float64 row norm of W + s·BA it stands for."""
    dora_refresh.refresh_dora_norms(model)
    kept = [m.lora_magnitude_vector[n]._loralab_norm.double() for m, n in fast_dora._fast_dora_adapters(model)]
    return kept, exact_dora_norms(model)


def _worst(kept, exact):
    return max(((a - e).abs() / e).max().item() for a, e in zip(kept, exact))


@interpreted
def test_the_triton_refresh_lands_on_the_exact_norms_and_auto_keeps_cublas_off_cuda(monkeypatch):
    """"triton" refreshes every layer (its groups apart from cuBLAS's) within 1e-6 of the exact norms, where the
    cuBLAS product's two FP8 terms of A leave them ~1e-4 away, with A stacked and the Gram a float32 bmm beside the
    products; "auto" picks cuBLAS on CPU even where the interpreter could run the kernel (it is for CUDA); the choice
    is set on every FP8 layer."""
    model = fp8_dora_llama()
    assert dora_refresh.use_refresh_kernel(model, "auto") == "cublas"
    assert {m.refresh_kernel for m in fp8_layers(model)} == {"cublas"}
    cublas = _worst(*_kept_and_exact(model))
    assert dora_refresh.use_refresh_kernel(model, "triton") == "triton"
    assert all(key[6] == "triton" for key in dora_refresh._refresh_groups(model))
    grams, given, products = [], [], dora_refresh._group_products
    monkeypatch.setattr(fast_dora, "_gram", lambda a, _gram=fast_dora._gram: grams.append(a.shape) or _gram(a))
    monkeypatch.setattr(dora_refresh, "_group_products", lambda members, a: given.append(a) or products(members, a))
    triton = _worst(*_kept_and_exact(model))
    assert triton < 1e-6 < 1e-5 < cublas < 1e-3, (triton, cublas)
    assert len(given) == 4 and len(grams) == 4  # q/o, k/v, gate/up, down
    assert all(isinstance(a, torch.Tensor) for a in given)


@interpreted
def test_bfloat16_lora_a_is_stacked_for_the_kernel_and_refreshes_alike(monkeypatch):
    """bfloat16 adapters' A's are stacked for the kernel as float32 ones are; the norms still land near the exact
    ones."""
    model = fp8_dora_llama()
    for m, n in fast_dora._fast_dora_adapters(model):
        m.lora_A[n].to(torch.bfloat16)
    dora_refresh.use_refresh_kernel(model, "triton")
    given, products = [], dora_refresh._group_products
    monkeypatch.setattr(dora_refresh, "_group_products", lambda members, a: given.append(a) or products(members, a))
    worst = _worst(*_kept_and_exact(model))
    assert all(isinstance(a, torch.Tensor) for a in given) and len(given) == 4 and worst < 1e-6


@interpreted
def test_prepare_model_records_the_kernel_it_set_and_an_explicit_one_wins():
    """``prepare_model`` settles "auto" from the layers (cuBLAS for CPU layers, whatever the device Speed was
    resolved for) and writes the kernel into the settings the record keeps; an explicit value wins; a model
    without FP8 layers records "cublas" (no "auto" left in a record)."""
    model = fp8_dora_llama()
    for device, given, kept in (("cpu", "auto", "cublas"), ("cuda", "auto", "cublas"), ("cpu", "triton", "triton")):
        speed = Speed(fp8_refresh_kernel=given, compile=False).resolve(device_type=device, kind="causal_lm",
                                                                       base_dtype="bfloat16")
        assert speed.fp8_refresh_kernel == ("auto" if (device, given) == ("cuda", "auto") else given if given != "auto"
                                            else "cublas")
        prepare_model(model, speed)
        assert speed.fp8_refresh_kernel == kept and speed.record()["fp8_refresh_kernel"] == kept
        assert {m.refresh_kernel for m in fp8_layers(model)} == {kept}
    plain = nn.Sequential(nn.Linear(4, 4))
    speed = Speed(compile=False).resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")
    assert speed.fp8_refresh_kernel == "auto"  # on CUDA only the layers settle it
    prepare_model(plain, speed)
    assert speed.fp8_refresh_kernel == "cublas"


def test_a_refresh_kernel_that_cannot_run_is_refused_with_the_key_the_value_and_the_way_out(monkeypatch):
    """A value outside the allowed ones, a layer the kernel cannot read (named), a device it cannot run on: each
    refused with the key and value, and no layer's kernel changed."""
    model = fp8_dora_llama(layers=1)
    assert dora_refresh.use_refresh_kernel(model, "cublas") == "cublas"
    with pytest.raises(ValueError, match="'speed.fp8_refresh_kernel' = 'cuda': allowed: auto, cublas, triton"):
        dora_refresh.use_refresh_kernel(model, "cuda")
    assert Speed.problems({**Speed().record(), "fp8_refresh_kernel": "fast"}) == [
        "'speed.fp8_refresh_kernel' = 'fast' is not allowed; allowed: auto, cublas, triton"]
    layer = fp8_layers(model)[1]
    shifted = torch.empty(layer.weight.numel() + 1, dtype=torch.uint8)[1:].view(layer.weight.shape)
    shifted.copy_(layer.weight)
    layer.weight = nn.Parameter(shifted, requires_grad=False)
    name = next(n for n, m in model.named_modules() if m is layer)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match=f"layer {name}'s codes are not contiguous and 16-byte aligned"):
            dora_refresh.use_refresh_kernel(model, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'speed.fp8_refresh_kernel' = 'triton': the Triton kernel runs on CUDA"):
        dora_refresh.use_refresh_kernel(model, "triton")
    speed = Speed(fp8_refresh_kernel="triton", compile=False).resolve(device_type="cpu", kind="causal_lm",
                                                                      base_dtype="bfloat16")
    with pytest.raises(RuntimeError, match="runs on CUDA"):  # prepare_model refuses it for fast DoRA layers...
        prepare_model(model, speed)
    torch.manual_seed(0)  # ... and keeps it, unused, where nothing refreshes (FP8-base LoRA)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    quantize_linears(llama, linear_names(llama))
    lora = get_peft_model(llama, LoraConfig(r=8, target_modules="all-linear"))
    prepare_model(lora, speed)
    assert speed.fp8_refresh_kernel == "triton"
    assert {m.refresh_kernel for m in fp8_layers(model)} == {"cublas"}
    assert dora_refresh.use_refresh_kernel(model, "auto") == "cublas"  # auto falls back, never refuses


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 layers on CUDA need compute capability >= 8.9")
def test_on_cuda_auto_takes_the_kernel_and_keeps_the_norms_eagerly_and_captured():
    """On an FP8 GPU "auto" takes the Triton kernel and its norms sit near the exact ones; replayed from a CUDA
    graph they are the eager refresh's bits."""
    model = fp8_dora_llama().cuda()
    assert dora_refresh.use_refresh_kernel(model, "auto") == "triton"
    kept, exact = _kept_and_exact(model)
    assert _worst(kept, exact) < 4e-5
    for m, n in fast_dora._fast_dora_adapters(model):
        m.lora_magnitude_vector[n]._loralab_norm.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dora_refresh.refresh_dora_norms(model)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [m.lora_magnitude_vector[n]._loralab_norm.double() for m, n in fast_dora._fast_dora_adapters(model)]
    assert all(torch.equal(a, b) for a, b in zip(kept, replayed, strict=True))


def test_an_explicit_triton_kernel_without_cuda_is_refused_before_the_build(monkeypatch):
    """Either FP8 Triton kernel named explicitly for a run on CPU ('device' "cpu", or "auto" where there is no
    CUDA) is a problem of the training parameters, with the key, the device and the way out, unless Triton's CPU
    interpreter is on; on CUDA, and for "auto" values, nothing is said."""
    from loralab.config import ConfigError, build_parameters

    speed = {"fp8_refresh_kernel": "triton", "fp8_quantize_kernel": "triton"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on a CUDA machine too, where tests/conftest.py leaves it unset
    assert build_parameters({"device": "cpu", "speed": speed}).speed["fp8_refresh_kernel"] == "triton"  # interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as err:
        build_parameters({"device": "cpu", "speed": speed})
    text = str(err.value)
    assert "'speed.fp8_refresh_kernel' = 'triton' runs on CUDA and 'device' = 'cpu': set it to 'auto'" in text
    assert "'speed.fp8_quantize_kernel' = 'triton' runs on CUDA and 'device' = 'cpu': set it to 'torch'" in text
    assert build_parameters({"device": "cuda", "speed": speed}).device == "cuda"
    assert build_parameters({"device": "cpu"}).speed["fp8_refresh_kernel"] == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'device' = 'auto', which finds none here"):
        build_parameters({"speed": {"fp8_refresh_kernel": "triton"}})


def test_bench_refuses_an_explicit_triton_kernel_without_cuda_before_its_first_row(monkeypatch):
    """``loralab bench --device cpu --speed fp8_refresh_kernel=triton`` exits naming the key, --device and the way
    out before any row is built (it had run the bf16 rows, then failed the FP8 row with a traceback)."""
    from loralab.bench import runner
    from loralab.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a row ran"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cpu", "--methods", "dora,fp8+dora", "--stacks", "loralab",
              "--speed", "fp8_refresh_kernel=triton"])
    assert str(exc.value) == ("--speed: 'speed.fp8_refresh_kernel' = 'triton' runs on CUDA and --device = 'cpu': "
                              "set it to 'auto' (or run with TRITON_INTERPRET=1, Triton's slow CPU interpreter)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the other Triton key, no --device, no GPU
    with pytest.raises(SystemExit, match=r"'speed.fp8_quantize_kernel' = 'triton' runs on CUDA and the device found \(no "
                                         r"--device\) = 'cpu': set it to 'torch'"):
        main(["bench", "--methods", "fp8+lora", "--stacks", "loralab", "--speed", "fp8_quantize_kernel=triton"])
