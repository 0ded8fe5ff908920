"""``speed.activation_memory_budget`` "auto": after the micro-batch probe and the transpose cache, the layers compile
at torch's default partition (1.0) where the estimate of what it saves beyond ``speed_settings.ACTIVATION_BUDGET`` fits what
the budget has left (run/spare_memory.py ``row_bytes``, ``spend_spare_on_activations``; run/step.py ``make_step``).
The probe needs CUDA, so it is stood in for with the peaks an H100 probed for bf16 LoRA at the 8B shape
(results/bench-fair-h100-1206/probecheck: 17.76, 19.84, 23.51 GiB at micro-batch 1, 2, 4; AdamW's state 0.63 GiB)."""

from __future__ import annotations

import pytest
import torch

from loralab.run.spare_memory import FULL_PARTITION_EXTRA, HEADROOM, row_bytes, spare_bytes, spend_spare_on_activations
from loralab.speed_settings import ACTIVATION_BUDGET, Speed

GIB = 2**30
PEAKS = [17.76, 19.84, 23.51]


def probe(budget_gib=34.92, **kw):
    return {"micro_batch": 4, "sizes": [1, 2, 4], "peaks_gib": list(PEAKS), "budget_gib": budget_gib,
            "optimizer_state_gib": 0.63, "loss_chunk_size": 1024, "reason": "stood in", **kw}


def test_row_bytes_is_the_slope_of_the_two_largest_measured_sizes_up_to_the_one_run():
    assert row_bytes(probe(), 4) == int((23.51 - 19.84) / 2 * GIB)
    assert row_bytes(probe(), 2) == int((19.84 - 17.76) * GIB)  # a rank running the common, smaller size
    assert row_bytes(probe(peaks_gib=[17.76, 19.84, "oom"]), 4) == int((19.84 - 17.76) * GIB)  # unmeasured: skipped
    assert row_bytes(probe(sizes=[1], peaks_gib=[17.76]), 1) is None  # one size: no slope
    assert row_bytes(probe(sizes=[], peaks_gib=[]), 4) is None  # explicit micro-batch: nothing probed


def resolved(**kw):
    return Speed(compile=True, **kw).resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")


@pytest.mark.parametrize("budget_gib, switch", [(34.92, True), (27.0, False)])
def test_switches_to_the_default_partition_only_where_the_estimate_fits_the_budget_left(monkeypatch, budget_gib, switch):
    """An H200's budget (34.92 GiB) leaves 10.78 GiB beside micro-batch 4, 9.03 after the headroom, for an estimated
    3.16 GiB: the layers compile again at 1.0. 27 GiB leaves 1.51 after the headroom: they stay at 0.8."""
    from loralab.run import spare_memory

    compiled = []
    monkeypatch.setattr(spare_memory, "compile_layers", lambda model, speed: compiled.append(speed.activation_memory_budget))
    speed, record, lines = resolved(), probe(budget_gib), []
    assert speed.activation_memory_budget == ACTIVATION_BUDGET
    spare = spare_bytes(record, 4, 1024)
    assert spend_spare_on_activations(object(), speed, record, 4, spare, log=lines.append) is switch
    extra = FULL_PARTITION_EXTRA * (23.51 - 19.84) / 2 * 4
    room = budget_gib - 23.51 - 0.63 - HEADROOM * budget_gib
    assert record["activation_memory_budget"]["extra_gib"] == pytest.approx(extra, abs=0.01)
    assert record["activation_memory_budget"]["room_gib"] == pytest.approx(room, abs=0.01)
    assert speed.activation_memory_budget == record["activation_memory_budget"]["budget"] == (1.0 if switch else 0.8)
    assert compiled == ([1.0] if switch else [])
    assert len(lines) == 1 and lines[0].startswith(f"speed.activation_memory_budget auto: {1.0 if switch else 0.8} ")


