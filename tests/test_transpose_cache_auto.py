"""``speed.fp8_transpose_cache`` "auto": the FP8 layers' column-major codes kept within what the probed
micro-batch leaves of the memory budget (run/spare_memory.py ``spare_bytes``, ``cache_spare_transposes``;
run/step.py ``make_step``). The cache itself gives the same bits (tests/test_fp8.py); these tests hold the
choice: how much is spare, what is cached within it, what is recorded, and where "auto" means nothing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch import nn

from loralab import methods
from loralab.config import ConfigError
from loralab.experiment import build_parameters, hashed_parameters
from loralab.methods.fp8base import quantize_linears
from loralab.run.probe import SMALL_LOSS_CHUNK
from loralab.run.spare_memory import HEADROOM, cache_spare_transposes, spare_bytes
from loralab.speed.fp8 import Fp8Linear
from loralab.speed_settings import Speed

GIB = 2**30


def probe(**kw):
    """A probe record as ``run.probe.probe_micro_batch`` writes it: sizes 1, 2, 4 against a 20 GiB budget."""
    return {"micro_batch": 2, "sizes": [1, 2, 4], "peaks_gib": [10.0, 14.0, 21.0], "budget_gib": 20.0,
            "optimizer_state_gib": 1.0, "loss_chunk_size": 1024, **kw}


def test_spare_bytes_is_the_budget_left_beside_the_size_the_step_runs():
    assert spare_bytes(probe(), 2, 1024) == 5 * GIB
    assert spare_bytes(probe(), 1, 1024) == 9 * GIB  # a rank running the common, smaller size: that size's peak
    # the size over the budget probed again with small loss chunks, and taken: its own peak counts
    small = probe(small_loss_chunk_trial={"size": 4, "peak_gib": 18.0, "tokens_per_second": 3.4})
    assert spare_bytes(small, 4, SMALL_LOSS_CHUNK) == 1 * GIB
    assert spare_bytes(small, 4, 1024) == -2 * GIB  # not taken (or another rank's size): the default chunk's peak
    assert spare_bytes(probe(sizes=[1], peaks_gib=[22.0]), 1, 1024) == -3 * GIB  # over the budget anyway
    assert spare_bytes(probe(sizes=[1], peaks_gib=["oom"]), 1, 1024) is None
    assert spare_bytes(probe(sizes=[1], peaks_gib=[None]), 1, 1024) is None
    assert spare_bytes(probe(budget_gib=None), 2, 1024) is None  # nothing measured (CPU, FSDP): no budget
    assert spare_bytes(probe(), 8, 1024) is None


class Block(nn.Module):
    """Llama's seven projections, with the MLP's three the largest (hidden 32, KV 16, MLP 96)."""

    def __init__(self):
        super().__init__()
        self.q, self.o, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.gate, self.up, self.down = nn.Linear(32, 96), nn.Linear(32, 96), nn.Linear(96, 32)


def fp8_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    quantize_linears(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    return model


def cached_names(model):
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "codes_t_bits", None) is not None}


def test_cache_spare_transposes_keeps_the_largest_layers_within_the_spare_memory_less_headroom():
    mlp, total = 2 * 3 * 96 * 32, 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 96 * 32)
    attn = 2 * (2 * 32 * 32 + 2 * 16 * 32)
    qo = 2 * 2 * 32 * 32
    # a spare too small for the MLP group still takes the attention projections that fit (q and o, the larger first)
    for spare, want in [(mlp - 1, {"q", "o", "k", "v"}), (qo, {"q", "o"}), (qo - 1, {"k", "v"}),
                        (mlp, {"gate", "up", "down"}), (mlp + attn, {"q", "k", "v", "o", "gate", "up", "down"}),
                        (total + 10, {"q", "k", "v", "o", "gate", "up", "down"}), (15, set()), (-5, set()), (None, set())]:
        model, speed, lines = fp8_blocks(), Speed(), []
        share = cache_spare_transposes(model, speed, spare, None, lines.append)
        assert cached_names(model) == want, spare
        cached = speed.fp8_transposes_cached
        assert cached["bytes"] <= max(spare or 0, 0) and cached["total_bytes"] == total
        assert share == round(cached["bytes"] / total, 4)  # the share cached, not the share spare
        assert cached["auto_spare_gib"] == (None if spare is None else round(spare / GIB, 2))
        assert len(lines) == 1 and lines[0].startswith("speed.fp8_transpose_cache auto (")
        assert ("nothing cached" in lines[0]) is (not want)
    # HEADROOM of the budget stays free: with a headroom a little over the attention's bytes, a spare that holds
    # everything no longer holds the MLP group, and the attention projections are what fits
    model, speed = fp8_blocks(), Speed()
    budget_gib = attn / (HEADROOM * GIB) * 1.01
    cache_spare_transposes(model, speed, mlp + attn, budget_gib, print)
    assert cached_names(model) == {"q", "k", "v", "o"}
    assert speed.fp8_transposes_cached["auto_headroom_gib"] == round(HEADROOM * budget_gib, 2)
    float_model, speed = nn.Sequential(nn.Linear(32, 32)), Speed()
    assert cache_spare_transposes(float_model, speed, GIB, 20.0, print) == 0.0 and speed.fp8_transposes_cached is None


def tiny_fp8_llama(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A one-layer Llama with an FP8 base and LoRA on its seven projections: codes of 9,216 bytes in the MLP
    (gate, up, down: 96 x 32 each), 3,072 in attention (q, o: 32 x 32; k, v: 16 x 32); on ``device`` in
    ``dtype`` before the base is quantised."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).to(device, dtype)
    quantize_linears(base.model, [n for n, m in base.model.named_modules() if isinstance(m, nn.Linear)])
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=4, target_modules=projections))


def cached_projections(model):
    return {n.split(".")[-2].removesuffix("_proj") for n, m in model.named_modules()
            if getattr(m, "codes_t_bits", None) is not None}


@pytest.mark.parametrize("own, common, small_chunk, want", [
    (2, 2, False, {"gate", "up", "down"}),  # 5.2 units spare at micro-batch 2, less 1 of headroom: the MLP's 4
    (4, 2, False, {"gate", "up", "down"}),  # another rank ran 2: size 2's spare, not this rank's 4's (0.1)
    (4, 4, True, {"q", "k", "v", "o"}),  # size 4 taken with small loss chunks: their peak, 2.5 units spare (0.1 at 1,024)
    (2, 1, False, {"q", "k", "v", "o", "gate", "up", "down"}),  # size 1: 9 units spare, everything fits
])
def test_make_step_settles_auto_at_the_size_and_loss_chunk_every_rank_runs(monkeypatch, own, common, small_chunk, want):
    """make_step's wiring (the probe needs CUDA, so it is stood in for, and "auto" kept on CPU): the spare
    memory is read at the micro-batch and loss chunk the step runs, the least over ranks, less the headroom,
    and what is cached is what is recorded. The stand-in probe speaks in units of 2,304 bytes (the MLP's codes
    are 4 units, everything 5.33), written as GiB in the record as the real probe writes them."""
    from loralab import distributed
    from loralab.run import micro_batch as run_micro
    from loralab.run import step as run_step

    unit = 2304 / GIB
    real_resolve = Speed.resolve

    def keep_auto(self, **kw):
        out = real_resolve(self, **kw)
        out.micro_batch, out.fp8_transpose_cache = "auto", "auto"
        out.loss_chunk_size = "auto" if small_chunk else out.loss_chunk_size
        return out

    def stand_in_probe(model, features, loss_chunk=None, **kw):
        if loss_chunk is not None:
            loss_chunk(SMALL_LOSS_CHUNK)
        n = [1, 2, 4].index(own) + 1
        return own, {"micro_batch": own, "sizes": [1, 2, 4][:n], "peaks_gib": [10 * unit, 13.8 * unit, 18.9 * unit][:n],
                     "budget_gib": 20 * unit, "optimizer_state_gib": 1 * unit, "reason": "stood in",
                     "small_loss_chunk_trial": {"size": 4, "peak_gib": 16.5 * unit, "tokens_per_second": None}}

    monkeypatch.setattr(Speed, "resolve", keep_auto)
    monkeypatch.setattr(run_micro, "probe_micro_batch", stand_in_probe)
    monkeypatch.setattr(run_micro, "uses_fused_loss", lambda model: small_chunk)
    monkeypatch.setattr(distributed, "min_over_ranks", lambda value: common if value == own else value)
    model = tiny_fp8_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lines = []
    _, resolved = run_step.make_step(model, optimizer, speed={"compile": False}, kind="causal_lm", dtype="float32",
                                     device=torch.device("cpu"), features=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}],
                                     batch_size=4, limit=4, max_length=8, pad_id=0, log=lines.append)
    assert resolved.micro_batch == common and (resolved.loss_chunk_size == SMALL_LOSS_CHUNK) is small_chunk
    assert cached_projections(model) == want
    cached = resolved.record()["fp8_transposes_cached"]
    assert cached["total_bytes"] == 12288 and resolved.fp8_transpose_cache == round(cached["bytes"] / 12288, 4)
    assert sum(line.startswith("speed.fp8_transpose_cache auto (") for line in lines) == 1


def test_fsdp_turns_auto_off_quietly_and_an_explicit_share_off_with_a_line():
    from loralab.distributed import Launch
    from loralab.run.step import distributed_speed

    fsdp = Launch(rank=0, world_size=2, backend="nccl", sharding="fsdp")
    for value, said in (("auto", False), (0.81, True)):
        speed, lines = Speed(fp8_transpose_cache=value, compile=False, cuda_graphs=False), []
        distributed_speed(speed, fsdp, rewrites_base=None, log=lines.append)
        assert speed.fp8_transpose_cache == 0.0 and speed.fp8_fused_qkv is False  # one unsharded buffer each
        assert any("fp8_transpose_cache off under FSDP" in line for line in lines) is said


def test_auto_is_settled_by_a_measurement_on_cuda_and_caches_nothing_on_cpu():
    """"auto" stays for the run to settle on CUDA, probed or explicit micro-batch alike (``run/micro_batch.py``
    measures an explicit size once); on CPU nothing is measured, so nothing is spare."""
    for device, micro, want in (("cpu", "auto", 0.0), ("cpu", 4, 0.0), ("cuda", 4, "auto"), ("cuda", "auto", "auto")):
        resolved = Speed(micro_batch=micro, fp8_transpose_cache="auto").resolve(device_type=device, kind="causal_lm",
                                                                                base_dtype="bfloat16")
        assert resolved.fp8_transpose_cache == want, (device, micro)
    explicit = Speed(micro_batch=4, fp8_transpose_cache=0.81).resolve(device_type="cuda", kind="causal_lm",
                                                                      base_dtype="bfloat16")
    assert explicit.fp8_transpose_cache == 0.81  # an explicit share always wins


def test_auto_and_the_old_default_pass_on_any_base_and_hash_alike():
    cfg = LoraConfig(r=4, target_modules=["query"])
    for value, refused_off_fp8 in (("auto", False), (0, False), (0.0, False), (0.5, True)):
        for base in (None, "nf4", "fp8"):
            params = build_parameters({"quantization": base, "speed": {"fp8_transpose_cache": value}})
            problems = methods.choose_method(cfg, params).conflicts(cfg, params)
            said = any("'speed.fp8_transpose_cache'" in p for p in problems)
            assert said is (refused_off_fp8 and base != "fp8"), (value, base)
    # 0 was the default before "auto": an experiment that set it keeps its train_params_sha, as one that sets "auto"
    for value in ("auto", 0, 0.0):
        assert "fp8_transpose_cache" not in hashed_parameters(build_parameters({"speed": {"fp8_transpose_cache": value}}))["speed"]
    assert hashed_parameters(build_parameters({"speed": {"fp8_transpose_cache": 0.81}}))["speed"]["fp8_transpose_cache"] == 0.81
    with pytest.raises(ConfigError, match="'speed.fp8_transpose_cache' = 'most' must be \"auto\" or a number"):
        build_parameters({"speed": {"fp8_transpose_cache": "most"}})


def test_prepare_model_leaves_auto_to_the_probe():
    import dataclasses

    from loralab.speed.step import PLAIN, prepare_model

    model = fp8_blocks()
    options = dataclasses.replace(PLAIN, fp8_transpose_cache="auto")
    prepare_model(model, options)
    assert cached_names(model) == set() and options.fp8_transposes_cached is None
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 14  # FP8 layers there, none cached


def test_plain_settings_leave_no_auto_that_prepare_model_acts_on():
    """``PLAIN`` (what a model prepared outside ``make_step`` computes with) names a value for every key
    ``prepare_model`` acts on, so such a model's record holds no "auto" that nothing settled (the FP8 cache's
    "auto" is settled only by ``make_step`` after its probe)."""
    import dataclasses

    from loralab.speed.step import PLAIN

    acted_on = ("autocast", "compile", "lora_scale_at_rank", "activation_memory_budget", "fp8_transpose_cache",
                "fp8_quantize_kernel", "fused_lora", "fast_dora", "fp8_refresh_kernel")
    assert [k for k in acted_on if getattr(PLAIN, k) == "auto"] == []
    assert set(acted_on) <= {f.name for f in dataclasses.fields(PLAIN)}


def test_an_explicit_micro_batch_is_measured_once_and_kept_where_auto_would_cache_fp8_codes(monkeypatch):
    """``settle_micro_batch`` with an explicit ``speed.micro_batch`` on CUDA (stood in: the measurement needs a GPU):
    where "auto" would cache an FP8 base's codes, that one size is measured (the probe's measurement, the step's
    optimizer state counted), kept whatever it peaks at, and what it leaves of the budget is spent as after a
    probe; the record says why it was measured. Not measured: no FP8 layer, an explicit share, CPU. The stand-in
    speaks in the units of ``test_make_step_settles_auto_at_the_size_and_loss_chunk_every_rank_runs``."""
    from loralab.run import micro_batch as run_micro

    unit, measured, real = 2304 / GIB, [], run_micro.measure_micro_batch

    def stand_in(model, features, *, size, why, **kw):
        measured.append((size, why, kw["optimizer"] is not None, kw["memory_fraction"]))
        return {"micro_batch": size, "reason": f"explicit: speed.micro_batch; measured once: {why}", "sizes": [size],
                "peaks_gib": [13.8 * unit], "budget_gib": 20 * unit, "optimizer_state_gib": 1 * unit,
                "loss_chunk_size": None}

    monkeypatch.setattr(run_micro, "measure_micro_batch", stand_in)
    features = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]

    def settle(model, device="cuda", **speed):
        settings = Speed(compile=False, **speed)
        resolved = settings.resolve(device_type=device, kind="causal_lm", base_dtype="bfloat16")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        lines = []
        micro = run_micro.settle_micro_batch(model, resolved, settings, kind="causal_lm", features=features,
                                             batch_size=4, limit=4, max_length=8, pad_id=0, device=torch.device(device),
                                             optimizer=optimizer, dora_layers=0, log=lines.append)
        return micro, resolved, lines

    model = tiny_fp8_llama()
    micro, resolved, lines = settle(model, micro_batch=2)
    assert micro == resolved.micro_batch == 2 and measured == [(2, run_micro.MEASURED_FOR_CACHE, True, 0.25)]
    assert cached_projections(model) == {"gate", "up", "down"}  # 5.2 units spare, 1 of headroom: the MLP's 4
    assert resolved.fp8_transpose_cache == round(9216 / 12288, 4) and resolved.loss_chunk_size == 1024
    assert resolved.micro_batch_probe["reason"].startswith("explicit: speed.micro_batch; measured once: ")
    assert lines[0].startswith("micro-batch 2 (explicit; measured once for speed.fp8_transpose_cache auto: peak ")
    assert any(line.startswith("speed.fp8_transpose_cache auto (") for line in lines)
    measured.clear()  # an explicit size above the optimizer batch: measured at the batch, kept as set
    micro, resolved, _ = settle(tiny_fp8_llama(), micro_batch=8)
    assert micro == resolved.micro_batch_probe["micro_batch"] == 8 and measured[0][0] == 4
    assert resolved.fp8_transpose_cache == round(9216 / 12288, 4)  # the spare of the size measured
    for model, speed, device in ((tiny_fp8_llama(), {"fp8_transpose_cache": 0.81}, "cuda"),
                                 (tiny_fp8_llama(), {}, "cpu"), (nn.Sequential(nn.Linear(32, 32)), {}, "cuda")):
        measured.clear()
        micro, resolved, _ = settle(model, device=device, micro_batch=2, **speed)
        assert micro == 2 and not measured and resolved.micro_batch_probe["reason"] == "explicit: speed.micro_batch"
    with pytest.raises(ValueError, match="needs a CUDA device"):  # the real measurement, off CUDA
        real(tiny_fp8_llama(), features, size=2, kind="causal_lm", packing=True, max_length=8,
             pad_id=0, device=torch.device("cpu"), memory_fraction=0.25)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the FP8 kernel and the measurement need an FP8 GPU")
def test_make_step_on_cuda_measures_an_explicit_micro_batch_and_caches_within_its_budget():
    """On a GPU: an explicit micro-batch's one measurement is in the record (one size, its peak, the budget) and
    "auto" caches the tiny model's codes within the budget it leaves."""
    from loralab.run.step import make_step

    model = tiny_fp8_llama("cuda", torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    features = [{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}] * 4
    _, resolved = make_step(model, optimizer, speed={"micro_batch": 2, "compile": False, "cuda_graphs": False},
                            kind="causal_lm", dtype="bfloat16", device=torch.device("cuda"), features=features,
                            batch_size=4, limit=4, max_length=8, pad_id=0, log=print)
    probe = resolved.micro_batch_probe
    assert resolved.micro_batch == 2 and probe["sizes"] == [2] and isinstance(probe["peaks_gib"][0], float)
    cached = resolved.record()["fp8_transposes_cached"]
    assert probe["budget_gib"] > probe["peaks_gib"][0] and resolved.fp8_transpose_cache == 1.0
    assert cached["bytes"] == cached["total_bytes"] == 12288  # every layer's codes: the budget dwarfs the model
