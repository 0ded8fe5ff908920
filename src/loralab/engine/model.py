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

import copy

import torch
import torch.nn.functional as F

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
    if _sharded(base):
        return "its parameters are sharded (FSDP DTensors); the engine needs whole weights on one device"
    peft_config = getattr(model, "peft_config", None) or {}
    for name, cfg in peft_config.items():
        if not getattr(cfg, "peft_type", None) or str(getattr(cfg.peft_type, "value", cfg.peft_type)) in (
                "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"):
            return f"peft adapter {name!r} ({cfg.peft_type}) changes the input, not the layers"
    return None


def _sharded(module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot have sharded it
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def rope_is_static(model) -> bool:
    config = causal_lm(model).config
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return (rope.get("rope_type") or rope.get("type")) in GRAPHABLE_ROPE


def _projections(layer) -> list:
    attn, mlp = layer.self_attn, layer.mlp
    names = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
             (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
    return [getattr(owner, name) for owner, name in names if hasattr(owner, name)]


def _merged_copy(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of ``module`` with its active adapters merged, or None to call the module itself
    (no adapter, already merged, adapters disabled, or a base that is not a plain ``nn.Linear``)."""
    if not hasattr(module, "get_base_layer") or not hasattr(module, "merge"):
        return None
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    duplicate = copy.deepcopy(module)
    duplicate.merge()
    merged = duplicate.get_base_layer()
    return merged.weight.detach(), None if merged.bias is None else merged.bias.detach()


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
        self._weights: dict = {}

    # -- merged copies -----------------------------------------------------------------------------
    def merge_copies(self) -> int:
        """Merge every adapted projection into a **copy** of its base weight (peft's own ``merge`` on
        a deep copy of the layer, so DoRA's magnitude and every variant merge as peft defines them);
        the model is not touched. Later forwards use the copies: one GEMM per projection instead of
        base + adapter kernels (on an H200 at 256 slots, LoRA r32's fp32 adapter GEMMs and casts were
        ~9 of a 25 ms step). Quantised bases (NF4) keep the model's own forward. Returns how many
        projections were merged; ``release`` drops the copies."""
        self._weights = {}
        for layer in self.layers:
            for module in _projections(layer):
                merged = _merged_copy(module)
                if merged is not None:
                    self._weights[module] = merged
        return len(self._weights)

    def release(self) -> None:
        self._weights = {}

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        merged = self._weights.get(module)
        if merged is None:
            return module(x)
        return F.linear(x, merged[0], merged[1])

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        if not self._weights or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return mlp(x)
        return self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        b, t = input_ids.shape
        h = self.embed(input_ids)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = self._linear(a.q_proj, x).view(b, t, -1, self.head_dim)
            k = self._linear(a.k_proj, x).view(b, t, -1, self.head_dim)
            v = self._linear(a.v_proj, x).view(b, t, -1, self.head_dim).transpose(1, 2)
            if self.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = attend(i, q, k.to(self.dtype), v.to(self.dtype))
            h = h + self._linear(a.o_proj, o.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 (transformers' generate also scores in fp32)."""
        return self.lm_head(hidden).float()

    # -- attention ---------------------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], keys/values [B, KVH, K, D], allowed [B, T, K] bool -> [B, H, T, D].

        Grouped-query heads become queries of their key head, ``[B, KVH, G*T, D]`` against the
        shared keys: no copy of the cache is repeated per head and each key is read once. One new
        token per row (decode) is two batched matmuls with the softmax in fp32 (on an H200 at 256
        slots x 384 keys: 3.6 ms per step for 12.9 GB of keys and values, near the bandwidth; cuDNN's
        masked SDPA took 5.4 ms); a prefill goes to SDPA, which never holds all scores at once."""
        b, _, t, d = q.shape
        qg = q.reshape(b, self.kv_heads, self.groups * t, d).to(keys.dtype)
        if t == 1:
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling
            scores = scores.masked_fill(~allowed[:, None], -torch.inf)  # [B, 1, 1, K] over heads
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            return torch.matmul(probs, values).view(b, self.heads, t, d)
        mask = allowed[:, None, None].expand(b, 1, self.groups, t, allowed.shape[-1]).reshape(b, 1, self.groups * t, -1)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=self.scaling)
        return out.view(b, self.heads, t, d)

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
