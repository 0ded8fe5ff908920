"""QLoRA (Dettmers et al., NeurIPS 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314): the frozen base's linear layers are stored in 4-bit NormalFloat (NF4, one
absmax per block of 64 weights) and dequantised on the fly in every forward; the adapter (LoRA,
rsLoRA or DoRA, with its own init and optimizer) stays in float32 on top. It changes no part of the
method, only the base under it, so it is selected by training_parameters ``quantization: "nf4"``
and recorded as ``parts["base"] = "nf4"``.

Library: **bitsandbytes** (``bnb.nn.Linear4bit``, ``quant_type="nf4"``), because it is the
quantiser peft dispatches its own 4-bit LoRA/DoRA layers to (``peft.tuners.lora.bnb``), so the
adapter is a plain peft adapter and merging is peft's. bitsandbytes 0.50 installs from PyPI and
quantises, dequantises and runs NF4 matmuls on CPU (a pure-torch path; slow, fine for MiniLM
tests) as on CUDA; torchao's NF4 tensor would need our own peft layer dispatch. Every linear layer
outside the head is quantised (as QLoRA's ``bnb_4bit`` loading does), before the adapter is built.

LoftQ (``loftq.py``) is the init made for this base. Refused with NF4: the residual inits (PiSSA,
OLoRA, CorDA, MiLoRA, LoRA-GA, corrected SVD LoRA-FA) and seed 003's as-written SVD init. Their base is W − s·B₀A₀, which has to be quantised *after*
the init (QPiSSA's recipe); the adapter then belongs to that quantised residual, which plain
``PeftModel.from_pretrained`` on the quantised original cannot reproduce. Not built here.

Every adapter folder loralab saves gets ``loralab_base.json`` (``BASE_FILE``) beside
adapter_config.json: the base the adapter trained on (``float`` or ``nf4``, the frozen weights'
dtype; for NF4 the bitsandbytes settings and version, the device that quantised, and per quantised
module a SHA-256 of its packed weight and quantisation state). It is a file of its own, not a key
in adapter_config.json, because peft's config loader drops (and warns about) keys it does not
know, so a field there would not survive a load/save round trip; plain peft ignores the file, so
the folder stays a plain peft adapter. ``loralab merge`` reads it to re-quantise the base the same
way (``quantize_as_recorded``) and merge into the dequantised weights the trained model computed
with.

The FP8 base (``quantization: "fp8"``) is this module's sibling, ``fp8base.py``: ``check`` applies
the same composition rule to it, ``dequantize_linears`` and ``base_record`` cover both.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from loralab.methods import fp8base

QUANTIZATIONS = (None, "nf4", "fp8")
"""Allowed ``quantization`` values: float weights, NF4 (here), FP8 (``fp8base.py``)."""
RESIDUAL_REASON = (
    "the residual base W − s·B₀A₀ would have to be quantised after the init (QPiSSA), and plain "
    "PeftModel.from_pretrained on the NF4 original could not reproduce it"
)


def quantization(params) -> str | None:
    """training_parameters ``quantization`` (read with default None until config.py declares it)."""
    return getattr(params, "quantization", None)


def check(params, init) -> list[str]:
    """Problems of the ``quantization`` value and its combination with the init."""
    value = quantization(params)
    if value not in QUANTIZATIONS:
        return [f"'quantization' = {value!r} is not allowed; allowed: null, nf4, fp8"]
    key = None
    if init is not None:
        key = f"'init' = {params.init!r}" if init.key == "init" else f"adapter_config.json 'init_lora_weights' (init {init.name!r})"
    if value in ("nf4", "fp8") and init is not None and init.base == "float":
        reason = RESIDUAL_REASON if value == "nf4" else fp8base.RESIDUAL_REASON
        return [f"'quantization' = {value!r} with {key} does not compose: {reason}"]
    if value != "nf4" and init is not None and init.base == "nf4":
        return [f"{key} needs 'quantization' = 'nf4' (got {value!r}): its factors fit the NF4 quantisation error"]
    if value == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return ["'quantization' = 'nf4' needs the PyPI package 'bitsandbytes' (pip install bitsandbytes)"]
    if value == "fp8" and not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")):
        return [f"'quantization' = 'fp8' needs torch.float8_e4m3fn and torch._scaled_mm (torch {torch.__version__} lacks them)"]
    return []


@torch.no_grad()
def quantize_linears(model: nn.Module, names: list[str], compute_dtype=torch.float32) -> nn.Module:
    """Replace the nn.Linear modules ``names`` of ``model`` (in place) by bitsandbytes NF4
    ``Linear4bit`` layers holding the same weights quantised (blocks of 64, bitsandbytes' default
    double quantisation of the absmax statistics), on the weights' device; biases stay in float. Returns ``model``."""
    import bitsandbytes as bnb

    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu", torch.float32).clone(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        # bitsandbytes' CPU path repacks the weight for AVX512-BF16 kernels at the first eval-mode
        # forward, one way: training after an evaluation then fails. Keep the trainable layout.
        q.support_avx512bf16_for_cpu = False
        q = q.to(lin.weight.device)  # Params4bit quantises on its first move
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, q)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose NF4 ``Linear4bit`` (and FP8 ``Fp8Linear``) layers are plain
    nn.Linear with the dequantised weights (what the quantised base computes, for merge and reference checks)."""
    import copy

    return dequantize_linears(copy.deepcopy(model))


def _is_nf4(module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state") and type(module).__name__ == "Linear4bit"


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> nn.Module:
    """In place: every bitsandbytes ``Linear4bit`` of ``model`` becomes an nn.Linear holding the
    dequantised weight (the float weight every forward of the NF4 layer computes with), on the same
    device; bitsandbytes is imported only when there is one. FP8 layers (``fp8base``) likewise
    become nn.Linear of codes · scale. Returns ``model``."""
    fp8base.dequantize_linears(model)
    found = [(name, m) for name, m in model.named_modules() if _is_nf4(m)]
    if not found:
        return model
    from peft.utils.integrations import dequantize_bnb_weight

    for name, module in found:
        weight = dequantize_bnb_weight(module.weight, module.weight.quant_state)
        lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            lin.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


# ---- the base an adapter needs, saved beside it ---------------------------------------------------
BASE_FILE = "loralab_base.json"
RECORD_FORMAT = 1


def _fingerprint(weight) -> str:
    """SHA-256 of an NF4 weight as stored: packed 4-bit codes, absmax (and the nested state)."""
    import hashlib

    qs = weight.quant_state
    parts = [weight.data, qs.absmax] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
    h = hashlib.sha256()
    for t in parts:
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _settings(module) -> dict:
    w = module.weight
    return {"quant_type": w.quant_type, "blocksize": int(w.blocksize), "double_quant": bool(w.compress_statistics),
            "quant_storage": str(w.quant_storage).removeprefix("torch."),
            "dequantized_dtype": str(w.quant_state.dtype).removeprefix("torch."),
            "compute_dtype": str(module.compute_dtype).removeprefix("torch.") if module.compute_dtype else None}


def _base_name(name: str) -> str:
    """A module's name in the transformers model under peft's wrappers."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base was loaded in: that of its frozen, unquantised float weights."""
    floats = [p for n, p in model.named_parameters() if p.is_floating_point() and not p.requires_grad and "lora_" not in n]
    return floats[0].dtype if floats else torch.float32


