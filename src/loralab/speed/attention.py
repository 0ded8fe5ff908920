"""Attention for the step's batches without a mask (``speed.step.causal_lm_loss``): SDPA's causal path, and
cuDNN's SDPA kernel first where ``speed.cudnn_attention`` says so.

Why our own code: transformers picks SDPA's ``is_causal`` only after looking at the data on the host, which it
skips inside a CUDA graph capture; and torch 2.11 (cu130) on an H100 ran its flash kernels in our profile of the
8B step (results/bench-profile-h100-1206: ~17 ms of flash kernels in a bf16 LoRA profile window), where, timed
alone at 4 x 512 tokens, 32 query / 8 key-value heads of 128, forward and backward, cuDNN's kernel took 0.205 ms
against flash's 0.329, equally close to float32 math (results/bench-fusedqkv-h100, sdpa.json). Newer torch with
cuDNN above 9.15 already puts cuDNN first on Hopper and Blackwell itself (``check_prefer_cudnn_attention`` in
torch's ``sdp_utils.cpp``); there this setting changes nothing.

Where cuDNN is not put first, and why (public reports, not our measurements):
- batches with a mask (padding, packing): cuDNN's backward has returned NaN in the query's gradient with an
  explicit mask at lengths 64 past a multiple of 128 (pytorch/pytorch#196678); masked batches keep torch's order;
- lengths not divisible by 128: cuDNN before 9.15.1 read out of bounds there (pytorch/pytorch#169849, which led
  torch to turn cuDNN's attention off by default for CUDA < 12.9, #171627);
- "auto" takes it only on compute capability 9.0 (H100, H200: where it was timed), not where
  ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` is set, nor where cuDNN's SDPA is switched off
  (``torch.backends.cuda.enable_cudnn_sdp(False)``); on Blackwell (sm_100) cuDNN's attention has corrupted
  grouped-query generation with fewer than 8 key-value heads (pytorch/pytorch#193893).

The batches that take cuDNN run under their own attention implementation name (``CAUSAL_SDPA_CUDNN``): compiled
layers trace the kernel order in force when they are traced, and torch.compile does not guard on that order but
does on the name, so code traced for one kind of batch never runs for the other.
"""

from __future__ import annotations

import contextlib
import os

import torch

CAUSAL_SDPA = "loralab_causal_sdpa"
CAUSAL_SDPA_CUDNN = "loralab_causal_sdpa_cudnn"
CUDNN_LENGTH_MULTIPLE = 128  # the lengths that take cuDNN's kernel (see the module docstring)


def cudnn_attention_pays(device: torch.device) -> bool:
    """What ``speed.cudnn_attention`` "auto" resolves to on ``device``: True on a CUDA device of compute
    capability 9.0 with cuDNN's SDPA available and switched on and ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` unset;
    False elsewhere (CPU included)."""
    if device.type != "cuda" or os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "0") not in ("", "0"):
        return False
    if not (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention called without a mask, i.e. with SDPA's ``is_causal``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _cudnn_first():
    """torch's SDPA kernels now switched on, in their order, with cuDNN's moved first (each used where the ones
    before it refuse the inputs; a kernel switched off stays off). Read when an op is called or traced."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    on = _cur_sdpa_kernel_backends(with_priority=True)
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *(b for b in on if b != SDPBackend.CUDNN_ATTENTION)], set_priority=True)


def takes_cudnn(cudnn_first: bool, length: int | None) -> bool:
    """Whether a batch without a mask of ``length`` tokens a row runs cuDNN's kernel first: ``cudnn_first``
    (``speed.cudnn_attention``), the length a multiple of ``CUDNN_LENGTH_MULTIPLE`` and cuDNN's SDPA switched on."""
    return bool(cudnn_first and length and length % CUDNN_LENGTH_MULTIPLE == 0 and torch.backends.cuda.cudnn_sdp_enabled())


@contextlib.contextmanager
def plain_causal_attention(hf_model, *, cudnn_first: bool = False, length: int | None = None):
    """For batches with neither padding nor packing: attention through SDPA's causal kernel, with cuDNN's kernel
    first where ``takes_cudnn(cudnn_first, length)`` (``length``: tokens per row).

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

    for name in (CAUSAL_SDPA, CAUSAL_SDPA_CUDNN):
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _causal_sdpa)
    cudnn = takes_cudnn(cudnn_first, length)
    config._attn_implementation_internal = CAUSAL_SDPA_CUDNN if cudnn else CAUSAL_SDPA
    try:
        with _cudnn_first() if cudnn else contextlib.nullcontext():
            yield
    finally:
        config._attn_implementation_internal = "sdpa"
