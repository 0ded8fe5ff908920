"""The auto micro-batch counts the optimizer state its probe cannot see (issue 22's memory budget).

The probe runs before the first optimizer step, so AdamW's two moments are not in its peak: on an
H100 an FP8 LoRA row probed 19.78 GiB at micro-batch 4 against a 19.79 GiB budget and then ran at
20.45 GiB, 0.67 GiB over, with AdamW's 0.63 GiB of state among it (results/bench-probe-h100/). ``pending_state_bytes`` says what the first step will add;
``decide_micro_batch(held=...)`` counts it beside every probed peak.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from loralab.run.probe import Trial, decide_micro_batch, pending_state_bytes, probe_record

GIB = 2**30
ROOT = pathlib.Path(__file__).resolve().parents[1]


def state_bytes(optimizer) -> int:
    """What the optimizer's state holds now: every tensor's bytes."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def model_with_frozen_part(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False)).to(dtype)
    model[0].requires_grad_(False)  # a frozen base: no state for it
    return model


def one_step(model, optimizer) -> None:
    model(torch.randn(4, 16, dtype=next(model.parameters()).dtype)).float().pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    lambda ps: torch.optim.SGD(ps, lr=1e-3),
], ids=["adamw", "amsgrad", "fused", "adam", "sgd-momentum", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pending_state_is_what_the_first_step_allocates_and_nothing_after(make, dtype):
    """The estimate equals the state's bytes after the first step (the state's ``step`` counted where
    it is a tensor on the parameters' device: fused/capturable); a second step adds nothing."""
    model = model_with_frozen_part(dtype)
    optimizer = make([p for p in model.parameters()])  # the frozen layer's parameters too: they get no state
    pending = pending_state_bytes(optimizer)
    one_step(model, optimizer)
    fused_step = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    steps_on_host = 0 if fused_step else sum(
        s["step"].numel() * s["step"].element_size() for s in optimizer.state.values()
        if isinstance(s.get("step"), torch.Tensor))
    assert pending == state_bytes(optimizer) - steps_on_host
    assert pending > 0 or isinstance(optimizer, torch.optim.SGD)
    assert pending_state_bytes(optimizer) == 0  # allocated now: the probe's peak would include it


def test_pending_state_of_a_real_lora_adapter_is_two_fp32_moments_of_its_parameters():
    """peft's LoRA on the packaged MiniLM keeps its adapters in float32: AdamW will hold 8 bytes per
    trainable parameter (the 8B r32 adapters' 84M parameters: 0.63 GiB)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=100)
    model = get_peft_model(AutoModelForSequenceClassification.from_config(config),
                           LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    assert pending_state_bytes(optimizer) == 8 * sum(p.numel() for p in trainable)


def test_a_size_that_fits_alone_but_not_with_the_state_is_refused():
    trials = [Trial(2, 15.0 * GIB, 5000.0), Trial(4, 19.78 * GIB, 10800.0)]
    alone = decide_micro_batch(trials, limit=4, budget=19.79 * GIB)
    assert alone.micro_batch == 4  # the old rule: the probed peak alone fits
    held = decide_micro_batch(trials, limit=4, budget=19.79 * GIB, held=0.66 * GIB)
    assert held.micro_batch == 2
    assert held.reason == ("memory: micro-batch 4 peaked at 19.78 GiB + 0.66 GiB of optimizer state, "
                           "over the 19.79 GiB budget")
    oom = decide_micro_batch([Trial(1, 5 * GIB, 1.0), Trial(2, float("inf"), None)], limit=4, budget=GIB * 30,
                             held=GIB)
    assert oom.micro_batch == 1 and oom.reason == "memory: micro-batch 2 out of memory, over the 30.0 GiB budget"
    record = probe_record(trials, held, budget=19.79 * GIB, memory_fraction=0.25, row_tokens=512, held=0.66 * GIB)
    assert record["optimizer_state_gib"] == 0.66 and record["peaks_gib"] == [15.0, 19.78]  # peaks as measured


def test_the_trainer_memory_margin_does_not_count_the_state_twice():
    """``peer_memory_budget`` takes the run's unprobed memory as its peak minus the probed peak; a
    record that counted the optimizer state in its probe leaves it out of that margin (else the
    second run's probe would subtract it twice)."""
    from loralab.bench.experiment import peer_memory_budget

    rows = {r["stack"]: r for r in json.loads((ROOT / "results/bench-fair/recipe.json").read_text())["rows"]}
    ours, trainer = rows["loralab"], rows["trainer"]
    total = 150_000_000_000
    before = peer_memory_budget(ours, trainer, total)
    probe = {**ours["speed"]["micro_batch_probe"], "optimizer_state_gib": 0.66}
    counted = peer_memory_budget({**ours, "speed": {**ours["speed"], "micro_batch_probe": probe}}, trainer, total)
    assert counted["margin_gib"] == pytest.approx(before["margin_gib"] - 0.66, abs=0.011)
    # the probe then counts the state beside each peak: the size it may choose is the same
    for plan, held in ((before, 0.0), (counted, 0.66 * GIB)):
        trials = [Trial(m, g * GIB, r) for m, g, r in zip(probe["sizes"], probe["peaks_gib"], probe["tokens_per_second"])]
        assert decide_micro_batch(trials[:3], limit=128, budget=plan["memory_fraction"] * total, held=held).micro_batch == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe measures CUDA memory")
@pytest.mark.parametrize("fraction", [0.5, 1e-6], ids=["fits", "over"])
def test_the_probe_counts_the_state_and_tries_small_loss_chunks_on_cuda(fraction):
    """A tiny Llama + peft LoRA as make_step prepares it: the record holds the state it counted;
    with a budget nothing fits, micro-batch 1 is probed again at 128-token loss chunks and, still
    over, keeps 1,024."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.run.probe import probe_micro_batch
    from loralab.speed.step import prepare_model
    from loralab.speed_settings import Speed

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).cuda()
    speed = Speed(compile=False, cuda_graphs=False).resolve(device_type="cuda", kind="causal_lm", base_dtype="float32")
    prepare_model(model, speed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    features = [{"input_ids": list(range(3, 67)), "labels": list(range(3, 67))}]
    chunks = []

    def set_chunk(n):
        chunks.append(n)
        speed.loss_chunk_size = n

    micro, record = probe_micro_batch(model, features, kind="causal_lm", packing=True, max_length=64, limit=4, pad_id=0,
                                      device=torch.device("cuda"), memory_fraction=fraction, optimizer=optimizer,
                                      loss_chunk=set_chunk, log=lambda line: None)
    assert record["optimizer_state_gib"] == round(pending_state_bytes(optimizer) / GIB, 2)
    if fraction == 0.5:
        assert micro >= 1 and chunks == [1024] and record["loss_chunk_size"] == 1024  # nothing over: no retry
    else:
        # micro-batch 1 over either way: 128 is kept only where it peaked lower (here the 64-token rows are one chunk)
        assert micro == 1 and chunks[:2] == [1024, 128] and chunks[-1] == record["loss_chunk_size"]
        assert record["small_loss_chunk_trial"]["size"] == 1 and "over it too" in record["reason"]


# The H100's losschunk rows (results/bench-probe-h100/losschunk-*.json): probed peaks (GiB) and tokens/s at
# 1,024-token loss chunks, and the same size again at 128; AdamW's state for the 8B r32 adapters, 0.63 GiB (probe8b.json).
FP8_1024 = [Trial(1, 12.22 * GIB, 8600.0), Trial(2, 14.99 * GIB, 14950.0), Trial(4, 19.78 * GIB, 17300.0)]
BUDGET, STATE = 19.79 * GIB, 0.63 * GIB


def test_a_size_over_the_budget_takes_small_loss_chunks_when_they_fit_and_pay():
    from loralab.run.probe import SMALL_LOSS_CHUNK, decide_loss_chunk

    stop = decide_micro_batch(FP8_1024, limit=4, budget=BUDGET, held=STATE)
    assert stop.micro_batch == 2  # 19.78 + 0.66 > 19.79
    taken, decision = decide_loss_chunk(stop, FP8_1024, Trial(4, 18.28 * GIB, 16200.0), budget=BUDGET, held=STATE)
    assert taken and decision.micro_batch == 4 and SMALL_LOSS_CHUNK == 128
    assert decision.reason == ("memory: micro-batch 4 with 128-token loss chunks peaked at 18.28 GiB + 0.63 GiB of "
                               "optimizer state, within the 19.79 GiB budget, +8.4 % tokens/s over 2")
    # the same fit at a rate that does not beat micro-batch 2 by 5 %: 1,024-token chunks at 2
    flat, decision = decide_loss_chunk(stop, FP8_1024, Trial(4, 18.28 * GIB, 15300.0), budget=BUDGET, held=STATE)
    assert not flat and decision.micro_batch == 2 and "gained +2.3 % tokens/s over 2, less than 5 %" in decision.reason


def test_small_loss_chunks_that_still_do_not_fit_change_nothing():
    from loralab.run.probe import decide_loss_chunk

    bf16 = [Trial(1, 18.6 * GIB, 12000.0), Trial(2, 21.37 * GIB, 13000.0)]  # bf16 LoRA: 2 is over either way
    stop = decide_micro_batch(bf16, limit=4, budget=BUDGET, held=STATE)
    taken, decision = decide_loss_chunk(stop, bf16, Trial(2, 20.35 * GIB, 12500.0), budget=BUDGET, held=STATE)
    assert not taken and decision.micro_batch == 1
    assert decision.reason == stop.reason + ("; micro-batch 2 with 128-token loss chunks peaked at 20.35 GiB + 0.63 GiB "
                                             "of optimizer state, over it too")
    oom, _ = decide_loss_chunk(stop, bf16, Trial(2, float("inf"), None), budget=BUDGET, held=STATE)
    assert not oom


def test_micro_batch_1_over_the_budget_shrinks_the_loss_chunks_rather_than_go_over():
    from loralab.run.probe import decide_loss_chunk

    one = [Trial(1, 19.3 * GIB, 11000.0)]
    stop = decide_micro_batch(one, limit=4, budget=BUDGET, held=STATE)
    assert stop.micro_batch == 1 and "1 is the least" in stop.reason
    taken, decision = decide_loss_chunk(stop, one, Trial(1, 18.9 * GIB, 10500.0), budget=BUDGET, held=STATE)
    assert taken and decision.micro_batch == 1  # slower, but within the memory the run is allowed
    assert "micro-batch 1 with 128-token loss chunks peaked at 18.90 GiB + 0.63 GiB of optimizer state, within it" \
        in decision.reason
    # over the budget at either chunk (the seed 000 recipe capped at the Trainer's peak): the lower peak is kept
    over = [Trial(1, 19.5 * GIB, 11000.0)]
    stop = decide_micro_batch(over, limit=4, budget=BUDGET, held=STATE)
    lower, decision = decide_loss_chunk(stop, over, Trial(1, 19.3 * GIB, 10500.0), budget=BUDGET, held=STATE)
    assert lower and decision.micro_batch == 1 and "over it too but lower" in decision.reason
    same, decision = decide_loss_chunk(stop, over, Trial(1, 19.5 * GIB, 10500.0), budget=BUDGET, held=STATE)
    assert not same and decision.reason.endswith("over it too")
    oom, _ = decide_loss_chunk(stop, over, Trial(1, float("inf"), None), budget=BUDGET, held=STATE)
    assert not oom


def test_the_trainer_memory_rerun_runs_where_the_probe_can_shrink_the_loss_chunks():
    from loralab.bench.experiment import peer_memory_budget

    rows = {r["stack"]: r for r in json.loads((ROOT / "results/bench-fair/recipe.json").read_text())["rows"]}
    ours, trainer = rows["loralab"], {**rows["trainer"], "peak_memory_gib": 19.0}
    total = 150_000_000_000
    assert peer_memory_budget(ours, trainer, total)["run"] is False  # an old record: no micro-batch fits
    auto = {**ours["speed"]["micro_batch_probe"], "loss_chunk_size": 1024}
    plan = peer_memory_budget({**ours, "speed": {**ours["speed"], "micro_batch_probe": auto}}, trainer, total)
    assert plan["run"] is True and plan["budget_gib"] == pytest.approx(19.0 - plan["margin_gib"], abs=0.01)


def test_only_a_fused_loss_has_chunks_to_shrink():
    """The probe's small-chunk retry needs the fused loss: a plain or LoRA head (seed 000's ``lm_head``)
    takes it; a DoRA head, or ``chunked_loss`` off, takes the full logits, where the chunk changes
    nothing (before the LoRA head joined the fused loss, the H100 recipe's retry peaked the same,
    results/bench-probe-h100/recipe.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.speed.step import prepare_model, uses_fused_loss
    from loralab.speed_settings import Speed

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    resolve = dict(device_type="cpu", kind="causal_lm", base_dtype="float32")
    for targets, dora, chunked, fused in ((["q_proj"], False, True, True), (["q_proj", "lm_head"], False, True, True),
                                          (["q_proj", "lm_head"], True, True, False), (["q_proj"], False, False, False)):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=targets, use_dora=dora))
        prepare_model(model, Speed(chunked_loss=chunked, fast_dora=False).resolve(**resolve))
        assert uses_fused_loss(model) is fused, (targets, dora, chunked)


