"""Chunked (fused LM-head) cross-entropy equals the plain loss, in value and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.config import Speed
from loralab.speed.losses import chunked_linear_cross_entropy, plain_linear_cross_entropy
from loralab.speed.step import causal_lm_loss, prepare_model


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_equals_plain(chunk_size, with_bias):
    torch.manual_seed(0)
    h = torch.randn(2, 25, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(300, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, 300, (2, 25))
    y[0, :5] = -100
    y[1, -3:] = -100
    inputs = [h, w] + ([b] if with_bias else [])
    plain = plain_linear_cross_entropy(h, w, y, b)
    g_plain = torch.autograd.grad(plain * 0.37, inputs)
    chunked = chunked_linear_cross_entropy(h, w, y, b, chunk_size=chunk_size)
    g_chunked = torch.autograd.grad(chunked * 0.37, inputs)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(g_chunked, g_plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_chunked_cross_entropy_frozen_head_and_bf16():
    torch.manual_seed(0)
    h = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(500, 32, dtype=torch.bfloat16)
    y = torch.randint(0, 500, (40,))
    plain = plain_linear_cross_entropy(h, w, y)
    (g_plain,) = torch.autograd.grad(plain, [h])
    chunked = chunked_linear_cross_entropy(h, w, y, chunk_size=16)
    (g_chunked,) = torch.autograd.grad(chunked, [h])
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_chunked.float(), g_plain.float(), rtol=2e-2, atol=2e-3)


def test_causal_lm_loss_chunked_equals_model_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=400))
    prepare_model(model, Speed(autocast=None, compile=False, lora_scale_at_rank=False, loss_chunk_size=5))
    ids = torch.randint(0, 400, (2, 11))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    loss, n = causal_lm_loss(model, batch)
    g = torch.autograd.grad(loss, [model.model.embed_tokens.weight])[0]
    ref = model(**batch).loss
    g_ref = torch.autograd.grad(ref, [model.model.embed_tokens.weight])[0]
    assert n.item() == 2 * (11 - 3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    unchunked, _ = causal_lm_loss(model, batch, chunked=False)
    torch.testing.assert_close(unchunked, ref, rtol=1e-5, atol=1e-6)
