"""Attention for the step's batches without a mask (``speed.step.causal_lm_loss``): SDPA's causal path; and, for
batches with one, the widths the step pads them to where cuDNN's masked kernel gives NaN (``MaskedWidths``, below).

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

import torch

from loralab.data import carries_padding

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


# Batches with an explicit mask (padded rows, packed rows whose samples restart their positions): SDPA's cuDNN
# kernel, which torch puts first on compute capability 9.x and 10.x with cuDNN above 9.15, returns NaN in grad_q when
# the key length is 64 modulo 128 and some query row's logsumexp is below about -88.7 (pytorch/pytorch#196678, a
# regression since torch 2.11, reported on H100/H200; also huggingface/trl#7181 on torch 2.13: the last 128-wide key
# tile's padded half is scored 0 instead of -inf). Other widths, is_causal without a mask, and the flash, efficient
# and math kernels are clean by those reports. The step pads such widths a little further (masked padding: the loss
# and gradients are those of the narrower batch), so no masked batch has that width where cuDNN may run.
CUDNN_NAN_WIDTH = (128, 64)  # (modulus, remainder) of the key lengths the report names


def cudnn_masked_width_risk(device: torch.device) -> bool:
    """Whether a masked SDPA call on ``device`` may run cuDNN's kernel with the NaN of pytorch/pytorch#196678: CUDA,
    cuDNN's SDPA switched on (``torch.backends.cuda.cudnn_sdp_enabled()``), a GPU of compute capability 9.x or 10.x and
    cuDNN above 9.15.0 (where torch prefers cuDNN's kernel: ``check_prefer_cudnn_attention``). Conservative: no
    torch or cuDNN version is known to be fixed. Measured on an H100, torch 2.11, cuDNN 9.19: every grad_q element NaN
    at widths 64, 192, 320 and 704, none at the guarded widths (results/bench-fair-h100-1207)."""
    if device.type != "cuda" or not torch.cuda.is_available() or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    major = torch.cuda.get_device_capability(device)[0]
    return major in (9, 10) and (torch.backends.cudnn.version() or 0) > 91500


def masked_width(width: int, step: int) -> int:
    """``width`` (tokens, > 0), or ``width + step`` where ``width`` is 64 modulo 128 (``CUDNN_NAN_WIDTH``); ``step``
    (16 or 64: the bucket's granularity) keeps the result on the bucket grid and off that remainder."""
    modulus, remainder = CUDNN_NAN_WIDTH
    return width + step if width % modulus == remainder else width


def step_width(width: int, bucketed: bool) -> int:
    """``masked_width`` on the training step's grid: 64 tokens a step above 128 where ``bucketed`` (CUDA graphs:
    ``graphs.bucket_width``'s multiples of 64), else 16."""
    return masked_width(width, 64 if bucketed and width > 128 else 16)


class MaskedWidths:
    """``widths(width, feats=None) -> width``: a batch's padded width (tokens), or ``step_width``'s wider one where a
    masked batch on ``device`` may run cuDNN's kernel (``cudnn_masked_width_risk``; ``on``). ``bucketed``: widths on
    ``graphs.bucket_width``'s grid (CUDA graphs; a graphed step's padded batches always carry an explicit mask). Outside
    CUDA graphs a batch of samples ``feats`` with no padded position at ``width`` (``data.carries_padding``, asked only
    then) stays as it is: transformers then finds its mask all ones and runs SDPA's causal path without one; None:
    a batch with a mask. When on, one line is logged (``log``) as the step is built;
    ``widened`` counts the batches widened."""

    def __init__(self, device: torch.device, bucketed: bool, log=print):
        self.on, self.bucketed, self.widened = cudnn_masked_width_risk(device), bucketed, 0
        if self.on:
            log("masked-width guard on: torch may run cuDNN's SDPA here, whose masked backward gives NaN gradients at "
                "key widths of 64 modulo 128 (pytorch/pytorch#196678), so masked batches of such widths are padded a "
                "step further (speed/attention.py)")

    def __call__(self, width: int, feats: list[dict] | None = None) -> int:
        masked = self.on and (self.bucketed or feats is None or carries_padding(feats, width))
        wider = step_width(width, self.bucketed) if masked else width
        self.widened += wider != width
        return wider
