"""``speed.fp8_transpose_cache`` "auto": the FP8 layers' column-major codes kept within what the probed
micro-batch leaves of the memory budget (run/probe.py ``spare_bytes``, ``transpose_cache_share``,
``cache_spare_transposes``). The cache itself gives the same bits (tests/test_fp8.py); these tests hold the
choice: how much is spare, what is cached within it, what is recorded, and where "auto" means nothing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch import nn

from loralab import methods
from loralab.config import ConfigError, Speed
from loralab.experiment import build_parameters, hashed_parameters
from loralab.methods.fp8base import quantize_linears
from loralab.run.probe import (
    Decision,
    Trial,
    cache_spare_transposes,
    spare_bytes,
    transpose_cache_share,
)
from loralab.speed.fp8 import Fp8Linear

GIB = 2**30


def test_spare_bytes_is_the_budget_left_beside_the_chosen_size():
    trials = [Trial(1, 10 * GIB, 1.0), Trial(2, 14 * GIB, 1.9), Trial(4, 21 * GIB, 3.5)]
    chosen = Decision(2, None, "memory: micro-batch 4 ...")
    assert spare_bytes(chosen, trials, None, budget=20 * GIB, held=1 * GIB) == 5 * GIB
    # the size over the budget probed again with small loss chunks, and taken: its own peak counts
    small = Trial(4, 18 * GIB, 3.4)
    assert spare_bytes(Decision(4, None, "memory: ..."), trials, small, budget=20 * GIB, held=1 * GIB) == 1 * GIB
    # micro-batch 1 over the budget: negative, so nothing can be spent
    assert spare_bytes(Decision(1, None, "1 is the least"), [Trial(1, 22 * GIB, 1.0)], None, budget=20 * GIB) == -2 * GIB
    assert spare_bytes(Decision(1, None, ""), [Trial(1, None, None)], None, budget=20 * GIB) is None
    assert spare_bytes(Decision(1, None, ""), [Trial(1, float("inf"), None)], None, budget=20 * GIB) is None


def test_transpose_cache_share_fits_the_spare_bytes():
    assert transpose_cache_share(3 * GIB, 6 * GIB) == 0.5
    assert transpose_cache_share(9 * GIB, 6 * GIB) == 1.0  # at most every layer
    for spare in (None, 0, -GIB):
        assert transpose_cache_share(spare, 6 * GIB) == 0.0
    assert transpose_cache_share(GIB, 0) == 0.0  # no FP8 layer


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


def test_cache_spare_transposes_keeps_the_largest_layers_within_the_spare_memory_and_records_it():
    mlp, total = 2 * 3 * 96 * 32, 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 96 * 32)
    attn = 2 * (2 * 32 * 32 + 2 * 16 * 32)
    # a spare too small for the MLP group still takes the attention projections that fit (q and o, the larger first)
    for spare, want in [(mlp - 1, {"q", "o", "k", "v"}), (2 * 2 * 32 * 32, {"q", "o"}), (2 * 2 * 32 * 32 - 1, {"k", "v"}),
                        (mlp, {"gate", "up", "down"}), (mlp + attn, {"q", "k", "v", "o", "gate", "up", "down"}),
                        (total + 10, {"q", "k", "v", "o", "gate", "up", "down"}), (15, set()), (-5, set()), (None, set())]:
        model, speed, lines = fp8_blocks(), Speed(), []
        share = cache_spare_transposes(model, speed, spare, lines.append)
        assert cached_names(model) == want, spare
        cached = speed.fp8_transposes_cached
        assert cached["bytes"] <= max(spare or 0, 0) and cached["total_bytes"] == total
        assert cached["auto_spare_gib"] == (None if spare is None else round(spare / GIB, 2))
        assert share == (0.0 if not spare or spare < 0 else round(min(1.0, spare / total), 4))
        assert len(lines) == 1 and lines[0].startswith("speed.fp8_transpose_cache auto (auto: ")
        assert ("NOTHING cached" in lines[0]) is (not want)
    float_model, speed = nn.Sequential(nn.Linear(32, 32)), Speed()
    assert cache_spare_transposes(float_model, speed, GIB, print) == 0.0 and speed.fp8_transposes_cached is None


def test_auto_caches_nothing_where_nothing_is_probed():
    for device, micro, want in (("cpu", "auto", 0.0), ("cuda", 4, 0.0), ("cuda", "auto", "auto")):
        resolved = Speed(micro_batch=micro).resolve(device_type=device, kind="causal_lm", base_dtype="bfloat16")
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
    # 0 was the default before "auto": an experiment that set it keeps its train_params_sha
    for value in ("auto", 0.0):
        assert "fp8_transpose_cache" not in hashed_parameters(build_parameters({"speed": {"fp8_transpose_cache": value}}))["speed"]
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