def replay(trials: dict, chunks: list):
    """A ``measure`` for ``probe_sizes`` that returns the H100's recorded trial of each (size, chunk)."""
    return lambda m: trials[(m, chunks[-1])]


@pytest.mark.parametrize("case", ["taken", "retry-over", "retry-oom", "one-over", "one-over-both", "fits"])
def test_the_probe_search_leaves_the_chunk_it_chose(case):
    """``probe_sizes`` over recorded trials (losschunk-*.json's FP8 rows): which sizes it measures at
    which chunk, the chunk it leaves set, and the micro-batch."""
    from loralab.run.probe import probe_sizes

    trials = {(m, 1024): t for m, t in zip((1, 2, 4), FP8_1024)}
    trials[(4, 128)] = {"taken": Trial(4, 18.28 * GIB, 16200.0), "retry-over": Trial(4, 19.5 * GIB, 16200.0),
                        "retry-oom": Trial(4, float("inf"), None)}.get(case)
    if case == "one-over":
        trials = {(1, 1024): Trial(1, 19.3 * GIB, 3700.0), (1, 128): Trial(1, 18.9 * GIB, 3500.0)}
    if case == "one-over-both":  # micro-batch 1 over at either chunk: the lower peak
        trials = {(1, 1024): Trial(1, 19.6 * GIB, 3700.0), (1, 128): Trial(1, 19.3 * GIB, 3500.0)}
    chunks = []
    decision, measured, chunk, small = probe_sizes(replay(trials, chunks), limit=4, held=STATE, loss_chunk=chunks.append,
                                                   budget=BUDGET if case != "fits" else 40 * GIB)
    want = {"taken": (4, [1024, 128, 128], 128), "retry-over": (2, [1024, 128, 1024], 1024),
            "retry-oom": (2, [1024, 128, 1024], 1024), "one-over": (1, [1024, 128, 128], 128),
            "one-over-both": (1, [1024, 128, 128], 128),
            "fits": (4, [1024], 1024)}[case]
    assert (decision.micro_batch, chunks, chunk) == want
    assert (small is None) == (case == "fits")
    if case == "retry-over":  # under the budget alone, over it with the state: the message says so
        assert "peaked at 19.50 GiB + 0.63 GiB of optimizer state, over it too" in decision.reason


