"""Memory-lean cross-entropy: the LM-head projection and the loss fused, chunked over tokens.

A causal LM's loss normally materialises ``tokens × vocab`` logits, upcasts them to fp32 and keeps
them (and their softmax) for backward: at 2,048 tokens and Llama-3's 128,256-word vocabulary that
is a few GiB, more than all LoRA activations of a layer. Here the loss is computed chunk by chunk
of tokens: each chunk's logits ``h_c Wᵀ`` live only while their loss and their gradients
(``softmax − onehot``, folded back through W into ``∂L/∂h_c`` and, if W trains, into ``∂L/∂W``)
are computed, all inside the forward. Backward then only scales those stored gradients by the
incoming gradient, so neither pass ever holds more than one chunk of logits.

A LoRA-adapted head (seed 000's recipes adapt ``lm_head``) adds its low-rank term per chunk:
logits ``h_c Wᵀ + s · u_c Bᵀ`` with ``u = dropout(h) Aᵀ`` (tokens × r) computed outside by autograd;
the chunk's gradient goes into ``∂L/∂u_c = s · G_c B`` and ``∂L/∂B += s · G_cᵀ u_c`` (Hu et al. 2021,
eq. 3; peft's ``lora.Linear.forward``), so the adapted head never holds the full logits either.

The result equals ``F.cross_entropy(h @ W.T (+ b), labels, ignore_index=-100, reduction="sum")``
to fp32 tolerance (logits and softmax are fp32 per chunk, as the plain loss upcasts them). With
per-token ``weights`` it is the weighted sum ``Σ_t w_t · CE_t``: the training step gives every token
the weight that makes the optimizer batch's loss exact under either normalisation
(``loralab.run.step``), so micro-batches add up to it whatever their size.
"""

from __future__ import annotations

import torch

from loralab.data import IGNORE_INDEX


def chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor):
    """One chunk's ``(Σ_t w_t · CE_t, (softmax − onehot) · w)`` from its logits in the head's dtype: ``logits``
    (T, V) bf16/fp16/fp32, ``target`` (T,) int64 in [0, V), ``w`` (T,) float32 (0 on ignored rows). Returns a
    float32 scalar and the gradient (T, V) in ``logits``' dtype; every step between is in float32, as the eager
    path computes it (``_ChunkedLinearCrossEntropy``), to float32 rounding of the exponentials' sums.

    Why a function of its own: the step compiles it (``compiled_chunk_loss``), so inductor fuses the row's
    log-sum-exp and the gradient, written in the head's dtype, into a few kernels over the 16-bit logits (their
    count not profiled). Eager, the chunk's float32 copy, log-sum-exp, softmax, one-hot
    and weighting each pass over a float32 (T, V) tensor: at Llama-3's 128,256-word vocabulary, 1,024-token
    chunks and 2,048 tokens, ~6 ms of an H100's 132 ms bf16 LoRA step by its kernels' names (results/bench-profile-h100-1206;
    the compiled form's saving is not measured alone)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, target[:, None]).squeeze(1)
    total = ((lse - picked) * w).sum()
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    g = (torch.exp(x - lse[:, None]) - hit.to(x.dtype)) * w[:, None]
    return total, g.to(logits.dtype)


_COMPILED: dict = {}


def compiled_chunk_loss(backend="inductor"):
    """``chunk_loss_and_grad`` compiled with ``backend`` (dynamic in both sizes: chunks differ in length), one
    per backend for the process."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(chunk_loss_and_grad, backend=backend, dynamic=True)
    return _COMPILED[backend]


