"""The decoder forward over the slot cache: the model's own modules, our attention.

Every projection, norm, MLP, embedding and LM head is the model's own module, called as the
model's forward calls it, so any peft adapter (LoRA, DoRA, the residual inits, LoRA-FA, an NF4
base, loralab's fused layers) applies exactly as in training. Only three things are ours: rotary
position embedding applied with the model's own ``rotary_emb`` tables (``q * cos + rotate_half(q) *
sin``, RoFormer eq. 34 in the half-split layout transformers' Llama uses), writing keys/values into
the slot cache, and attention over that cache (softmax in fp32, grouped-query heads without
copying keys). Supported: decoder stacks laid out as transformers' Llama (``llama``, ``mistral``
without a sliding window shorter than the cache, ``qwen2``, ``qwen3`` with its q/k norms);
``unsupported_reason`` names what else stops it.
"""

from __future__ import annotations

import math

import torch

from loralab.engine.cache import SlotCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GRAPHABLE_ROPE = (None, "default", "linear", "llama3")
"""Rope types whose tables depend on positions only (``dynamic`` rescales with the sequence length
seen, a data-dependent branch a CUDA graph cannot hold)."""


def causal_lm(model):
    """The transformers ``*ForCausalLM`` inside ``model`` (a peft model's base model, adapters in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model, max_len: int | None = None) -> str | None:
    """Why the engine cannot run ``model`` (None when it can)."""
    base = causal_lm(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one the engine runs ({', '.join(SUPPORTED_MODEL_TYPES)})"
    inner = getattr(base, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(base).__name__} is not laid out as transformers' Llama (model.embed_tokens/layers/norm/rotary_emb)"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and (max_len is None or window < max_len):
        return f"sliding-window attention (window {window}) is not implemented in the engine"
    peft_config = getattr(model, "peft_config", None) or {}
    for name, cfg in peft_config.items():
        if not getattr(cfg, "peft_type", None) or str(getattr(cfg.peft_type, "value", cfg.peft_type)) in (
                "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"):
            return f"peft adapter {name!r} ({cfg.peft_type}) changes the input, not the layers"
    return None


def rope_is_static(model) -> bool:
    config = causal_lm(model).config
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return (rope.get("rope_type") or rope.get("type")) in GRAPHABLE_ROPE


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderRunner:
    """Runs ``model``'s decoder on token rows, reading and writing a ``SlotCache``.

    ``forward(input_ids [B, T], positions [B, T], attend) -> hidden [B, T, hidden]``, where
    ``attend(layer, q [B, H, T, D], k [B, KVH, T, D], v) -> [B, H, T, D]`` writes k/v into the cache and
    attends; ``decode_attend`` and ``prefill_attend`` build the two ``attend`` functions."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the generation engine cannot run this model: {reason}")
        base = causal_lm(model)
        self.model = model
        self.config = base.config
        self.embed = base.get_input_embeddings()
        self.layers = list(base.model.layers)
        self.norm = base.model.norm
        self.rotary = base.model.rotary_emb
        self.lm_head = base.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.head_dim = getattr(attn, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.heads = self.config.num_attention_heads
        self.kv_heads = getattr(self.config, "num_key_value_heads", None) or self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = getattr(attn, "scaling", None) or self.head_dim ** -0.5
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        first = next(p for p in base.parameters() if p.dtype.is_floating_point)
        self.device = first.device
        # the cache's dtype: the activations' (an NF4 base stores uint8 weights; its compute dtype is the norms')
        self.dtype = self.norm.weight.dtype if hasattr(self.norm, "weight") else first.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        b, t = input_ids.shape
        h = self.embed(input_ids)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(b, t, -1, self.head_dim)
            k = a.k_proj(x).view(b, t, -1, self.head_dim)
            v = a.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = attend(i, q, k.to(self.dtype), v.to(self.dtype))
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (transformers' generate also scores in fp32)."""
        return self.lm_head(hidden).float()

    # -- attention ---------------------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], keys/values [B, KVH, K, D], allowed [B, T, K] bool -> [B, H, T, D].

        Grouped-query heads as ``[B, KVH, G*T, D]`` against the shared keys: no repeated copy of
        the cache; scores and softmax in fp32."""
        b, _, t, d = q.shape
        qg = q.reshape(b, self.kv_heads, self.groups * t, d).to(keys.dtype)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling
        scores = scores.view(b, self.kv_heads, self.groups, t, -1)
        scores = scores.masked_fill(~allowed[:, None, None], -math.inf)
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(b, self.kv_heads, self.groups * t, -1)
        return torch.matmul(probs, values).view(b, self.heads, t, d)

    def decode_attend(self, cache: SlotCache, slots: int, positions: torch.Tensor, length: int):
        """``attend`` for one new token in each of slots ``0 .. slots-1`` at ``positions`` ([slots] long),
        attending to cache positions ``0 .. length-1`` (``length`` > every position)."""
        rows = torch.arange(slots, device=positions.device)
        allowed = (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[:, None, :]

        def attend(layer, q, k, v):
            cache.k[layer][rows, :, positions] = k[:, :, 0]
            cache.v[layer][rows, :, positions] = v[:, :, 0]
            return self._attend(q, cache.k[layer, :slots, :, :length], cache.v[layer, :slots, :, :length], allowed)

        return attend

    def prefill_attend(self, cache: SlotCache, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int):
        """``attend`` for rows of ``width`` right-padded tokens: row ``b`` holds ``lengths[b]`` tokens of
        slot ``slots[b]`` at positions ``starts[b] ..``; earlier positions are already in the cache."""
        device = slots.device
        t = torch.arange(width, device=device)
        valid = t[None, :] < lengths[:, None]  # [B, T]
        row_idx, col_idx = valid.nonzero(as_tuple=True)
        write_slots, write_pos = slots[row_idx], starts[row_idx] + col_idx
        keys_len = int((starts + lengths).max())
        allowed = torch.arange(keys_len, device=device)[None, None, :] <= (starts[:, None] + t[None, :])[:, :, None]

        def attend(layer, q, k, v):
            cache.k[layer][write_slots, :, write_pos] = k[row_idx, :, col_idx]
            cache.v[layer][write_slots, :, write_pos] = v[row_idx, :, col_idx]
            keys = cache.k[layer][slots, :, :keys_len]
            values = cache.v[layer][slots, :, :keys_len]
            return self._attend(q, keys, values, allowed)

        return attend