def test_after_a_probe_over_several_sizes_the_step_compiles_its_own_size_statically():
    """The probe runs sizes 1, 2, 4 through the compiled layers: dynamo compiles the second size with a symbolic
    batch dimension and that graph then serves the chosen size too (no new compile), so without a reset the
    step's CUDA graphs would capture the dynamic-shape kernels. ``forget_probe_compiles`` drops them: the chosen
    size compiles again with every dimension static, as with an explicit micro-batch."""
    from loralab.run.micro_batch import forget_probe_compiles

    compiles = []

    def backend(gm, example_inputs):  # records whether the graph has a symbolic size among its inputs
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        compiles.append(any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in v.shape)) for v in values))
        return gm.forward

    class Layer(torch.nn.Module):  # a module of ours: dynamo skips torch.nn's own forwards
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.proj(x))

    torch.compiler.reset()
    layer = Layer()
    layer.compile(backend=backend)
    for size in (1, 2, 4):  # the probe's sizes
        layer(torch.randn(size, 8))
    assert compiles == [False, True]  # size 4 ran the dynamic graph compiled at size 2
    assert forget_probe_compiles() is True
    layer(torch.randn(4, 8))  # the step's size
    assert compiles == [False, True, False]
    torch.compiler.reset()


@pytest.mark.parametrize("sizes, compile_layers, reset", [([1, 2, 4], True, True), ([1], True, False),
                                                          ([1, 2], False, False)])
