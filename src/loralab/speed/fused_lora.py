"""Fused LoRA linear: ``x Wᵀ + s·(x Aᵀ) Bᵀ`` with the adapter term accumulated into the base
output by the matmul itself, forward and backward.

peft computes ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``: the adapter output is
a separate activation-sized tensor, scaled in a second pass and added in a third; backward adds the
adapter's input gradient to the base layer's in yet another pass. At Llama-3-8B shapes those
passes read and write about a gigabyte per layer per step, all memory-bound. Here one autograd
function does

    forward:  out = x Wᵀ (+ b);  xa = x Aᵀ;  out += s · xa Bᵀ        (addmm into out)
    backward: g_xa = s · g B;  dx = g W;  dx += g_xa A                 (addmm into dx)
              dA = g_xaᵀ x;  dB = s · gᵀ xa

so the adapter costs only its two thin matmuls each way (the accumulate rides in the GEMM's
epilogue). Measured on an H100 (Llama-3-8B LoRA, 4 x 512, loralab bench): with torch.compile of
the layers on, this is 2.6 % *slower* than peft's forward compiled (14,656 vs 15,045 tokens/s):
inductor already fuses peft's adds into neighbouring elementwise kernels, and the opaque function
blocks those fusions. So it is off by default (``speed.fused_lora``); it stays for eager runs
(compile off), where nothing fuses the adds. Numbers: the same products in the same
dtype as peft under autocast (the compute dtype, fp32 results cast back for fp32 adapter
weights); equal to peft's forward and gradients to fp32 tolerance (tests/test_fused_lora.py).

What it shares with peft: everything but the forward. ``enable_fused_lora(model)`` makes each
plain-LoRA ``Linear`` a ``FusedLoraLinear`` (peft's class with this forward) that takes this path
when it applies (one active adapter, no dropout, not merged, a frozen ``nn.Linear`` base, no
mixed-adapter batch) and calls peft's own forward otherwise; names, state dict and the saved adapter
are untouched.

How a rewrite is installed (``install_lora_class``, shared with ``rank_scaling.py``): the module's
class becomes a subclass of peft's ``lora.Linear`` that overrides ``forward``. Not an instance
attribute: a bound method as the instance ``forward`` compiles well but does not pickle (pickle
stores it as ``getattr(module, name)``, which the loaded module lacks), and a ``functools.partial``
pickles but torch.compile guards it by its identity, so with one per layer each compiled decoder
layer was a new graph, the recompile limit (8) was hit and the other layers ran eagerly (measured on
an H100 at the Llama-3-8B shape, micro-batch 2: FP8-base LoRA 5,863 tokens/s with the partials,
14,907 with this class; results/bench-fair-h100/). A class is guarded by its type, which every layer
shares, and pickles and deep-copies by its import path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            out = F.linear(x2, w, None if bias is None else bias.to(dtype))
            xa = x2 @ a.T
            # out of place: under torch.compile an in-place addmm_ is functionalised into addmm + copy
            out = torch.addmm(out, xa, b.T, alpha=scaling)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        ctx.in_shape = shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, w, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        s = ctx.scaling
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        g_xa = (g @ b).mul_(s)
        dx = da = db = None
        if need_x:
            dx = torch.addmm(g @ w, g_xa, a)
            dx = dx.reshape(ctx.in_shape).to(x_dtype)
        if need_a:
            da = (g_xa.T @ x2).to(a_dtype)
        if need_b:
            db = (g.T @ xa).mul_(s).to(b_dtype)
        return dx, None, None, da, db, None


def fused_lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * (x @ lora_a.T) @ lora_b.T`` with a frozen weight/bias."""
    return _FusedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling)


def one_active_adapter(module: LoraLinear) -> str | None:
    """The one active adapter of peft LoRA layer ``module`` (adapters enabled and unmerged, exactly one active,
    with or without a variant), else None."""
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if module.disable_adapters or module.merged or len(adapters) != 1:
        return None
    return adapters[0]


def plain_active_adapter(module: LoraLinear) -> str | None:
    """The one active adapter of peft LoRA layer ``module`` where the LoRA forward rewrites may apply:
    ``one_active_adapter`` with no variant (DoRA) on it. None otherwise."""
    name = one_active_adapter(module)
    return None if name is None or name in module.lora_variant else name


class FusedLoraLinear(LoraLinear):
    """peft ``lora.Linear`` whose forward takes the fused path where it applies (``enable_fused_lora``)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        name = None if args or kwargs else plain_active_adapter(self)
        base = self.get_base_layer()
        if (name is None or type(base) is not nn.Linear or getattr(self, "fan_in_fan_out", False)
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if (not isinstance(dropout, nn.Identity) and self.training) or lora_a.bias is not None or lora_b.bias is not None:
            return super().forward(x, *args, **kwargs)
        return fused_lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name])


def install_lora_class(model: nn.Module, cls: type) -> int:
    """Make every peft LoRA ``Linear`` of ``model`` an instance of ``cls`` (a subclass of peft's
    ``lora.Linear`` overriding ``forward``); returns how many. Shared by the LoRA forward rewrites (this
    file, ``rank_scaling.py``): a module whose class is already not peft's own (another rewrite, FSDP's
    wrapper class, a subclass) or that has an instance ``forward`` (accelerate's hooks) is left as it is,
    so the first rewrite installed keeps it. Raises TypeError if ``cls`` is not such a subclass."""
    if not (isinstance(cls, type) and issubclass(cls, LoraLinear) and cls is not LoraLinear):
        raise TypeError(f"install_lora_class needs a subclass of peft's lora.Linear, got {cls!r}")
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in module.__dict__:
            module.__class__ = cls
            count += 1
    return count


def remove_lora_class(model: nn.Module, cls: type) -> int:
    """peft's ``lora.Linear`` again where ``install_lora_class`` set ``cls``; returns how many. A module
    given an instance ``forward`` since (accelerate's hooks keep the bound rewrite and call it) keeps
    ``cls``, as ``install_lora_class`` leaves such modules alone: its class is what that forward needs."""
    count = 0
    for module in model.modules():
        if type(module) is cls and "forward" not in module.__dict__:
            module.__class__ = LoraLinear
            count += 1
    return count


def enable_fused_lora(model: nn.Module) -> int:
    """Make the peft LoRA ``Linear`` layers of ``model`` ``FusedLoraLinear`` (those ``install_lora_class``
    takes: peft's own class, no instance forward); returns how many."""
    return install_lora_class(model, FusedLoraLinear)


def disable_fused_lora(model: nn.Module) -> int:
    """peft's class again where ``enable_fused_lora`` set it (``remove_lora_class``); returns how many."""
    return remove_lora_class(model, FusedLoraLinear)