def test_transposes_cached_by_auto_come_first_and_an_explicit_cache_is_already_in_the_peaks(monkeypatch):
    from loralab.run import spare_memory

    monkeypatch.setattr(spare_memory, "compile_layers", lambda model, speed: None)
    spare = spare_bytes(probe(), 4, 1024)
    auto = resolved()
    auto.fp8_transposes_cached = {"layers": 224, "bytes": 7 * GIB, "total_bytes": 7 * GIB, "auto_spare_gib": 10.78}
    assert not spend_spare_on_activations(object(), auto, probe(), 4, spare, log=lambda line: None)  # 9.03 - 7 < 3.16
    explicit = resolved()
    explicit.fp8_transposes_cached = {"layers": 224, "bytes": 7 * GIB, "total_bytes": 7 * GIB}  # probed with them held
    assert spend_spare_on_activations(object(), explicit, probe(), 4, spare, log=lambda line: None)


def test_nothing_switches_without_compiled_layers_a_budget_or_a_probe(monkeypatch):
    from loralab.run import spare_memory

    monkeypatch.setattr(spare_memory, "compile_layers", lambda model, speed: pytest.fail("compiled"))
    spare = spare_bytes(probe(), 4, 1024)
    eager = Speed(compile=False).resolve(device_type="cuda", kind="causal_lm", base_dtype="bfloat16")
    assert eager.activation_memory_budget == 1.0
    for speed, record, room in ((eager, probe(), spare), (resolved(), probe(), None),
                                (resolved(), probe(sizes=[4], peaks_gib=[23.51]), spare)):
        assert not spend_spare_on_activations(object(), speed, record, 4, room, log=lambda line: None)
        assert "activation_memory_budget" not in record


def tiny_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=64))
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("asked, budget_gib, want", [("auto", 34.92, 1.0), ("auto", 27.0, ACTIVATION_BUDGET),
                                                     (0.8, 34.92, 0.8)])
def test_make_step_spends_what_the_probe_left_unless_the_budget_is_explicit(monkeypatch, asked, budget_gib, want):
    """make_step's wiring: "auto" settles after the probe (stood in for: it needs CUDA) on what its micro-batch left;
    an explicit budget always wins. The layers' compiled calls are replaced only where it switches (no forward runs
    here, so nothing compiles)."""
    from loralab.run import micro_batch as run_micro
    from loralab.run import spare_memory
    from loralab.run import step as run_step

    real_resolve, real_compile, compiled = Speed.resolve, spare_memory.compile_layers, []

    def keep_auto(self, **kw):
        out = real_resolve(self, **kw)
        out.micro_batch = "auto"
        return out

    monkeypatch.setattr(Speed, "resolve", keep_auto)
    monkeypatch.setattr(run_micro, "probe_micro_batch", lambda model, features, **kw: (4, probe(budget_gib)))
    monkeypatch.setattr(run_micro, "forget_probe_compiles", lambda: True)
    monkeypatch.setattr(spare_memory, "compile_layers",
                        lambda model, speed: (compiled.append(speed.activation_memory_budget), real_compile(model, speed)))
    model = tiny_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    layers = model.get_base_model().model.layers
    lines = []
    _, speed = run_step.make_step(model, optimizer, speed={"compile": True, "activation_memory_budget": asked},
                                  kind="causal_lm", dtype="float32", device=torch.device("cpu"),
                                  features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], batch_size=4, limit=4,
                                  max_length=8, pad_id=0, log=lines.append)
    assert speed.activation_memory_budget == want and speed.record()["activation_memory_budget"] == want
    assert ("activation_memory_budget" in speed.micro_batch_probe) is (asked == "auto")
    assert compiled == ([1.0] if want == 1.0 else []) and all(layer._compiled_call_impl is not None for layer in layers)
    assert sum(line.startswith("speed.activation_memory_budget auto") for line in lines) == (asked == "auto")


