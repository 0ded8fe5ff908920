"""Chunked (fused LM-head) cross-entropy equals the plain loss, in value and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.speed.losses import (
    chunk_loss_and_grad,
    chunked_linear_cross_entropy,
    compiled_chunk_loss,
    plain_linear_cross_entropy,
)
from loralab.speed.step import causal_lm_loss, prepare_model
from loralab.speed_settings import Speed


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


def _frozen_head_case(dtype):
    torch.manual_seed(1)
    h = torch.randn(2, 37, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(700, 32, dtype=dtype) / 4
    y = torch.randint(0, 700, (2, 37))
    y[0, :6] = -100
    weights = torch.rand(2, 37)
    return h, w, y, weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("token_weights", [False, True])
def test_the_fused_chunk_gives_the_loops_loss_and_gradient(dtype, token_weights):
    """A frozen, bias-free head's chunks through ``chunk_loss_and_grad`` (logits kept in the head's dtype, one call
    for loss and gradient) give the float32 loop's loss and input gradient: the same products, the softmax in float32
    either way; only the exponentials' order of summation differs."""
    h, w, y, weights = _frozen_head_case(dtype)
    tw = weights if token_weights else None
    loop = chunked_linear_cross_entropy(h, w, y, chunk_size=16, token_weights=tw)
    (g_loop,) = torch.autograd.grad(loop * 0.5, [h])
    fused = chunked_linear_cross_entropy(h, w, y, chunk_size=16, token_weights=tw, chunk_fn=chunk_loss_and_grad)
    (g_fused,) = torch.autograd.grad(fused * 0.5, [h])
    assert fused.dtype == torch.float32 and g_fused.dtype == dtype
    torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g_fused.float(), g_loop.float(), **tol)
    assert (g_fused[0, :6] == 0).all()  # ignored labels get no gradient


def test_the_fused_chunk_is_not_taken_where_the_head_trains_or_is_adapted():
    """A trained head (its weight's gradient), a bias, a LoRA head or no gradient at all keep the float32 loop:
    ``chunk_fn`` is never called."""
    h, w, y, _ = _frozen_head_case(torch.float32)
    calls = []

    def spy(*args):
        calls.append(1)
        return chunk_loss_and_grad(*args)

    trained = w.clone().requires_grad_(True)
    chunked_linear_cross_entropy(h, trained, y, chunk_size=16, chunk_fn=spy).backward()
    chunked_linear_cross_entropy(h, w, y, bias=torch.zeros(700), chunk_size=16, chunk_fn=spy)
    chunked_linear_cross_entropy(h, w, y, chunk_size=16, chunk_fn=spy, low_rank=(torch.randn(2, 37, 4), torch.randn(700, 4), 2.0))
    assert calls == []
    with torch.no_grad():  # evaluation: no gradient to compute, so the loop (which skips it)
        chunked_linear_cross_entropy(h, w, y, chunk_size=16, chunk_fn=spy)
    assert calls == []
    chunked_linear_cross_entropy(h, w, y, chunk_size=16, chunk_fn=spy)
    assert len(calls) == 5  # 74 tokens in chunks of 16


@pytest.mark.slow  # one inductor compile on CPU (~10-20 s)
def test_the_compiled_chunk_equals_the_eager_one():
    """What the step runs on CUDA with compiled layers (``compiled_chunk_loss``, here inductor on CPU) computes the eager
    function's loss and bf16 gradient, across chunk lengths (one dynamic graph)."""
    compiled = compiled_chunk_loss("inductor")
    for rows in (16, 5):
        torch.manual_seed(rows)
        logits = (torch.randn(rows, 700) * 3).to(torch.bfloat16)
        target = torch.randint(0, 700, (rows,))
        weights = torch.rand(rows)
        want = chunk_loss_and_grad(logits, target, weights)
        got = compiled(logits, target, weights)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
        assert got[1].dtype == torch.bfloat16
        torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-2, atol=1e-4)


