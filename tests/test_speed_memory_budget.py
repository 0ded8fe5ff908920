"""``speed.activation_memory_budget``: compiled layers saving fewer activations through torch's
memory-budget partitioner, with the same loss and gradients; its checks at the edge."""

import pytest
import torch

from loralab.config import ConfigError, build_parameters
from loralab.speed_settings import Speed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _saved_activation_bytes(budget: float):
    """Bytes the forward of a compiled 2-layer bf16 Llama with LoRA on every linear saves for its
    backward (parameters excluded, each storage once), and its loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.speed.step import causal_lm_loss, prepare_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=64, vocab_size=1000)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(r=8, target_modules=TARGETS))
    for name, p in model.named_parameters():  # B = 0 at init would leave half the gradients zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    # aot_eager_decomp_partition partitions as inductor does (min-cut) without generating kernels: seconds on CPU
    speed = Speed(compile=True, cuda_graphs=False, autocast="bfloat16", activation_memory_budget=budget,
                  compile_backend="aot_eager_decomp_partition").resolve(device_type="cpu", kind="causal_lm",
                                                                        base_dtype="bfloat16")
    prepare_model(model, speed)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, batch)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch._dynamo.reset()
    return sum(saved.values()), loss.detach(), grads


@pytest.mark.slow
def test_a_lower_budget_saves_fewer_activations_and_trains_the_same():
    full_bytes, full_loss, full_grads = _saved_activation_bytes(1.0)
    low_bytes, low_loss, low_grads = _saved_activation_bytes(0.8)
    # measured: 2,619 KiB at 1.0 (~20 hidden sizes per token and layer), 1,831 KiB at 0.8
    assert low_bytes <= 0.8 * full_bytes, (low_bytes, full_bytes)
    assert torch.equal(low_loss, full_loss)
    assert low_grads.keys() == full_grads.keys() and len(full_grads) == 2 * (7 * 2 + 1)
    for name, grad in full_grads.items():  # the backward recomputes the same ops: equal up to bf16 rounding order
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(low_grads[name], grad, rtol=2e-2, atol=1e-5, msg=name)


def test_budget_one_is_the_backend_itself_and_lower_wraps_it():
    from loralab.speed.step import budgeted_backend

    assert budgeted_backend("inductor", 1.0) == "inductor"
    wrapped = budgeted_backend("aot_eager_decomp_partition", 0.5)
    assert callable(wrapped) and "activation_memory_budget=0.5" in wrapped.__name__
    assert budgeted_backend("aot_eager_decomp_partition", 0.5) is wrapped  # one per (backend, budget)
    assert budgeted_backend("aot_eager_decomp_partition", 0.7) is not wrapped


def test_models_prepared_one_after_another_share_the_compiled_layers():
    """One process training several experiments (``loralab run a b c ...``): torch keys compiled code
    by the backend's identity, so a budgeted backend made anew per model compiled the layers again
    for each (2 graphs more per model here) until torch's recompile limit (8) left them uncompiled
    from the fifth model on, the record still saying compile true."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.speed.step import causal_lm_loss, prepare_model

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    counts = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        speed = Speed(compile=True, cuda_graphs=False, autocast=None, activation_memory_budget=0.8,
                      compile_backend=counting).resolve(device_type="cpu", kind="causal_lm", base_dtype="float32")
        prepare_model(model, speed)
        ids = torch.randint(0, 64, (1, 16))
        causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})[0].backward()
        counts.append(len(graphs))
    torch._dynamo.reset()
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts


@pytest.mark.parametrize("speed, message", [
    ({"activation_memory_budget": 0}, "'speed.activation_memory_budget' = 0 must be \"auto\" or a number in (0, 1]"),
    ({"activation_memory_budget": 1.5}, "'speed.activation_memory_budget' = 1.5 must be \"auto\" or a number in (0, 1]"),
    ({"activation_memory_budget": "low"}, "'speed.activation_memory_budget' = 'low'"),
    ({"activation_memory_budget": 0.8, "compile": False}, "with 'speed.compile' = false: the budget acts on compiled layers; set compile to true"),
])
def test_bad_budgets_are_refused_naming_the_key(speed, message):
    with pytest.raises(ConfigError) as err:
        build_parameters({"speed": speed})
    assert message in str(err.value)