def test_make_step_drops_the_probes_compiled_code_only_after_several_compiled_sizes(monkeypatch, sizes,
                                                                                   compile_layers, reset):
    """make_step's wiring (the probe itself needs CUDA, so it is stood in for, and "auto" kept on CPU): after a
    probe of several sizes through compiled layers the compiled code is dropped, logged and recorded; after one
    size, or with compile off, nothing is dropped and the record says so."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.run import micro_batch as run_micro
    from loralab.run import step as run_step
    from loralab.speed_settings import Speed

    real_resolve, dropped = Speed.resolve, []

    def keep_auto(self, **kw):
        out = real_resolve(self, **kw)
        out.micro_batch = "auto"
        return out

    monkeypatch.setattr(Speed, "resolve", keep_auto)
    monkeypatch.setattr(run_micro, "probe_micro_batch", lambda model, features, **kw: (
        sizes[-1], {"micro_batch": sizes[-1], "sizes": list(sizes), "reason": "stood in", "loss_chunk_size": None}))
    monkeypatch.setattr(run_micro, "forget_probe_compiles", lambda: dropped.append(1) or True)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64)),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lines = []
    _, resolved = run_step.make_step(model, optimizer, speed={"compile": compile_layers}, kind="causal_lm",
                                     dtype="float32", device=torch.device("cpu"),
                                     features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], batch_size=4, limit=4,
                                     max_length=8, pad_id=0, log=lines.append)
    assert resolved.micro_batch_probe["compiled_code_reset"] is reset and len(dropped) == int(reset)
    assert any("probe's compiled code" in line for line in lines) is reset


# call 4 of results/bench-fair-h100-1206 (bf16 LoRA, 8B shape, budget 34.92 GiB): micro-batch 4 stalled
LORA_0441 = {1: Trial(1, 17.76 * GIB, 5011.7), 2: Trial(2, 19.84 * GIB, 9294.1)}


RETIME_CASES = {  # micro-batch 4's measurements in turn, what is kept (rate, peak GiB), the micro-batch chosen
    "stall": ([(5206.4, 23.51), (14855.1, 23.50)], (14855.1, 23.51), 4),
    "slow": ([(5206.4, 23.51), (5300.0, 23.52)], (5300.0, 23.52), 2),
    "slower-again": ([(5206.4, 23.51), (5100.0, 23.50)], (5206.4, 23.51), 2),
    "oom-again": ([(5206.4, 23.51), (None, float("inf"))], (None, float("inf")), 2),
    "at-the-line": ([(9294.1 * 0.8, 23.51)], (9294.1 * 0.8, 23.51), 2),
    "over-budget": ([(5206.4, 36.0)], (5206.4, 36.0), 2),
}


@pytest.mark.parametrize("case", list(RETIME_CASES))
def test_a_size_far_slower_than_the_one_before_is_timed_again(case):
    """A doubled size within the budget measured more than ``RETIME_DROP`` below the size before it is
    measured once more (a stall in the timed passes made an H100's probe keep micro-batch 2 at 7 %
    less speed): the faster rate and the higher peak are kept, or out of memory if either ran out,
    and both measurements are recorded. A size at the line, or over the budget, is measured once."""
    from loralab.run.probe import RETIME_DROP, probe_record, probe_sizes

    assert RETIME_DROP == 0.2  # "at-the-line" sits on it
    fours, (rate, peak), chosen = RETIME_CASES[case]
    fours = [Trial(4, p * GIB, r) for r, p in fours]
    first = list(fours)
    calls = []

    def measure(m):
        calls.append(m)
        return LORA_0441[m] if m < 4 else fours.pop(0)

    decision, trials, _, _ = probe_sizes(measure, limit=4, budget=34.92 * GIB, held=STATE)
    record = probe_record(trials, decision, budget=34.92 * GIB, memory_fraction=0.441, row_tokens=512, held=STATE)
    assert calls == [1, 2] + [4] * len(first) and fours == []
    assert decision.micro_batch == chosen, decision.reason
    assert (trials[-1].rate, trials[-1].peak) == (rate, peak * GIB)
    if len(first) == 1:
        assert trials[-1].retimed is None and record["retimed"] == []
    else:
        assert trials[-1].retimed == tuple(first)
        assert record["retimed"] == [{"size": 4, "tokens_per_second": [t.rate for t in first],
                                      "peaks_gib": ["oom" if t.peak == float("inf") else round(t.peak / GIB, 2) for t in first]}]
        assert record["tokens_per_second"][-1] == rate


def test_an_out_of_memory_size_stops_the_search_without_a_budget():
    """With no memory budget (the peers on CPU, ``trainer_row`` uncapped) an out-of-memory size still stops the
    search at the size before it; it is never chosen at the optimizer batch."""
    from loralab.run.probe import probe_sizes

    trials = {1: Trial(1, None, 100.0), 2: Trial(2, None, 190.0), 4: Trial(4, float("inf"), None)}
    decision, measured, _, _ = probe_sizes(lambda m: trials[m], limit=4, budget=None)
    assert decision.micro_batch == 2 and decision.reason == "memory: micro-batch 4 out of memory"
    decision, _, _, _ = probe_sizes(lambda m: Trial(1, float("inf"), None), limit=4, budget=None)
    assert (decision.micro_batch, decision.reason) == (1, "memory: micro-batch 1 out of memory; 1 is the least")


def test_time_passes_counts_the_fastest_timed_pass(monkeypatch):
    """``time_passes``: neither the untimed first pass nor a stalled timed pass counts, and not the last
    or the mean either (a fake clock)."""
    from loralab.run import probe

    clock, durations, syncs = [0.0], [0.1, 0.3, 0.9], []

    def run_pass():
        clock[0] += durations.pop(0)

    monkeypatch.setattr(probe.time, "perf_counter", lambda: clock[0])
    assert probe.time_passes(run_pass, lambda: syncs.append(clock[0]), repeats=2) == pytest.approx(0.3)
    assert durations == [] and len(syncs) == 3  # every pass ran and was synchronised before its clock read


def test_the_tuned_peers_search_rates_real_tokens_of_one_pass(monkeypatch):
    """``bench.peers.search_micro_batch`` rates a size by the real (unpadded) tokens of one pass over the fastest pass's
    seconds, as loralab's probe does, and drops the gradients of its passes."""
    from types import SimpleNamespace

    from loralab.bench.peers import search_micro_batch
    from loralab.run import probe

    class Counter(torch.nn.Module):  # a loss whose gradient shows whether the probe's passes left any behind
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask, labels):
            return SimpleNamespace(loss=self.w * attention_mask.sum())

    passes = []
    monkeypatch.setattr(probe, "time_passes", lambda run_pass, sync: (run_pass(), passes.append(1), 0.5)[-1])
    model = Counter()

    def make_batch(m):  # 3 real tokens of 4 in each row
        mask = torch.tensor([[1, 1, 1, 0]] * m)
        return {"input_ids": torch.zeros(m, 4, dtype=torch.long), "attention_mask": mask, "labels": mask.clone()}

    micro, record = search_micro_batch(model, make_batch, device="cpu", autocast=None, budget_gib=None, limit=4,
                                       row_tokens=4)
    assert (micro, record["sizes"], record["tokens_per_second"]) == (4, [1, 2, 4], [6.0, 12.0, 24.0])
    assert len(passes) == 3 and model.w.grad is None and record["retimed"] == []