def test_causal_lm_loss_chunked_equals_model_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=400))
    prepare_model(model, Speed(autocast=None, compile=False, lora_scale_at_rank=False, lora_shared_input=False, loss_chunk_size=5))
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


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_cross_entropy_with_a_lora_head_equals_plain(chunk_size):
    """The low-rank term of a LoRA head (logits + s · u Bᵀ) computed per chunk: the loss and the
    gradients of hidden, u and B equal the full-logits reference (float64)."""
    torch.manual_seed(0)
    h = torch.randn(2, 25, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64)  # the frozen base head
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(300, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (2, 25))
    y[0, :5] = -100
    weights = torch.rand(2, 25, dtype=torch.float64)
    losses = []
    for fn in (plain_linear_cross_entropy, chunked_linear_cross_entropy):
        u = h @ a.T
        kw = {"chunk_size": chunk_size, "token_weights": weights} if fn is chunked_linear_cross_entropy else {}
        loss = fn(h, w, y, low_rank=(u, b, 0.5), **kw)
        if fn is plain_linear_cross_entropy:  # the reference weights each token's loss itself
            logits = torch.nn.functional.linear(h.reshape(-1, 16), w) + 0.5 * (u.reshape(-1, 4) @ b.T)
            per = torch.nn.functional.cross_entropy(logits, y.reshape(-1), ignore_index=-100, reduction="none")
            loss = (per * weights.reshape(-1)).sum()
        losses.append((loss, torch.autograd.grad(loss * 0.37, [h, a, b])))
    (ref, g_ref), (got, g_got) = losses
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for x, want in zip(g_got, g_ref):
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="low_rank: u"):
        chunked_linear_cross_entropy(h, w, y, low_rank=(h @ a.T, b[:10], 0.5))


@pytest.mark.parametrize("rank_scaling", [False, True], ids=["peft-forward", "scale-at-rank"])
@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj"]], ids=["head-adapted", "head-plain"])
def test_causal_lm_loss_with_an_adapted_head_equals_peft(targets, rank_scaling):
    """seed 000's recipes adapt ``lm_head``: the fused loss takes the LoRA head without full logits and
    gives peft's loss and the adapters' gradients (the head's lora_A/lora_B included)."""
    from peft import LoraConfig, get_peft_model

    from loralab.speed.step import uses_fused_loss

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=400))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    prepare_model(model, Speed(autocast=None, compile=False, lora_scale_at_rank=rank_scaling, lora_shared_input=False, loss_chunk_size=5))
    assert uses_fused_loss(model) is True
    ids = torch.randint(0, 400, (2, 11))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, _ = causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, trainable)
    ref = model(**batch).loss
    grads_ref = torch.autograd.grad(ref, trainable)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_dora_or_merged_head_takes_the_full_logits():
    from peft import LoraConfig, get_peft_model

    from loralab.speed.step import uses_fused_loss

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    speed = Speed(autocast=None, compile=False, lora_scale_at_rank=False, lora_shared_input=False)
    dora = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["lm_head"], use_dora=True))
    prepare_model(dora, Speed(autocast=None, compile=False, lora_scale_at_rank=False, lora_shared_input=False, fast_dora=False))
    merged = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["lm_head"]))
    prepare_model(merged, speed)
    assert uses_fused_loss(merged) is True
    merged.base_model.model.lm_head.merge()
    assert uses_fused_loss(dora) is False and uses_fused_loss(merged) is False


@pytest.mark.parametrize("case", ["bf16-base-no-autocast", "dropout-train"])
def test_an_adapted_head_matches_peft_where_it_casts_or_drops_out(case):
    """A bf16 base without autocast (CPU runs of seed 000's bf16 recipe): the head's input is cast to
    the fp32 adapter as peft casts it. lora_dropout > 0 in training: the head's mask is drawn over
    every position as peft draws it, so the loss and the random stream after it are peft's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=400))
    bf16 = case == "bf16-base-no-autocast"
    model = get_peft_model(base.to(torch.bfloat16) if bf16 else base,
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False,
                                      lora_dropout=0.0 if bf16 else 0.3))
    prepare_model(model, Speed(autocast=None, compile=False, lora_scale_at_rank=False, lora_shared_input=False, loss_chunk_size=5))
    model.train()
    ids = torch.randint(0, 400, (2, 11))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(7)
    ref = model(**batch).loss
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    got, _ = causal_lm_loss(model, batch)
    after_got = torch.rand(3)
    if bf16:  # peft rounds the logits to bf16; the fused loss keeps them in fp32
        torch.testing.assert_close(got, ref.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(after_got, after_ref)
