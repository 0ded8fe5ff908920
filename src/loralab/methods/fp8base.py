"""The FP8 base (issue 22, point 3): a base variation beside NF4 (``qlora.py``), selected by
training_parameters ``quantization: "fp8"`` and recorded as ``parts["base"] = "fp8"``.

Every linear layer outside the head (``common.linear_names``, as NF4) becomes a
``loralab.speed.fp8.Fp8Linear`` before the adapter is built: float8_e4m3fn weights with one
scale per output channel (amax/448), activations quantised per token at every forward, the
forward and input-gradient GEMMs through ``torch._scaled_mm``, no weight gradient. The adapter
(LoRA, rsLoRA or DoRA, its init and optimizer), norms, attention, embeddings, the head and the
loss keep their dtypes. A layer whose in or out features are not divisible by 16 (the CUDA
kernel's constraint) stays in float and is recorded (``fallback`` in the base record).

Composition follows NF4's rule, with the same check (``qlora.check``): the residual inits (PiSSA,
OLoRA, CorDA, MiLoRA, LoRA-GA, corrected SVD LoRA-FA) and seed 003's as-written SVD init are
refused naming both keys (their base W − s·B₀A₀ would have to be quantised after the init, and
the saved rank-2r adapter on the FP8 original would not reproduce it); LoftQ needs NF4. The fused
LoRA matmul reads the float base weight and is refused as for NF4; the fast DoRA forward takes its
norm from the FP8 codes and scales (``speed/fast_dora.py``).

Recorded in ``loralab_base.json`` (``qlora.BASE_FILE``): ``base: "fp8"``, the rule, torch's
version, the device that quantised, a SHA-256 per quantised module of its codes and scales, and
the float fallbacks. ``loralab merge`` re-quantises the float checkpoint by the same rule, checks
the fingerprints, and merges into the dequantised weights (codes · scale) in float32. The merged
model is the trained model's weights exactly; its outputs differ from the trained model's by the
activation quantisation the FP8 forward adds (the merged model runs unquantised activations).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from loralab.speed.fp8 import Fp8Linear, fits
from loralab.speed.fp8_qkv import unfuse_fp8_qkv

RESIDUAL_REASON = (
    "the residual base W − s·B₀A₀ would have to be quantised after the init, and plain "
    "PeftModel.from_pretrained on the FP8 original could not reproduce it"
)
FALLBACK_ATTR = "loralab_fp8_fallback"
"""Attribute set on the quantised model: {module name: [out, in]} of the layers left in float."""
RULE = {"format": "float8_e4m3fn", "weights": "per output channel, scale = amax * float32(1/448)",
        "activations": "per token, scale = amax * float32(1/448)", "kernel": "torch._scaled_mm"}


@torch.no_grad()
def quantize_linears(model: nn.Module, names: list[str]) -> dict[str, list[int]]:
    """Replace the nn.Linear modules ``names`` of ``model`` (in place) by ``Fp8Linear`` layers of
    the same weights, on the weights' device. Layers whose shape the kernel cannot take stay as
    they are. Returns (and sets as ``model.loralab_fp8_fallback``) {name: [out, in]} of those."""
    modules = dict(model.named_modules())
    fallback = {}
    for name in names:
        lin = modules[name]
        if not fits(lin):
            fallback[name] = [lin.out_features, lin.in_features]
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, Fp8Linear.from_linear(lin))
    setattr(model, FALLBACK_ATTR, fallback)
    return fallback


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> nn.Module:
    """In place: every ``Fp8Linear`` of ``model`` becomes a float32 nn.Linear holding its
    dequantised weight (codes · scale), on the same device; fused q/k/v trios are undone first (their buffers
    dropped: ``speed/fp8_qkv.unfuse_fp8_qkv``). Returns ``model``."""
    unfuse_fp8_qkv(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear)]:
        weight = module.dequantize()
        lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            lin.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


def fingerprint(module: Fp8Linear) -> str:
    """SHA-256 of an FP8 layer as stored: its codes, then its float32 scales."""
    h = hashlib.sha256()
    for t in (module.weight, module.weight_scale):
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def has_fp8(model: nn.Module) -> bool:
    """Whether ``model`` holds an FP8 layer."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def record(model: nn.Module, base: dict) -> dict:
    """``base`` (qlora.base_record's common keys) completed for an FP8 base: ``quantization``
    (the rule, torch's version, the device), ``modules`` ({name: fingerprint}), ``fallback``
    ({name: [out, in]} left in float)."""
    quantised = {_base_name(n): m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    fallback = next((getattr(m, FALLBACK_ATTR) for m in model.modules() if hasattr(m, FALLBACK_ATTR)), {})
    first = next(iter(quantised.values()))
    base = dict(base, base="fp8")
    base["quantization"] = {"library": "torch", "version": torch.__version__.split("+")[0],
                            "device": first.weight.device.type, **RULE}
    base["modules"] = {name: fingerprint(m) for name, m in quantised.items()}
    base["fallback"] = {_base_name(n): list(s) for n, s in fallback.items()}
    return base


def quantize_as_recorded(model: nn.Module, base: dict) -> list[str]:
    """Quantise ``model``'s recorded modules in place as ``quantize_linears`` does and compare them
    with the record ``base`` (fingerprints; fallbacks still float and unfit). Returns the
    differences; [] means the base is bitwise the one the adapter trained on."""
    names = list(base["modules"])
    modules = dict(model.named_modules())
    absent = [n for n in names + list(base.get("fallback", {})) if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        return [f"the base has no linear layer {absent[0]!r} ({len(absent)} recorded module(s) absent): "
                "not the model the adapter trained on"]
    quantize_linears(model, names)
    modules = dict(model.named_modules())
    problems = []
    unfit = [n for n in names if not isinstance(modules[n], Fp8Linear)]
    if unfit:
        problems.append(f"{len(unfit)} recorded FP8 module(s) have shapes the kernel cannot take here (e.g. {unfit[0]!r})")
    changed = [n for n in names if n not in unfit and fingerprint(modules[n]) != base["modules"][n]]
    if changed:
        q = base.get("quantization", {})
        problems.append(
            f"{len(changed)} of {len(names)} FP8 module(s) quantise to other codes or scales than the adapter's base "
            f"(e.g. {changed[0]!r}): a different base checkpoint or dtype (recorded: torch {q.get('version')} on "
            f"{q.get('device')}; here: torch {torch.__version__.split('+')[0]})")
    return problems