def base_record(model: nn.Module) -> dict:
    """The base ``model`` (a peft model or a plain one) computes with: ``{"base": "float", ...}``,
    the NF4 record (settings, bitsandbytes version, device, a fingerprint per quantised module) or
    the FP8 record (``fp8base.record``)."""
    quantised = {_base_name(n): m for n, m in model.named_modules() if _is_nf4(m)}
    record = {"format": RECORD_FORMAT, "written_by": "loralab", "base": "nf4" if quantised else "float",
              "dtype": str(base_dtype(model)).removeprefix("torch.")}
    if not quantised and fp8base.has_fp8(model):
        return fp8base.record(model, record)
    if not quantised:
        return record
    import bitsandbytes

    settings = {name: _settings(m) for name, m in quantised.items()}
    distinct = {json.dumps(s, sort_keys=True) for s in settings.values()}
    first = next(iter(quantised.values()))
    record["quantization"] = {"library": "bitsandbytes", "version": bitsandbytes.__version__,
                              "device": first.weight.device.type, **next(iter(settings.values()))}
    if len(distinct) > 1:  # never made by quantize_linears; kept exact anyway
        record["module_settings"] = settings
    record["modules"] = {name: _fingerprint(m.weight) for name, m in quantised.items()}
    return record


def write_base_record(model: nn.Module, folder) -> None:
    """Write ``BASE_FILE`` (``base_record``) into the adapter folder ``folder``."""
    from pathlib import Path

    (Path(folder) / BASE_FILE).write_text(json.dumps(base_record(model), indent=1) + "\n")


def quantize_as_recorded(model: nn.Module, record: dict) -> list[str]:
    """Quantise ``model``'s recorded modules in place as ``quantize_linears`` does and compare them
    with the record (settings and fingerprints). Returns the differences; [] means the base is
    bitwise the one the adapter trained on."""
    import bitsandbytes

    names = list(record["modules"])
    modules = dict(model.named_modules())
    absent = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        return [f"the base has no linear layer {absent[0]!r} ({len(absent)} recorded module(s) absent): "
                "not the model the adapter trained on"]
    quantize_linears(model, names, compute_dtype=getattr(torch, record["quantization"].get("compute_dtype") or "float32"))
    modules = dict(model.named_modules())
    q = record["quantization"]
    problems = []
    wanted = record.get("module_settings") or {n: {k: q.get(k) for k in _settings(modules[n])} for n in names}
    differ = [n for n in names if _settings(modules[n]) != wanted[n]]
    if differ:
        problems.append(f"quantising here gives settings {_settings(modules[differ[0]])} for {differ[0]!r}, the adapter's "
                        f"base had {wanted[differ[0]]} ({len(differ)} module(s) differ)")
    changed = [n for n in names if n not in differ and _fingerprint(modules[n].weight) != record["modules"][n]]
    if changed:
        here = next(p for p in model.parameters()).device.type
        problems.append(
            f"{len(changed)} of {len(names)} NF4 module(s) quantise to other codes than the adapter's base (e.g. "
            f"{changed[0]!r}): a different base checkpoint or dtype, or a quantiser that rounds differently "
            f"(recorded: bitsandbytes {q.get('version')} on {q.get('device')}; here: bitsandbytes "
            f"{bitsandbytes.__version__} on {here})")
    return problems
