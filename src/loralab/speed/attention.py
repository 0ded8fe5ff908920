"""Attention for the step's batches without a mask (``speed.step.causal_lm_loss``): SDPA's causal path, and
which of torch's SDPA kernels computes it (``speed.cudnn_attention``).

Why our own code: transformers picks SDPA's ``is_causal`` only after looking at the data on the host, which it
skips inside a CUDA graph capture, and torch's default kernel order on Hopper put its flash kernels first in our
profile of the 8B step (results/bench-profile-h100-1206: ~17 ms of flash kernels in a bf16 LoRA step's profile
window). Timed alone at 4 x 512 tokens, 32 query / 8 key-value heads of 128, forward and backward, cuDNN's kernel
took 0.205 ms against flash's 0.329, equally close to float32 math (results/bench-fusedqkv-h100, sdpa.json).

Where cuDNN's attention is kept off, and why (public reports, not our measurements):
- batches with a mask (padding, packing): cuDNN's backward has returned NaN in the query's gradient with an
  explicit mask at lengths 64 past a multiple of 128 (pytorch/pytorch#196678); masked batches keep torch's order;
- "auto" takes it only on compute capability 9.0 (Hopper: H100, H200, where it was timed) with cuDNN >=
  9.15.1, the release that fixed lengths not divisible by 128 (pytorch/pytorch#169849, #171627). On Blackwell
  (sm_100) cuDNN's attention has corrupted grouped-query generation (pytorch/pytorch#193893).
"""

from __future__ import annotations

import contextlib

import torch

CAUSAL_SDPA = "loralab_causal_sdpa"
CUDNN_MIN_VERSION = 91501  # torch.backends.cudnn.version() of cuDNN 9.15.1 (see the module docstring)


def cudnn_attention_pays(device: torch.device) -> bool:
    """What ``speed.cudnn_attention`` "auto" resolves to on ``device``: True on a CUDA device of compute
    capability 9.0 whose cuDNN is at least 9.15.1 (``CUDNN_MIN_VERSION``); False elsewhere (CPU included)."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0) and (torch.backends.cudnn.version() or 0) >= CUDNN_MIN_VERSION


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention called without a mask, i.e. with SDPA's ``is_causal``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _cudnn_first():
    """torch's SDPA kernels with cuDNN's first, then flash, memory-efficient and math (each used where the
    ones before it refuse the inputs). The choice is made when an op is traced or called, so compiled
    layers traced inside keep cuDNN's op; torch.compile does not guard on this order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


@contextlib.contextmanager
def plain_causal_attention(hf_model, *, cudnn_first: bool = False):
    """For batches with neither padding nor packing: attention through SDPA's causal kernel, with cuDNN's kernel
    first where ``cudnn_first`` (``speed.cudnn_attention``).

    transformers picks ``is_causal`` itself only after checking the data on the host, which it
    skips inside a CUDA graph capture (and so in our warm-up, see ``graphs.py``); it then builds an
    explicit causal mask, which sends SDPA to the slower masked kernel (13 % of a Llama-3-8B step
    in our H100 profile). When the batch carries no mask and no position ids the mask is causal by
    construction, so we say so: an attention implementation registered without a mask function
    makes transformers build none. Only for plain SDPA models without sliding windows; other models
    are left as they are (``cudnn_first`` included).
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
        with _cudnn_first() if cudnn_first else contextlib.nullcontext():
            yield
    finally:
        config._attn_implementation_internal = "sdpa"