def test_auto_is_the_budget_where_layers_compile_and_an_explicit_value_wins():
    from loralab.speed_settings import ACTIVATION_BUDGET

    def resolved(device_type, **speed):
        return Speed(**speed).resolve(device_type=device_type, kind="causal_lm", base_dtype="bfloat16").activation_memory_budget

    assert Speed().activation_memory_budget == "auto" and ACTIVATION_BUDGET == 0.8
    assert resolved("cuda") == ACTIVATION_BUDGET  # compile auto: on for a CUDA causal LM
    assert resolved("cpu") == 1.0 and resolved("cuda", compile=False) == 1.0
    assert resolved("cuda", activation_memory_budget=1.0) == 1.0 and resolved("cpu", compile=True) == ACTIVATION_BUDGET
    # an explicit budget where compile "auto" leaves layers uncompiled (CPU): nothing to partition, recorded as such
    assert resolved("cpu", activation_memory_budget=0.6) == 1.0 and resolved("cuda", activation_memory_budget=0.6) == 0.6
    build_parameters({"speed": {"activation_memory_budget": 0.8, "compile": True}})  # no problem
    build_parameters({"speed": {"compile": False}})  # auto with compile off: nothing to refuse


def test_a_failing_budgeted_partition_compiles_at_the_default_with_a_warning(monkeypatch):
    """torch 2.11's flop count of a grouped-query SDPA asserted at budget 0.6 on the 8B shape (H100,
    results/bench-actbudget-h100): the graph compiles without the budget, and the warning says so."""
    import torch._functorch.config as functorch_config

    from loralab.speed.step import budget_partitions, budgeted_backend, partitions_since

    seen = []

    def fails_under_a_budget(gm, example_inputs):
        seen.append(functorch_config.activation_memory_budget)
        if functorch_config.activation_memory_budget < 1:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        return gm.forward

    monkeypatch.setattr("torch._dynamo.lookup_backend", lambda name: fails_under_a_budget)
    budgeted_backend.cache_clear()  # a wrapper made earlier in the process would hold the real backend
    before = budget_partitions()
    compiled = budgeted_backend("inductor", 0.6)
    with pytest.warns(RuntimeWarning, match="budget 1.0"):
        fn = compiled(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [torch.zeros(1, 2)])
    budgeted_backend.cache_clear()
    assert seen == [0.6, 1.0] and callable(fn)
    # what the run records (train_info.timing.activation_memory_budget_partitions): the fallback, not the setting alone
    assert partitions_since(before) == {"within_budget": 0, "fell_back": 1,
                                        "error": "AssertionError: sdpa_flop_count: query/key/value shapes are incompatible"}


@pytest.mark.slow
def test_a_run_records_how_its_budgeted_partitions_went(monkeypatch, tmp_path, smollm2_cut_path, data_dir):
    """`loralab run` with compiled layers at a budget below 1 records, beside the budget it asked for, how many
    graphs torch partitioned within it and how many fell back to the default (SmolLM2 cut to 2 layers, real
    GSM8K rows, aot_eager_decomp_partition standing in for inductor: the same min-cut partition, no kernels)."""
    import json

    from torch._dynamo import lookup_backend

    from loralab.experiment import read_experiment
    from loralab.run import run_experiment
    from loralab.speed.step import budgeted_backend

    partitioner = lookup_backend("aot_eager_decomp_partition")
    monkeypatch.setattr("torch._dynamo.lookup_backend", lambda name: partitioner)
    budgeted_backend.cache_clear()
    folder = tmp_path / "experiments" / "budget"
    folder.mkdir(parents=True)
    from peft import LoraConfig

    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(folder)
    params = {"model_id": smollm2_cut_path, "task": "gsm8k", "data_dir": str(data_dir), "max_train_samples": 2,
              "max_length": 96, "batch_size": 1, "max_steps": 2, "eval_tasks": [], "device": "cpu", "seed": 0,
              "speed": {"compile": True, "cuda_graphs": False, "activation_memory_budget": 0.8}}
    (folder / "training_parameters.json").write_text(json.dumps(params))
    try:
        torch._dynamo.reset()
        record, _ = run_experiment(read_experiment(folder), evaluate=False).unwrap()
    finally:
        budgeted_backend.cache_clear()
        torch._dynamo.reset()
    info = record["train_info"]
    assert info["speed"]["activation_memory_budget"] == 0.8 and info["speed"]["compile"] is True
    partitions = info["timing"]["activation_memory_budget_partitions"]
    assert partitions["within_budget"] >= 2 and partitions["fell_back"] == 0 and partitions["error"] is None, partitions