def _targets_and_weights(y: torch.Tensor, token_weights: torch.Tensor | None, start: int, dtype: torch.dtype):
    """A chunk's labels ``y`` (T,) starting at token ``start``: the targets (ignored labels -> 0, any valid index)
    and each token's weight in ``dtype`` (0 where ignored, else ``token_weights``' entry or 1)."""
    valid = y != IGNORE_INDEX
    w = valid.to(dtype)
    if token_weights is not None:
        w = w * token_weights[start:start + y.shape[0]].to(dtype)
    return torch.where(valid, y, torch.zeros_like(y)), w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, token_weights, u=None, lora_b=None, scale=1.0,
                chunk_fn=None):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, bias, labels, chunk_size, token_weights,
                                                       u, lora_b, scale, chunk_fn)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, chunk_size, token_weights, u, lora_b, scale, chunk_fn):
        n, _ = hidden.shape
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 logits (fp64 stays fp64)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        low_rank = u is not None
        need_u, need_lb = low_rank and ctx.needs_input_grad[6], low_rank and ctx.needs_input_grad[7]
        if chunk_fn is not None and need_h and not (need_w or bias is not None or low_rank) and acc == torch.float32:
            return _ChunkedLinearCrossEntropy._fused(ctx, hidden, weight, labels, chunk_size, token_weights, chunk_fn)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_u = torch.empty_like(u) if need_u else None
        grad_lb = torch.zeros(lora_b.shape, dtype=acc, device=lora_b.device) if need_lb else None
        b_acc = lora_b.to(acc) if low_rank else None  # the low-rank logits term is added in fp32, into the logits
        b_low = lora_b.to(weight.dtype) if need_u else None  # u's gradient in the head's compute dtype, as grad_h
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(weight.dtype)
            y = labels[start:start + chunk_size]
            logits = (h @ weight.T).to(acc)
            if low_rank:  # in place: no second (chunk x vocab) tensor
                u_c = u[start:start + chunk_size].to(acc)
                logits.addmm_(u_c, b_acc.T, alpha=scale)
            if bias is not None:
                logits = logits + bias.to(acc)
            target, w = _targets_and_weights(y, token_weights, start, acc)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * w).sum()
            if need_h or need_w or need_b or need_u or need_lb:
                # d(sum loss)/d logits = softmax - onehot on valid rows, 0 on ignored rows.
                g = torch.softmax(logits, dim=-1)
                g.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
                g.mul_(w[:, None])
                g_low = g.to(weight.dtype) if need_h or need_u else None  # one copy for both products
                if need_h:
                    grad_h[start:start + chunk_size] = (g_low @ weight).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.T, h.to(acc))
                if need_b:
                    grad_b += g.sum(dim=0)
                if need_u:
                    grad_u[start:start + chunk_size] = ((g_low @ b_low) * scale).to(u.dtype)
                if need_lb:
                    grad_lb.addmm_(g.T, u_c, alpha=scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b, grad_u, grad_lb)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if u is None else u.dtype, None if lora_b is None else lora_b.dtype)
        return total

    @staticmethod
    def _fused(ctx, hidden, weight, labels, chunk_size, token_weights, chunk_fn):
        """The frozen, bias-free, unadapted head with ``chunk_fn`` (``chunk_loss_and_grad`` or its compiled form):
        per chunk the logits stay in the head's dtype and one call gives the loss and ``∂L/∂logits`` in it, the
        same values the loop in ``_forward`` computes (its float32 gradient is cast to the head's dtype there too)."""
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(weight.dtype)
            target, w = _targets_and_weights(labels[start:start + chunk_size], token_weights, start, torch.float32)
            part, g = chunk_fn(h @ weight.T, target, w)
            total += part
            if grad_h is not None:
                grad_h[start:start + chunk_size] = (g @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_h, None, None, None, None)
        ctx.dtypes = (hidden.dtype, None, None, None, None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else (g * grad_out).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        grad_h, grad_w, grad_b, grad_u, grad_lb = grads
        return grad_h, grad_w, grad_b, None, None, None, grad_u, grad_lb, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 bias: torch.Tensor | None = None, chunk_size: int = 1024,
                                 token_weights: torch.Tensor | None = None,
                                 low_rank: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                                 chunk_fn=None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (-100 ignored).

    ``hidden`` is (tokens, d) or (..., d); labels (and ``token_weights``, float, optional) match its
    leading shape. ``low_rank``: a LoRA head's ``(u, lora_B weight, scaling)``, u = ``lora_A(dropout(hidden))``
    shaped (..., r) like hidden's leading shape, lora_B (vocab, r): the logits gain ``scaling · u @ lora_Bᵀ``
    (module docstring). Returns an fp32 scalar: ``Σ_t w_t · CE_t`` over valid tokens (w = 1 when
    ``token_weights`` is None, so divide by the number of valid labels for the mean). ``chunk_fn``:
    ``chunk_loss_and_grad`` or its compiled form (``compiled_chunk_loss``), which a frozen, bias-free head
    without ``low_rank`` in a 16-bit or float32 dtype uses per chunk, where ``hidden`` needs a gradient, instead of
    float32 logits (the same values to float32 rounding); None, any other head, or no gradient (evaluation): the
    float32 loop, which computes no gradient there.
    Raises ValueError when the shapes disagree or ``chunk_size`` < 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size!r}: must be a positive integer")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but labels has {labels.shape[0]}")
    if token_weights is not None:
        token_weights = token_weights.reshape(-1)
        if token_weights.shape[0] != labels.shape[0]:
            raise ValueError(f"token_weights has {token_weights.shape[0]} entries but labels has {labels.shape[0]}")
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        chunk_fn = None  # no gradient wanted (the Function's forward cannot tell: it runs with grad mode off)
    if low_rank is None:
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, token_weights, None, None,
                                                1.0, chunk_fn)
    u, lora_b, scale = low_rank
    u = u.reshape(-1, u.shape[-1])
    if u.shape[0] != labels.shape[0] or lora_b.shape != (weight.shape[0], u.shape[1]):
        raise ValueError(f"low_rank: u {tuple(u.shape)} and lora_B {tuple(lora_b.shape)} do not fit {labels.shape[0]} "
                         f"tokens and the head's {tuple(weight.shape)}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, token_weights, u, lora_b,
                                            float(scale))


def plain_linear_cross_entropy(hidden, weight, labels, bias=None, low_rank=None) -> torch.Tensor:
    """The reference: full logits (with a LoRA head's ``low_rank`` term), fp32 upcast, summed cross-entropy."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if low_rank is not None:
        u, lora_b, scale = low_rank
        logits = logits + scale * (u.reshape(-1, u.shape[-1]) @ lora_b.T)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
