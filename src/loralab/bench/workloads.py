"""The training bench's workloads: random-weight models of fixed shapes and the batches every stack gets.

Models are built from their configs (``loralab.shapes.MODELS``) with random weights in the
workload's dtype (the recipe's base dtype, the same for every stack; float32 on CPU); each
optimizer step gets the same ``batch_size`` samples in every stack, of fixed length or with
lengths drawn from real histograms (``loralab/speed/lengths.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loralab.shapes import HUB_SHAPES, MODELS
from loralab.speed.lengths import sample_lengths


class BenchError(ValueError):
    """Bad input to ``loralab bench`` (an argument or a recipe it cannot bench), with what is allowed."""


def random_model_id(model_id: str) -> str:
    """``random:<shape>`` for a known hub id (or a ``random:`` id, unchanged); ValueError naming
    the known ids otherwise."""
    if model_id.startswith("random:"):
        return model_id
    if model_id not in HUB_SHAPES:
        raise BenchError(f"--random-weights: no known shape for model_id {model_id!r}; known: "
                         f"{', '.join(sorted(HUB_SHAPES))} (or set model_id to one of "
                         f"{', '.join('random:' + m for m in MODELS)})")
    return "random:" + HUB_SHAPES[model_id]


def gib(n) -> float | None:
    """Bytes ``n`` in GiB rounded to 2 places; None stays None."""
    return None if n is None else round(n / 2**30, 2)


FP8 = "fp8+"
"""Method prefix of a row whose frozen base is FP8 (``quantization: "fp8"``, ``methods/fp8base.py``):
``fp8+lora``, ``fp8+dora``. Only loralab runs it; its ratios are over the peers of the float method."""


def float_method(method: str) -> str:
    """The method without the FP8-base prefix (``fp8+dora`` -> ``dora``)."""
    return method.removeprefix(FP8)


@dataclass
class Workload:
    name: str
    model: str
    methods: tuple[str, ...]
    lengths: str = "fixed"
    """``fixed`` or a histogram in lengths.json (``gsm8k_sft``, ``sst2``)."""
    batch_size: int = 4
    seq_len: int = 512
    """Fixed length, else the cap on drawn lengths; the recipe's ``max_length`` (loralab packs rows
    of this many tokens; the classification peer pads to it with ``peer_pad_to_max``)."""
    rank: int = 32
    alpha: int = 64
    dtype: str = "bfloat16"
    """The base model's dtype (the recipe's ``dtype``), for every stack (float32 on CPU)."""
    peer_pad_to_max: bool = False
    """Classification peer pads every batch to seq_len (seed 000)."""
    steps: int | None = None
    warmup: int | None = None
    """Per-workload step counts for the full preset (short steps need more to time well)."""


def presets(name: str) -> list[Workload]:
    """The workloads of preset ``name`` (``tiny``: small shapes for CPU; ``full``: Llama-3-8B,
    Llama-3.2-1B and roberta-base shapes); ValueError for another name."""
    if name == "tiny":
        return [
            Workload("tiny-llama/fixed-2x64", "tiny-llama", ("lora", "dora", "full", "fp8+lora", "fp8+dora"), batch_size=2, seq_len=64,
                     rank=8, alpha=16),
            Workload("tiny-llama/gsm8k", "tiny-llama", ("lora",), "gsm8k_sft", batch_size=2, seq_len=256, rank=8, alpha=16),
            Workload("tiny-roberta/sst2", "tiny-roberta", ("lora",), "sst2", batch_size=8, seq_len=128, rank=8, alpha=8,
                     dtype="float32", peer_pad_to_max=True),
        ]
    if name == "full":
        return [
            Workload("llama-3-8b/fixed-4x512", "llama-3-8b", ("lora", "dora", "fp8+lora", "fp8+dora")),
            Workload("llama-3-8b/gsm8k", "llama-3-8b", ("lora", "dora"), "gsm8k_sft", seq_len=768),
            Workload("llama-3.2-1b/fixed-4x512", "llama-3.2-1b", ("lora", "full")),
            Workload("llama-3.2-1b/gsm8k", "llama-3.2-1b", ("lora",), "gsm8k_sft", seq_len=768),
            Workload("roberta-base/sst2", "roberta-base", ("lora", "dora"), "sst2", batch_size=32, seq_len=128,
                     rank=128, alpha=128, dtype="float32", peer_pad_to_max=True, steps=40, warmup=12),
        ]
    raise ValueError(f"preset {name!r} is unknown; known: tiny, full")


def is_seq_cls(w: Workload) -> bool:
    """Whether the workload is sequence classification (the roberta shapes; else a causal LM)."""
    return "roberta" in w.model


def build_model(w: Workload, device: str, dtype: torch.dtype):
    """The workload's model from its config in ``MODELS``, random weights (seed 0) in ``dtype`` on
    ``device``: a 2-label sequence classifier for roberta shapes, else a causal LM."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    spec = dict(MODELS[w.model])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):
        if "roberta" in w.model:
            config.num_labels = 2
            return AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def step_features(w: Workload, vocab: int, n_steps: int) -> list[list[dict]]:
    """The optimizer batches of a row: ``n_steps`` lists of ``batch_size`` tokenized samples
    (random ids in [3, vocab), fixed length or lengths drawn from ``w.lengths``), the same for
    every stack. Causal LM: labels = input ids; classification: labels alternate 0/1."""
    gen = torch.Generator().manual_seed(1)
    seq_cls = is_seq_cls(w)
    n = w.batch_size * n_steps
    lengths = [w.seq_len] * n if w.lengths == "fixed" else sample_lengths(w.lengths, n, seed=1, max_len=w.seq_len)
    out = []
    for s in range(n_steps):
        feats = []
        for i in range(s * w.batch_size, (s + 1) * w.batch_size):
            ids = torch.randint(3, vocab, (lengths[i],), generator=gen).tolist()
            feats.append({"input_ids": ids, "labels": i % 2 if seq_cls else list(ids)})
        out.append(feats)
    return out
