"""Attention in ``loralab bench``: which rows run with cuDNN's SDPA kernel switched off (bench/runner.py)."""

from __future__ import annotations

import torch


def test_the_bench_switches_cudnn_off_only_for_peers_of_varying_lengths():
    """``loralab bench`` runs loralab's rows and fixed-shape peers with torch's own kernel order (what ``loralab run``
    and a careful user get); only a peer's row of a workload whose lengths vary runs with cuDNN's SDPA off (a plan
    per new shape), and the switch is undone after the row."""
    from loralab.bench.runner import peer_attention
    from loralab.bench.workloads import presets

    fixed = next(w for w in presets("full") if w.lengths == "fixed")
    varying = next(w for w in presets("full") if w.lengths != "fixed")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    seen = {}
    for w, stack in ((fixed, "tuned"), (fixed, "loralab"), (varying, "loralab"), (varying, "tuned"), (varying, "peer")):
        with peer_attention(w, stack, "cuda"):
            seen[(w.lengths == "fixed", stack)] = torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with peer_attention(varying, "tuned", "cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)  # a kernel the user switched off stays off: only cuDNN's switch moves
    try:
        with peer_attention(varying, "tuned", "cuda") as off:
            assert off and not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    assert seen == {(True, "tuned"): True, (True, "loralab"): True, (False, "loralab"): True, (False, "tuned"): False,
                    (False, "peer"): False}


def test_run_bench_runs_each_row_with_cudnn_as_peer_attention_says_and_records_it(monkeypatch):
    """Through ``run_bench`` (stand-in rows, no model built): on CUDA the peers of the varying-length workload run with
    cuDNN's SDPA off and their rows say so; loralab's rows and the fixed-shape peers run with it on and say nothing."""
    from loralab.bench import runner

    seen = {}

    def fake_run_one(w, method, stack, device, steps, warmup, speed=None, budget_gib=None, budget_from=None):
        seen[(w.name, stack)] = torch.backends.cuda.cudnn_sdp_enabled()
        return {"workload": w.name, "method": method, "stack": stack, "throughput": 1.0, "unit": "tokens/s",
                "peak_memory_gib": 1.0, "mfu": None}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    rows, _ = runner.run_bench("tiny", "cuda", methods=("lora",), stacks=("loralab", "peer"), log=lambda s: None)
    off = {(r["workload"], r["stack"]) for r in rows if r.get("cudnn_sdpa") == "off"}
    assert off == {k for k, on in seen.items() if not on} == {("tiny-llama/gsm8k", "peer"), ("tiny-roberta/sst2", "peer")}
    assert seen[("tiny-llama/fixed-2x64", "peer")] and seen[("tiny-llama/gsm8k", "loralab")]
    assert torch.backends.cuda.cudnn_sdp_enabled()
