"""The run path's own pieces (``loralab.run``): the speed settings' defaults and auto resolution
(``config.Speed``), the one step factory (``run.step.make_step``) and the outcome of a run as a value."""

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError, Speed, _speed_defaults, build_parameters
from loralab.methods.lora import ADAMW
from loralab.run.record import Cancelled, Outcome
from loralab.run.step import make_step


def test_experiment_speed_defaults_are_unchanged():
    """The experiment's ``speed`` dict is hashed (``train_params_sha``): its keys, order and values
    stay what they were before the settings became one dataclass."""
    assert _speed_defaults() == {"fast_dora": True, "chunked_loss": True, "cuda_graphs": "auto", "fused_lora": False,
                                 "autocast": "auto", "compile": "auto", "packing": "auto", "micro_batch": "auto",
                                 "group_by_length": False}
    assert list(_speed_defaults()) == Speed.experiment_keys()
    assert "loss_chunk_size" not in build_parameters({}).speed  # code-only settings stay out of experiments


@pytest.mark.parametrize("device,kind,dtype", list(itertools.product(["cpu", "cuda"], ["causal_lm", "seq_cls"],
                                                                      ["float32", "bfloat16", "float16"])))
def test_auto_resolves_per_device_kind_and_dtype(device, kind, dtype):
    cuda, causal = device == "cuda", kind == "causal_lm"
    got = Speed().resolve(device_type=device, kind=kind, base_dtype=dtype)
    assert got.cuda_graphs is cuda
    assert got.autocast == (dtype if cuda and dtype != "float32" else None)
    assert got.compile is (cuda and causal)
    assert got.packing is causal
    assert got.micro_batch == ("auto" if cuda else None)  # CUDA: only the probe settles it
    assert (got.fast_dora, got.chunked_loss, got.fused_lora, got.group_by_length) == (True, True, False, False)


def test_explicit_values_win_and_graphs_need_cuda():
    explicit = Speed(cuda_graphs=True, autocast=None, compile=False, packing=False, micro_batch=3)
    on_cuda = explicit.resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")
    assert (on_cuda.cuda_graphs, on_cuda.autocast, on_cuda.compile, on_cuda.packing, on_cuda.micro_batch) == \
        (True, None, False, False, 3)
    assert explicit.resolve(device_type="cpu", kind="causal_lm", base_dtype="float32").cuda_graphs is False
    assert explicit.cuda_graphs is True  # resolve returns a copy


def test_speed_problems_are_the_config_errors():
    with pytest.raises(ConfigError) as err:
        build_parameters({"speed": {"packing": "yes", "micro_batch": 0, "fast_dora": 1, "autocast": "fp8"}})
    text = str(err.value)
    for line in ("'speed.packing' = 'yes' must be true, false or \"auto\"", "'speed.micro_batch' = 0 must be",
                 "'speed.fast_dora' = 1 must be true or false", "'speed.autocast' = 'fp8' is not allowed"):
        assert line in text


def tiny_lora_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_make_step_on_cpu_resolves_prepares_and_steps():
    model = tiny_lora_llama()
    optimizer = ADAMW.make(model, None, build_parameters({"learning_rate": 1e-2}))
    features = [{"input_ids": list(range(1, 1 + n))} for n in (5, 9, 3, 7)]
    step, speed = make_step(model, optimizer, speed={}, kind="causal_lm", dtype="float32", device=torch.device("cpu"),
                            features=features, batch_size=2, limit=4, max_length=16, pad_id=0, log=lambda s: None)
    assert speed.record() == {**_speed_defaults(), "cuda_graphs": False, "autocast": None, "compile": False,
                              "packing": True, "micro_batch": 2}
    assert model._loralab_speed is speed  # prepared with the resolved settings
    assert step.optimizer is optimizer and step.micro_batch == 2 and step.packing and step.wrapped is None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = step(features)
    assert torch.isfinite(stats.loss) and stats.samples == 4 and stats.tokens == 24
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_an_ending_is_a_value_and_unwrap_raises_it():
    ok = Outcome("success", {"eval": {}}, None)
    assert ok.unwrap() == ({"eval": {}}, None)
    cancelled = Outcome("cancelled", {}, "r.json", Cancelled("SIGTERM"))
    with pytest.raises(Cancelled) as err:
        cancelled.unwrap()
    assert err.value.result_path == "r.json"
