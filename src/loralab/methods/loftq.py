"""LoftQ (Li et al., ICLR 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models", arXiv:2310.08659): quantise W and start the adapter at the best rank-r fit of the
quantisation error, so Q + s·B·A ≈ W instead of QLoRA's Q. One alternation (T = 1, peft's
default ``loftq_iter``): Q = NF4(W), W − Q = U S Vᵀ, A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s).

An init variation for the NF4 base (``quantization: "nf4"``; refused on a float base):
``init_lora_weights: "loftq"`` + ``loftq_config: {loftq_bits: 4, loftq_iter: 1}``. Ours, not
peft's ``loftq_init``: peft 0.21 runs it on CUDA only (its compute device is hard-coded), and it
overwrites the base with the dequantised Q, which we already hold as the NF4 base. With T = 1 the
base is exactly NF4(W), so the adapter reloads with plain ``PeftModel.from_pretrained`` on the
NF4-quantised original; T > 1 changes the base (Q_T = NF4(W − s·B_{T−1}A_{T−1})) and is refused
for that reason. DoRA is refused: its magnitude would start from ||Q||, not ||Q + s·B·A||.
"""

import copy

import torch

from loralab.methods.common import build_peft, init_each_layer, lora_modules
from loralab.methods.parts import Init


def _check(model, cfg, params) -> list[str]:
    lc = cfg.loftq_config or {}
    problems = []
    if lc.get("loftq_bits", 4) != 4:
        problems.append(f"adapter_config.json 'loftq_config.loftq_bits' = {lc.get('loftq_bits')!r}: only 4 (NF4) is supported")
    if lc.get("loftq_iter", 1) != 1:
        problems.append(
            f"adapter_config.json 'loftq_config.loftq_iter' = {lc.get('loftq_iter')!r}: only 1 is supported "
            "(more alternations change the base away from NF4(W), which the saved adapter could not reload onto)"
        )
    return problems


def _build(model, cfg, params, ctx):
    from peft.utils.integrations import dequantize_bnb_weight

    plain = copy.deepcopy(cfg)
    plain.init_lora_weights, plain.loftq_config = True, {}  # peft's own LoftQ would run on CUDA only
    peft_model = build_peft(model, plain)
    peft_model.peft_config["default"].init_lora_weights = True
    names = {id(layer): name.removeprefix("base_model.model.") for name, layer in lora_modules(peft_model)}

    def factors(layer):
        base = layer.get_base_layer()
        W = ctx.float_weights[names[id(layer)]].to(base.weight.device, torch.float32)
        Q = dequantize_bnb_weight(base.weight, base.weight.quant_state).float()
        r, s = layer.r["default"], layer.scaling["default"]
        u, sv, vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = (sv[:r] / s).sqrt()
        return root[:, None] * vh[:r], u[:, :r] * root

    init_each_layer(peft_model, factors, residual=False)
    return peft_model


INIT = Init(
    name="loftq",
    summary="NF4 base + adapter = rank-r SVD of the quantisation error W − NF4(W) (init_lora_weights=loftq; quantization=nf4)",
    key="init_lora_weights",
    values=("loftq",),
    build=_build,
    check=_check,
    preserves_output=False,
    base="nf4",
    needs_float_weights=True,
    refuses={"layer:dora": "its magnitude would start from ||Q||, not ||Q + s·B·A||",
             "layer:dora_magnitude_only": "its magnitude would start from ||Q||, not ||Q + s·B·A||"},
)
