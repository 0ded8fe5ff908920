"""LoRA's scaling applied at the rank: ``result + B(s·(A x))`` where peft computes ``result + B(A x)·s``
(``speed.lora_scale_at_rank``).

Why: in peft's order the backward of ``B(A x)·s`` makes ``s·grad``, a (tokens × out_features)
tensor, for ``lora_B``'s two gradient products, in every adapted layer and step (at the Llama-3-8B
shape with every linear layer adapted, 2,048 tokens: 176 MB per decoder layer, 5.6 GB written per
step). With the scaling on the r-wide intermediate the backward hands ``lora_B`` the layer's output
gradient as it is; the multiply by s falls on a (tokens × r) tensor (in eager mode the forward also
skips peft's activation-sized ``·s`` pass; compiled, inductor fuses that pass either way).

Exact, bit for bit: the rewrite is taken only where s is a power of two (peft's ``lora_alpha / r``
with both powers of two, e.g. 16/8, 64/32) and the adapter computes in float32 or bfloat16:
multiplying by a power of two commutes with every rounding of a matmul there (binary floating point;
barring overflow and subnormals, which float32's and bfloat16's exponent range keeps out of reach),
so every output and gradient equals peft's. float16's normal range ends at 6.1e-5, where gradients
and small ``A x`` values fall, and there scaling before or after a rounding differs: float16 takes
peft's forward (measured: 27 of 28 gradients of a small Llama differed otherwise). Other scalings (rsLoRA's α/√r, say),
adapter-bearing layers with a variant (DoRA: ``fast_dora.py`` does the same inside its combine),
``lora_B`` biases, several active adapters, merged or disabled adapters and extra forward arguments
take peft's own forward.

What it shares with peft: everything but the line that adds the adapter's output; ``enable_rank_scaling``
makes each plain-LoRA ``Linear`` a ``RankScaledLoraLinear`` (peft's class with this forward, installed
as ``fused_lora.py``'s docstring says why; state dict, names and the saved adapter are untouched),
``disable_rank_scaling`` makes it peft's again. On by default (``"auto"``: unless ``fused_lora`` is
on or the adapters compute in float16): FP8-base LoRA at the Llama-3-8B shape ran 1.028x and 1.027x peft's order on an
H100, micro-batch 4, off and on back to back (results/bench-fair-h100/, rankab-*.json).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from loralab.speed.fused_lora import install_lora_class, plain_active_adapter, remove_lora_class


def is_power_of_two(value: float) -> bool:
    """Whether ``value`` is ±2^k (multiplying by it is exact in binary floating point)."""
    return value != 0 and math.isfinite(value) and math.frexp(abs(value))[0] == 0.5


def _rank_adapter(module, x: torch.Tensor | None) -> str | None:
    """The one active adapter whose forward ``RankScaledLoraLinear`` rewrites on ``module`` (for ``x``;
    None: whatever the input), or None where peft's own forward runs (the module docstring's cases)."""
    name = plain_active_adapter(module)
    if name is None or module.lora_B[name].bias is not None or not is_power_of_two(module.scaling[name]):
        return None
    if x is not None:  # float16 compute: autocast's dtype under autocast, else the input's or the adapter's
        half = (torch.get_autocast_dtype(x.device.type) == torch.float16 if torch.is_autocast_enabled(x.device.type)
                else torch.float16 in (x.dtype, module.lora_A[name].weight.dtype))
        if half:
            return None
    return name


def takes_rank_scaling(module, x: torch.Tensor | None = None) -> bool:
    """Whether ``RankScaledLoraLinear.forward`` takes its path on ``module`` (for ``x``; None: whatever the input)."""
    return _rank_adapter(module, x) is not None


class RankScaledLoraLinear(LoraLinear):
    """peft ``lora.Linear`` with the scaling at the rank where that is exact, peft's own forward otherwise."""

    def forward(self, x, *args, **kwargs):
        name = None if args or kwargs else _rank_adapter(self, x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        result_dtype = result.dtype
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        result = result + lora_B(lora_A(self.lora_dropout[name](x)) * self.scaling[name])
        return result.to(result_dtype)


def enable_rank_scaling(model: nn.Module) -> int:
    """Make every peft LoRA ``Linear`` of ``model`` (still peft's own class) a ``RankScaledLoraLinear``
    (``prepare_model`` refuses it beside ``fused_lora``'s); returns how many."""
    return install_lora_class(model, RankScaledLoraLinear)


def disable_rank_scaling(model: nn.Module) -> int:
    """peft's forward again where ``enable_rank_scaling`` set this one; returns how many."""
    return remove_lora_class(model, RankScaledLoraLinear)


def rank_scaling_summary(model: nn.Module) -> tuple[int, int]:
    """(layers of class ``RankScaledLoraLinear`` whose adapter it applies to now, layers of that
    class): for the run's log, so a setting that applies nowhere (rsLoRA, α/r not a power of
    two) does not pass unnoticed. Input-dependent cases (float16) are not counted out: ``Speed.resolve``
    leaves "auto" off where the adapters compute in float16."""
    layers = [m for m in model.modules() if type(m) is RankScaledLoraLinear]
    return sum(takes_rank_scaling(m) for m in layers), len(layers)
