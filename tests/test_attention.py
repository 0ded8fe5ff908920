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
    assert seen == {(True, "tuned"): True, (True, "loralab"): True, (False, "loralab"): True, (False, "tuned"): False,
                    (False, "peer"): False}
