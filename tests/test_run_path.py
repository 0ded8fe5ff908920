"""The run path's own pieces (``loralab.run``): the speed settings' defaults and auto resolution
(``speed_settings.Speed``), the one step factory (``run.step.make_step``) and the outcome of a run as a value."""

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.config import ConfigError, build_parameters
from loralab.experiment import hashed_parameters
from loralab.methods.lora import ADAMW
from loralab.run.record import Cancelled, Outcome
from loralab.run.step import make_step
from loralab.speed_settings import Speed, _speed_defaults

HASHED_SPEED_DEFAULTS = {"fast_dora": True, "chunked_loss": True, "cuda_graphs": "auto", "fused_lora": False,
                         "autocast": "auto", "compile": "auto", "packing": "auto", "micro_batch": "auto",
                         "group_by_length": False}


def test_experiment_speed_defaults_are_unchanged():
    """The experiment's ``speed`` dict is hashed (``train_params_sha``): the hashed keys, order and
    values stay what they were before the settings became one dataclass; a key added since
    (``memory_fraction``, ``grad_reduce``, ``dora_norm_per_step``, ...) is hashed only when an experiment sets it away from its default."""
    assert _speed_defaults() == {**HASHED_SPEED_DEFAULTS, "memory_fraction": 0.25, "grad_reduce": "ddp",
                                 "fp8_transpose_cache": "auto", "fp8_quantize_kernel": "torch", "fp8_fast_accum": "all",
                                 "fp8_fused_qkv": True, "fp8_refresh_kernel": "auto", "lora_scale_at_rank": "auto", "lora_shared_input": "auto",
                                 "dora_norm_per_step": True, "foreach_grad_add": "auto", "activation_memory_budget": "auto",
                                 "loss_chunk_size": "auto"}
    assert list(_speed_defaults()) == Speed.experiment_keys()
    assert "compile_backend" not in build_parameters({}).speed  # code-only settings stay out of experiments
    assert "micro_batch_probe" not in build_parameters({}).speed
    hashed = hashed_parameters(build_parameters({}))["speed"]
    assert hashed == HASHED_SPEED_DEFAULTS and list(hashed) == list(HASHED_SPEED_DEFAULTS)
    # lora_scale_at_rank's old default (false) and its new one ("auto") hash alike: an experiment that set
    # false keeps its train_params_sha (--resume, sweeps); true is hashed
    for key in ("lora_scale_at_rank", "lora_shared_input"):  # lora_shared_input: the same, off before it existed
        for value, hashed_as in ((False, None), ("auto", None), (True, True)):
            assert hashed_parameters(build_parameters({"speed": {key: value}}))["speed"].get(key) == hashed_as
    assert hashed_parameters(build_parameters({"speed": {"memory_fraction": 0.5}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "memory_fraction": 0.5}
    assert hashed_parameters(build_parameters({"speed": {"dora_norm_per_step": False}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "dora_norm_per_step": False}
    assert hashed_parameters(build_parameters({"speed": {"loss_chunk_size": 128}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "loss_chunk_size": 128}
    assert hashed_parameters(build_parameters({"speed": {"activation_memory_budget": 1.0}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "activation_memory_budget": 1.0}  # not "auto": 0.8 where layers compile
    # its old default (1024) and the new "auto" hash alike: the loss is the same at any chunk
    for value in (1024, "auto"):
        assert "loss_chunk_size" not in hashed_parameters(build_parameters({"speed": {"loss_chunk_size": value}}))["speed"]
    for bad in (0, True, 1.5, "128", "small"):
        with pytest.raises(ConfigError, match="'speed.loss_chunk_size' = .* must be \"auto\" or a positive integer"):
            build_parameters({"speed": {"loss_chunk_size": bad}})


def test_memory_fraction_is_checked():
    with pytest.raises(ConfigError) as err:
        build_parameters({"speed": {"memory_fraction": 1.5}})
    assert "'speed.memory_fraction' = 1.5 must be a number in (0, 1]" in str(err.value)
    for bad in (0, True, "half"):
        with pytest.raises(ConfigError, match="'speed.memory_fraction'"):
            build_parameters({"speed": {"memory_fraction": bad}})
    assert build_parameters({"speed": {"memory_fraction": 1}}).speed["memory_fraction"] == 1


def test_fp8_transpose_cache_is_checked_hashed_once_set_and_needs_the_fp8_base():
    from peft import LoraConfig

    from loralab import methods

    for bad in (-0.1, 1.5, True, "all"):
        with pytest.raises(ConfigError, match="'speed.fp8_transpose_cache'"):
            build_parameters({"speed": {"fp8_transpose_cache": bad}})
    assert hashed_parameters(build_parameters({"speed": {"fp8_transpose_cache": 0.81}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "fp8_transpose_cache": 0.81}
    cfg = LoraConfig(r=4, target_modules=["query"])
    for base, refused in ((None, True), ("nf4", True), ("fp8", False)):
        params = build_parameters({"quantization": base, "speed": {"fp8_transpose_cache": 1}})
        problems = methods.choose_method(cfg, params).conflicts(cfg, params)
        assert any("'speed.fp8_transpose_cache' = 1" in p and "'quantization': 'fp8'" in p for p in problems) is refused


def test_fp8_quantize_kernel_is_checked_hashed_once_set_and_needs_the_fp8_base():
    from peft import LoraConfig

    from loralab import methods

    with pytest.raises(ConfigError, match="'speed.fp8_quantize_kernel' = 'cuda' is not allowed; allowed: torch, triton"):
        build_parameters({"speed": {"fp8_quantize_kernel": "cuda"}})
    with pytest.raises(ConfigError, match="'speed.fp8_fast_accum' = 'fast' is not allowed; allowed: none, forward, all"):
        build_parameters({"speed": {"fp8_fast_accum": "fast"}})
    assert hashed_parameters(build_parameters({"speed": {"fp8_quantize_kernel": "triton"}}))["speed"] == \
        {**HASHED_SPEED_DEFAULTS, "fp8_quantize_kernel": "triton"}
    cfg = LoraConfig(r=4, target_modules=["query"])
    for base, kernel, refused in ((None, "triton", True), ("nf4", "triton", True), ("fp8", "triton", False),
                                  (None, "torch", False)):
        params = build_parameters({"quantization": base, "speed": {"fp8_quantize_kernel": kernel}})
        problems = methods.choose_method(cfg, params).conflicts(cfg, params)
        assert any("'speed.fp8_quantize_kernel' = 'triton'" in p and "'quantization': 'fp8'" in p
                   for p in problems) is refused, (base, kernel)


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
    assert got.loss_chunk_size == ("auto" if cuda and causal else 1024)  # the probe may shrink a causal LM's chunk
    for explicit in ({"loss_chunk_size": 256}, {"micro_batch": 2}, {"chunked_loss": False}):  # nothing to settle
        assert Speed(**explicit).resolve(device_type=device, kind=kind, base_dtype=dtype).loss_chunk_size == \
            explicit.get("loss_chunk_size", 1024)
    assert (got.fast_dora, got.chunked_loss, got.fused_lora, got.group_by_length) == (True, True, False, False)
    # exact (tests/test_rank_scaling.py), so on wherever it applies; float16 computes take peft's forward anyway
    assert got.lora_scale_at_rank is (dtype != "float16")
    fp16_autocast = Speed(autocast="float16").resolve(device_type=device, kind=kind, base_dtype=dtype)
    assert fp16_autocast.lora_scale_at_rank is False


def test_explicit_values_win_and_graphs_need_cuda():
    explicit = Speed(cuda_graphs=True, autocast=None, compile=False, packing=False, micro_batch=3)
    on_cuda = explicit.resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")
    assert (on_cuda.cuda_graphs, on_cuda.autocast, on_cuda.compile, on_cuda.packing, on_cuda.micro_batch) == \
        (True, None, False, False, 3)
    assert explicit.resolve(device_type="cpu", kind="causal_lm", base_dtype="float32").cuda_graphs is False
    assert explicit.cuda_graphs is True  # resolve returns a copy
    fused = Speed(fused_lora=True).resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")
    assert fused.lora_scale_at_rank is False  # an explicit fused_lora wins over the scaling's "auto"
    kept = Speed(fused_lora=True, lora_scale_at_rank=True).resolve(device_type="cpu", kind="causal_lm", base_dtype="float32")
    assert kept.lora_scale_at_rank is True  # explicit: prepare_model refuses the pair, naming both keys


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
                              "packing": True, "micro_batch": 2, "lora_scale_at_rank": True, "lora_shared_input": False,
                              "activation_memory_budget": 1.0, "foreach_grad_add": False,  # nothing graphed on CPU
                              "fp8_transpose_cache": 0.0, "fp8_refresh_kernel": "cublas",
                              "lora_scaled_at_rank": {"layers": 4, "lora_layers": 4}, "micro_batch_probe": {
                                  "micro_batch": 2, "reason": "not probed on cpu: the experiment's batch_size",
                                  "sizes": [], "peaks_gib": [], "tokens_per_second": [], "budget_gib": None,
                                  "memory_fraction": None, "min_gain": None, "row_tokens": None,
                                  "optimizer_state_gib": None, "retimed": []}, "loss_chunk_size": 1024}
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


GIB = 2**30


def decide(measured, limit=16, budget=30 * GIB, **kw):
    from loralab.run.probe import Trial, decide_micro_batch

    return decide_micro_batch([Trial(*t) for t in measured], limit=limit, budget=budget, **kw)


def test_probe_decision_doubles_while_it_pays_and_fits():
    assert decide([]).next_size == 1
    grows = decide([(1, 20 * GIB, 4000.0), (2, 22 * GIB, 7000.0)])
    assert grows.micro_batch is None and grows.next_size == 4
    assert decide([(1, 20 * GIB, 4000.0)], limit=3).next_size == 2 and decide([(2, 1, 1.0)], limit=3).next_size == 3


def test_probe_decision_stops_at_the_memory_budget():
    over = decide([(1, 20 * GIB, 4000.0), (2, 24 * GIB, 7000.0), (4, 31 * GIB, 9000.0)])
    assert (over.micro_batch, over.next_size) == (2, None)
    assert over.reason.startswith("memory: micro-batch 4 peaked at 31.0 GiB, over the 30.0 GiB budget")
    oom = decide([(1, 20 * GIB, 4000.0), (2, float("inf"), None)])
    assert oom.micro_batch == 1 and "micro-batch 2 out of memory" in oom.reason
    first = decide([(1, 40 * GIB, 4000.0)])
    assert first.micro_batch == 1 and "1 is the least" in first.reason  # nothing smaller to fall back to
    # the H100's FP8 row: 19.84 over a 19.79 GiB budget reads as two different numbers
    close = decide([(2, 15 * GIB, 5000.0), (4, 19.84 * GIB, 10800.0)], budget=19.79 * GIB)
    assert "micro-batch 4 peaked at 19.84 GiB, over the 19.79 GiB budget" in close.reason


def test_probe_decision_stops_when_gains_flatten():
    flat = decide([(1, 10 * GIB, 8000.0), (2, 12 * GIB, 14000.0), (4, 16 * GIB, 14500.0)])
    assert flat.micro_batch == 2 and flat.reason.startswith("flat: micro-batch 4 gained +3.6 % tokens/s over 2")
    slower = decide([(1, 10 * GIB, 8000.0), (2, 12 * GIB, 7000.0)])
    assert slower.micro_batch == 1
    # a zero threshold keeps any gain (the bench's tuned peer: its best micro-batch within the memory)
    assert decide([(1, 10 * GIB, 8000.0), (2, 12 * GIB, 8100.0)], min_gain=0.0).next_size == 4


def test_probe_decision_stops_at_the_optimizer_batch_and_respects_an_explicit_micro_batch():
    at_limit = decide([(1, GIB, 100.0), (2, GIB, 300.0), (4, GIB, 900.0)], limit=4)
    assert (at_limit.micro_batch, at_limit.reason) == (4, "limit: the optimizer batch (4)")
    explicit = decide([], explicit=3)
    assert (explicit.micro_batch, explicit.next_size, explicit.reason) == (3, None, "explicit: speed.micro_batch")
    assert decide([(1, None, None), (2, None, None)], budget=None, limit=2).micro_batch == 2  # nothing measured: no stop


def test_probe_record_keeps_sizes_peaks_rates_and_the_reason():
    from loralab.run.probe import Trial, decide_micro_batch, probe_record

    trials = [Trial(1, 20 * GIB, 4000.0), Trial(2, float("inf"), None)]
    decision = decide_micro_batch(trials, limit=8, budget=30 * GIB)
    record = probe_record(trials, decision, budget=30 * GIB, memory_fraction=0.25, row_tokens=512)
    assert record == {"micro_batch": 1, "reason": decision.reason, "sizes": [1, 2], "peaks_gib": [20.0, "oom"],
                      "tokens_per_second": [4000.0, None], "budget_gib": 30.0, "memory_fraction": 0.25,
                      "min_gain": 0.05, "row_tokens": 512, "optimizer_state_gib": 0.0, "retimed": []}


def test_the_probe_builds_the_step_shape():
    from loralab.run.probe import worst_case_batch

    longest = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    packed = worst_case_batch(longest, 2, packing=True, width=8, pad_id=0)
    assert set(packed) == {"input_ids", "labels", "loss_weights"}  # no mask: SDPA's causal kernel, as the step
    assert packed["input_ids"].tolist() == [[5, 6, 7, 5, 6, 7, 5, 6]] * 2 and packed["labels"][0, 0] == -100
    assert packed["loss_weights"].sum().item() == pytest.approx(1.0)
    padded = worst_case_batch(longest, 2, packing=False, width=4, pad_id=0)
    assert padded["input_ids"].shape == (2, 4) and padded["loss_weights"].sum().item() == pytest.approx(1.0)


def test_every_fp8_only_speed_key_set_away_from_its_default_needs_the_fp8_base():
    """The refusal follows speed_settings.FP8_ONLY_SPEED: a key added there is refused without the FP8 base
    with no other change (a non-default value per key here; the test fails for a key it lacks)."""
    from peft import LoraConfig

    from loralab import methods
    from loralab.speed_settings import FP8_ONLY_SPEED

    values = {"fp8_transpose_cache": 0.5, "fp8_quantize_kernel": "triton", "fp8_fast_accum": "none", "fp8_fused_qkv": False,
              "fp8_refresh_kernel": "cublas"}
    assert set(values) == set(FP8_ONLY_SPEED)
    cfg = LoraConfig(r=4, target_modules=["query"])
    for key, value in values.items():
        for base in (None, "nf4", "fp8"):
            params = build_parameters({"quantization": base, "speed": {key: value}})
            problems = methods.choose_method(cfg, params).conflicts(cfg, params)
            assert any(f"'speed.{key}' = {value!r}" in p and "'quantization': 'fp8'" in p for p in problems) is (base != "fp8")
