"""Model shapes: transformers config keys of the architectures loralab builds with random weights
(``random:<shape>`` model ids in ``loralab.models``; ``loralab bench``'s workloads), and which
shape stands in for a hub model id (``--random-weights``). Plain data, on the ground floor, so the
loader and the bench read one table. Shapes from the models' published config.json files."""

from __future__ import annotations

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA32_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA32_3B = dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
ROBERTA_BASE = dict(model_type="roberta", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
TINY_ROBERTA = dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=512, max_position_embeddings=160, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
MODELS = {"llama-3-8b": LLAMA3_8B, "llama-3.2-1b": LLAMA32_1B, "llama-3.2-3b": LLAMA32_3B, "llama-2-7b": LLAMA2_7B,
          "smollm2-135m": SMOLLM2_135M, "roberta-base": ROBERTA_BASE, "tiny-llama": TINY_LLAMA,
          "tiny-roberta": TINY_ROBERTA}
"""Architectures (transformers config keys) by shape name: the ``random:<shape>`` model ids and
``loralab bench``'s workloads. Shapes from the models' published config.json files."""
HUB_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.1-8B": "llama-3-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b", "yahma/llama-7b-hf": "llama-2-7b",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "packaged:smollm2-135m": "smollm2-135m",
    "FacebookAI/roberta-base": "roberta-base", "roberta-base": "roberta-base",
}
"""``--random-weights``: the shape that stands in for a model id (LLaMA-1 7B has LLaMA-2 7B's shape)."""
