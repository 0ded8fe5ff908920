"""Attention for the step's batches without a mask (``speed.step.causal_lm_loss``): SDPA's causal path.

Which of torch's SDPA kernels computes it is torch's choice: with cuDNN above 9.15 on Hopper torch puts cuDNN's
kernel first itself (``check_prefer_cudnn_attention`` in torch's ``sdp_utils.cpp``; torch 2.11 with cuDNN 9.19 on
an H100 ran cuDNN's kernels in ``causal_lm_loss`` on a small Llama, eager and with compiled layers, without CUDA
graphs: results/bench-cudnn-h100, call 3). A setting that put cuDNN first for these batches was built and taken
out again on 2026-12-07 (results/bench-cudnn-h100/README.md says why: it changed nothing where torch already
prefers cuDNN, and probably, not verified, torch's compile caches, which key on the traced graph and not on
SDPA's kernel order, handed code traced with one order to layers traced under another).
"""

from __future__ import annotations

import contextlib

CAUSAL_SDPA = "loralab_causal_sdpa"


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention called without a mask, i.e. with SDPA's ``is_causal``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@contextlib.contextmanager
def plain_causal_attention(hf_model):
    """For batches with neither padding nor packing: attention through SDPA's causal kernel.

    transformers picks ``is_causal`` itself only after checking the data on the host, which it
    skips inside a CUDA graph capture (and so in our warm-up, see ``graphs.py``); it then builds an
    explicit causal mask, which sends SDPA to the slower masked kernel (13 % of a Llama-3-8B step
    in our H100 profile). When the batch carries no mask and no position ids the mask is causal by
    construction, so we say so: an attention implementation registered without a mask function
    makes transformers build none. Only for plain SDPA models without sliding windows.
    """
    config = getattr(hf_model, "config", None)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    usable = (config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
              and getattr(config, "is_causal", True) and getattr(config, "sliding_window", None) is None
              and layer_types == {"full_attention"} and not getattr(config, "sub_configs", None))
    if not usable:
        yield
        return
    from transformers import AttentionInterface

    if CAUSAL_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    config._attn_implementation_internal = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation_internal = "sdpa"