@pytest.mark.parametrize("again", [16200.0, 9100.0])
def test_a_stalled_small_loss_chunk_trial_is_timed_again(again):
    """The size over the budget, probed again with 128-token loss chunks, fits but measured far below the size
    before it (a stall): it is measured once more and the faster kept, so a stall does not cost the run its
    micro-batch (recorded FP8 trials of losschunk-*.json, the small-chunk rate stalled)."""
    from loralab.run.probe import probe_sizes

    trials = {(m, 1024): t for m, t in zip((1, 2, 4), FP8_1024)}
    small = [Trial(4, 18.28 * GIB, 9000.0), Trial(4, 18.30 * GIB, again)]
    chunks, calls = [], []

    def measure(m):
        calls.append((m, chunks[-1]))
        return small.pop(0) if (m, chunks[-1]) == (4, 128) else trials[(m, chunks[-1])]

    decision, _, chunk, kept = probe_sizes(measure, limit=4, held=STATE, loss_chunk=chunks.append, budget=BUDGET)
    assert calls == [(1, 1024), (2, 1024), (4, 1024), (4, 128), (4, 128)] and small == []
    assert kept.retimed is not None and (kept.rate, kept.peak) == (max(9000.0, again), 18.30 * GIB)
    taken = again == 16200.0
    assert (decision.micro_batch, chunk, chunks[-1]) == ((4, 128, 128) if taken else (2, 1024, 1024)), decision.reason