def test_compile_layers_replaces_each_decoder_layers_compiled_call():
    from loralab.speed.step import compile_layers

    model = tiny_llama()
    layers = model.get_base_model().model.layers
    speed = resolved(compile_backend="eager")
    compile_layers(model, speed)
    before = [layer._compiled_call_impl for layer in layers]
    speed.activation_memory_budget = 1.0
    compile_layers(model, speed)
    assert all(a is not b and b is not None for a, b in zip(before, (layer._compiled_call_impl for layer in layers)))
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits  # the recompiled layers run
    assert out.shape == (1, 3, 64)


def test_every_rank_votes_and_one_ranks_no_keeps_every_rank_at_the_resolved_budget(monkeypatch):
    """The switch is the least vote over ranks (one all-reduce, called on every rank even where this rank has nothing
    to weigh), so ranks never compile different partitions; a rank whose own room holds says that another's did not."""
    from loralab import distributed
    from loralab.run import spare_memory

    votes = []
    monkeypatch.setattr(spare_memory, "compile_layers", lambda model, speed: pytest.fail("compiled"))
    monkeypatch.setattr(distributed, "min_over_ranks", lambda value: votes.append(value) or 0)
    speed, record, lines = resolved(), probe(), []
    assert not spend_spare_on_activations(object(), speed, record, 4, spare_bytes(record, 4, 1024), log=lines.append)
    assert votes == [1] and speed.activation_memory_budget == ACTIVATION_BUDGET
    assert record["activation_memory_budget"]["budget"] == ACTIVATION_BUDGET
    assert lines[0].endswith("GiB left in the budget holds, another rank's does not hold it)")
    for spare in (None, -GIB):  # nothing to weigh here: still one vote, a no
        assert not spend_spare_on_activations(object(), resolved(), probe(), 4, spare, log=lambda line: None)
    assert votes == [1, 0, 0]


@pytest.mark.parametrize("cache, switch", [("auto", False), (0.0, True)])
def test_make_step_caches_the_transposes_first_and_gives_the_activations_what_is_left(monkeypatch, cache, switch):
    """In units of 2,304 bytes: the probe leaves 5 beside micro-batch 4 (budget 20, peak 14, optimizer state 1), a row
    adds 1, so the default partition needs 0.43 x 4 = 1.72; 1 is kept free. "auto" transposes take the MLP's codes (4)
    first and leave 0: the layers stay at 0.8. With no cache the 4 units hold the 1.72: they compile at 1.0."""
    from test_transpose_cache_auto import tiny_fp8_llama  # the MLP's codes 9,216 bytes (4 units), all 12,288

    from loralab.run import micro_batch as run_micro
    from loralab.run import spare_memory
    from loralab.run import step as run_step

    unit, real_resolve = 2304 / GIB, Speed.resolve

    def keep_auto(self, **kw):
        out = real_resolve(self, **kw)
        out.micro_batch = "auto"
        out.fp8_transpose_cache = cache
        return out

    stand_in = {"micro_batch": 4, "sizes": [1, 2, 4], "peaks_gib": [12 * unit, 13 * unit, 14 * unit],
                "budget_gib": 20 * unit, "optimizer_state_gib": 1 * unit, "reason": "stood in"}
    monkeypatch.setattr(Speed, "resolve", keep_auto)
    monkeypatch.setattr(run_micro, "probe_micro_batch", lambda model, features, **kw: (4, dict(stand_in)))
    monkeypatch.setattr(run_micro, "forget_probe_compiles", lambda: True)
    monkeypatch.setattr(spare_memory, "compile_layers", lambda model, speed: None)
    model = tiny_fp8_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    _, speed = run_step.make_step(model, optimizer, speed={"compile": True}, kind="causal_lm", dtype="float32",
                                  device=torch.device("cpu"), features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}],
                                  batch_size=4, limit=4, max_length=8, pad_id=0, log=lambda line: None)
    assert (speed.fp8_transposes_cached or {}).get("bytes", 0) == (9216 if cache == "auto" else 0)
    assert speed.activation_memory_budget == (1.0 if switch else ACTIVATION_BUDGET)
    assert speed.micro_batch_probe["activation_memory_budget"]["budget"] == speed.activation_memory_budget
